"""``var sample``: draw class-conditional samples and save a PNG grid (and optionally an npz).

Its sampling-setting and sampler-option flags come from var/sample/arguments.py (derived from the
declarations).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from var.eval.images import Samples, save_npz_samples
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
    which.add_argument("--labels", type=int, nargs="+", help="class labels (-1 = unconditional)")
    which.add_argument("--per-class", type=int, help="this many samples of every class, one row per class")
    parser.add_argument("--out", default="samples.png", help="PNG grid to write")
    parser.add_argument("--npz", help="also write the samples as an npz (arr_0: uint8 NHWC, labels), in a seeded "
                                      "shuffled order")
    parser.add_argument("--nrow", type=int, help="images per grid row")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    device = resolve_device(args.device)
    vqvae, model = load_models(args, device)
    options = sampler_options_from_args(args, device)
    sampler = build_sampler(args.sampler, model, vqvae, settings_from_args(args), **options)
    if args.labels is not None:
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
        save_npz_samples(args.npz, Samples(images, labels).shuffled())  # seeded order: IS splits see every class
        print(f"wrote {args.npz}")
