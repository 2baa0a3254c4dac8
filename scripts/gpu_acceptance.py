#!/usr/bin/env python
"""Every GPU measurement the issues ask for, each part small enough for one device call (< 10 minutes).

    python scripts/gpu_acceptance.py --parts bench --out $OUT            # one part on the device machine
    python scripts/gpu_acceptance.py --parts all --out $OUT              # everything (a longer session)
    python scripts/gpu_acceptance.py --tiny --device cpu --out out/acc   # CPU smoke run of every part (CI)
    python scripts/gpu_acceptance.py --parts official --official-var ../official/VAR \
        --official-code ../official/CoDe --out $OUT                     # beside the official code, same run

Parts (random weights at official sizes unless said otherwise; fp16 autocast, guidance on, decode included):

* ``bench``   plain VAR, depths 16/20/24/30 x batch 1/16/64/256: img/s, latency and peak memory against the
  official H100 numbers (performance issue: B=64 >= 2x, B=1 latency <= 0.5x, d24 at B=256 within 80 GB,
  memory never above the official at equal batch).
* ``latency`` the same at batch 1 and 16 with ``torch.compile(mode="reduce-overhead")`` (CUDA graphs).
* ``addons``  at d30: CoDe d30 -> d16 refiner with 8 and 6 draft steps and ScaleKV at 10 %, against plain d30
  in the same run (CoDe: >= 1.7x img/s and <= 0.55x peak memory at B=64; ScaleKV: <= 10 % of the KV bytes),
  and batch 512, where the full cache does not fit on an 80 GB card and ScaleKV's does.
* ``sjd``     a ~314M-parameter raster AR (d16): plain vs speculative Jacobi decoding at batch 1 and 16; with
  ``--ar-run``/``--var-run`` (trained runs, e.g. the digits ones), also ar vs sjd and var vs sjd-scale on them.
* ``official`` the official VAR and CoDe code timed beside ours in the same run (``--official-var DIR``,
  ``--official-code DIR``: checkouts on the device machine): d16/d20/d24/d30 x batch 1/16/64/256 and CoDe
  d30 -> d16; tokens identical, B=64 >= 2x img/s, B=1 latency <= 0.5x, peak memory <= 1x at every batch,
  d24 at B=256 fits.  Not part of ``all`` (it needs the checkouts).
* ``fid``     a 10k-sample FID/IS job (d16 tokenizer + transformer, 10 per class, random Inception weights):
  samples/s and feature-extraction img/s.

Each part's rows, ratios and threshold checks go to OUT/acceptance.json (merged with an earlier file there),
the benchmark tables and plots to OUT/<part>/.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from var.bench import add_arguments, base_ratios, bench_samplers, build_models, finalize_defaults, run
from var.checkpoints import save_model
from var.cli import main as var_cli
from var.config import load_experiment
from var.eval.fidelity import write_random_inception_weights
from var.loading import load_pair
from var.sample.registry import model_name_for
from var.utils import atomic_write_text, resolve_device

PARTS = ("bench", "latency", "addons", "sjd", "fid")  # "all"
EXTRA_PARTS = ("official",)  # need arguments "all" cannot supply
FID_SAMPLES_PER_CLASS = 10  # x 1000 classes = the 10k-sample job


def check(value: float | None, threshold: float, at_least: bool) -> dict:
    """One acceptance check: the measured value, the threshold, and whether it is met."""
    passed = value is not None and (value >= threshold if at_least else value <= threshold)
    return {"value": value, "threshold": ("min " if at_least else "max ") + str(threshold), "pass": passed}


def bench_args(options: argparse.Namespace, *argv: str) -> argparse.Namespace:
    """``var bench`` arguments: these, plus the shared device / size / repetition ones."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    shared = ["--device", options.device, "--runs", str(options.runs), *(["--tiny"] if options.tiny else [])]
    return finalize_defaults(parser.parse_args([*argv, *shared]))


def bench(out: Path, options: argparse.Namespace, *argv: str) -> dict:
    """``var bench`` with these arguments, writing to ``out``; returns its report."""
    return run(bench_args(options, *argv, "--out", str(out)))


def official_checks(report: dict, latency: bool) -> dict:
    """Performance-issue thresholds on the rows that have an official counterpart."""
    checks = {}
    for entry in report.get("vs_official_h100", []):
        name = f"{entry['sampler']} d{entry['depth']} B={entry['B']}"
        if "official_img_per_s" not in entry:
            checks[f"{name} runs where the official code runs out of memory"] = {"value": entry["ours_img_per_s"],
                                                                                  "pass": True}
            continue
        if entry["sampler"] == "var" and entry["B"] == 64:
            checks[f"{name} img/s vs official"] = check(entry["speedup"], 2.0, at_least=True)
        if entry["sampler"] == "var" and entry["B"] == 1:
            checks[f"{name} latency vs official"] = check(entry["latency_ratio"], 0.5, at_least=False)
        if "memory_ratio" in entry and not latency:
            checks[f"{name} peak memory vs official"] = check(entry["memory_ratio"], 1.0, at_least=False)
    return checks


def part_bench(out: Path, options: argparse.Namespace) -> dict:
    report = bench(out, options, "--samplers", "var")
    return {"rows": report["results"], "vs_official_h100": report.get("vs_official_h100", []),
            "checks": official_checks(report, latency=False)}


def part_latency(out: Path, options: argparse.Namespace) -> dict:
    depths = ["2"] if options.tiny else ["16", "30"]
    report = bench(out, options, "--samplers", "var", "--batch-sizes", "1", "16", "--depths", *depths,
                   "--compile", "reduce-overhead", "--warmup", "2")
    return {"rows": report["results"], "vs_official_h100": report.get("vs_official_h100", []),
            "checks": official_checks(report, latency=True)}


def draft_steps(official: int, options: argparse.Namespace) -> str:
    """CoDe draft steps: the official split, or one that fits the tiny models' four scales."""
    return str(min(official, 3) if options.tiny else official)


def part_addons(out: Path, options: argparse.Namespace) -> dict:
    depth = ["--depths", "2" if options.tiny else "30"]
    batches = ["--batch-sizes", "1", "16", "64"]
    rows = bench(out / "draft8", options, "--samplers", "var", "code", "scalekv", "--draft-steps",
                 draft_steps(8, options), *batches, *depth)["results"]
    rows += bench(out / "draft6", options, "--samplers", "code", "--draft-steps", draft_steps(6, options), *batches,
                  *depth)["results"]
    big = ["4"] if options.tiny else ["512"]
    rows += bench(out / "large_batch", options, "--samplers", "var", "scalekv", "--batch-sizes", *big,
                  *depth)["results"]
    ratios = base_ratios(rows)  # every add-on row against the plain d30 rows measured above
    checks = {}
    for entry in ratios:
        name = f"{entry['sampler']} d{entry['depth']} B={entry['B']}"
        if entry["sampler"] == "code" and entry["B"] == 64 and entry["draft_steps"] == int(draft_steps(8, options)):
            checks[f"{name} N=8 img/s vs plain"] = check(entry.get("speedup"), 1.7, at_least=True)
            checks[f"{name} N=8 peak memory vs plain"] = check(entry.get("memory_ratio"), 0.55, at_least=False)
        if entry["sampler"] == "scalekv" and "kv_ratio" in entry:
            checks[f"{name} KV bytes vs full cache"] = check(entry["kv_ratio"], 0.10, at_least=False)
        if entry["sampler"] == "scalekv" and entry.get("base_error") and not entry.get("error"):
            checks[f"{name} fits where the full cache does not"] = {"value": entry["base_error"], "pass": True}
    return {"rows": rows, "vs_base": ratios, "checks": checks}


def time_trained_run(run_dir: str, names: list[str], options: argparse.Namespace) -> list[dict]:
    """Plain vs speculative sampling (``names``: both decode the same model) of a trained run, at batch 1 and
    16, with the sampling settings of its config."""
    args = bench_args(options, "--batch-sizes", "1", "16")
    device = resolve_device(args.device)
    vqvae, model = load_pair(run_dir, device=device, var_name=model_name_for(names[0]))
    settings = load_experiment(Path(run_dir) / "config.yaml").sample
    return bench_samplers(model, vqvae, names, args, settings, device, run=run_dir)


def part_sjd(out: Path, options: argparse.Namespace) -> dict:
    depth = ["--depths", "2" if options.tiny else "16"]
    report = bench(out, options, "--samplers", "ar", "sjd", "--batch-sizes", "1", "16", *depth)
    result = {"rows": report["results"], "vs_base": report["vs_base"], "trained": []}
    if options.ar_run:
        result["trained"] += time_trained_run(options.ar_run, ["ar", "sjd"], options)
    if options.var_run:
        result["trained"] += time_trained_run(options.var_run, ["var", "sjd-scale"], options)
    result["checks"] = {f"sjd d{e['depth']} B={e['B']} latency speed-up": {"value": e.get("speedup"), "pass": True}
                        for e in report["vs_base"]}
    return result


def part_official(out: Path, options: argparse.Namespace) -> dict:
    """``var bench --official-var/--official-code``: both implementations side by side, thresholds checked."""
    if not options.official_var:
        raise SystemExit("gpu_acceptance: error: --parts official needs --official-var DIR (a FoundationVision/VAR "
                         "checkout; --official-code DIR adds czg1225/CoDe)")
    sizes = (["--depths", "2", "--batch-sizes", "1", "2"] if options.tiny else
             ["--depths", "16", "20", "24", "30", "--batch-sizes", "1", "16", "64", "256"])
    code = ["--official-code", options.official_code] if options.official_code else []
    report = bench(out, options, "--official-var", options.official_var, *code, *sizes)
    checks = {}
    for row in report["results"]:
        name = (f"d{row['depth']}" if row["sampler"] == "var" else
                f"CoDe d{row['depth']}->d{row['refiner_depth']}") + f" B={row['B']}"
        if "error" in row:
            if row["sampler"] == "var" and row["depth"] == 24 and row["B"] == 256:
                checks[f"{name} fits"] = {"value": row["error"], "pass": False}
            continue
        ratios = row["ratios"]
        checks[f"{name} tokens identical"] = {"value": row["tokens_identical"], "pass": row["tokens_identical"]}
        if row["sampler"] == "var" and row["B"] == 64:
            checks[f"{name} img/s vs official"] = check(ratios["img_per_s"], 2.0, at_least=True)
        if row["sampler"] == "var" and row["B"] == 1:
            checks[f"{name} latency vs official"] = check(ratios["latency"], 0.5, at_least=False)
        checks[f"{name} peak memory vs official"] = check(ratios["peak_memory"], 1.0, at_least=False)
    return {"rows": report["results"], "settings": report["settings"], "checks": checks}


def part_fid(out: Path, options: argparse.Namespace) -> dict:
    device = resolve_device(options.device)
    bundle, work = out / "random_d16", out / "work"
    work.mkdir(parents=True, exist_ok=True)
    model, vqvae = build_models(2 if options.tiny else 16, options.tiny, torch.device("cpu"))
    save_model(vqvae, bundle)
    save_model(model, bundle)
    weights = work / "random_inception.pth"
    write_random_inception_weights(weights)
    reference = work / "reference_stats.npz"  # timing only: any valid statistics will do
    np.savez(reference, mu=np.zeros(2048), sigma=np.eye(2048))
    per_class = 2 if options.tiny else FID_SAMPLES_PER_CLASS
    var_cli(["eval", "--ckpt", str(bundle), "--per-class", str(per_class), "--ref", str(reference),
             "--inception-weights", str(weights), "--allow-weights-mismatch", "--metrics", "fid,is",
             "--device", str(device), "--dtype", "fp32" if device.type == "cpu" else "fp16",
             "--batch-size", "125", "--eval-batch-size", "250", "--no-progress", "--no-npz",
             "--out", str(out / "eval")])
    report = json.loads((out / "eval" / "report.json").read_text())
    numbers = {"num_samples": report["num_samples"], "samples_per_s": report["sampling"]["samples_per_s"],
               "sampling_s": report["sampling"]["sampling_s"],
               "extraction_images_per_s": report["metrics"]["extraction_images_per_s"],
               "extraction_s": report["metrics"]["extraction_s"]}
    return {**numbers, "checks": {"FID job ran end to end": {"value": numbers["num_samples"], "pass": True}}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", default=["all"], choices=("all", *PARTS, *EXTRA_PARTS))
    parser.add_argument("--out", default="out/acceptance")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--tiny", action="store_true", help="tiny models (CPU smoke run of every part)")
    parser.add_argument("--runs", type=int, default=3, help="timed runs per configuration (min and median)")
    parser.add_argument("--ar-run", help="sjd part: a trained raster AR run (var train --model ar)")
    parser.add_argument("--var-run", help="sjd part: a trained VAR run, for sjd-scale")
    parser.add_argument("--official-var", metavar="DIR", help="official part: a FoundationVision/VAR checkout")
    parser.add_argument("--official-code", metavar="DIR", help="official part: a czg1225/CoDe checkout")
    options = parser.parse_args()
    out = Path(options.out)
    summary_path = out / "acceptance.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    device = resolve_device(options.device)
    summary["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    parts = [*PARTS, *(p for p in options.parts if p in EXTRA_PARTS)] if "all" in options.parts else options.parts
    for part in parts:
        print(f"== {part}", flush=True)
        summary[part] = globals()[f"part_{part}"](out / part, options)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(summary_path, json.dumps(summary, indent=1))
        for name, result in summary[part]["checks"].items():
            print(f"  {'ok  ' if result['pass'] else 'FAIL'} {name}: {result['value']} "
                  f"({result.get('threshold', 'reported')})", flush=True)
    print(f"wrote {summary_path}")


if __name__ == "__main__":
    main()
