"""``var train-tokenizer`` and ``var train``: training from a config file plus ``key=value`` overrides.

Overrides name a config key; keys outside the top-level sections (data, tokenizer, var, sample, demo) are
read relative to the command's stage, so ``var train-tokenizer --config c.yaml train.steps=100`` sets
``tokenizer.train.steps`` and ``var train --config c.yaml model.depth=8`` sets ``var.model.depth``.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from var.argtypes import integer
from var.config import ExperimentConfig, load_experiment

TOP_LEVEL = tuple(field.name for field in dataclasses.fields(ExperimentConfig))


def stage_overrides(overrides: list[str], section: str) -> list[str]:
    """Prefix overrides that do not start with a top-level section with the stage's section."""
    return [item if item.split(".", 1)[0] in TOP_LEVEL else f"{section}.{item}" for item in overrides]


def resolve_run(args: argparse.Namespace, default_name: str) -> tuple[Path, ExperimentConfig]:
    """The run directory and the config: RUN/config.yaml when resuming a run that has one, else --config."""
    if args.out is None and args.config is None:
        raise ValueError("pass --config FILE (and optionally --out RUN), or --out RUN --resume")
    run_dir = Path(args.out) if args.out else Path("runs") / Path(args.config).stem / default_name
    saved = run_dir / "config.yaml"
    source = saved if args.resume and saved.is_file() else args.config
    return run_dir, load_experiment(source, args.overrides)


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="experiment config (configs/*.yaml)")
    parser.add_argument("--out", help="run directory (default: runs/<config name>/<stage>)")
    parser.add_argument("--resume", action="store_true", help="continue from the run's latest checkpoint")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.steps=100")


def add_parser(subparsers) -> None:
    tokenizer = subparsers.add_parser("train-tokenizer", help="train the multi-scale VQ-VAE tokenizer")
    add_common_arguments(tokenizer)
    tokenizer.set_defaults(func=run_tokenizer)

    transformer = subparsers.add_parser("train", help="train a VAR (or raster AR) transformer on a tokenizer")
    add_common_arguments(transformer)
    transformer.add_argument("--tokenizer", help="tokenizer run or bundle (default: runs/<config name>/tokenizer)")
    transformer.add_argument("--model", default="var", choices=["var", "ar"],
                             help="next-scale VAR or raster AR (LlamaGen)")
    transformer.add_argument("--recipe", choices=["standard", "code-drafter", "code-refiner"],
                             help="CoDe fine-tuning recipe (sets var.recipe.name)")
    transformer.add_argument("--base", help="start from this VAR run/bundle (var.recipe.base)")
    transformer.add_argument("--teacher", help="refiner: frozen teacher VAR run/bundle (var.recipe.teacher)")
    transformer.add_argument("--draft-steps", type=integer(0),
                             help="CoDe: number of drafter scales (var.recipe.draft_steps)")
    transformer.set_defaults(func=run_transformer)


def run_tokenizer(args: argparse.Namespace) -> None:
    from var.train.tokenizer import TokenizerTrainer

    args.overrides = stage_overrides(args.overrides, "tokenizer")
    run_dir, experiment = resolve_run(args, "tokenizer")
    trainer = TokenizerTrainer(experiment, run_dir, resume=args.resume, progress=args.progress)
    report(trainer, trainer.fit())


def run_transformer(args: argparse.Namespace) -> None:
    from var.train.ar_trainer import ARTrainer
    from var.train.var_trainer import VARTrainer

    overrides = stage_overrides(args.overrides, "var")
    for flag, key in (("recipe", "name"), ("base", "base"), ("teacher", "teacher"), ("draft_steps", "draft_steps")):
        if getattr(args, flag) is not None:
            overrides.append(f"var.recipe.{key}={getattr(args, flag)}")
    args.overrides = overrides
    recipe = args.recipe if args.recipe not in (None, "standard") else None
    run_dir, experiment = resolve_run(args, recipe or args.model)
    tokenizer = args.tokenizer
    if tokenizer is None and experiment.var.tokenizer is None and args.config:
        default = Path("runs") / Path(args.config).stem / "tokenizer"
        tokenizer = default if default.exists() else None
    trainer_class = {"var": VARTrainer, "ar": ARTrainer}[args.model]
    trainer = trainer_class(experiment, run_dir, tokenizer=tokenizer, resume=args.resume, progress=args.progress)
    report(trainer, trainer.fit())


def report(trainer, metrics: dict[str, float]) -> None:
    """One closing line (main process only) with the last logged metrics."""
    if trainer.is_main:
        print(f"{trainer.name} run {trainer.run.root}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
