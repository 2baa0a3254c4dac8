"""The add-on samplers on the many-scale digits model, side by side in one run (issue 15's report).

    var demo --config configs/digits_multiscale.yaml --out out/multiscale     # tokenizer, drafter, refiner
    python benchmarks/multiscale_report.py --run out/multiscale --out out/multiscale/report

Every sampler draws the same labels with the same seeds in Gumbel mode (tokens = argmax(logits + noise keyed by
seed and position)), so a sampler that follows plain VAR's law gives plain VAR's tokens and any difference is
the add-on's.  Per sampler: class-consistency, recall/precision and FID in the digit classifier's feature space
(against the training digits), PSNR/SSIM and the share of identical tokens against `var`, KV bytes (and their
fraction of `var`'s), forward passes per image and CPU images/s; then sjd-scale's passes at batch 1, 16 and 100.
ScaleKV budgets are calibrated with `var calibrate-kv` (written to OUT/kv/) with the largest observation window
the budget affords.  Writes OUT/report.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from var.cli import main as var_cli
from var.eval.digit_features import DIGITS_EXTRACTOR
from var.eval.evaluate import Evaluator
from var.eval.generate import class_balanced_labels
from var.eval.images import Samples
from var.eval.paired import compare_images
from var.loading import load_one, load_pair
from var.sample.logits import SamplingSettings
from var.sample.registry import build_sampler
from var.utils import to_uint8

BUDGETS = (0.05, 0.1, 0.2)


def window_for(budget: float, prefix: int) -> int:
    """The largest observation-window side whose SOS + side^2 floor fits the budget's tokens per layer."""
    tokens = int(budget * prefix + 1e-9)
    side = 1
    while 1 + (side + 1) ** 2 <= tokens:
        side += 1
    return side


def run_sampler(sampler, labels: torch.Tensor, batch_size: int, seed: int) -> dict:
    """Images uint8 (N, 3, H, W), token maps (N, 130), per-batch stats and CPU / wall seconds."""
    images, tokens, stats = [], [], []
    cpu, wall = time.process_time(), time.perf_counter()
    for i, start in enumerate(range(0, len(labels), batch_size)):
        out = sampler.sample(labels[start:start + batch_size], seed=seed + i)
        images.append(to_uint8(out.images))
        tokens.append(torch.cat([t.flatten(1) for t in out.indices], dim=1))
        stats.append(out.stats)
    return {"images": torch.cat(images), "tokens": torch.cat(tokens), "stats": stats,
            "cpu_s": time.process_time() - cpu, "wall_s": time.perf_counter() - wall}


def mean_stat(stats: list[dict], key: str, sizes: list[int]) -> float:
    return sum(s[key] * n for s, n in zip(stats, sizes, strict=True)) / sum(sizes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="the demo output (var_run, refiner_run)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--per-class", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cfg", type=float, default=1.5)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=0.96)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    run, out = Path(args.run), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    vqvae, model = load_pair(run / "var_run")
    refiner = load_one(run / "refiner_run")
    cfg = model.config
    prefix = cfg.scale_bounds[-1][0]
    settings = SamplingSettings(cfg=args.cfg, top_k=args.top_k, top_p=args.top_p)
    labels = class_balanced_labels(cfg.num_classes, args.per_class)
    budgets = {}
    for budget in BUDGETS:
        path = out / "kv" / f"budget_{budget:g}.json"
        if not path.is_file():
            var_cli(["calibrate-kv", "--ckpt", str(run / "var_run"), "--kv-budget", str(budget), "--kv-window",
                     str(window_for(budget, prefix)), "--cfg", str(args.cfg), "--top-p", str(args.top_p),
                     "--out", str(path)])
        budgets[budget] = str(path)
    rows = {
        "var": ("var", {}),
        **{f"scalekv {b:g}": ("var", {"kv_budget": budgets[b]}) for b in BUDGETS},
        "code": ("code", {"refiner": refiner}),
        "code + scalekv 0.1": ("code", {"refiner": refiner, "kv_budget": 0.1, "kv_window": 1}),
        "sjd-scale": ("sjd-scale", {}),
    }
    evaluator = Evaluator(DIGITS_EXTRACTOR, "digits", metrics=("fid", "pr"), progress=False)
    sizes = [len(labels[s:s + args.batch_size]) for s in range(0, len(labels), args.batch_size)]
    results, reference = {}, None
    for name, (sampler_name, options) in rows.items():
        sampler = build_sampler(sampler_name, model, vqvae, settings, gumbel=True, **options)
        with torch.no_grad():
            result = run_sampler(sampler, labels, args.batch_size, args.seed)
        reference = reference or result
        metrics = evaluator.evaluate(Samples(result["images"], labels))
        paired = compare_images(reference["images"], result["images"], with_lpips=False)
        stats = result["stats"]
        row = {
            "class_consistency": metrics["class_consistency"],
            "recall": metrics["recall"], "precision": metrics["precision"], "fid": metrics["fid"],
            "psnr_db": paired["psnr_db"], "ssim": paired["ssim"],
            "identical_tokens": (result["tokens"] == reference["tokens"]).float().mean().item(),
            "kv_bytes": max(s["kv_bytes"] for s in stats),
            "passes_per_image": mean_stat(stats, "passes_per_image", sizes),
            "cpu_images_per_s": len(labels) / result["cpu_s"], "wall_images_per_s": len(labels) / result["wall_s"],
            **{key: stats[0][key] for key in stats[0] if key.startswith(("kv_fraction", "kv_budget"))},
        }
        row["kv_vs_var"] = row["kv_bytes"] / results["var"]["kv_bytes"] if results else 1.0
        results[name] = row
        print(name, json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    speculation = {}
    for batch in (1, 16, 100):
        sampler = build_sampler("sjd-scale", model, vqvae, settings, gumbel=True)
        subset = labels[: max(batch, 100)]
        with torch.no_grad():
            result = run_sampler(sampler, subset, batch, args.seed)
        batch_sizes = [len(subset[start:start + batch]) for start in range(0, len(subset), batch)]
        speculation[batch] = {
            "passes_per_image": mean_stat(result["stats"], "passes_per_image", batch_sizes),
            "passes_per_batch": sum(s["passes"] for s in result["stats"]) / len(result["stats"]),
            "plain_passes": cfg.num_scales,
            "kv_bytes": result["stats"][0]["kv_bytes"],
        }
        print(f"sjd-scale batch {batch}", json.dumps(speculation[batch]), flush=True)
    report = {"settings": vars(args), "num_samples": len(labels), "load_average": os.getloadavg(),
              "samplers": results, "sjd_scale_batches": speculation}
    (out / "report.json").write_text(json.dumps(report, indent=1))
    header = ("| sampler | consistency | recall | precision | classifier FID | PSNR dB vs var | SSIM | identical "
              "tokens | KV bytes (vs var) | passes/img | CPU img/s |")
    lines = [header, "|" + "---|" * 11]
    for name, r in results.items():
        lines.append(f"| {name} | {r['class_consistency']:.1%} | {r['recall']:.2f} | {r['precision']:.2f} | "
                     f"{r['fid']:.2f} | {min(r['psnr_db'], 100):.1f} | {r['ssim']:.3f} | {r['identical_tokens']:.1%} | "
                     f"{r['kv_bytes'] / 1024:.0f} KiB ({r['kv_vs_var']:.3f}) | {r['passes_per_image']:.2f} | "
                     f"{r['cpu_images_per_s']:.1f} |")
    lines.append("")
    lines.append("| sjd-scale batch | passes per image | passes per batch (latency) | plain var |")
    lines.append("|---|---|---|---|")
    for batch, s in speculation.items():
        lines.append(f"| {batch} | {s['passes_per_image']:.2f} | {s['passes_per_batch']:.2f} | {s['plain_passes']} |")
    table = "\n".join(lines)
    (out / "table.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
