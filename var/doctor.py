"""``var doctor``: what this machine has, the first thing to run on a new cluster; and ``var --version``.

Prints the versions that matter (torch and its CUDA build, accelerate, torch-fidelity, transformers, ...), the
devices (each CUDA device runs one tiny kernel, so a broken driver shows here), the cache folders, which weights
files are already present (FID Inception, VGG16/LPIPS, AlexNet for paired LPIPS, flan-t5-xl and every released
model of :mod:`var.hub`) and a one-line verdict.  It never downloads anything and hashes nothing larger than the
Inception file, so it runs offline in seconds.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
from pathlib import Path

import torch

from var import hub
from var.utils import cache_dir, format_bytes

PACKAGES = ("torch", "torchvision", "accelerate", "torch-fidelity", "transformers", "huggingface_hub", "timm",
            "safetensors", "lpips")


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def version_line() -> str:
    """``var-toolkit 0.1.0 (torch 2.4.1, CUDA 12.4)``: what ``var --version`` prints."""
    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU-only build"
    toolkit = package_version("var-toolkit") or "unknown (not installed)"
    return f"var-toolkit {toolkit} (torch {torch.__version__}, {build})"


def devices() -> list[dict]:
    """Every CUDA device with its memory and whether a kernel runs on it; empty without CUDA."""
    found = []
    for index in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
        properties = torch.cuda.get_device_properties(index)
        entry = {"device": f"cuda:{index}", "name": properties.name, "memory_bytes": properties.total_memory,
                 "capability": f"{properties.major}.{properties.minor}"}
        try:
            entry["works"] = bool(torch.ones(8, device=f"cuda:{index}").sum().item() == 8)
        except RuntimeError as error:
            entry["works"], entry["error"] = False, str(error).splitlines()[0]
        found.append(entry)
    return found


def _file_entry(path: Path | None, purpose: str, fix: str) -> dict:
    present = path is not None and path.is_file()
    return {"present": present, "path": str(path) if path else None,
            "size_bytes": path.stat().st_size if present else None, "purpose": purpose, "fix": fix}


def weight_files() -> dict[str, dict]:
    """The non-Hub weights the toolkit looks for, by what they are for."""
    from var.eval.fidelity import INCEPTION_SHA256_PREFIX, INCEPTION_URL, default_inception_path
    from var.eval.paired import LPIPS_BACKBONE_FILE
    from var.train.perceptual import lpips_heads_path, vgg16_weights_path
    from var.utils import sha256_of

    checkpoints = Path(torch.hub.get_dir()) / "checkpoints"
    inception = _file_entry(default_inception_path(), "FID, IS, KID, precision/recall", f"download {INCEPTION_URL}")
    if inception["present"]:
        digest = sha256_of(inception["path"])
        inception["sha256_ok"] = digest.startswith(INCEPTION_SHA256_PREFIX)
        if not inception["sha256_ok"]:
            inception["fix"] = f"sha256 {digest[:12]}... is not the FID network's ({INCEPTION_SHA256_PREFIX}...)"
    vgg = vgg16_weights_path()
    return {
        "FID Inception": inception,
        "VGG16": _file_entry(vgg, "perceptual loss of tokenizer training", f"download {vgg.name} from "
                             "download.pytorch.org/models"),
        "LPIPS heads": _file_entry(lpips_heads_path(), "LPIPS weighting of VGG16 features", "pip install lpips"),
        "AlexNet": _file_entry(checkpoints / LPIPS_BACKBONE_FILE, "LPIPS in 'var eval --paired'",
                               f"download {LPIPS_BACKBONE_FILE} from download.pytorch.org/models"),
    }


def released_weights() -> dict[str, dict]:
    """For every released model: how many of its files are cached, their size, and whether all hashes are verified."""
    report = {}
    for name in hub.RELEASES:
        files = hub.cache_report(name)
        cached = [(file, path, verified) for file, path, verified in files if path is not None]
        report[name] = {
            "cached": len(cached), "files": len(files),
            "size_bytes": sum(path.stat().st_size for _, path, _ in cached),
            "verified": all(verified or file.sha256 is None for file, _, verified in cached),
            "missing": [f"{file.repo_id}/{file.filename}" for file, path, _ in files if path is None],
        }
    return report


def collect() -> dict:
    return {
        "version": version_line(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": {name: package_version(name) for name in PACKAGES},
        "cuda_build": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "cpu_count": os.cpu_count(),
        "devices": devices(),
        "caches": {"huggingface hub": str(hub.hub_cache_path()), "torch hub": torch.hub.get_dir(),
                   "var": str(cache_dir())},
        "hub_offline": hub.offline(),
        "weights": weight_files(),
        "released": released_weights(),
    }


def verdict(report: dict) -> str:
    """One line: ready, or what is missing and what that stops."""
    working = [d for d in report["devices"] if d["works"]]
    gaps = []
    if any(not d["works"] for d in report["devices"]):
        gaps.append("a CUDA device fails to run a kernel (see above)")
    if not report["devices"]:
        gaps.append("no CUDA device (CPU only: fine for tests and tiny models, slow for real ones)")
    inception = report["weights"]["FID Inception"]
    if not inception["present"] or not inception.get("sha256_ok", False):
        gaps.append("FID needs the Inception weights")
    complete = [name for name, entry in report["released"].items() if entry["cached"] == entry["files"]]
    if not complete:
        source = "HF_HUB_OFFLINE is set" if report["hub_offline"] else "'var sample --model NAME' downloads them"
        gaps.append(f"no released weights cached ({source})")
    where = f"{len(working)} CUDA device(s)" if working else "CPU"
    cached = f"{len(complete)} of {len(report['released'])} released models cached"
    if not gaps:
        return f"verdict: ready on {where}; FID ready; {cached}"
    return f"verdict: usable on {where}, with gaps: {'; '.join(gaps)}; {cached}"


def format_report(report: dict) -> str:
    lines = [report["version"], f"python {report['python']} on {report['platform']}"]
    lines.append("packages: " + ", ".join(f"{name} {version or 'not installed'}"
                                           for name, version in report["packages"].items()))
    cudnn = report["cudnn"]
    cudnn = f"{cudnn // 10000}.{cudnn % 10000 // 100}.{cudnn % 100}" if cudnn else "none"
    lines.append(f"CUDA build {report['cuda_build'] or 'none'}, cuDNN {cudnn}, {report['cpu_count']} CPU cores")
    if not report["devices"]:
        lines.append("devices: no CUDA device (CPU only)")
    for device in report["devices"]:
        state = "runs kernels" if device["works"] else f"FAILS: {device.get('error', 'wrong result')}"
        lines.append(f"device {device['device']}: {device['name']}, {format_bytes(device['memory_bytes'])}, "
                     f"compute {device['capability']}, {state}")
    lines.append("caches: " + ", ".join(f"{name} {path}" for name, path in report["caches"].items())
                 + (" (HF_HUB_OFFLINE)" if report["hub_offline"] else ""))
    lines.append("weights:")
    for name, entry in report["weights"].items():
        if entry["present"] and entry.get("sha256_ok", True):
            state = f"present ({format_bytes(entry['size_bytes'])}) {entry['path']}"
        else:
            state = f"{'WRONG FILE' if entry['present'] else 'missing'} {entry['path'] or ''}: {entry['fix']}"
        lines.append(f"  {name:<14} {entry['purpose']:<38} {state}")
    lines.append("released models (var.hub, in the Hugging Face cache above):")
    absent = [name for name, entry in report["released"].items() if not entry["cached"]]
    for name, entry in report["released"].items():
        if entry["cached"] == entry["files"]:
            state = "cached" + (", sha256 verified" if entry["verified"] else ", sha256 checked at first use")
        elif entry["cached"]:
            state = f"partly cached ({entry['cached']} of {entry['files']} files)"
        else:
            continue
        lines.append(f"  {name:<22} {state}, {format_bytes(entry['size_bytes'])}")
    if absent:
        lines.append(f"  not cached: {', '.join(absent)}")
    lines.append(verdict(report))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> None:
    report = collect()
    print(json.dumps({**report, "verdict": verdict(report)}, indent=2) if args.json else format_report(report))


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("doctor", help="versions, devices and which weights are cached (no downloads)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.set_defaults(func=run)
