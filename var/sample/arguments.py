"""Command-line arguments shared by the commands that sample (``var sample``, ``var eval``, ``var calibrate-kv``,
``var bench``), derived from the declarations: the sampling-setting flags from
:class:`~var.sample.logits.SamplingSettings`, the sampler option flags from each sampler's ``Options``.  Every
option appears once, with one meaning, and its help names the samplers that take it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from var.argtypes import integer
from var.checkpoints import check_pair
from var.compile import compile_for_sampling
from var.hub import load_pair as load_release
from var.hub import release, resolve
from var.loading import load_one, load_pair
from var.models.infinity import Infinity, PackedText
from var.models.infinity_schedules import parse_aspect, schedule_for
from var.models.llamagen import Captions
from var.sample.logits import SamplingSettings
from var.sample.options import add_option_arguments, check_applicable, declared, given_options
from var.sample.registry import SAMPLER_NAMES, all_options, model_name_for, option_users, sampler_options
from var.sample.rules import InfinityRule, LlamaGenRule, rule_for
from var.text import FLAN_T5_XL, T5TextEncoder

SETTINGS = declared(SamplingSettings)
MAX_SEED = 2**63 - 1


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--model", metavar="NAME",
                       help="a released model by name (var-d16 ... var-d36, code-n6 ...; 'var doctor' says which are "
                            "cached): its files from the Hugging Face cache (downloaded and checked if missing) and "
                            "its authors' sampling settings for every setting not given")
    group.add_argument("--ckpt", help="checkpoint or run directory (written by 'var train')")
    group.add_argument("--vae", help="official tokenizer .pth (with --var): VAR's VQ-VAE or Infinity's BSQ-VAE")
    group.add_argument("--var", help="official transformer (with --vae): a VAR .pth, or an Infinity .pth / "
                                     ".safetensors / folder of shards (told apart by its keys)")
    group.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    group.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="autocast precision")
    group.add_argument("--compile", nargs="?", const="default", help="torch.compile the model (optional mode)")
    group.add_argument("--force-tokenizer", action="store_true",
                       help="use the tokenizer given although the transformer was trained on another one")


def family_defaults_help() -> str:
    """What a sampling setting not given becomes for each model family (the settings group's help)."""
    def flags(values: dict) -> str:
        return " ".join(f"{SETTINGS[name].flag} {value:g}" for name, value in values.items())

    llamagen = "; ".join(f"LlamaGen {kind}: {flags(values)}" for kind, values in LlamaGenRule.OFFICIAL_DEFAULTS.items())
    return (f"the defaults shown are VAR's; the other families take their official ones ({llamagen}; "
            f"Infinity: {flags(InfinityRule.OFFICIAL_DEFAULTS)})")


def add_settings_arguments(parser: argparse.ArgumentParser) -> None:
    """The sampling settings (guidance, filtering), the seed and the batch size."""
    group = parser.add_argument_group("sampling", family_defaults_help())
    add_option_arguments(group, SETTINGS)  # None = not given: a release's or the declared default applies
    group.add_argument("--seed", type=integer(0, MAX_SEED), default=0, help="batch i is sampled with seed + i")
    group.add_argument("--batch-size", type=integer(1), default=64)


def add_sampler_arguments(parser: argparse.ArgumentParser) -> None:
    """``--sampler`` and every declared sampler option (each names the samplers that take it)."""
    group = parser.add_argument_group("sampler")
    group.add_argument("--sampler", choices=SAMPLER_NAMES,
                       help="plain next-scale (var), ScaleKV preset (scalekv), CoDe (code), scale-wise speculation "
                            "(sjd-scale); raster LlamaGen models: plain (ar) or speculative Jacobi (sjd); default: "
                            "var, or the sampler of the --model release")
    add_option_arguments(group, all_options(), option_users())


def apply_release(args: argparse.Namespace) -> None:
    """Fill what the command line left out: with ``--model NAME``, the release's sampler, sampler options (the
    CoDe refiner's file included) and sampling settings; else the ``var`` sampler. The release's resolved files
    are kept in ``args.release_files`` (role -> path) for reports.

    Raises a ValueError for an unknown name or a model given twice, and stops here when a file is missing or is
    not the released one (see :func:`var.hub.resolve`).
    """
    name = getattr(args, "model", None)
    if name is None:
        if getattr(args, "sampler", "") is None:
            args.sampler = "var"
        return
    if args.ckpt or args.vae or args.var:
        raise ValueError(f"--model {name} is a whole released model: pass it instead of --ckpt/--vae/--var")
    entry = release(name)
    paths = args.release_files = resolve(name)  # every file found (or downloaded) and checked before any model work
    if hasattr(args, "sampler"):
        args.sampler = args.sampler or entry.sampler or "var"
        for option, value in entry.sampler_options.items():
            if option in sampler_options(args.sampler) and getattr(args, option, None) is None:
                setattr(args, option, value)
        if "refiner" in sampler_options(args.sampler) and args.refiner is None and "refiner" in entry.components:
            args.refiner = str(paths["refiner"])
    for setting, value in entry.sampling.items():
        if setting in SETTINGS and getattr(args, setting, None) is None:
            setattr(args, setting, [value] if SETTINGS[setting].per_scale else value)


def add_text_arguments(parser: argparse.ArgumentParser, exclusive) -> None:
    """Text-to-image flags (Infinity, LlamaGen t2i): the prompts (in ``exclusive``, beside the class-label flags),
    the T5 encoder and Infinity's schedule."""
    exclusive.add_argument("--prompt", nargs="+", action="extend",
                           help="text-to-image prompts, one image each (--prompt A B or --prompt A --prompt B)")
    exclusive.add_argument("--prompts", help="text-to-image: a text file of prompts, one per line")
    text = parser.add_argument_group("text-to-image (Infinity, LlamaGen t2i)")
    text.add_argument("--text-encoder", default=FLAN_T5_XL,
                      help="T5 model id in the local Hugging Face cache, or its folder (never downloaded)")
    text.add_argument("--resolution", default="1M",
                      help="Infinity schedule level: 0.06M, 0.25M, 0.60M, 1M or the square side 256, 512, 768, 1024")
    text.add_argument("--aspect", default="1:1", help="Infinity: W:H (16:9 is landscape) or height/width; the "
                                                      "nearest official template is used")


def read_prompts(args: argparse.Namespace) -> list[str] | None:
    """The prompts of --prompt / --prompts (None for class-conditional sampling)."""
    if args.prompts:
        path = Path(args.prompts)
        if not path.is_file():
            raise FileNotFoundError(f"--prompts {path}: no such file (one prompt per line)")
        prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if not prompts:
            raise ValueError(f"--prompts {path} holds no prompt (one per line)")
        return prompts
    return args.prompt


def is_text_to_image(model) -> bool:
    """Whether ``model`` is conditioned on prompts (Infinity, LlamaGen t2i) rather than class labels."""
    return isinstance(model, Infinity) or getattr(getattr(model, "config", None), "model_type", None) == "t2i"


def use_text_arguments(args: argparse.Namespace, model, prompts: list[str] | None) -> None:
    """Check that prompts and the model fit, and set an Infinity's schedule from --resolution/--aspect."""
    if is_text_to_image(model) and prompts is None:
        raise ValueError(f"this {type(model).__name__} is text-to-image: give --prompt 'a photo of a cat' or "
                         "--prompts FILE")
    if not is_text_to_image(model) and prompts is not None:
        raise ValueError(f"--prompt/--prompts need a text-to-image model (Infinity, LlamaGen t2i); this "
                         f"{type(model).__name__} is class-conditional: use --labels or --per-class")
    if isinstance(model, Infinity):
        model.use_schedule(schedule_for(parse_aspect(args.aspect), args.resolution))


def encode_prompts(encoder: T5TextEncoder, model, prompts: list[str]) -> PackedText | Captions:
    """The text condition ``model``'s family samples from: Infinity's packed T5 features, or LlamaGen's left-padded
    captions of its caption length."""
    if isinstance(model, Infinity):
        return encoder.encode_infinity(prompts)
    return Captions(*encoder.encode_llamagen(prompts, max_length=model.config.cls_token_num))


def settings_from_args(args: argparse.Namespace, model: torch.nn.Module | None = None) -> SamplingSettings:
    """Settings from the derived flags (a one-value per-scale list becomes that value).

    A flag not given (None; a ``--model`` release has already filled its own) takes the default of ``model``'s
    family (its rule's :meth:`~var.sample.rules.TokenRule.default_settings`: LlamaGen's official top-k 2000,
    top-p 1, cfg-scale 4 ...), else the declared default (VAR's).  Without ``model`` (checking the flags before
    any weights are read) every such flag takes the declared default.
    """
    family = rule_for(model).default_settings() if model is not None else {}
    values = {name: getattr(args, name) if getattr(args, name) is not None else family.get(name, spec.default)
              for name, spec in SETTINGS.items()}
    for name, spec in SETTINGS.items():
        if spec.per_scale and isinstance(values[name], (list, tuple)) and len(values[name]) == 1:
            values[name] = values[name][0]
        elif spec.per_scale and isinstance(values[name], (list, tuple)):
            values[name] = list(values[name])
    return SamplingSettings(**values)


def sampler_options_from_args(args: argparse.Namespace, device: torch.device | str = "cpu",
                              tokenizer: torch.nn.Module | None = None, model: torch.nn.Module | None = None) -> dict:
    """The options of ``args.sampler`` set on the command line, model-valued ones loaded onto ``device`` (see
    :func:`load_option_model` for the checks against ``tokenizer`` and ``model``).

    Raises a ValueError naming every flag that the chosen sampler does not take.
    """
    specs = all_options()
    given = given_options(args, specs)
    check_applicable(given, args.sampler, sampler_options(args.sampler), specs)
    for name, value in given.items():
        if specs[name].model:
            given[name] = load_option_model(f"--{name.replace('_', '-')} {value}", value, specs[name].model, device,
                                            tokenizer, model, getattr(args, "force_tokenizer", False))
    return given


def load_option_model(flag: str, path: str, kind: str, device: torch.device | str, tokenizer: torch.nn.Module | None,
                      model: torch.nn.Module | None, force_tokenizer: bool) -> torch.nn.Module:
    """A model-valued option (CoDe's refiner) loaded from ``path``: VAR or Infinity, told by its keys.

    Given the ``model`` it works with, it must be of the same family (one line naming both otherwise, before any
    tokenizer check), and an Infinity takes that model's scale schedule (--resolution/--aspect: schedules are not
    in the weights); given the ``tokenizer`` it decodes with, it must fit it and (unless ``force_tokenizer``) have
    been trained on it.
    """
    loaded = load_one(path, kind, device)
    if model is not None and type(loaded) is not type(model):
        family = type(model).__name__
        files = ".pth/.safetensors/shard folder" if family == "Infinity" else "bundle, run directory or .pth"
        raise ValueError(f"{flag} holds {type(loaded).__name__} weights but the model given is {family}: give "
                         f"{family} weights ({files}) over the same tokenizer")
    try:
        if isinstance(loaded, Infinity) and model is not None:
            loaded.use_schedule(model.schedule)
        if tokenizer is not None:
            check_pair(tokenizer, loaded, force_tokenizer)
    except ValueError as error:
        raise ValueError(f"{flag}: {error}") from None
    return loaded


def load_models(args: argparse.Namespace, device: torch.device) -> tuple:
    """(tokenizer, transformer) named by the model arguments: the transformer --sampler decodes (VAR, or the
    raster AR for 'ar'/'sjd'), compiled when --compile is given."""
    if getattr(args, "model", None):
        vqvae, model = load_release(args.model, device)
    else:
        vqvae, model = load_pair(args.ckpt, args.vae, args.var, device=device,
                                 var_name=model_name_for(getattr(args, "sampler", None) or "var"),
                                 force_tokenizer=args.force_tokenizer)
    if args.compile:
        compile_for_sampling(model, vqvae, args.compile)
    return vqvae, model
