"""``var sample``: draw class-conditional samples and save a PNG grid (and optionally an npz)."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import torch
from torchvision.utils import make_grid, save_image
from tqdm import tqdm

from var.pipeline import load_pair
from var.sample.logits import SamplingSettings
from var.sample.registry import SAMPLER_NAMES, build_sampler, model_name_for
from var.sample.sjd import DRAFT_INITS
from var.sample.sjd_scale import DRAFT_SOURCES
from var.utils import autocast, resolve_device, to_uint8


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--ckpt", help="checkpoint or run directory (written by 'var train')")
    group.add_argument("--vae", help="official VQ-VAE .pth (with --var)")
    group.add_argument("--var", help="official VAR .pth (with --vae)")
    group.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    group.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="autocast precision")


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("sampling")
    group.add_argument("--sampler", default="var", choices=SAMPLER_NAMES)
    group.add_argument("--cfg", type=float, default=1.5, help="guidance weight at the last scale")
    group.add_argument("--top-k", type=int, nargs="+", default=[900], help="one value or one per scale")
    group.add_argument("--top-p", type=float, nargs="+", default=[0.96], help="one value or one per scale")
    group.add_argument("--temperature", type=float, nargs="+", default=[1.0], help="one value or one per scale")
    group.add_argument("--more-smooth", action="store_true", help="Gumbel-softmax smoothing (nicer, not for FID)")
    group.add_argument("--seed", type=int, default=0)
    group.add_argument("--batch-size", type=int, default=64)
    spec = parser.add_argument_group("speculative decoding (sjd, sjd-scale)")
    spec.add_argument("--window", type=int, help="sjd: tokens per pass (default 16); sjd-scale: scales per pass (3)")
    spec.add_argument("--draft-init", choices=DRAFT_INITS, help="sjd: one-hot guess for new drafts (default above)")
    spec.add_argument("--draft-source", choices=DRAFT_SOURCES, help="sjd-scale: where drafts come from (recycle)")
    spec.add_argument("--spec-max-tokens", type=int, help="sjd-scale: speculate only blocks up to this size (36)")
    spec.add_argument("--gumbel", action="store_true",
                      help="var, sjd-scale: Gumbel-max draws keyed by the seed (both give the same tokens)")


def _one_or_list(values: list):
    return values[0] if len(values) == 1 else list(values)


def settings_from_args(args: argparse.Namespace) -> SamplingSettings:
    return SamplingSettings(
        cfg=args.cfg,
        top_k=_one_or_list(args.top_k),
        top_p=_one_or_list(args.top_p),
        temperature=_one_or_list(args.temperature),
        more_smooth=args.more_smooth,
    )


def sampler_options(args: argparse.Namespace) -> dict:
    """The sampler options given on the command line (each sampler validates which ones it takes)."""
    options = {
        "window": args.window, "draft_init": args.draft_init, "draft_source": args.draft_source,
        "spec_max_tokens": args.spec_max_tokens, "gumbel": args.gumbel or None,
    }
    return {name: value for name, value in options.items() if value is not None}


def sample_in_batches(sampler, labels: torch.Tensor, batch_size: int, seed: int, device, dtype: str,
                      progress: bool = True, stats: list | None = None) -> torch.Tensor:
    """Sample one image per label in batches; batch i uses seed ``seed + i``.  Returns uint8 (N, 3, H, W).

    ``stats``, if given, collects every batch's statistics (forward passes, ...).
    """
    chunks = []
    starts = range(0, len(labels), batch_size)
    for i, start in enumerate(tqdm(starts, desc="sampling", unit="batch", disable=not progress)):
        with autocast(device, dtype):
            out = sampler.sample(labels[start:start + batch_size], seed=seed + i)
        chunks.append(to_uint8(out.images).cpu())
        if stats is not None:
            stats.append(out.stats)
    return torch.cat(chunks)


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("sample", help="sample images and write a PNG grid")
    add_model_arguments(parser)
    add_sampling_arguments(parser)
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--labels", type=int, nargs="+", help="class labels (-1 = unconditional)")
    which.add_argument("--per-class", type=int, help="this many samples of every class, one row per class")
    parser.add_argument("--out", default="samples.png", help="PNG grid to write")
    parser.add_argument("--npz", help="also write the samples as an npz (arr_0: uint8 NHWC, labels)")
    parser.add_argument("--nrow", type=int, help="images per grid row")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    device = resolve_device(args.device)
    vqvae, model = load_pair(args.ckpt, args.vae, args.var, device=device, var_name=model_name_for(args.sampler))
    sampler = build_sampler(args.sampler, model, vqvae, settings_from_args(args), **sampler_options(args))
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
    passes = [batch.get("passes_per_image", batch["passes"]) for batch in stats]  # plain: one batch pass = one image
    mean_passes = sum(p * size for p, size in zip(passes, sizes, strict=True)) / len(labels)
    print(f"{args.sampler}: {mean_passes:.2f} forward passes per image")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_image(make_grid(images.float() / 255, nrow=nrow, padding=2, pad_value=1.0), out)
    print(f"wrote {len(images)} samples to {out}")
    if args.npz:
        np.savez(args.npz, arr_0=images.permute(0, 2, 3, 1).numpy(), labels=labels.numpy())
        print(f"wrote {args.npz}")
