"""``var bench``: sampling throughput, latency and memory of every sampler, beside the official numbers.

Models have random weights (speed does not depend on weight values) and official sizes (or ``--tiny``
sizes for a CPU smoke run).  Every configuration is warmed up, then timed ``--runs`` times; the report gives
the min (what the official anchors report) and the median.  On CUDA, time is measured with CUDA events and
memory with ``max_memory_allocated``; VAE decode is included unless ``--no-decode``.  Results go to
``bench.json`` and ``bench.png`` (throughput and peak memory against batch size, one line per sampler and
depth), and rows that match an official anchor (benchmarks/official_h100.json) get speed and memory ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from var.models.var import VAR, build_var
from var.sample.logits import SamplingSettings
from var.sample.registry import SAMPLER_NAMES, build_sampler
from var.tokenizers.vqvae import VQVAE, VQVAEConfig
from var.utils import autocast, compile_for_sampling, resolve_device

ANCHORS = Path(__file__).resolve().parents[1] / "benchmarks" / "official_h100.json"
TINY_VAR = dict(width=64, num_heads=2, vocab_size=64, z_channels=8, num_classes=10, patch_nums=(1, 2, 3, 4))
TINY_VQVAE = dict(vocab_size=64, z_channels=8, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, patch_nums=(1, 2, 3, 4))


def timed_runs(fn: Callable[[], object], device: torch.device, warmup: int, runs: int) -> list[float]:
    """Seconds per call of ``fn`` after ``warmup`` untimed calls (CUDA events on GPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end) / 1000)
        else:
            begin = time.perf_counter()
            fn()
            times.append(time.perf_counter() - begin)
    return times


def build_models(depth: int, tiny: bool, device: torch.device) -> tuple[VAR, VQVAE]:
    """Random-weight VAR of ``depth`` and a VQ-VAE (official sizes, or tiny ones), built on ``device``."""
    with torch.device(device):
        if tiny:
            model = build_var(depth, **TINY_VAR)
            vqvae = VQVAE(VQVAEConfig(**TINY_VQVAE))
        else:
            model = build_var(depth)
            vqvae = VQVAE()
    return model.eval().requires_grad_(False), vqvae.eval().requires_grad_(False)


def _is_oom(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error)


def bench_sampler(sampler, batch_size: int, num_classes: int, device: torch.device, dtype: str,
                  warmup: int, runs: int, decode: bool) -> dict:
    """Time one sampler at one batch size; returns a result row (or an error row on OOM)."""
    labels = torch.arange(batch_size, device=device) % num_classes
    stats = {}

    def run_once():
        with autocast(device, dtype):
            stats.update(sampler.sample(labels, seed=0, decode=decode).stats)

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    try:
        times = timed_runs(run_once, device, warmup, runs)
    except RuntimeError as error:
        if not _is_oom(error):
            raise
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return {"B": batch_size, "error": f"out of memory ({str(error).splitlines()[0][:120]})"}
    best = min(times)
    row = {
        "B": batch_size,
        "sec": round(best, 4),
        "median_sec": round(statistics.median(times), 4),
        "img_per_s": round(batch_size / best, 1),
        "kv_bytes": stats.get("kv_bytes"),
        "passes": stats.get("passes"),
    }
    if device.type == "cuda":
        row["peak_GB"] = round(torch.cuda.max_memory_allocated(device) / 1e9, 2)
    return row


def sampler_options(name: str, args: argparse.Namespace, depth: int, device: torch.device) -> dict:
    """Extra constructor arguments of the add-on samplers for a benchmark run."""
    options = {}
    if name.startswith("code"):
        options.update(refiner=build_models(args.refiner_depth, args.tiny, device)[0], draft_steps=args.draft_steps)
    if name.endswith("scalekv"):
        options["kv_budget"] = args.kv_budget
    return options


def anchor_ratios(rows: list[dict], anchors: dict) -> list[dict]:
    """Speed and memory of our rows relative to the official rows of the same depth and batch."""
    official = {(a["depth"], a["B"]): a for a in anchors["results"] if a.get("impl") == "official-VAR"}
    comparisons = []
    for row in rows:
        ref = official.get((row["depth"], row["B"]))
        if row["sampler"] != "var" or ref is None or "img_per_s" not in row:
            continue
        entry = {"depth": row["depth"], "B": row["B"], "ours_img_per_s": row["img_per_s"]}
        if "img_per_s" in ref:
            entry.update(official_img_per_s=ref["img_per_s"], speedup=round(row["img_per_s"] / ref["img_per_s"], 2))
        if "peak_GB" in row and "peak_GB" in ref:
            entry["memory_ratio"] = round(row["peak_GB"] / ref["peak_GB"], 2)
        if "error" in ref:
            entry["official"] = ref["error"]
        comparisons.append(entry)
    return comparisons


def plot(rows: list[dict], path: Path) -> None:
    """Throughput and peak memory against batch size, one line per (sampler, depth)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_speed, ax_memory) = plt.subplots(1, 2, figsize=(11, 4))
    series: dict[tuple[str, int], list[dict]] = {}
    for row in rows:
        if "img_per_s" in row:
            series.setdefault((row["sampler"], row["depth"]), []).append(row)
    for (sampler, depth), points in sorted(series.items()):
        points.sort(key=lambda r: r["B"])
        batches = [p["B"] for p in points]
        ax_speed.plot(batches, [p["img_per_s"] for p in points], marker="o", label=f"{sampler} d{depth}")
        memory = [p.get("peak_GB") if p.get("peak_GB") is not None else (p.get("kv_bytes") or 0) / 1e9
                  for p in points]
        ax_memory.plot(batches, memory, marker="o", label=f"{sampler} d{depth}")
    for axis, title in ((ax_speed, "images / s"), (ax_memory, "peak memory (GB; KV bytes on CPU)")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("batch size")
        axis.set_title(title)
        axis.grid(alpha=0.3)
    ax_speed.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args: argparse.Namespace) -> dict:
    device = resolve_device(args.device)
    dtype = args.dtype or ("fp16" if device.type == "cuda" else "fp32")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    settings = SamplingSettings(cfg=args.cfg, top_k=args.top_k, top_p=args.top_p)
    rows = []
    for depth in args.depths:
        model, vqvae = build_models(depth, args.tiny, device)
        if args.compile:
            compile_for_sampling(model, vqvae, args.compile)
        for name in args.samplers:
            sampler = build_sampler(name, model, vqvae, settings, **sampler_options(name, args, depth, device))
            for batch_size in args.batch_sizes:
                row = bench_sampler(sampler, batch_size, model.num_classes, device, dtype,
                                    args.warmup, args.runs, not args.no_decode)
                row = {"sampler": name, "depth": depth, **row}
                rows.append(row)
                print(json.dumps(row), flush=True)
        del model, vqvae
    report = {
        "settings": {
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "dtype": dtype, "cfg": args.cfg, "top_k": args.top_k,
            "top_p": args.top_p, "vae_decode_included": not args.no_decode, "weights": "random",
            "sizes": "tiny" if args.tiny else "official", "warmup": args.warmup, "runs": args.runs,
            "compile": args.compile,
            "time": "min of runs (median also given)",
        },
        "results": rows,
    }
    if ANCHORS.is_file() and not args.tiny:
        report["vs_official_h100"] = anchor_ratios(rows, json.loads(ANCHORS.read_text()))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(report, indent=1))
    plot(rows, out / "bench.png")
    print(f"wrote {out / 'bench.json'} and {out / 'bench.png'}")
    return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], help="default: fp16 on CUDA, fp32 on CPU")
    parser.add_argument("--tiny", action="store_true", help="tiny random models (CPU smoke run)")
    parser.add_argument("--depths", type=int, nargs="+", help="default: 16 20 24 30 (tiny: 2)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", help="default: 1 16 64 256 (tiny: 1 4)")
    parser.add_argument("--samplers", nargs="+", default=["var"], choices=SAMPLER_NAMES,
                        help="add-on samplers use random-weight drafter/refiner models of the sizes below")
    parser.add_argument("--cfg", type=float, default=1.5)
    parser.add_argument("--top-k", type=int, default=900)
    parser.add_argument("--top-p", type=float, default=0.96)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--no-decode", action="store_true", help="leave the VAE decode out of the timing")
    parser.add_argument("--compile", nargs="?", const="default", help="torch.compile mode (e.g. reduce-overhead)")
    parser.add_argument("--draft-steps", type=int, default=8, help="CoDe: scales run by the drafter")
    parser.add_argument("--refiner-depth", type=int, default=16, help="CoDe: depth of the refiner (tiny: 1)")
    parser.add_argument("--kv-budget", type=float, default=0.1, help="ScaleKV: fraction of the prefix kept")
    parser.add_argument("--out", default="out/bench")


def finalize_defaults(args: argparse.Namespace) -> argparse.Namespace:
    if args.depths is None:
        args.depths = [2] if args.tiny else [16, 20, 24, 30]
    if args.batch_sizes is None:
        args.batch_sizes = [1, 4] if args.tiny else [1, 16, 64, 256]
    if args.tiny:
        args.refiner_depth = min(args.refiner_depth, 1)
        args.draft_steps = min(args.draft_steps, len(TINY_VAR["patch_nums"]) - 1)
    return args


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("bench", help="benchmark sampling speed and memory (random weights)")
    add_arguments(parser)
    parser.set_defaults(func=lambda args: run(finalize_defaults(args)))
