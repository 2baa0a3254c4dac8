"""``var eval``: FID / IS / KID / precision-recall of a sample set, or of a model's class-balanced samples (or,
text-to-image, of one sample per prompt of ``--prompts``); ``var compare``: paired PSNR / SSIM / LPIPS between
two same-seed sample sets.

``var eval`` checks the extractor weights and the reference before sampling, samples (sharded over processes
under ``accelerate launch``), exports the samples in the OpenAI evaluator's npz format, computes the metrics
and writes a JSON report holding every setting.  ``--sweep cfg=1,1.5,2`` repeats this per value and plots
each metric against it.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch_fidelity

from var.argtypes import integer
from var.eval.evaluate import METRICS, Evaluator
from var.eval.fidelity import INCEPTION
from var.eval.generate import class_balanced_labels, generate_samples, processes
from var.eval.images import Samples, export_order, load_samples, save_npz_samples, save_pngs
from var.eval.paired import compare_images
from var.eval.report import plot_sweep, write_json
from var.sample.arguments import (
    SETTINGS,
    add_model_arguments,
    add_sampler_arguments,
    add_settings_arguments,
    add_text_arguments,
    apply_release,
    encode_prompts,
    load_models,
    read_prompts,
    sampler_options_from_args,
    settings_from_args,
    use_text_arguments,
)
from var.sample.options import OptionSpec, given_options
from var.sample.registry import SAMPLER_NAMES, all_options, build_sampler
from var.text import T5TextEncoder

# what --sweep can vary: the sampler, every sampling setting and every declared sampler option
SAMPLER_CHOICE = OptionSpec(help="the sampler", type=str, choices=SAMPLER_NAMES, name="sampler")
SWEEPABLE: dict[str, OptionSpec] = {"sampler": SAMPLER_CHOICE, **SETTINGS, **all_options()}


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval", help="FID/IS/KID/precision-recall of samples or of a model",
        description="Evaluate a samples .npz / PNG folder (--samples), a model's class-balanced samples (--ckpt), "
                    "or a text-to-image model's samples of --prompts FILE (one per prompt).",
    )
    parser.add_argument("--samples", help="samples .npz (arr_0: uint8 NHWC, optional labels) or a folder of images")
    add_model_arguments(parser)
    add_settings_arguments(parser)
    add_sampler_arguments(parser)
    parser.add_argument("--per-class", type=integer(1), default=50, help="samples per class when sampling a model")
    add_text_arguments(parser, parser.add_mutually_exclusive_group())
    group = parser.add_argument_group("metrics")
    group.add_argument("--ref", help="reference: stats .npz (mu/sigma, OpenAI VIRTUAL_*.npz as is), images .npz, "
                                     "image folder, dataset name (digits, digits-test, shapes) or training config "
                                     "(CONFIG.yaml[:train|:val], its data section)")
    group.add_argument("--ref-resize", type=integer(1), help="centre-crop and resize a reference folder to this side")
    group.add_argument("--extractor", default=INCEPTION, help="feature extractor (default %(default)s; "
                                                              "digits-classifier for offline digit metrics)")
    group.add_argument("--inception-weights", "--extractor-weights", dest="extractor_weights",
                       help="extractor weights file (default for Inception: the torch hub cache)")
    group.add_argument("--allow-weights-mismatch", action="store_true",
                       help="accept Inception weights whose sha256 is not the FID network's (test weights only)")
    group.add_argument("--metrics", help=f"comma-separated subset of {','.join(METRICS)} "
                                         "(default: all with --ref, else is)")
    group.add_argument("--no-metrics", action="store_true", help="only sample and export")
    group.add_argument("--eval-batch-size", type=integer(1), default=100, help="feature extraction batch size")
    group.add_argument("--no-ref-cache", action="store_true", help="do not read or write cached reference features")
    group.add_argument("--save-stats", action="store_true", help="also write the samples' mu/sigma (OUT/stats.npz)")
    output = parser.add_argument_group("output")
    output.add_argument("--out", default="out/eval", help="output folder (report.json, samples.npz, ...)")
    output.add_argument("--png", action="store_true", help="also export every sample as a PNG (OUT/samples/<label>/)")
    output.add_argument("--no-npz", action="store_true",
                        help="do not export the samples as OUT/samples.npz (the OpenAI evaluator's input)")
    output.add_argument("--sweep", help=f"SETTING=V1,V2,...: evaluate each value and plot the metrics "
                                        f"(settings: {', '.join(SWEEPABLE)})")
    output.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(func=run)

    compare = subparsers.add_parser(
        "compare", help="paired PSNR/SSIM(/LPIPS) between two same-seed sample sets",
        description="Image-by-image fidelity of sample set B to sample set A (same classes, same seeds).",
    )
    compare.add_argument("a", help="reference samples (.npz or folder)")
    compare.add_argument("b", help="samples to compare (.npz or folder)")
    compare.add_argument("--json", help="also write the numbers to this JSON file")
    compare.add_argument("--no-lpips", action="store_true", help="skip LPIPS even if its weights are present")
    compare.set_defaults(func=run_compare)


def parse_sweep(text: str) -> tuple[str, list]:
    """'cfg=1,1.5' -> ('cfg', [1.0, 1.5]); every value is parsed and checked by its declaration."""
    name, _, values = text.partition("=")
    name = name.strip().replace("-", "_")
    if name not in SWEEPABLE or not values.strip():
        raise ValueError(f"--sweep expects SETTING=V1,V2,... with SETTING one of {', '.join(SWEEPABLE)}; got {text!r}")
    try:
        return name, [SWEEPABLE[name].parse(value.strip()) for value in values.split(",")]
    except ValueError as error:
        raise ValueError(f"--sweep {name}: cannot use {values!r} ({error})") from None


def with_setting(args: argparse.Namespace, name: str, value) -> argparse.Namespace:
    varied = copy.copy(args)
    setattr(varied, name, [value] if SWEEPABLE[name].per_scale else value)
    return varied


def options_report(sampler, args: argparse.Namespace) -> dict:
    """The sampler's options that differ from their defaults, as given (a model option as its path)."""
    specs = all_options()
    given = given_options(args, specs)
    return {name: given[name] if specs[name].model else value for name, value in sampler.options.non_default().items()}


def versions() -> dict:
    return {"torch": torch.__version__, "torch_fidelity": torch_fidelity.__version__, "numpy": np.__version__}


def summary_line(metrics: dict) -> str:
    parts = []
    if "fid" in metrics:
        parts.append(f"FID {metrics['fid']:.4f}")
    if "is" in metrics:
        parts.append(f"IS {metrics['is']:.4f} ± {metrics['is_std']:.4f} ({metrics['is_splits']} split(s))")
    if "kid" in metrics:
        parts.append(f"KID {metrics['kid']:.5f} ± {metrics['kid_std']:.5f}")
    if "precision" in metrics:
        parts.append(f"precision {metrics['precision']:.4f} recall {metrics['recall']:.4f}")
    if "class_consistency" in metrics:
        parts.append(f"class-consistency {metrics['class_consistency']:.4f}")
    return "  ".join(parts)


def export_and_evaluate(samples: Samples, evaluator: Evaluator | None, out: Path, args: argparse.Namespace,
                        report: dict, prompts: list[str] | None = None) -> dict:
    """Write the samples (npz / PNGs), compute the metrics and write OUT/report.json; returns the metrics.

    Generated samples are written and scored in a seeded shuffled order, so that Inception Score over
    consecutive splits sees every class in every split (their ``prompts`` follow them into the npz); a given
    npz is scored in its own order."""
    out.mkdir(parents=True, exist_ok=True)
    exports = {}
    given_npz = str(report.get("samples", "")).endswith(".npz")
    if not given_npz:
        samples = samples.shuffled()
    if not args.no_npz and not given_npz:
        given = {} if prompts is None else {"prompts": np.array(prompts)[export_order(len(prompts)).numpy()]}
        save_npz_samples(out / "samples.npz", samples, **given)
        exports["npz"] = str(out / "samples.npz")
    if args.png:
        save_pngs(out / "samples", samples)
        exports["png"] = str(out / "samples")
    metrics = {}
    if evaluator is not None:
        metrics = evaluator.evaluate(samples, save_stats_to=str(out / "stats.npz") if args.save_stats else None)
        report["evaluation"] = evaluator.describe()
        if args.save_stats:
            exports["stats"] = str(out / "stats.npz")
    report.update(num_samples=len(samples.images), image_size=samples.images.shape[-1], metrics=metrics,
                  exports=exports, versions=versions(), command=sys.argv)
    write_json(out / "report.json", report)
    line = summary_line(metrics)
    passes = report.get("sampling", {}).get("passes_per_image")
    print(f"{out}: {len(samples.images)} samples" + (f" ({passes:.2f} forward passes per image)" if passes else "")
          + (f"  {line}" if line else ""))
    for note in metrics.get("notes", []):
        print(f"note: {note}")
    return metrics


def build_evaluator(args: argparse.Namespace, device: torch.device) -> Evaluator | None:
    if args.no_metrics:
        return None
    metrics = args.metrics or (",".join(METRICS) if args.ref else "is")
    return Evaluator(
        args.extractor, args.ref, metrics, args.extractor_weights, args.allow_weights_mismatch, device,
        args.eval_batch_size, args.ref_resize, use_cache=not args.no_ref_cache, progress=not args.no_progress,
    )


def run(args: argparse.Namespace) -> None:
    from_model = bool(args.model or args.ckpt or args.vae or args.var)
    if bool(args.samples) == from_model:
        raise ValueError("pass either --samples (an npz or image folder) or a model (--model NAME, --ckpt, or --vae "
                         "and --var)")
    sweep = parse_sweep(args.sweep) if args.sweep else None
    if sweep and args.samples:
        raise ValueError("--sweep varies sampling settings, so it needs a model (--ckpt), not --samples")
    if args.samples and not Path(args.samples).exists():  # before the extractor and reference are prepared
        raise FileNotFoundError(f"{args.samples} is neither a samples .npz (arr_0: uint8 NHWC) nor a folder of images")
    prompts = read_prompts(args)
    if prompts is not None and not from_model:
        raise ValueError("--prompt/--prompts are for sampling a text-to-image model: pass it (--vae and --var, "
                         "--ckpt or --model)")
    if from_model:
        apply_release(args)  # a released model's files are resolved and checked here
        settings_from_args(args)  # bad sampling settings fail before any weights are read
    with processes(args.device) as (state, device):
        evaluate_in_process(args, state, device, prompts, sweep)


def evaluate_in_process(args: argparse.Namespace, state, device: torch.device, prompts: list[str] | None,
                        sweep: tuple[str, list] | None) -> None:
    """This process's part of ``var eval``: its share of the sampling and feature extraction; the main process
    also writes the exports, reports and sweep plot."""
    encoder = T5TextEncoder(args.text_encoder, device=device) if prompts else None  # missing T5: fail first
    with state.main_process_first():  # the main process trains/caches shared judges first
        evaluator = build_evaluator(args, device)  # weights and reference checked before any sampling
    out = Path(args.out)
    if args.samples:
        if state.is_main_process:
            export_and_evaluate(load_samples(args.samples), evaluator, out, args, {"samples": args.samples})
        elif evaluator is not None:
            evaluator.evaluate(None)  # extract this process's share of the features
        return

    vqvae, model = load_models(args, device)
    use_text_arguments(args, model, prompts)
    if prompts is not None:
        conditions = encode_prompts(encoder, model, prompts)
        del encoder  # T5 is not needed while sampling
    else:
        conditions = class_balanced_labels(model.num_classes, args.per_class)
    name, values = sweep if sweep else (None, [None])
    results: list[dict] = []
    try:
        for value in values:
            results.append(evaluate_setting(args, name, value, model, vqvae, conditions, evaluator, state, device,
                                            out, prompts))
    except KeyboardInterrupt:
        raise KeyboardInterrupt(interrupted_note(out, name, values, len(results))) from None
    results = [metrics for metrics in results if metrics is not None]
    if sweep and state.is_main_process:
        write_json(out / "sweep.json", {"setting": name, "values": values, "metrics": results})
        plotted = plot_sweep(out / "sweep.png", name, values, results)
        print(f"wrote {out / 'sweep.json'}" + (f" and {out / 'sweep.png'} ({', '.join(plotted)})" if plotted else ""))


def interrupted_note(out: Path, name: str | None, values: list, finished: int) -> str:
    """What an interrupted ``var eval`` kept (each finished setting's folder is complete) and how to go on."""
    if name is None:
        return (f"interrupted before {out / 'report.json'} was written (files already written are complete, never "
                "partial); run the same command again")
    done = ", ".join(str(out / f"{name}_{value}") for value in values[:finished]) or "none"
    left = ",".join(str(value) for value in values[finished:])
    return (f"interrupted; finished settings (complete reports): {done}; continue with the same command and "
            f"--sweep {name}={left}")


def evaluate_setting(args: argparse.Namespace, name: str | None, value, model, vqvae, conditions, evaluator,
                     state, device: torch.device, out: Path, prompts: list[str] | None = None) -> dict | None:
    """Sample and evaluate one setting of a sweep (or the only one): one sample per condition (class labels, or
    the encoded ``prompts``); the metrics on the main process, else None."""
    sweep = name is not None
    run_args = with_setting(args, name, value) if sweep else args
    settings = settings_from_args(run_args, model)
    options = sampler_options_from_args(run_args, device, tokenizer=vqvae, model=model)
    sampler = build_sampler(run_args.sampler, model, vqvae, settings, **options)
    start = time.perf_counter()
    stats: dict = {}
    samples = generate_samples(sampler, conditions, run_args.batch_size, run_args.seed, device, run_args.dtype,
                               state, progress=not args.no_progress, stats=stats)
    seconds = time.perf_counter() - start
    if not state.is_main_process:
        if evaluator is not None:
            evaluator.evaluate(None)  # extract this process's share of the features
        return None
    report = {"sampling": {
        "model": ({"release": args.model, "files": {role: str(path) for role, path in args.release_files.items()}}
                  if args.model else args.ckpt or {"vae": args.vae, "var": args.var}),
        "sampler": run_args.sampler, "sampler_options": options_report(sampler, run_args),
        **dataclasses.asdict(settings), "seed": run_args.seed,
        "seeding": f"batch b = {'prompts' if prompts else 'labels'}[b*B:(b+1)*B] is sampled with seed + b",
        "batch_size": run_args.batch_size,
        **({"prompts": args.prompts or "--prompt", "num_prompts": len(prompts), "resolution": args.resolution,
            "aspect": args.aspect} if prompts else {"per_class": args.per_class, "num_classes": model.num_classes}),
        "dtype": run_args.dtype, "device": str(device), "num_processes": state.num_processes,
        "sampling_s": round(seconds, 3), "samples_per_s": round(len(conditions) / max(seconds, 1e-9), 3),
        **stats,
    }}
    if sweep:
        report["sweep"] = {name: value}
    target = out / f"{name}_{value}" if sweep else out
    return export_and_evaluate(samples, evaluator, target, run_args, report, prompts)


def run_compare(args: argparse.Namespace) -> None:
    a, b = load_samples(args.a), load_samples(args.b)
    if a.labels is not None and b.labels is not None and not torch.equal(a.labels, b.labels):
        raise ValueError(f"{args.a} and {args.b} have different labels: compare same-class, same-seed sample sets")
    results = compare_images(a.images, b.images, with_lpips=not args.no_lpips)
    line = (f"{results['num_pairs']} pairs ({a.images.shape[-2]}x{a.images.shape[-1]}): "
            f"PSNR {results['psnr_db']:.3f} dB (min {results['psnr_db_min']:.3f}, pooled "
            f"{results['psnr_db_pooled']:.3f})  "
            f"SSIM {results['ssim']:.5f} (min {results['ssim_min']:.5f})")
    if "lpips" in results:
        line += f"  LPIPS {results['lpips']:.5f}"
    print(line)
    for note in results["notes"]:
        print(f"note: {note}")
    if args.json:
        write_json(args.json, {"a": args.a, "b": args.b, **results})
