"""``var sample``: draw class-conditional (VAR) or text-to-image (Infinity: ``--prompt``) samples and save a PNG
grid (and optionally an npz).

Its sampling-setting and sampler-option flags come from var/sample/arguments.py (derived from the
declarations).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from var.models.infinity import Infinity
from var.models.infinity_schedules import parse_aspect, schedule_for
from var.sample.arguments import (
    add_model_arguments,
    add_sampler_arguments,
    add_settings_arguments,
    load_models,
    sampler_options_from_args,
    settings_from_args,
)
from var.sample.batches import sample_in_batches
from var.sample.registry import build_sampler
from var.text import FLAN_T5_XL, T5TextEncoder
from var.utils import atomic_savez, resolve_device, save_grid


def memory_summary(stats: dict) -> str:
    """One line on the KV cache (and CUDA peak) of a batch, from its sampler stats."""
    mib = 2**20
    line = f"KV cache {stats['kv_bytes'] / mib:.2f} MiB allocated, {stats['kv_bytes_held'] / mib:.2f} MiB held"
    if stats.get("peak_cuda_bytes") is not None:
        line += f"; peak CUDA memory {stats['peak_cuda_bytes'] / mib:.0f} MiB"
    return line


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("sample", help="sample images and write a PNG grid")
    add_model_arguments(parser)
    add_settings_arguments(parser)
    add_sampler_arguments(parser)
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--labels", type=int, nargs="+", help="class labels (-1 = unconditional)")
    which.add_argument("--per-class", type=int, help="this many samples of every class, one row per class")
    which.add_argument("--prompt", nargs="+", help="Infinity: prompts, one image each")
    which.add_argument("--prompts", help="Infinity: a text file of prompts, one per line")
    text = parser.add_argument_group("text-to-image (Infinity)")
    text.add_argument("--text-encoder", default=FLAN_T5_XL,
                      help="T5 model id in the local Hugging Face cache, or its folder (never downloaded)")
    text.add_argument("--resolution", default="1M",
                      help="schedule level: 0.06M, 0.25M, 0.60M, 1M or the square side 256, 512, 768, 1024")
    text.add_argument("--aspect", default="1:1", help="W:H (16:9 is landscape) or height/width; the nearest "
                                                      "official template is used")
    parser.add_argument("--out", default="samples.png", help="PNG grid to write")
    parser.add_argument("--npz", help="also write the samples as an npz (arr_0: uint8 NHWC, labels)")
    parser.add_argument("--nrow", type=int, help="images per grid row")
    parser.set_defaults(func=run)


def read_prompts(args: argparse.Namespace) -> list[str] | None:
    """The prompts of --prompt / --prompts (None for class-conditional sampling)."""
    if args.prompts:
        path = Path(args.prompts)
        if not path.is_file():
            raise SystemExit(f"--prompts {path}: no such file (one prompt per line)")
        prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if not prompts:
            raise SystemExit(f"--prompts {path} holds no prompt")
        return prompts
    return args.prompt


def run(args: argparse.Namespace) -> None:
    device = resolve_device(args.device)
    prompts = read_prompts(args)
    encoder = T5TextEncoder(args.text_encoder, device=device) if prompts else None  # missing T5: fail first
    vqvae, model = load_models(args, device)
    if isinstance(model, Infinity):
        if prompts is None:
            raise SystemExit("Infinity is text-to-image: give --prompt 'a photo of a cat' or --prompts FILE")
        model.use_schedule(schedule_for(parse_aspect(args.aspect), args.resolution))
    elif prompts is not None:
        raise SystemExit(f"--prompt needs a text-to-image model (Infinity); {type(model).__name__} takes --labels")
    options = sampler_options_from_args(args, device)
    sampler = build_sampler(args.sampler, model, vqvae, settings_from_args(args), **options)
    if prompts is not None:
        labels = encoder.encode_infinity(prompts)
        del encoder  # T5 is not needed while sampling
        nrow = args.nrow or min(8, len(labels))
    elif args.labels is not None:
        labels = torch.tensor(args.labels)
        nrow = args.nrow or min(8, len(labels))
    else:
        per_class = args.per_class or 1
        labels = torch.arange(model.num_classes).repeat_interleave(per_class)
        nrow = args.nrow or (per_class if args.per_class else math.ceil(math.sqrt(len(labels))))
    stats: list[dict] = []
    images = sample_in_batches(sampler, labels, args.batch_size, args.seed, device, args.dtype, stats=stats)
    sizes = [len(labels[start:start + args.batch_size]) for start in range(0, len(labels), args.batch_size)]
    passes = [batch["passes_per_image"] for batch in stats]
    mean_passes = sum(p * size for p, size in zip(passes, sizes, strict=True)) / len(labels)
    print(f"{args.sampler}: {mean_passes:.2f} forward passes per image")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_grid(images, out, nrow=nrow)
    print(f"wrote {len(images)} samples to {out} ({memory_summary(stats[0])} in the first batch)")
    if args.npz:
        conditions = {"prompts": prompts} if prompts is not None else {"labels": labels.numpy()}
        atomic_savez(args.npz, arr_0=images.permute(0, 2, 3, 1).numpy(), **conditions)
        print(f"wrote {args.npz}")
