"""``var bench``: sampling throughput, latency and memory of every sampler, beside the official numbers.

Models have random weights (speed does not depend on weight values) and official sizes (or ``--tiny``
sizes for a CPU smoke run).  Every configuration is warmed up, then timed ``--runs`` times; the report gives
the min (what the official anchors report) and the median.  On CUDA, time is measured with CUDA events and
memory with ``max_memory_allocated``; VAE decode is included unless ``--no-decode``.  Results go to
``bench.json`` and ``bench.png`` (throughput and peak memory against batch size, one line per sampler and
depth).  Two kinds of ratios are reported: every add-on sampler against the base sampler of the same depth
and batch measured in the same run (``vs_base``: speed, peak memory, KV bytes), and base/CoDe rows against
the official rows of the same configuration (``vs_official_h100``, from benchmarks/official_h100.json).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from var.argtypes import integer
from var.compile import compile_for_sampling
from var.models.family import ScaleSchedule
from var.models.infinity import INFINITY_SIZES, Infinity, InfinityConfig, PackedText
from var.models.infinity_schedules import parse_aspect, schedule_for
from var.models.llamagen import LLAMAGEN_SIZES, LlamaGen, llamagen_config
from var.models.var import build_var
from var.sample.arguments import SETTINGS, family_defaults_help, settings_from_args
from var.sample.logits import SamplingSettings
from var.sample.options import add_option_arguments, given_options
from var.sample.registry import (
    BASE_SAMPLERS,
    SAMPLER_NAMES,
    all_options,
    build_sampler,
    model_name_for,
    option_users,
    sampler_options,
)
from var.tokenizers.bsq import BSQConfig, BSQTokenizer
from var.tokenizers.llamagen_vq import LlamaGenVQ, LlamaGenVQConfig
from var.tokenizers.vqvae import VQVAE, VQVAEConfig
from var.utils import atomic_write_text, autocast, resolve_device

ANCHORS = Path(__file__).resolve().parents[1] / "benchmarks" / "official_h100.json"
TINY_VAR = dict(width=64, num_heads=2, vocab_size=64, z_channels=8, num_classes=10, patch_nums=(1, 2, 3, 4))
TINY_VQVAE = dict(vocab_size=64, z_channels=8, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, patch_nums=(1, 2, 3, 4))
# raster rows: LlamaGen c2i at 256 px with its VQ-16 (16x16 tokens); --tiny: 4x4 tokens over a 64-code VQ
LLAMAGEN_BENCH_SIZES = ("GPT-B", "GPT-L", "GPT-XL")
TINY_LLAMAGEN = dict(n_layer=2, n_head=2, dim=64, vocab_size=64, num_classes=10, block_size=16)
TINY_LLAMAGEN_VQ = dict(codebook_size=64, z_channels=8, ch=32, encoder_ch_mult=(1, 2, 2), decoder_ch_mult=(1, 2, 2),
                        num_res_blocks=1)


def timed_runs(fn: Callable[[], object], device: torch.device, warmup: int, runs: int) -> tuple[float, list[float]]:
    """Wall seconds of the first warm-up call (with ``--compile``: compilation included; 0 without warm-up)
    and seconds per call of ``fn`` for ``runs`` calls after ``warmup`` warm-up calls (CUDA events on GPU)."""
    first_call = 0.0
    for index in range(warmup):
        begin = time.perf_counter()
        fn()
        if index == 0:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            first_call = time.perf_counter() - begin
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
    return first_call, times


def build_models(depth: int, tiny: bool, device: torch.device) -> tuple[nn.Module, VQVAE]:
    """Random-weight VAR of ``depth`` and a VQ-VAE (official sizes, or tiny ones), built on ``device``."""
    var_sizes, vqvae_sizes = (dict(TINY_VAR), dict(TINY_VQVAE)) if tiny else ({}, {})
    with torch.device(device):
        model = build_var(depth, **var_sizes)
        vqvae = VQVAE(VQVAEConfig(**vqvae_sizes))
    return model.eval().requires_grad_(False), vqvae.eval().requires_grad_(False)


TINY_INFINITY = dict(depth=2, width=64, num_heads=4, bits_per_token=4, text_channels=16, text_pool_heads=4,
                     text_maxlen=32)
TINY_BSQ = dict(codebook_dim=4, base_ch=24, encoder_ch_mult=(1, 2), decoder_ch_mult=(1, 2), num_res_blocks=1,
                patch_size=2)
PROMPT_TOKENS = 32  # T5 tokens of each random bench prompt


def build_infinity_models(size: str, tiny: bool, device: torch.device, h_div_w: float, level: str
                          ) -> tuple[Infinity, BSQTokenizer, int]:
    """A random-weight Infinity of a named size (tiny: 2 blocks) on the schedule, its BSQ tokenizer, and the
    parameter count of the official size (counted on the meta device, as spec_infinity.md states them)."""
    official = InfinityConfig(**INFINITY_SIZES[size])
    with torch.device("meta"):
        params = Infinity(official).num_params()
    config = InfinityConfig(**TINY_INFINITY) if tiny else official
    bits = config.bits_per_token
    patchify = not tiny and bits == 56  # the 8B reads 2 x 2 patches of 14-bit codes (stride-8 tokenizer)
    bsq_config = BSQConfig(**TINY_BSQ) if tiny else BSQConfig(codebook_dim=bits // 4 if patchify else bits,
                                                              patch_size=8 if patchify else 16,
                                                              spatial_patchify=patchify)
    with torch.device(device):
        model, tokenizer = Infinity(config), BSQTokenizer(bsq_config)
    model.init_weights()
    schedule = schedule_for(h_div_w, level)
    if tiny:  # a short prefix of the template keeps a CPU smoke run fast
        schedule = ScaleSchedule(schedule.shapes[:4], schedule.template)
    model.use_schedule(schedule)
    return model.eval().requires_grad_(False), tokenizer.eval().requires_grad_(False), params


def random_prompts(model: Infinity, batch_size: int, device: torch.device) -> PackedText:
    """Random T5 features of ``batch_size`` prompts of PROMPT_TOKENS tokens each (seeded)."""
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(batch_size * PROMPT_TOKENS, model.config.text_channels, generator=generator)
    return PackedText(features.to(device), (PROMPT_TOKENS,) * batch_size)


def build_llamagen_models(size: str, tiny: bool, device: torch.device) -> tuple[LlamaGen, LlamaGenVQ]:
    """Random-weight LlamaGen c2i of a named size (GPT-B ...; 256 px, 16x16 tokens) and its VQ-16 tokenizer
    (or tiny ones), built on ``device``.  The output head is drawn like the other weights (the official init
    zeroes it, which would make every distribution uniform and speculative acceptance meaningless)."""
    config = llamagen_config("GPT-B", **TINY_LLAMAGEN) if tiny else llamagen_config(size, block_size=256)
    with torch.device(device):
        model = LlamaGen(config)
        torch.nn.init.normal_(model.output.weight, std=config.initializer_range)
        vq = LlamaGenVQ(LlamaGenVQConfig(**(TINY_LLAMAGEN_VQ if tiny else {})))
    return model.eval().requires_grad_(False), vq.eval().requires_grad_(False)


def _is_oom(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error)


def bench_sampler(sampler, batch_size: int, num_classes: int, device: torch.device, dtype: str,
                  warmup: int, runs: int, decode: bool, compiled: bool = False) -> dict:
    """Time one sampler at one batch size; returns a result row (or an error row on OOM).  Infinity samples
    random prompts (``num_classes`` is ignored there)."""
    if isinstance(sampler.model, Infinity):
        labels = random_prompts(sampler.model, batch_size, device)
    else:
        labels = torch.arange(batch_size, device=device) % num_classes
    stats = {}

    def run_once():
        with autocast(device, dtype):
            stats.update(sampler.sample(labels, seed=0, decode=decode).stats)

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    try:
        first_call, times = timed_runs(run_once, device, warmup, runs)
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
        # compilation (--compile) happens in the first call: reported apart from the timed runs
        "first_call_sec": round(first_call, 2),
        "compile_sec": round(max(first_call - statistics.median(times), 0.0), 2) if compiled else None,
    }
    if device.type == "cuda":
        row["peak_GB"] = round(torch.cuda.max_memory_allocated(device) / 1e9, 2)
    return row


# sampler options as bench flags: declared ones as they are, model-valued ones as the depth of a random model
OPTIONS = all_options()
VALUE_OPTIONS = {name: spec for name, spec in OPTIONS.items() if not spec.model}
MODEL_OPTIONS = {name: spec for name, spec in OPTIONS.items() if spec.model}
DEFAULT_MODEL_DEPTH = 16
ROW_KEYS = (*VALUE_OPTIONS, *(f"{name}_depth" for name in MODEL_OPTIONS))  # what a row's configuration is


def parse_sampler_spec(text: str) -> tuple[str, dict]:
    """``NAME`` or ``NAME:option=value,...`` (options of that sampler only, parsed by their declarations)."""
    name, _, rest = text.partition(":")
    if name not in SAMPLER_NAMES:
        raise ValueError(f"--samplers: unknown sampler '{name}'; choose from {', '.join(SAMPLER_NAMES)}")
    accepted, own = sampler_options(name), {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        key = key.strip().replace("-", "_")
        model = key.removesuffix("_depth")
        if key in VALUE_OPTIONS and key in accepted:
            own[key] = VALUE_OPTIONS[key].parse(value)
        elif key.endswith("_depth") and model in MODEL_OPTIONS and model in accepted:
            own[key] = int(value)
        else:
            raise ValueError(f"--samplers {text}: sampler '{name}' does not take '{key}' (it takes "
                             f"{', '.join(k + '_depth' if k in MODEL_OPTIONS else k for k in accepted) or 'nothing'})")
    return name, own


def sampler_settings(text: str, args: argparse.Namespace) -> tuple[str, dict]:
    """(sampler name, its options in this run): the option flags it takes, then its own ``:option=value``;
    model-valued options as ``<name>_depth``."""
    name, own = parse_sampler_spec(text)
    accepted = sampler_options(name)
    settings = {key: value for key, value in given_options(args, VALUE_OPTIONS).items() if key in accepted}
    settings.update({f"{key}_depth": getattr(args, f"{key}_depth") for key in accepted if key in MODEL_OPTIONS})
    settings.update(own)
    return name, settings


def sampler_arguments(settings: dict, args: argparse.Namespace, device: torch.device) -> dict:
    """Constructor arguments for these settings, with random-weight models for model-valued options."""
    arguments = dict(settings)
    for key in MODEL_OPTIONS:
        if f"{key}_depth" in arguments:
            arguments[key] = build_models(arguments.pop(f"{key}_depth"), args.tiny, device)[0]
    return arguments


def recorded_settings(sampler, settings: dict) -> dict:
    """What a row records of its sampler: the options that differ from their defaults, as used (resolved
    defaults such as CoDe's draft steps included), model-valued ones as their depth."""
    recorded = {key: value for key, value in settings.items() if key.endswith("_depth")}
    recorded.update({key: value for key, value in sampler.options.non_default().items() if key not in MODEL_OPTIONS})
    return recorded


def _settings_of(row: dict) -> dict:
    return {key: row[key] for key in ROW_KEYS if key in row}


def _ratio(ours, theirs) -> float | None:
    return round(ours / theirs, 3) if ours is not None and theirs else None


def base_ratios(rows: list[dict]) -> list[dict]:
    """Every add-on sampler row against the plain sampler of its model ('var', or 'ar' for 'sjd') at the same
    depth and batch in the same run."""
    base = {(r["sampler"], r["depth"], r["B"]): r for r in rows if r["sampler"] in BASE_SAMPLERS}
    comparisons = []
    for row in rows:
        ref = base.get((model_name_for(row["sampler"]), row["depth"], row["B"]))
        if row["sampler"] in BASE_SAMPLERS or ref is None:
            continue
        entry = {"sampler": row["sampler"], "depth": row["depth"], "B": row["B"], **_settings_of(row)}
        if "error" in row or "error" in ref:  # e.g. the full cache does not fit where the compressed one does
            entry.update(error=row.get("error"), base_error=ref.get("error"))
        else:
            entry.update(speedup=_ratio(row["img_per_s"], ref["img_per_s"]),
                         memory_ratio=_ratio(row.get("peak_GB"), ref.get("peak_GB")),
                         kv_ratio=_ratio(row.get("kv_bytes"), ref.get("kv_bytes")))
        comparisons.append({k: v for k, v in entry.items() if v is not None})
    return comparisons


def _official_key(entry: dict) -> tuple | None:
    """What makes an official anchor row and one of ours the same configuration (ours: no other add-on)."""
    if entry.get("impl") == "official-VAR":
        return ("var", entry["depth"], entry["B"])
    if entry.get("impl") == "official-CoDe":
        return ("code", entry["drafter"], entry["refiner"], entry["draft_steps"], entry["B"])
    extra = set(_settings_of(entry)) - {"refiner_depth", "draft_steps"}
    if entry.get("sampler") == "var" and not extra:
        return ("var", entry["depth"], entry["B"])
    if entry.get("sampler") == "code" and not extra:
        return ("code", entry["depth"], entry["refiner_depth"], entry["draft_steps"], entry["B"])
    return None


def anchor_ratios(rows: list[dict], anchors: dict) -> list[dict]:
    """Speed and memory of our base and CoDe rows relative to the official rows of the same configuration."""
    official = {_official_key(a): a for a in anchors["results"]}
    comparisons = []
    for row in rows:
        ref = official.get(_official_key(row))
        if ref is None or "img_per_s" not in row:
            continue
        entry = {"sampler": row["sampler"], "depth": row["depth"], "B": row["B"], **_settings_of(row),
                 "ours_img_per_s": row["img_per_s"]}
        if "img_per_s" in ref:
            entry.update(official_img_per_s=ref["img_per_s"], speedup=_ratio(row["img_per_s"], ref["img_per_s"]),
                         latency_ratio=_ratio(row["sec"], ref["sec"]))
        if "peak_GB" in row and "peak_GB" in ref:
            entry["memory_ratio"] = _ratio(row["peak_GB"], ref["peak_GB"])
        if "error" in ref:
            entry["official"] = ref["error"]
        comparisons.append(entry)
    return comparisons


def plot(rows: list[dict], path: Path) -> None:
    """Throughput and peak memory against batch size, one line per configuration (sampler, model, options)."""
    from var.plots import HIGHER, LOWER, better_title, byte_scale, pyplot, save_figure

    measured = [row for row in rows if "img_per_s" in row]
    on_cuda = bool(measured) and all(row.get("peak_GB") is not None for row in measured)

    def memory_bytes(row: dict) -> float:  # CUDA: the peak allocation; CPU: only the KV cache is known
        return row["peak_GB"] * 1e9 if on_cuda else row.get("kv_bytes") or 0

    unit, divisor = byte_scale(map(memory_bytes, measured))
    series: dict[str, list[dict]] = {}
    for row in measured:
        options = " ".join(f"{key}={value}" for key, value in _settings_of(row).items())
        model = row.get("architecture", f"d{row['depth']}")
        series.setdefault(f"{row['sampler']} {model} {options}".strip(), []).append(row)
    plt = pyplot()
    fig, (ax_speed, ax_memory) = plt.subplots(1, 2, figsize=(12, 4.4))
    for label, points in sorted(series.items()):
        points.sort(key=lambda r: r["B"])
        batches = [p["B"] for p in points]
        line, = ax_speed.plot(batches, [p["img_per_s"] for p in points], marker="o", label=label)
        ax_memory.plot(batches, [memory_bytes(p) / divisor for p in points], marker="o", color=line.get_color())
    batches = sorted({row["B"] for row in measured})
    memory_title = "Peak CUDA memory" if on_cuda else "KV cache size, CPU run"
    memory_label = f"{'peak CUDA memory' if on_cuda else 'KV cache'} ({unit})"
    for axis, title, ylabel, better in ((ax_speed, "Throughput", "images / s", HIGHER),
                                         (ax_memory, memory_title, memory_label, LOWER)):
        axis.set_xscale("log", base=2)
        axis.set_xticks(batches, [str(b) for b in batches])
        axis.minorticks_off()
        axis.set_xlabel("batch size (images)")
        axis.set_ylabel(ylabel)
        axis.set_title(better_title(title, better), fontsize=10)
        axis.grid(alpha=0.3)
    if series:
        fig.legend(title="sampler, model, options", loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    fig.suptitle("Sampling speed and memory by batch size (random weights; min over timed runs)")
    save_figure(fig, path, dpi=120)


def bench_samplers(model: nn.Module, vqvae: VQVAE, names: list[str], args: argparse.Namespace,
                   settings: SamplingSettings, device: torch.device, **labels) -> list[dict]:
    """Rows of every sampler in ``names`` on one (model, tokenizer) pair at every batch size of ``args``;
    ``labels`` (e.g. ``depth=16``) head each row."""
    rows = []
    for text in names:
        name, chosen = sampler_settings(text, args)
        sampler = build_sampler(name, model, vqvae, settings, **sampler_arguments(chosen, args, device))
        recorded = recorded_settings(sampler, chosen)
        for batch_size in args.batch_sizes:
            row = bench_sampler(sampler, batch_size, getattr(model, "num_classes", 0), device, args.dtype,
                                args.warmup, args.runs, not args.no_decode,
                                bool(args.compile))
            row = {"sampler": name, **labels, **recorded, **row}
            rows.append(row)
            print(json.dumps(row), flush=True)
        del sampler  # a CoDe sampler holds its refiner
    return rows


def bench_model(family: str, size: int | str, names: list[str], args: argparse.Namespace,
                device: torch.device) -> tuple[list[dict], SamplingSettings]:
    """Rows of every sampler in ``names`` and batch size on one random-weight model: a VAR depth (``family``
    "var"), a LlamaGen size ("llamagen", the raster samplers) or an Infinity size ("infinity"); and the
    sampling settings they used (the flags given, the family's defaults for the others)."""
    if family == "llamagen":
        model, tokenizer = build_llamagen_models(size, args.tiny, device)
        labels = {"depth": model.depth, "architecture": "tiny LlamaGen" if args.tiny else f"LlamaGen {size}"}
    elif family == "infinity":
        model, tokenizer, params = build_infinity_models(size, args.tiny, device, parse_aspect(args.aspect),
                                                         args.resolution)
        labels = {"depth": size, "params": params}
    else:
        model, tokenizer = build_models(size, args.tiny, device)
        labels = {"depth": size}
    if args.compile and family != "infinity":
        compile_for_sampling(model, tokenizer, args.compile)
    settings = settings_from_args(args, model)
    rows = bench_samplers(model, tokenizer, names, args, settings, device, **labels)
    del model, tokenizer  # the next model's peak memory must not include this one's weights
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows, settings


def run(args: argparse.Namespace) -> dict:
    if args.official_var or args.official_code:
        from var.bench_official import run as run_beside_official

        return run_beside_official(args)
    args = finalize_defaults(args)
    device = resolve_device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    named = [(text, parse_sampler_spec(text)[0]) for text in args.samplers]
    raster = [text for text, name in named if model_name_for(name) == "ar"]
    scale = [text for text, name in named if model_name_for(name) != "ar"]
    # Infinity: the next-scale samplers without a model-valued option (a random CoDe refiner is a VAR)
    infinity = [text for text, name in named if model_name_for(name) != "ar"
                and not any(spec.model for spec in sampler_options(name).values())]
    rows, sampling = [], {}
    for family, sizes, names in (("var", args.depths, scale), ("llamagen", args.llamagen_sizes, raster),
                                 ("infinity", args.infinity or [], infinity)):
        for size in sizes if names else ():
            family_rows, settings = bench_model(family, size, names, args, device)
            rows += family_rows
            sampling[family] = dataclasses.asdict(settings)
    report = {
        "settings": {
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "dtype": args.dtype, "sampling": sampling,
            "vae_decode_included": not args.no_decode, "weights": "random",
            "sizes": "tiny" if args.tiny else "official", "warmup": args.warmup, "runs": args.runs,
            "compile": args.compile,
            "time": "min of runs (median also given)",
        },
        "results": rows,
        "vs_base": base_ratios(rows),
    }
    if ANCHORS.is_file() and not args.tiny:
        report["vs_official_h100"] = anchor_ratios(rows, json.loads(ANCHORS.read_text()))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "bench.json", json.dumps(report, indent=1))
    plot(rows, out / "bench.png")
    print(f"wrote {out / 'bench.json'} and {out / 'bench.png'}")
    return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], help="default: fp16 on CUDA, fp32 on CPU")
    parser.add_argument("--tiny", action="store_true", help="tiny random models (CPU smoke run)")
    parser.add_argument("--depths", type=integer(1), nargs="+", help="default: 16 20 24 30 (tiny: 2)")
    parser.add_argument("--batch-sizes", type=integer(1), nargs="+", help="default: 1 16 64 256 (tiny: 1 4)")
    parser.add_argument("--samplers", nargs="+", default=["var"], metavar="NAME[:OPTION=VALUE,...]",
                        help=f"samplers ({', '.join(SAMPLER_NAMES)}), each optionally with its own options, e.g. "
                        "scalekv:kv_budget=0.2; 'code' gets a random refiner of --refiner-depth; 'ar'/'sjd' run "
                        "LlamaGen c2i models of --llamagen-sizes")
    parser.add_argument("--llamagen-sizes", nargs="+", choices=list(LLAMAGEN_SIZES), metavar="SIZE",
                        help=f"LlamaGen sizes for 'ar'/'sjd' ({', '.join(LLAMAGEN_SIZES)}; default: "
                             f"{' '.join(LLAMAGEN_BENCH_SIZES)}; --tiny: one tiny model), 256 px with VQ-16")
    parser.add_argument("--infinity", nargs="+", choices=list(INFINITY_SIZES), metavar="SIZE",
                        help=f"also bench random-weight Infinity models ({', '.join(INFINITY_SIZES)}; --tiny: a tiny "
                             "one per name) on random prompts, with the next-scale samplers of --samplers")
    parser.add_argument("--resolution", default="1M", help="Infinity schedule level (0.06M .. 1M or 256 .. 1024)")
    parser.add_argument("--aspect", default="1:1", help="Infinity aspect ratio W:H")
    parser.add_argument("--warmup", type=integer(0), default=1)
    parser.add_argument("--runs", type=integer(1), default=3)
    parser.add_argument("--no-decode", action="store_true", help="leave the VAE decode out of the timing")
    parser.add_argument("--compile", nargs="?", const="default", help="torch.compile mode (e.g. reduce-overhead)")
    add_option_arguments(parser.add_argument_group("sampling settings", family_defaults_help()), SETTINGS)
    group = parser.add_argument_group("sampler options (each applies to every listed sampler that takes it)")
    add_option_arguments(group, VALUE_OPTIONS, option_users())
    for name in MODEL_OPTIONS:
        group.add_argument(f"--{name.replace('_', '-')}-depth", type=integer(1), default=DEFAULT_MODEL_DEPTH,
                           help=f"depth of the random-weight {name} for {', '.join(option_users()[name])} "
                                f"(default {DEFAULT_MODEL_DEPTH}; --tiny: 1)")
    parser.add_argument("--out", default="out/bench")
    parser.add_argument("--official-var", metavar="DIR", help="time the official VAR code of this checkout "
                        "beside ours, interleaved, on the same random weights (var/bench_official.py)")
    parser.add_argument("--official-code", metavar="DIR", help="the same for an official CoDe checkout: the "
                        "deepest --depths drafts, --refiner-depth refines")


def finalize_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the defaults that depend on --tiny and the device (idempotent; :func:`run` calls it)."""
    if args.dtype is None:
        args.dtype = "fp16" if resolve_device(args.device).type == "cuda" else "fp32"
    if args.depths is None:
        args.depths = [2] if args.tiny else [16, 20, 24, 30]
    if args.batch_sizes is None:
        args.batch_sizes = [1, 4] if args.tiny else [1, 16, 64, 256]
    if args.llamagen_sizes is None or args.tiny:
        args.llamagen_sizes = ["tiny"] if args.tiny else list(LLAMAGEN_BENCH_SIZES)
    if args.tiny:
        for name in MODEL_OPTIONS:
            setattr(args, f"{name}_depth", min(getattr(args, f"{name}_depth"), 1))
    for text in args.samplers:
        parse_sampler_spec(text)  # a bad name or option fails before any model is built
    return args


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("bench", help="benchmark sampling speed and memory (random weights)")
    add_arguments(parser)
    parser.set_defaults(func=run)
