"""``var sample``: draw class-conditional (or, with a text-to-image LlamaGen, prompted) samples and save a PNG
grid (and optionally an npz).

Its sampling-setting and sampler-option flags come from var/sample/arguments.py (derived from the
declarations).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import torch

from var.models.llamagen import Captions
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
    which.add_argument("--prompt", action="append", help="a prompt for a text-to-image model (repeat for more)")
    which.add_argument("--prompts", help="a file of prompts, one per line, for a text-to-image model")
    parser.add_argument("--text-encoder", default=FLAN_T5_XL,
                        help="T5 encoder of the prompts: a model id in the local Hugging Face cache, or a folder")
    parser.add_argument("--out", default="samples.png", help="PNG grid to write")
    parser.add_argument("--npz", help="also write the samples as an npz (arr_0: uint8 NHWC, labels or prompts)")
    parser.add_argument("--nrow", type=int, help="images per grid row")
    parser.set_defaults(func=run)


def read_prompts(args: argparse.Namespace) -> list[str]:
    """--prompt values, or the non-empty lines of --prompts."""
    if args.prompts is None:
        return args.prompt or []
    path = Path(args.prompts)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} does not exist (one prompt per line)")
    prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"prompt file {path} holds no prompt (one per line)")
    return prompts


def prompt_conditions(prompts: list[str], encoder: T5TextEncoder, model) -> Captions:
    """LlamaGen t2i captions of ``prompts``: cleaned, T5-encoded to the model's caption length, left padded."""
    if getattr(getattr(model, "config", None), "model_type", None) != "t2i":
        raise ValueError(f"--prompt/--prompts need a text-to-image model; this {type(model).__name__} is "
                         "class-conditional (use --labels or --per-class)")
    return Captions(*encoder.encode_llamagen(prompts, max_length=model.config.cls_token_num))


def run(args: argparse.Namespace) -> None:
    device = resolve_device(args.device)
    prompts = read_prompts(args)
    encoder = T5TextEncoder(args.text_encoder, device=device) if prompts else None  # missing: fails before loading
    vqvae, model = load_models(args, device)
    options = sampler_options_from_args(args, device)
    sampler = build_sampler(args.sampler, model, vqvae, settings_from_args(args), **options)
    extra = {}
    if not prompts and getattr(getattr(model, "config", None), "model_type", None) == "t2i":
        raise ValueError("this text-to-image model samples prompts: pass --prompt TEXT or --prompts FILE")
    if prompts:
        conditions = prompt_conditions(prompts, encoder, model)
        del encoder
        nrow = args.nrow or min(8, len(prompts))
        extra["prompts"] = np.array(prompts)
    elif args.labels is not None:
        conditions = torch.tensor(args.labels)
        nrow = args.nrow or min(8, len(conditions))
    else:
        per_class = args.per_class or 1
        conditions = torch.arange(model.num_classes).repeat_interleave(per_class)
        nrow = args.nrow or (per_class if args.per_class else math.ceil(math.sqrt(len(conditions))))
    if not prompts:
        extra["labels"] = conditions.numpy()
    stats: list[dict] = []
    images = sample_in_batches(sampler, conditions, args.batch_size, args.seed, device, args.dtype, stats=stats)
    sizes = [len(conditions[start:start + args.batch_size]) for start in range(0, len(conditions), args.batch_size)]
    passes = [batch["passes_per_image"] for batch in stats]
    mean_passes = sum(p * size for p, size in zip(passes, sizes, strict=True)) / len(conditions)
    print(f"{args.sampler}: {mean_passes:.2f} forward passes per image")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_grid(images, out, nrow=nrow)
    print(f"wrote {len(images)} samples to {out} ({memory_summary(stats[0])} in the first batch)")
    if args.npz:
        atomic_savez(args.npz, arr_0=images.permute(0, 2, 3, 1).numpy(), **extra)
        print(f"wrote {args.npz}")
