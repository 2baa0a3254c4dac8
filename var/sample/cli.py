"""``var sample``: draw class-conditional samples and save a PNG grid (and optionally an npz)."""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from var.pipeline import load_one, load_pair
from var.sample.logits import SamplingSettings
from var.sample.registry import SAMPLER_NAMES, build_sampler, model_name_for, sampler_options
from var.sample.scalekv import SCORINGS
from var.sample.sjd import DRAFT_INITS
from var.sample.sjd_scale import DRAFT_SOURCES
from var.utils import autocast, compile_for_sampling, resolve_device, save_grid, to_uint8


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--ckpt", help="checkpoint or run directory (written by 'var train')")
    group.add_argument("--vae", help="official VQ-VAE .pth (with --var)")
    group.add_argument("--var", help="official VAR .pth (with --vae)")
    group.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    group.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="autocast precision")
    group.add_argument("--compile", nargs="?", const="default", help="torch.compile the model (optional mode)")


def add_sampling_arguments(parser: argparse.ArgumentParser, sampler_choice: bool = True) -> None:
    group = parser.add_argument_group("sampling")
    if sampler_choice:
        group.add_argument("--sampler", default="var", choices=SAMPLER_NAMES)
        add_sampler_option_arguments(parser)
    group.add_argument("--cfg", type=float, default=1.5, help="guidance weight at the last scale")
    group.add_argument("--top-k", type=int, nargs="+", default=[900], help="one value or one per scale")
    group.add_argument("--top-p", type=float, nargs="+", default=[0.96], help="one value or one per scale")
    group.add_argument("--temperature", type=float, nargs="+", default=[1.0], help="one value or one per scale")
    group.add_argument("--more-smooth", action="store_true", help="Gumbel-softmax smoothing (nicer, not for FID)")
    group.add_argument("--seed", type=int, default=0)
    group.add_argument("--batch-size", type=int, default=64)


def add_sampler_option_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("add-on samplers (code, scalekv, code+scalekv)")
    group.add_argument("--refiner", help="CoDe refiner: bundle/run directory or official-format .pth")
    group.add_argument("--draft-steps", type=int, help="CoDe: scales the drafter decodes (default: all but 2)")
    budget = group.add_mutually_exclusive_group()
    budget.add_argument("--kv-budget", type=float, help="ScaleKV: uniform budget, fraction of the cache (0.1)")
    budget.add_argument("--kv-budget-file", help="ScaleKV: budget JSON written by 'var calibrate-kv'")
    group.add_argument("--refiner-kv-budget-file", help="code+scalekv: the refiner's budget JSON")
    group.add_argument("--kv-scoring", choices=SCORINGS, help="ScaleKV token scoring (default softmax)")
    group.add_argument("--kv-window", type=int,
                       help="ScaleKV with --kv-budget: observation window grid side (default 4: 16 tokens)")
    group.add_argument("--kv-share-cfg", action="store_true",
                       help="ScaleKV: the unconditional half keeps the tokens the conditional half chose")
    spec = parser.add_argument_group("speculative decoding (sjd, sjd-scale)")
    spec.add_argument("--window", type=int, help="sjd: tokens per pass (default 16); sjd-scale: scales per pass (3)")
    spec.add_argument("--draft-init", choices=DRAFT_INITS, help="sjd: one-hot guess for new drafts (default above)")
    spec.add_argument("--draft-source", choices=DRAFT_SOURCES, help="sjd-scale: where drafts come from (recycle)")
    spec.add_argument("--spec-max-tokens", type=int, help="sjd-scale: speculate only blocks up to this size (36)")
    spec.add_argument("--gumbel", action="store_true",
                      help="var, sjd-scale: Gumbel-max draws keyed by the seed (both give the same tokens)")


# sampler option -> the flag that sets it
_OPTION_FLAGS = {
    "refiner": "--refiner",
    "draft_steps": "--draft-steps",
    "kv_budget": "--kv-budget/--kv-budget-file",
    "refiner_kv_budget": "--refiner-kv-budget-file",
    "kv_scoring": "--kv-scoring",
    "kv_share_cfg": "--kv-share-cfg",
    "kv_window": "--kv-window",
    "window": "--window",
    "draft_init": "--draft-init",
    "draft_source": "--draft-source",
    "spec_max_tokens": "--spec-max-tokens",
    "gumbel": "--gumbel",
}


def sampler_options_from_args(args: argparse.Namespace, device: torch.device | str = "cpu") -> dict:
    """The options of ``args.sampler`` set on the command line (the refiner loaded; budget files are paths).

    Raises a ValueError naming any flag that the chosen sampler does not use.
    """
    given = {
        "refiner": args.refiner,
        "draft_steps": args.draft_steps,
        "kv_budget": args.kv_budget if args.kv_budget_file is None else args.kv_budget_file,
        "refiner_kv_budget": args.refiner_kv_budget_file,
        "kv_scoring": args.kv_scoring,
        "kv_share_cfg": args.kv_share_cfg or None,
        "kv_window": args.kv_window,
        "window": args.window,
        "draft_init": args.draft_init,
        "draft_source": args.draft_source,
        "spec_max_tokens": args.spec_max_tokens,
        "gumbel": args.gumbel or None,
    }
    given = {option: value for option, value in given.items() if value is not None}
    accepted = sampler_options(args.sampler)
    stray = [_OPTION_FLAGS[option] for option in given if option not in accepted]
    if stray:
        verb = "does" if len(stray) == 1 else "do"
        raise ValueError(f"{', '.join(stray)} {verb} not apply to --sampler {args.sampler}")
    if "refiner" in given:
        given["refiner"] = load_one(given["refiner"], "var", device)
    return given


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



def sample_in_batches(sampler, labels: torch.Tensor, batch_size: int, seed: int, device, dtype: str,
                      progress: bool = True, batch_ids: Sequence[int] | None = None,
                      stats: list | None = None) -> torch.Tensor:
    """Sample one image per label in batches; batch i (labels[i*batch_size:(i+1)*batch_size]) uses seed
    ``seed + i``, so any subset of batches (``batch_ids``, default all) reproduces the same images.
    Returns uint8 (n, 3, H, W) for the chosen batches, in order; each batch's ``SampleOutput.stats`` is
    appended to ``stats`` when given.
    """
    if batch_ids is None:
        batch_ids = range(math.ceil(len(labels) / batch_size))
    chunks = []
    for i in tqdm(batch_ids, desc="sampling", unit="batch", disable=not progress):
        with autocast(device, dtype):
            out = sampler.sample(labels[i * batch_size:(i + 1) * batch_size], seed=seed + i)
        chunks.append(to_uint8(out.images).cpu())
        if stats is not None:
            stats.append(out.stats)
    return torch.cat(chunks)


def memory_summary(stats: dict) -> str:
    """One line on the KV cache (and CUDA peak) of a batch, from its sampler stats."""
    mib = 2**20
    if "kv_bytes" not in stats:
        return "no KV statistics"
    line = f"KV cache {stats['kv_bytes'] / mib:.2f} MiB allocated, {stats['kv_bytes_held'] / mib:.2f} MiB held"
    if "peak_cuda_bytes" in stats:
        line += f"; peak CUDA memory {stats['peak_cuda_bytes'] / mib:.0f} MiB"
    return line


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


def load_models(args: argparse.Namespace, device: torch.device) -> tuple:
    """(tokenizer, transformer) named by the model arguments: the transformer --sampler decodes (VAR, or the
    raster AR for 'ar'/'sjd'), compiled when --compile is given."""
    vqvae, model = load_pair(args.ckpt, args.vae, args.var, device=device, var_name=model_name_for(args.sampler))
    if args.compile:
        compile_for_sampling(model, vqvae, args.compile)
    return vqvae, model


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
    passes = [batch.get("passes_per_image", batch["passes"]) for batch in stats]  # plain: one batch pass = one image
    mean_passes = sum(p * size for p, size in zip(passes, sizes, strict=True)) / len(labels)
    print(f"{args.sampler}: {mean_passes:.2f} forward passes per image")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_grid(images, out, nrow=nrow)
    print(f"wrote {len(images)} samples to {out} ({memory_summary(stats[0])} in the first batch)")
    if args.npz:
        np.savez(args.npz, arr_0=images.permute(0, 2, 3, 1).numpy(), labels=labels.numpy())
        print(f"wrote {args.npz}")
