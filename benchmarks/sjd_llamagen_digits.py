"""SJD against plain raster decoding on a trained LlamaGen-architecture digits model (issue 13's acceptance).

    var train-tokenizer --config configs/digits_raster.yaml --out runs/digits_tok8
    var train --config configs/digits_raster.yaml --model ar --tokenizer runs/digits_tok8 --out runs/digits_ar8
    python benchmarks/sjd_llamagen_digits.py --ckpt runs/digits_ar8 --out benchmarks/sjd_llamagen_digits.json \
        --per-class 20 --batch-sizes 1 10 --variants "cfg=0.5" ""

For every variant of the sampling settings (``key=value,...`` over the model family's defaults, LlamaGen's
official cfg-scale 4 / top-k 2000 / top-p 1 / temperature 1; ``""`` is the defaults alone), ``ar`` and ``sjd``
draw the same class-balanced labels with the same seeds (batch i with seed + i) at every batch size.  Per run:
mean forward passes per image (each image's own count; at batch > 1 also the batch's count, the latency figure),
their ratio sjd / ar, and class-consistency under the project's digit classifier (trained on the digits training
split, as ``var demo`` does) with its binomial standard error.  SJD is exact, so its class-consistency must agree
with ``ar``'s within noise.  The ceiling of class-consistency is the tokenizer's: the classifier's accuracy on
held-out digits reconstructed through the model's token map, reported as ``reconstruction_consistency``.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch

from var.data.digits import DigitsDataset
from var.eval.classifier import class_consistency, train_digit_classifier
from var.eval.generate import class_balanced_labels
from var.loading import load_pair
from var.sample.arguments import SETTINGS, settings_from_args
from var.sample.batches import sample_in_batches
from var.sample.registry import build_sampler
from var.utils import atomic_write_text


def parse_variant(text: str) -> dict:
    """``"temperature=0.7,top_k=8"`` -> {"temperature": 0.7, "top_k": 8} (typed by the declared settings)."""
    variant = {}
    for item in filter(None, text.split(",")):
        name, _, value = item.partition("=")
        if name not in SETTINGS:
            raise SystemExit(f"unknown sampling setting {name!r} in variant {text!r}; known: {', '.join(SETTINGS)}")
        variant[name] = SETTINGS[name].parse(value)
    return variant


def run_sampler(sampler, labels: torch.Tensor, batch_size: int, seed: int, classifier) -> dict:
    """Passes per image, batch passes and class-consistency of one sampler over ``labels``."""
    stats: list[dict] = []
    start = time.perf_counter()
    images = sample_in_batches(sampler, labels, batch_size, seed, torch.device("cpu"), "fp32", progress=False,
                               stats=stats)
    seconds = time.perf_counter() - start
    sizes = [len(labels[i:i + batch_size]) for i in range(0, len(labels), batch_size)]
    consistency = class_consistency(classifier, images.float() / 127.5 - 1, labels)
    return {
        "passes_per_image": sum(s["passes_per_image"] * n for s, n in zip(stats, sizes, strict=True)) / len(labels),
        "batch_passes": sum(s["passes"] for s in stats) / len(stats),
        "class_consistency": consistency,
        "class_consistency_se": math.sqrt(consistency * (1 - consistency) / len(labels)),
        "seconds": round(seconds, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="a 'var train --model ar' run or bundle")
    parser.add_argument("--out", required=True, help="JSON report to write")
    parser.add_argument("--per-class", type=int, default=30, help="samples per class (default 30)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 10], help="default: 1 10")
    parser.add_argument("--variants", nargs="+", default=[""],
                        help='settings over the family defaults, e.g. "" "temperature=0.7" "top_k=8,cfg=1"')
    parser.add_argument("--sjd-window", type=int, default=16)
    parser.add_argument("--draft-init", default="above")
    parser.add_argument("--gumbel", action="store_true",
                        help="both samplers draw with seed-keyed Gumbel noise: sjd then returns ar's tokens exactly")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: tiny model, shared CPU)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    tokenizer, model = load_pair(args.ckpt, var_name="ar")
    image_size = tokenizer.config.image_size
    classifier = train_digit_classifier(image_size=image_size)
    held_out = DigitsDataset("test", image_size=image_size)
    with torch.no_grad():
        reconstructed = tokenizer.decode(tokenizer.encode(held_out.images)).clamp(-1, 1)
    report = {
        "ckpt": args.ckpt, "tokens_per_image": model.grid[0] * model.grid[1], "vocab_size": model.vocab_size,
        "classifier_accuracy": class_consistency(classifier, held_out.images, held_out.labels),
        "reconstruction_consistency": class_consistency(classifier, reconstructed, held_out.labels),
        "num_samples": model.num_classes * args.per_class, "seed": args.seed,
        "gumbel": args.gumbel,
        "sjd": {"sjd_window": args.sjd_window, "draft_init": args.draft_init}, "runs": [],
    }
    labels = class_balanced_labels(model.num_classes, args.per_class)
    for text in args.variants:
        given = argparse.Namespace(**{**dict.fromkeys(SETTINGS), **parse_variant(text)})
        settings = settings_from_args(given, model)  # what `var sample` would use with these flags
        samplers = {"ar": build_sampler("ar", model, tokenizer, settings, gumbel=args.gumbel),
                    "sjd": build_sampler("sjd", model, tokenizer, settings, gumbel=args.gumbel,
                                         sjd_window=args.sjd_window, draft_init=args.draft_init)}
        for batch_size in args.batch_sizes:
            row = {"variant": text, "settings": {n: getattr(settings, n) for n in ("cfg", "top_k", "top_p",
                                                                                   "temperature")},
                   "batch_size": batch_size}
            for name, sampler in samplers.items():
                row[name] = run_sampler(sampler, labels, batch_size, args.seed, classifier)
            row["passes_ratio"] = row["sjd"]["passes_per_image"] / row["ar"]["passes_per_image"]
            row["batch_passes_ratio"] = row["sjd"]["batch_passes"] / row["ar"]["batch_passes"]
            report["runs"].append(row)
            print(f"{text or 'defaults':>24} batch {batch_size:>3}: passes/img ar {row['ar']['passes_per_image']:.2f}"
                  f" sjd {row['sjd']['passes_per_image']:.2f} (x{row['passes_ratio']:.3f}; batch passes "
                  f"x{row['batch_passes_ratio']:.3f}); class-consistency ar {row['ar']['class_consistency']:.3f} "
                  f"sjd {row['sjd']['class_consistency']:.3f} (+-{row['ar']['class_consistency_se']:.3f})",
                  flush=True)
    atomic_write_text(args.out, json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out} (classifier {report['classifier_accuracy']:.3f} on held-out digits, "
          f"{report['reconstruction_consistency']:.3f} on their reconstructions through the tokenizer)")


if __name__ == "__main__":
    main()
