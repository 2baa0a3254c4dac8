"""``var sample``: draw class-conditional (VAR, LlamaGen c2i) or text-to-image (Infinity, LlamaGen t2i:
``--prompt``) samples and save a PNG grid (and optionally an npz).

Its sampling-setting and sampler-option flags come from var/sample/arguments.py (derived from the
declarations).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import torch

from var.argtypes import integer
from var.eval.images import Samples, export_order, save_npz_samples
from var.sample.arguments import (
    add_model_arguments,
    add_sampler_arguments,
    add_settings_arguments,
    add_text_arguments,
    apply_release,
    encode_prompts,
    load_models,
    read_prompts,
    sampler_options_from_args,
    settings_from_args,
    use_text_arguments,
)
from var.sample.batches import sample_in_batches
from var.sample.registry import build_sampler
from var.text import T5TextEncoder
from var.utils import resolve_device, save_grid


def memory_summary(stats: dict) -> str:
    """One line on the KV cache (and CUDA peak) of a batch, from its sampler stats."""
    mib = 2**20
    line = f"KV cache {stats['kv_bytes'] / mib:.2f} MiB allocated, {stats['kv_bytes_held'] / mib:.2f} MiB held"
    if stats.get("kv_fraction") is not None:
        line += f" ({stats['kv_fraction']:.3f} of the full cache, budget {stats['kv_budget']:g})"
    if stats.get("peak_cuda_bytes") is not None:
        line += f"; peak CUDA memory {stats['peak_cuda_bytes'] / mib:.0f} MiB"
    return line


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("sample", help="sample images and write a PNG grid")
    add_model_arguments(parser)
    add_settings_arguments(parser)
    add_sampler_arguments(parser)
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--labels", type=integer(-1), nargs="+", help="class labels (-1 = unconditional)")
    which.add_argument("--per-class", type=integer(1), help="this many samples of every class, one row per class")
    add_text_arguments(parser, which)
    parser.add_argument("--out", default="samples.png", help="PNG grid to write")
    parser.add_argument("--npz", help="also write the samples as an npz (arr_0: uint8 NHWC, labels or prompts), in a "
                                      "seeded shuffled order")
    parser.add_argument("--nrow", type=integer(1), help="images per grid row")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    apply_release(args)
    settings_from_args(args)  # bad settings fail before any model is loaded
    device = resolve_device(args.device)
    prompts = read_prompts(args)
    encoder = T5TextEncoder(args.text_encoder, device=device) if prompts else None  # missing T5: fail first
    vqvae, model = load_models(args, device)
    settings = settings_from_args(args, model)  # unspecified settings: the model family's defaults
    use_text_arguments(args, model, prompts)
    options = sampler_options_from_args(args, device, tokenizer=vqvae, model=model)
    sampler = build_sampler(args.sampler, model, vqvae, settings, **options)
    if prompts is not None:
        conditions = encode_prompts(encoder, model, prompts)
        del encoder  # T5 is not needed while sampling
        nrow = args.nrow or min(8, len(prompts))
    elif args.labels is not None:
        conditions = torch.tensor(args.labels)
        nrow = args.nrow or min(8, len(conditions))
    else:
        per_class = args.per_class or 1
        conditions = torch.arange(model.num_classes).repeat_interleave(per_class)
        nrow = args.nrow or (per_class if args.per_class else math.ceil(math.sqrt(len(conditions))))
    stats: list[dict] = []
    try:
        images = sample_in_batches(sampler, conditions, args.batch_size, args.seed, device, args.dtype, stats=stats)
    except KeyboardInterrupt:
        raise KeyboardInterrupt(f"interrupted while sampling: nothing was written ({args.out} is written once every "
                                "sample is drawn); run the same command again") from None
    sizes = [len(conditions[start:start + args.batch_size]) for start in range(0, len(conditions), args.batch_size)]
    passes = [batch["passes_per_image"] for batch in stats]
    mean_passes = sum(p * size for p, size in zip(passes, sizes, strict=True)) / len(conditions)
    print(f"{args.sampler}: {mean_passes:.2f} forward passes per image")
    out = Path(args.out)
    save_grid(images, out, nrow=nrow)
    print(f"wrote {len(images)} samples to {out} ({memory_summary(stats[0])} in the first batch)")
    if args.npz:
        # a seeded order, so that Inception Score's consecutive splits see every class; prompts follow their images
        samples = Samples(images, None if prompts is not None else conditions).shuffled()
        given = {} if prompts is None else {"prompts": np.array(prompts)[export_order(len(prompts)).numpy()]}
        save_npz_samples(args.npz, samples, **given)
        print(f"wrote {args.npz}")
