"""``var demo``: the end-to-end main job on the embedded digits, on a CPU, in minutes.

Trains the tokenizer, then a small VAR (configs/digits.yaml), samples ``demo.per_class`` images of every
class with the config's sampler settings, and judges them with a digit classifier trained on the digits
training split.  Writes ``OUT/grid.png`` (one row per class), ``OUT/samples.npz`` (``arr_0`` uint8 N x H x W x 3,
``labels`` int64 N) and leaves both runs in ``OUT/tokenizer_run`` and ``OUT/var_run`` (so
``var sample --ckpt OUT/var_run`` works).  Re-running continues unfinished runs and re-samples finished ones.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from var.config import load_experiment
from var.data.digits import DigitsDataset
from var.eval.classifier import class_consistency, train_digit_classifier
from var.eval.digit_features import DIGITS_EXTRACTOR
from var.eval.evaluate import Evaluator
from var.eval.generate import class_balanced_labels
from var.eval.images import Samples, save_npz_samples
from var.eval.metrics import within_class_spread
from var.loading import load_pair
from var.sample.batches import sample_in_batches
from var.sample.scale import VARSampler
from var.train.runs import RunDirectory
from var.train.tokenizer import TokenizerTrainer
from var.train.var_trainer import VARTrainer
from var.utils import save_grid

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "digits.yaml"


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("demo", help="train tokenizer + VAR on the embedded digits, sample, report")
    parser.add_argument("--out", default="out/demo", help="output directory (default: out/demo)")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="experiment config (default: digits)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. var.train.steps=10")
    parser.set_defaults(func=run)


def _flag(value) -> str:
    """A sampler setting (one value or one per scale) as command-line text."""
    return " ".join(str(v) for v in value) if isinstance(value, (list, tuple)) else str(value)


def _minutes(seconds: float) -> str:
    return f"{int(seconds // 60)}m{seconds % 60:04.1f}s"


def run_demo(out: str | Path, config: str | Path = DEFAULT_CONFIG, overrides: list[str] | tuple[str, ...] = (),
             progress: bool = True) -> dict:
    """Run the demo; returns the numbers it reports."""
    wall_start, cpu_start = time.perf_counter(), time.process_time()
    out = Path(out)
    if not Path(config).is_file():
        raise FileNotFoundError(f"demo config {config} not found; pass --config configs/digits.yaml")
    experiment = load_experiment(config, overrides)
    if experiment.demo.threads > 0:
        # The demo's models are small: a second intra-op thread gains little on an idle machine and, whenever
        # another process competes for the cores, makes every step wait for a descheduled thread (measured:
        # tokenizer steps 10-30x slower on a busy 2-core machine).  One thread keeps the run time predictable.
        torch.set_num_threads(experiment.demo.threads)
    if experiment.data.name != "digits":
        raise ValueError(f"var demo judges samples with a digit classifier; data.name must be digits, "
                         f"got {experiment.data.name}")
    tokenizer_run, var_run = out / "tokenizer_run", out / "var_run"
    phase = time.perf_counter()
    tokenizer_metrics = TokenizerTrainer(experiment, tokenizer_run, resume=RunDirectory(tokenizer_run).exists(),
                                         progress=progress).fit()
    tokenizer_seconds = time.perf_counter() - phase
    phase = time.perf_counter()
    var_metrics = VARTrainer(experiment, var_run, tokenizer=tokenizer_run, resume=RunDirectory(var_run).exists(),
                             progress=progress).fit()
    refiner_metrics = None
    if experiment.demo.refiner:  # a second VAR on the same tokenizer: CoDe's refiner
        refiner_run = out / "refiner_run"
        refiner = load_experiment(config, [*overrides, *experiment.demo.refiner])
        refiner_metrics = VARTrainer(refiner, refiner_run, tokenizer=tokenizer_run,
                                     resume=RunDirectory(refiner_run).exists(), progress=progress).fit()
    var_seconds = time.perf_counter() - phase

    phase = time.perf_counter()
    image_size, demo = experiment.data.image_size, experiment.demo
    classifier = train_digit_classifier(image_size=image_size, epochs=demo.classifier_epochs)
    held_out = DigitsDataset("test", image_size=image_size)
    judge_accuracy = class_consistency(classifier, held_out.images, held_out.labels)
    vqvae, model = load_pair(var_run)
    sampler = VARSampler(model, vqvae, experiment.sample)
    labels = class_balanced_labels(model.num_classes, demo.per_class)
    images = sample_in_batches(sampler, labels, batch_size=len(labels), seed=demo.seed,
                               device=torch.device("cpu"), dtype="fp32", progress=progress)  # uint8 (N, 3, H, W)
    consistency = class_consistency(classifier, images.float() / 127.5 - 1, labels)
    # classifier-space FID and precision/recall against the training digits; diversity: the within-class
    # spread of the samples' classifier features over that of the real training digits
    distribution = Evaluator(DIGITS_EXTRACTOR, "digits", metrics=("fid", "pr"), progress=False).evaluate(
        Samples(images, labels))
    train = DigitsDataset("train", image_size=image_size)
    with torch.no_grad():
        spread = within_class_spread(classifier.features(images.float() / 127.5 - 1), labels)
        real_spread = within_class_spread(classifier.features(train.images), train.labels)
    sample_seconds = time.perf_counter() - phase

    out.mkdir(parents=True, exist_ok=True)
    per_class = images.view(model.num_classes, demo.per_class, *images.shape[1:])[:, : demo.grid_per_class]
    save_grid(per_class.flatten(0, 1), out / "grid.png", nrow=demo.grid_per_class)
    save_npz_samples(out / "samples.npz", Samples(images, labels).shuffled())
    report = {
        "wall_seconds": time.perf_counter() - wall_start,
        "cpu_seconds": time.process_time() - cpu_start,
        "tokenizer_seconds": tokenizer_seconds,
        "var_seconds": var_seconds,
        "sample_seconds": sample_seconds,
        "tokenizer": tokenizer_metrics,
        "var": var_metrics,
        "refiner": refiner_metrics,
        "class_consistency": consistency,
        "recall": distribution["recall"],
        "precision": distribution["precision"],
        "classifier_fid": distribution["fid"],
        "diversity": spread / real_spread,
        "judge_accuracy": judge_accuracy,
        "num_samples": len(labels),
    }
    print_report(report, out, experiment)
    return report


def print_report(report: dict, out: Path, experiment) -> None:
    tokenizer, var = report["tokenizer"], report["var"]
    nan = float("nan")
    usage = " ".join(f"{tokenizer[k]:.2f}" for k in sorted(tokenizer) if k.startswith("usage/s"))
    settings = experiment.sample
    lines = [
        f"var demo: done in {_minutes(report['wall_seconds'])} wall, {_minutes(report['cpu_seconds'])} CPU "
        f"({torch.get_num_threads()} thread{'s' if torch.get_num_threads() > 1 else ''}) "
        f"(tokenizer {_minutes(report['tokenizer_seconds'])}, VAR {_minutes(report['var_seconds'])}, "
        f"judge + sampling {_minutes(report['sample_seconds'])})",
        f"  tokenizer: recon L1 {tokenizer.get('recon', nan):.4f}, vq {tokenizer.get('vq', nan):.4f}, "
        f"codebook usage {tokenizer.get('usage/all', nan):.0%} (per scale {usage})",
        f"  VAR: loss {var.get('loss', nan):.4f}, token accuracy {var.get('acc', nan):.1%} "
        f"(last scale {var.get('acc_tail', nan):.1%})",
        *([f"  refiner ({out / 'refiner_run'}): loss {report['refiner'].get('loss', nan):.4f}, token accuracy "
           f"{report['refiner'].get('acc', nan):.1%}; CoDe: var sample --sampler code --ckpt {out / 'var_run'} "
           f"--refiner {out / 'refiner_run'}"] if report["refiner"] else []),
        f"  samples: {report['num_samples']} (cfg {settings.cfg}, top_k {settings.top_k}, top_p {settings.top_p}, "
        f"temperature {settings.temperature})",
        f"  class-consistency: {report['class_consistency']:.1%} under a digit classifier "
        f"({report['judge_accuracy']:.1%} on held-out real digits)",
        f"  recall {report['recall']:.2f}, precision {report['precision']:.2f}, classifier-space FID "
        f"{report['classifier_fid']:.2f}, diversity {report['diversity']:.2f}x the real digits' within-class spread",
        f"  wrote {out / 'grid.png'} (one row per class) and {out / 'samples.npz'}",
        f"  more samples: var sample --ckpt {out / 'var_run'} --per-class 8 --cfg {settings.cfg} "
        f"--top-k {_flag(settings.top_k)} --top-p {_flag(settings.top_p)} --temperature {_flag(settings.temperature)}",
    ]
    print("\n".join(lines))


def run(args: argparse.Namespace) -> None:
    run_demo(args.out, args.config, args.overrides, progress=args.progress)
