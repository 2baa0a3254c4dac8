"""The add-on samplers on the many-scale digits model, side by side in one run (issue 15's report).

    var demo --config configs/digits_multiscale.yaml --out out/multiscale     # tokenizer, drafter, refiner
    python benchmarks/multiscale_report.py --run out/multiscale --out out/multiscale/report

Every sampler draws the same labels with the same seeds in Gumbel mode (tokens = argmax(logits + noise keyed by
seed and position)), so a sampler that follows plain VAR's law gives plain VAR's tokens and any difference is
the add-on's.  Per sampler: class-consistency, recall/precision and FID in the digit classifier's feature space
(against the training digits), PSNR/SSIM and the share of identical tokens against `var`, KV bytes (and their
fraction of `var`'s), forward passes per image and CPU images/s; then sjd-scale's passes at batch 1, 16 and 100.
ScaleKV budgets are calibrated with `var calibrate-kv` (written to OUT/kv/) with the largest observation window
the budget affords (``--kv-window`` overrides it), on ``--calibration-per-class`` labels of every class.
``--scalekv-sweep`` adds rows at the 10 % budget that vary what ScaleKV's quality depends on (window, uniform or
calibrated, drafter fraction, calibration labels, scoring).  PSNR is reported pooled (MSE over the whole set,
torchmetrics' accumulated PeakSignalNoiseRatio, ScaleKV's protocol) and as the mean of per-image PSNRs (identical
images count 100 dB).  Writes OUT/report.json, OUT/table.md and a labelled plot (``--plot``, default OUT/report.png)
and prints the Markdown table.
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
from var.plots import HIGHER, better_title, pyplot, save_figure
from var.sample.logits import SamplingSettings
from var.sample.registry import build_sampler
from var.utils import atomic_write_text, autocast, to_uint8

BUDGETS = (0.05, 0.1, 0.2)
SWEEP_BUDGET = 0.1


def window_for(budget: float, prefix: int) -> int:
    """The largest observation-window side whose SOS + side^2 floor fits the budget's tokens per layer."""
    tokens = int(budget * prefix + 1e-9)
    side = 1
    while 1 + (side + 1) ** 2 <= tokens:
        side += 1
    return side


def run_sampler(sampler, labels: torch.Tensor, batch_size: int, seed: int, dtype: str = "fp32") -> dict:
    """Images uint8 (N, 3, H, W), token maps (N, 130), per-batch stats and CPU / wall seconds."""
    images, tokens, stats = [], [], []
    cpu, wall = time.process_time(), time.perf_counter()
    for i, start in enumerate(range(0, len(labels), batch_size)):
        with autocast(torch.device("cpu"), dtype):
            out = sampler.sample(labels[start:start + batch_size], seed=seed + i)
        images.append(to_uint8(out.images))
        tokens.append(torch.cat([t.flatten(1) for t in out.indices], dim=1))
        stats.append(out.stats)
    return {"images": torch.cat(images), "tokens": torch.cat(tokens), "stats": stats,
            "cpu_s": time.process_time() - cpu, "wall_s": time.perf_counter() - wall}


def mean_stat(stats: list[dict], key: str, sizes: list[int]) -> float:
    return sum(s[key] * n for s, n in zip(stats, sizes, strict=True)) / sum(sizes)


def calibrated_budget(run: Path, out: Path, budget: float, window: int, drafter_fraction: float,
                      per_class: int, num_classes: int, args) -> str:
    """The budget JSON `var calibrate-kv` writes for these calibration choices (computed once, then reused)."""
    path = out / "kv" / f"budget_{budget:g}_w{window}_d{drafter_fraction:g}_n{per_class * num_classes}.json"
    if not path.is_file():
        labels = [str(label) for label in class_balanced_labels(num_classes, per_class).tolist()]
        var_cli(["calibrate-kv", "--ckpt", str(run / "var_run"), "--kv-budget", str(budget), "--kv-window", str(window),
                 "--drafter-fraction", str(drafter_fraction), "--cfg", str(args.cfg), "--top-k", str(args.top_k),
                 "--top-p", str(args.top_p), "--temperature", str(args.temperature), "--batch-size", "100",
                 "--labels", *labels, "--out", str(path)])
    return str(path)


def sampler_rows(run: Path, out: Path, refiner, prefix: int, num_classes: int,
                 args) -> dict[str, tuple[str, dict, str]]:
    """Report row name -> (sampler name, options, compute dtype)."""
    def calibrated(budget: float, window: int | None = None, drafter_fraction: float | None = None,
                   per_class: int | None = None) -> str:
        return calibrated_budget(run, out, budget, window or args.kv_window or window_for(budget, prefix),
                                 args.drafter_fraction if drafter_fraction is None else drafter_fraction,
                                 per_class or args.calibration_per_class, num_classes, args)

    rows = {
        "var": ("var", {}),
        **{f"scalekv {b:g}": ("var", {"kv_budget": calibrated(b)}) for b in BUDGETS},
        "code": ("code", {"refiner": refiner}),
        "code + scalekv 0.1": ("code", {"refiner": refiner, "kv_budget": 0.1, "kv_window": 1}),
        "sjd-scale": ("sjd-scale", {}),
    }
    if args.scalekv_sweep:  # what ScaleKV's quality at 10 % depends on, one change at a time (a uniform budget
        # is a calibrated one with drafter fraction 0)
        b = SWEEP_BUDGET
        rows.update({
            f"sweep {b:g} uniform window 1": ("var", {"kv_budget": b, "kv_window": 1}),
            f"sweep {b:g} uniform window 2": ("var", {"kv_budget": b, "kv_window": 2}),
            f"sweep {b:g} calibrated window 1": ("var", {"kv_budget": calibrated(b, window=1)}),
            f"sweep {b:g} drafter fraction 0.3": ("var", {"kv_budget": calibrated(b, drafter_fraction=0.3)}),
            f"sweep {b:g} 100 calibration labels": ("var", {"kv_budget": calibrated(b, per_class=10)}),
            f"sweep {b:g} max-pool scoring": ("var", {"kv_budget": calibrated(b), "kv_scoring": "max-pool"}),
            f"sweep {b:g} shared cfg choice": ("var", {"kv_budget": calibrated(b), "kv_share_cfg": True}),
            **{f"sweep uniform {f:g}": ("var", {"kv_budget": f, "kv_window": window_for(f, prefix)})
               for f in (0.3, 0.5, 0.75)},
        })
    rows = {name: (sampler, options, "fp32") for name, (sampler, options) in rows.items()}
    if args.scalekv_sweep:  # the full cache computed in bf16: how far a tiny perturbation moves Gumbel-mode samples
        rows["sweep var in bf16 (full cache)"] = ("var", {}, "bf16")
    return rows


def plot_report(results: dict, speculation: dict, path: Path) -> None:
    """Three panels: paired PSNR against KV bytes (the ScaleKV target marked), consistency and recall per
    sampler, sjd-scale's passes per image by batch size."""
    plt = pyplot()
    figure, (fidelity, quality, passes) = plt.subplots(1, 3, figsize=(17, 5))
    def point(name: str) -> tuple[float, float]:
        return 100 * results[name]["kv_vs_var"], min(results[name]["psnr_db_pooled"], 60)

    curve = sorted((n for n in results if n.startswith(("scalekv", "sweep uniform"))), key=lambda n: point(n)[0])
    fidelity.plot(*zip(*(point(n) for n in curve), strict=True), "o-", label="var + ScaleKV, by budget")
    for name in curve:
        fidelity.annotate(name.split()[-1], point(name), fontsize=8, xytext=(4, -10), textcoords="offset points")
    variants = [n for n in results if n.startswith(f"sweep {SWEEP_BUDGET:g} ")]
    if variants:  # the investigation's variants at 10 %: one marker each, their span in the legend
        span = [results[n]["psnr_db_pooled"] for n in variants]
        fidelity.scatter([point(n)[0] for n in variants], span, marker="x", color="grey",
                         label=f"10 % variants (window, calibration, scoring): {min(span):.1f}-{max(span):.1f} dB")
    for name in ("code", "code + scalekv 0.1", "sjd-scale"):
        if name in results:
            fidelity.scatter(*point(name), marker="s")
            same = results[name]["psnr_db_pooled"] >= 100
            offset = (-70, -12) if same else (-20, -14) if "scalekv" in name else (4, 4)  # clear of the curve
            fidelity.annotate(f"{name} (identical)" if same else name, point(name), fontsize=8, xytext=offset,
                              textcoords="offset points")
    floor = [n for n in results if results[n].get("dtype") == "bf16"]
    for name in floor:
        fidelity.axhline(results[name]["psnr_db_pooled"], color="tab:red", linewidth=0.8,
                         label=f"full cache in bf16: {results[name]['psnr_db_pooled']:.1f} dB")
    fidelity.legend(fontsize=7, loc="upper left")
    fidelity.axhline(30, color="grey", linestyle="--", linewidth=0.8)
    fidelity.axvline(10, color="grey", linestyle=":", linewidth=0.8)
    fidelity.text(10.5, 30.5, "target: >= 30 dB at <= 10 % KV", fontsize=8, color="grey")
    fidelity.set_ylim(bottom=min(point(name)[1] for name in results) - 5)  # room for the labels below points
    fidelity.set_xscale("log")
    fidelity.set_xlabel("KV-cache bytes, % of plain var's (log)")
    fidelity.set_ylabel("pooled PSNR vs var, same seeds (dB; identical = 60 on this axis)")
    fidelity.set_title(better_title("Fidelity to var vs KV memory", HIGHER))
    names = [n for n in results if not n.startswith("sweep")]
    x = torch.arange(len(names)).float()
    quality.bar(x - 0.2, [100 * results[n]["class_consistency"] for n in names], 0.4, label="class-consistency %")
    quality.bar(x + 0.2, [100 * results[n]["recall"] for n in names], 0.4, label="recall x 100")
    quality.set_xticks(x.tolist(), names, rotation=30, ha="right", fontsize=8)
    quality.set_ylim(0, 125)  # the legend sits above the bars
    quality.set_ylabel("%")
    quality.legend(fontsize=8, loc="upper center", ncol=2)
    quality.set_title(better_title("Sample quality per sampler", HIGHER))
    batches = list(speculation)
    passes.bar([str(b) for b in batches], [speculation[b]["passes_per_image"] for b in batches], label="sjd-scale")
    passes.axhline(speculation[batches[0]]["plain_passes"], color="grey", linestyle="--", label="plain var")
    passes.set_xlabel("batch size")
    passes.set_ylabel("forward passes per image")
    passes.set_title(better_title("sjd-scale passes by batch", "lower"))
    passes.legend(fontsize=8)
    figure.suptitle("Add-on samplers on the many-scale digits VAR (6 scales, 130 tokens), Gumbel mode, same seeds")
    save_figure(figure, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="the demo output (var_run, refiner_run)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--plot", help="labelled figure (default OUT/report.png)")
    parser.add_argument("--per-class", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cfg", type=float, default=1.5)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=0.96)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--kv-window", type=int, help="observation window of the calibrated budgets (default: the "
                                                      "largest each budget affords)")
    parser.add_argument("--drafter-fraction", type=float, default=0.1, help="var calibrate-kv --drafter-fraction")
    parser.add_argument("--calibration-per-class", type=int, default=1,
                        help="calibration labels per class (default 1: each class once)")
    parser.add_argument("--scalekv-sweep", action="store_true", help="add the ScaleKV investigation rows at 10 %%")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    run, out = Path(args.run), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    vqvae, model = load_pair(run / "var_run")
    refiner = load_one(run / "refiner_run")
    cfg = model.config
    prefix = cfg.scale_bounds[-1][0]
    settings = SamplingSettings(cfg=args.cfg, top_k=args.top_k, top_p=args.top_p, temperature=args.temperature)
    labels = class_balanced_labels(cfg.num_classes, args.per_class)
    rows = sampler_rows(run, out, refiner, prefix, cfg.num_classes, args)
    evaluator = Evaluator(DIGITS_EXTRACTOR, "digits", metrics=("fid", "pr"), progress=False)
    sizes = [len(labels[s:s + args.batch_size]) for s in range(0, len(labels), args.batch_size)]
    results, reference = {}, None
    bounds = cfg.scale_bounds
    for name, (sampler_name, options, dtype) in rows.items():
        sampler = build_sampler(sampler_name, model, vqvae, settings, gumbel=True, **options)
        with torch.no_grad():
            result = run_sampler(sampler, labels, args.batch_size, args.seed, dtype)
        reference = reference or result
        metrics = evaluator.evaluate(Samples(result["images"], labels))
        paired = compare_images(reference["images"], result["images"], with_lpips=False)
        stats = result["stats"]
        row = {
            "options": {k: v for k, v in options.items() if k != "refiner"}, "dtype": dtype,
            "class_consistency": metrics["class_consistency"],
            "recall": metrics["recall"], "precision": metrics["precision"], "fid": metrics["fid"],
            "psnr_db_pooled": paired["psnr_db_pooled"], "psnr_db": paired["psnr_db"], "ssim": paired["ssim"],
            "identical_tokens": (result["tokens"] == reference["tokens"]).float().mean().item(),
            "identical_tokens_per_scale": [
                (result["tokens"][:, a:b] == reference["tokens"][:, a:b]).float().mean().item() for a, b in bounds],
            "identical_images": (result["images"] == reference["images"]).flatten(1).all(1).float().mean().item(),
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
        subset = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(args.seed))[:100]]
        with torch.no_grad():
            result = run_sampler(sampler, subset, batch, args.seed)
        batch_sizes = [len(subset[start:start + batch]) for start in range(0, len(subset), batch)]
        speculation[batch] = {
            "passes_per_image": mean_stat(result["stats"], "passes_per_image", batch_sizes),
            "passes_per_batch": sum(s["passes"] for s in result["stats"]) / len(result["stats"]),
            "plain_passes": cfg.num_scales,
            "kv_bytes": result["stats"][0]["kv_bytes"],
            "cpu_images_per_s": len(subset) / result["cpu_s"],
        }
        plain = run_sampler(build_sampler("var", model, vqvae, settings, gumbel=True), subset, batch, args.seed)
        speculation[batch]["plain_cpu_images_per_s"] = len(subset) / plain["cpu_s"]
        speculation[batch]["plain_kv_bytes"] = plain["stats"][0]["kv_bytes"]
        print(f"sjd-scale batch {batch}", json.dumps(speculation[batch]), flush=True)
    report = {"settings": vars(args), "num_samples": len(labels), "load_average": os.getloadavg(),
              "samplers": results, "sjd_scale_batches": speculation}
    atomic_write_text(out / "report.json", json.dumps(report, indent=1))
    plot_report(results, speculation, Path(args.plot) if args.plot else out / "report.png")
    header = ("| sampler | consistency | recall | precision | classifier FID | PSNR dB vs var (pooled / per-image "
              "mean) | SSIM | identical tokens | KV bytes (vs var) | passes/img | CPU img/s |")
    lines = [header, "|" + "---|" * 11]
    for name, r in results.items():
        psnr = "(same)" if r["psnr_db_pooled"] >= 100 else f"{r['psnr_db_pooled']:.1f} / {r['psnr_db']:.1f}"
        lines.append(f"| {name} | {r['class_consistency']:.1%} | {r['recall']:.2f} | {r['precision']:.2f} | "
                     f"{r['fid']:.2f} | {psnr} | {r['ssim']:.3f} | {r['identical_tokens']:.1%} | "
                     f"{r['kv_bytes'] / 1024:.0f} KiB ({r['kv_vs_var']:.3f}) | {r['passes_per_image']:.2f} | "
                     f"{r['cpu_images_per_s']:.1f} |")
    lines.append("")
    lines.append("| sjd-scale batch | passes per image | passes per batch (latency) | plain var passes | KV bytes vs "
                 "var | CPU img/s (var) |")
    lines.append("|---|---|---|---|---|---|")
    for batch, s in speculation.items():
        lines.append(f"| {batch} | {s['passes_per_image']:.2f} | {s['passes_per_batch']:.2f} | {s['plain_passes']} | "
                     f"{s['kv_bytes'] / s['plain_kv_bytes']:.3f} | {s['cpu_images_per_s']:.1f} "
                     f"({s['plain_cpu_images_per_s']:.1f}) |")
    table = "\n".join(lines)
    atomic_write_text(out / "table.md", table + "\n")
    print(table)


if __name__ == "__main__":
    main()
