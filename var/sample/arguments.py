"""Command-line arguments shared by the commands that sample (``var sample``, ``var eval``, ``var calibrate-kv``,
``var bench``), derived from the declarations: the sampling-setting flags from
:class:`~var.sample.logits.SamplingSettings`, the sampler option flags from each sampler's ``Options``.  Every
option appears once, with one meaning, and its help names the samplers that take it.
"""

from __future__ import annotations

import argparse

import torch

from var.compile import compile_for_sampling
from var.loading import load_one, load_pair
from var.sample.logits import SamplingSettings
from var.sample.options import add_option_arguments, check_applicable, declared, given_options
from var.sample.registry import SAMPLER_NAMES, all_options, model_name_for, option_users, sampler_options

SETTINGS = declared(SamplingSettings)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--ckpt", help="checkpoint or run directory (written by 'var train')")
    group.add_argument("--vae", help="official VQ-VAE .pth (with --var)")
    group.add_argument("--var", help="official VAR .pth (with --vae)")
    group.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    group.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="autocast precision")
    group.add_argument("--compile", nargs="?", const="default", help="torch.compile the model (optional mode)")


def add_settings_arguments(parser: argparse.ArgumentParser) -> None:
    """The sampling settings (guidance, filtering), the seed and the batch size."""
    group = parser.add_argument_group("sampling")
    add_option_arguments(group, SETTINGS, defaults=True)
    group.add_argument("--seed", type=int, default=0, help="batch i is sampled with seed + i")
    group.add_argument("--batch-size", type=int, default=64)


def add_sampler_arguments(parser: argparse.ArgumentParser) -> None:
    """``--sampler`` and every declared sampler option (each names the samplers that take it)."""
    group = parser.add_argument_group("sampler")
    group.add_argument("--sampler", default="var", choices=SAMPLER_NAMES,
                       help="plain next-scale (var), ScaleKV preset (scalekv), CoDe (code), scale-wise speculation "
                            "(sjd-scale); the raster AR baseline: plain (ar) or speculative Jacobi (sjd)")
    add_option_arguments(group, all_options(), option_users())


def settings_from_args(args: argparse.Namespace) -> SamplingSettings:
    """Settings from the derived flags (a one-value per-scale list becomes that value)."""
    values = {name: getattr(args, name) for name in SETTINGS}
    for name, spec in SETTINGS.items():
        if spec.per_scale and isinstance(values[name], (list, tuple)) and len(values[name]) == 1:
            values[name] = values[name][0]
        elif spec.per_scale:
            values[name] = list(values[name])
    return SamplingSettings(**values)


def sampler_options_from_args(args: argparse.Namespace, device: torch.device | str = "cpu") -> dict:
    """The options of ``args.sampler`` set on the command line, model-valued ones loaded onto ``device``.

    Raises a ValueError naming every flag that the chosen sampler does not take.
    """
    specs = all_options()
    given = given_options(args, specs)
    check_applicable(given, args.sampler, sampler_options(args.sampler), specs)
    for name, value in given.items():
        if specs[name].model:
            given[name] = load_one(value, specs[name].model, device)
    return given


def load_models(args: argparse.Namespace, device: torch.device) -> tuple:
    """(tokenizer, transformer) named by the model arguments: the transformer --sampler decodes (VAR, or the
    raster AR for 'ar'/'sjd'), compiled when --compile is given."""
    vqvae, model = load_pair(args.ckpt, args.vae, args.var, device=device, var_name=model_name_for(args.sampler))
    if args.compile:
        compile_for_sampling(model, vqvae, args.compile)
    return vqvae, model
