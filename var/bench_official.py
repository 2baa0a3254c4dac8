"""``var bench --official-var DIR [--official-code DIR]``: ours beside the official VAR / CoDe code, in one run.

The official code is imported from the checkout the user points at (never vendored): its ``models`` package is
imported with the checkout first on ``sys.path``, and ``sys.path``/``sys.modules`` are restored afterwards.
Both implementations are built at the requested depth with the same random weights: the official models come
from the official constructors (``build_vae_var`` / ``build_vae_var_ctf``), and their state dicts are loaded
into ours through our importer (var/checkpoints.py).  Before timing, the same seed must give the same tokens
on both sides (official tokens are read from the codebook lookups of its quantiser); a mismatch is recorded
and makes the command fail once the report is written.

Timing is interleaved: after the warm-up, each round runs official and ours back to back, alternating which
goes first, so load from other processes hits both alike.  Every run records wall time (CUDA events on GPU)
and process CPU time, split into the scale loop and the VAE decode (everything from the first
``post_quant_conv`` call on), the peak memory above the loaded models (CPU: the kernel's resident-set high
water mark, reset through /proc/self/clear_refs after returning freed heap pages with malloc_trim, so each
side starts from the same baseline; CUDA: ``max_memory_allocated``), split the same way, and the KV-cache
bytes.  Ratios: speed = official time / our time (> 1: ours is faster); memory = ours / official (< 1: ours
is leaner); latency = our time / official time.  Writes ``vs_official.json`` and ``vs_official.png``.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import hashlib
import importlib
import io
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import torch
from torch import nn

from var.checkpoints import load_official_var, load_official_vqvae
from var.compile import compile_for_sampling
from var.plots import save_figure
from var.sample.arguments import SETTINGS, settings_from_args
from var.sample.code import CoDeSampler
from var.sample.logits import SamplingSettings
from var.sample.scale import VARSampler
from var.tokenizers.vqvae import OFFICIAL_PATCH_NUMS_256
from var.utils import atomic_write_text, autocast, resolve_device

# Constructor arguments of the official build functions: the released sizes, or tiny ones for a CPU smoke
# run.  The official code supports only its own scale schedule (CoDe hard-codes its token offsets).
OFFICIAL_SIZES = dict(V=4096, Cvae=32, ch=160, share_quant_resi=4, num_classes=1000)
TINY_SIZES = dict(V=64, Cvae=8, ch=32, share_quant_resi=4, num_classes=10)
PATCH_NUMS = OFFICIAL_PATCH_NUMS_256
SEED = 0
RESET_FUNCTIONS = (nn.Linear, nn.LayerNorm, nn.BatchNorm2d, nn.SyncBatchNorm, nn.Conv1d, nn.Conv2d,
                   nn.ConvTranspose1d, nn.ConvTranspose2d)


# ------------------------------------------------------------------------------------------------------
# importing and building the official models
def import_official(root: str | os.PathLike, flag: str) -> ModuleType:
    """The ``models`` package of an official checkout at ``root`` (FoundationVision/VAR or czg1225/CoDe).

    The checkout's own top-level modules (``models``, ``dist``, ``utils`` ...) are imported with ``root``
    first on ``sys.path``; afterwards ``sys.path`` is restored and those names leave ``sys.modules`` again
    (modules of the same names imported before are put back), so two checkouts can be loaded side by side.
    """
    root = Path(root).expanduser().resolve()
    if not (root / "models" / "var.py").is_file():
        raise SystemExit(f"var bench: error: {flag} {root} has no models/var.py; pass the root folder of an "
                         "official checkout (git clone https://github.com/FoundationVision/VAR, or "
                         "https://github.com/czg1225/CoDe for --official-code)")
    local = {p.stem for p in root.iterdir() if p.suffix == ".py" or (p / "__init__.py").is_file()}
    local |= {p.name for p in root.iterdir() if p.is_dir()}  # namespace packages such as utils/

    def owned(name: str) -> bool:
        return name.split(".")[0] in local

    stashed = {name: sys.modules.pop(name) for name in [n for n in sys.modules if owned(n)]}
    sys.path.insert(0, str(root))
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return importlib.import_module("models")
    except ImportError as error:
        raise SystemExit(f"var bench: error: cannot import the official code at {root} ({error}); install "
                         "its requirements or check the path") from None
    finally:
        sys.path.remove(str(root))
        for name in [n for n in sys.modules if owned(n)]:
            del sys.modules[name]
        sys.modules.update(stashed)


def source_digest(root: str | os.PathLike) -> str:
    """sha256 of the checkout's models/*.py: which version of the official code was measured."""
    digest = hashlib.sha256()
    for path in sorted((Path(root) / "models").glob("*.py")):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:16]


@contextlib.contextmanager
def default_initialisation() -> Iterator[None]:
    """Undo the official builders' global ``reset_parameters`` patch when they return.

    ``build_vae_var`` disables the default initialisation of every Linear/Conv/Norm class for speed (its VAR
    is initialised by ``init_weights``, its VQ-VAE convolutions are left uninitialised, to be loaded from a
    checkpoint); the originals come back here so that nothing else in this process is affected.
    """
    saved = {cls: cls.__dict__.get("reset_parameters") for cls in RESET_FUNCTIONS}
    try:
        yield
    finally:
        for cls, function in saved.items():
            if function is not None:
                cls.reset_parameters = function
            elif "reset_parameters" in cls.__dict__:
                del cls.reset_parameters


def initialise_vqvae(vqvae: nn.Module) -> None:
    """Default PyTorch initialisation for the official VQ-VAE's convolutions, which the official builder leaves
    as uninitialised memory (random weights must not hold NaNs or denormals that would skew the timing)."""
    for module in vqvae.modules():
        if isinstance(module, nn.Conv2d):
            module.reset_parameters()


def build_official(models: ModuleType, depths: tuple[int, ...], tiny: bool, device: torch.device) -> tuple:
    """Official (vqvae, var) for one depth, or (vqvae, drafter, refiner) for two (CoDe), on ``device``.

    The official VAR draws tokens with a generator on CUDA whenever CUDA exists; it is moved to ``device``.
    """
    sizes = TINY_SIZES if tiny else OFFICIAL_SIZES
    torch.manual_seed(SEED)
    with default_initialisation(), contextlib.redirect_stdout(io.StringIO()):
        if len(depths) == 1:
            built = models.build_vae_var(device=device, patch_nums=PATCH_NUMS, depth=depths[0], **sizes)
        else:
            built = models.build_vae_var_ctf(device=device, patch_nums=PATCH_NUMS, depth_draft=depths[0],
                                             depth_refine=depths[1], **sizes)
    initialise_vqvae(built[0])  # with the default initialisation back
    for model in built:
        model.eval().requires_grad_(False)
    for var in built[1:]:
        var.rng = torch.Generator(device=device)
    return built


def ours_from_official(vqvae: nn.Module, *transformers: nn.Module, device: torch.device) -> tuple:
    """Our (vqvae, transformer, ...) holding the official models' weights, through our importer."""
    ours = [load_official_vqvae(vqvae.state_dict())]
    ours += [load_official_var(var.state_dict()) for var in transformers]
    return tuple(model.to(device).eval().requires_grad_(False) for model in ours)


def parameter_bytes(*models: nn.Module) -> int:
    """Bytes of the parameters and buffers of ``models`` (shared tensors counted once)."""
    tensors = {t.data_ptr(): t for m in models for t in (*m.parameters(), *m.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


# ------------------------------------------------------------------------------------------------------
# measuring one call
class RSSMeter:
    """Resident-set peak of this process above a baseline, via the kernel's high water mark (VmHWM).

    ``start`` returns freed heap pages to the kernel (malloc_trim) so that neither side profits from pages
    the other left behind, then resets the high water mark to the current RSS (the baseline).
    """

    def __init__(self) -> None:
        try:
            self._libc = ctypes.CDLL("libc.so.6")
        except OSError:
            self._libc = None
        self.available = self._reset()
        self.baseline = 0

    @staticmethod
    def _reset() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as file:
                file.write("5")  # "reset the peak resident set size to the current one"
            return True
        except OSError:
            return False

    @staticmethod
    def _status(key: str) -> int:
        with open("/proc/self/status") as file:
            for line in file:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
        raise KeyError(key)

    def start(self) -> None:
        if self._libc is not None:
            self._libc.malloc_trim(0)
        self._reset()
        self.baseline = self._status("VmRSS:")

    def peak(self, reset: bool = False) -> int:
        """Peak bytes above the baseline since the last reset (optionally resetting the mark now)."""
        value = self._status("VmHWM:") - self.baseline
        if reset:
            self._reset()
        return value


class CUDAMeter:
    """``max_memory_allocated`` above the allocation at ``start``."""

    available = True

    def __init__(self, device: torch.device):
        self.device = device
        self.baseline = 0

    def start(self) -> None:
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        self.baseline = torch.cuda.memory_allocated(self.device)

    def peak(self, reset: bool = False) -> int:
        value = torch.cuda.max_memory_allocated(self.device) - self.baseline
        if reset:
            torch.cuda.reset_peak_memory_stats(self.device)
        return value


class Clock:
    """Wall (CUDA events on GPU) and process CPU time of one call, and the instant its decode starts."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device

    def now(self) -> tuple:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event, time.process_time()
        return time.perf_counter(), time.process_time()

    def seconds(self, begin: tuple, end: tuple) -> tuple[float, float]:
        """(wall, cpu) seconds between two ``now()`` readings (after the device has finished)."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
            return begin[0].elapsed_time(end[0]) / 1000, end[1] - begin[1]
        return end[0] - begin[0], end[1] - begin[1]


@dataclass
class Run:
    """One timed call of one side."""

    wall: float
    cpu: float
    loop_wall: float
    loop_cpu: float
    decode_wall: float
    decode_cpu: float
    loop_peak: int | None
    decode_peak: int | None


class DecodeProbe:
    """Marks the start of the VAE decode (the first ``post_quant_conv`` call) inside a sampling call."""

    def __init__(self, vqvae: nn.Module, device: torch.device):
        self.clock = Clock(device)
        self.meter = CUDAMeter(device) if device.type == "cuda" else RSSMeter()
        self.reading: tuple | None = None
        self.loop_peak: int | None = None
        vqvae.post_quant_conv.register_forward_pre_hook(self._decode_starts)

    def _decode_starts(self, module, inputs) -> None:
        if self.reading is None:
            self.reading = self.clock.now()
            if self.meter.available:
                self.loop_peak = self.meter.peak(reset=True)

    def measure(self, call: Callable[[], object]) -> Run:
        """Time one call with the garbage collector paused (as timeit does: a collection would land on
        whichever side happens to trigger it)."""
        self.reading, self.loop_peak = None, None
        if self.meter.available:
            self.meter.start()
        gc.disable()
        try:
            begin = self.clock.now()
            call()
            end = self.clock.now()
        finally:
            gc.enable()
        wall, cpu = self.clock.seconds(begin, end)
        decode_start = self.reading or end
        loop_wall, loop_cpu = self.clock.seconds(begin, decode_start)
        decode_peak = self.meter.peak() if self.meter.available else None
        return Run(wall, cpu, loop_wall, loop_cpu, wall - loop_wall, cpu - loop_cpu, self.loop_peak, decode_peak)


class OfficialRecorder:
    """Tokens and KV bytes of an official sampling call, read through forward hooks (checking call only).

    Tokens: the inputs of the quantiser's codebook ``embedding``, which the official loop calls once per
    scale with the drawn indices.  KV bytes: the largest total, over one transformer's attention layers, of
    the ``cached_k`` / ``cached_v`` tensors seen after a layer call (the official cache grows by
    concatenation, so its tensors are exactly its memory; CoDe's two caches never coexist).
    """

    def __init__(self, vqvae: nn.Module, transformers: tuple[nn.Module, ...]):
        self.tokens: list[torch.Tensor] = []
        self.kv_bytes = 0
        self._handles = [vqvae.quantize.embedding.register_forward_hook(self._tokens)]
        for var in transformers:
            held: dict[int, int] = {}  # layer -> bytes it holds
            for block in getattr(var, "blocks", []):
                self._handles.append(block.attn.register_forward_hook(
                    lambda module, inputs, output, held=held: self._kv(module, held)))

    def _tokens(self, module, inputs, output) -> None:
        self.tokens.append(inputs[0].detach().clone())

    def _kv(self, module: nn.Module, held: dict[int, int]) -> None:
        tensors = (getattr(module, "cached_k", None), getattr(module, "cached_v", None))
        held[id(module)] = sum(t.numel() * t.element_size() for t in tensors if t is not None)
        self.kv_bytes = max(self.kv_bytes, sum(held.values()))

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()


# ------------------------------------------------------------------------------------------------------
# one configuration: both sides, checked, then timed interleaved
@dataclass
class Side:
    """One implementation at one configuration: ``call(labels)`` samples and decodes a batch."""

    name: str
    vqvae: nn.Module
    transformers: tuple[nn.Module, ...]
    call: Callable[[torch.Tensor], dict]  # -> {"images", "tokens" (ours), "kv_bytes" (ours)}
    runs: list[Run] = field(default_factory=list)
    probe: DecodeProbe | None = None


def official_var_side(vqvae, var, settings: SamplingSettings) -> Side:
    def call(labels: torch.Tensor) -> dict:
        images = var.autoregressive_infer_cfg(B=labels.shape[0], label_B=labels, g_seed=SEED, cfg=settings.cfg,
                                              top_k=settings.top_k, top_p=settings.top_p, more_smooth=False)
        return {"images": images}

    return Side("official", vqvae, (var,), call)


def official_code_side(vqvae, drafter, refiner, settings: SamplingSettings, draft_steps: int) -> Side:
    scales = len(PATCH_NUMS)
    options = dict(g_seed=SEED, cfg=settings.cfg, top_k=[settings.top_k] * scales, top_p=settings.top_p,
                   more_smooth=False, temp=[1.0] * scales)

    def call(labels: torch.Tensor) -> dict:
        batch = labels.shape[0]
        f_hat, hub = drafter.autoregressive_infer_cfg_draft(B=batch, label_B=labels, exit_num=draft_steps,
                                                             **options)
        images = refiner.autoregressive_infer_cfg_refine(B=batch, label_B=labels, draft=hub, f_hat=f_hat,
                                                         entry_num=draft_steps, **options)
        return {"images": images}

    return Side("official", vqvae, (drafter, refiner), call)


def our_side(sampler: VARSampler) -> Side:
    def call(labels: torch.Tensor) -> dict:
        output = sampler.sample(labels, seed=SEED)
        return {"images": output.images, "tokens": output.indices, "kv_bytes": output.stats.get("kv_bytes")}

    transformers = (sampler.model, *([sampler.refiner] if isinstance(sampler, CoDeSampler) else []))
    return Side("ours", sampler.tokenizer, transformers, call)


def compare_tokens(official: list[torch.Tensor], ours: list[torch.Tensor]) -> str | None:
    """None when every scale's tokens are equal, else where they first differ."""
    if len(official) != len(ours):
        return f"official drew {len(official)} token maps, ours {len(ours)}"
    for scale, (theirs, mine) in enumerate(zip(official, ours, strict=True)):
        theirs, mine = theirs.cpu().view(mine.shape[0], -1), mine.cpu()
        if theirs.shape != mine.shape:
            return f"scale {scale}: shape {tuple(theirs.shape)} vs ours {tuple(mine.shape)}"
        differ = (theirs != mine).nonzero()
        if len(differ):
            image, position = differ[0].tolist()
            return (f"scale {scale}: {len(differ)} of {mine.numel()} tokens differ, first at image {image} "
                    f"position {position} (official {int(theirs[image, position])}, ours {int(mine[image, position])})")
    return None


def _is_oom(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error)


def check_sides(official: Side, ours: Side, labels: torch.Tensor, context) -> dict:
    """Run both sides once (the first warm-up), comparing tokens and images; returns the row's check fields."""
    recorder = OfficialRecorder(official.vqvae, official.transformers)
    try:
        with context():
            theirs = official.call(labels)
    finally:
        recorder.close()
    begin = time.perf_counter()
    with context():
        mine = ours.call(labels)
    first_call = time.perf_counter() - begin
    mismatch = compare_tokens(recorder.tokens, mine["tokens"])
    check = {"tokens_identical": mismatch is None,
             "images_max_abs_diff": float((theirs["images"].float() - mine["images"].float()).abs().max()),
             "kv_bytes": {"official": recorder.kv_bytes or None, "ours": mine["kv_bytes"]},
             "ours_first_call_sec": first_call}
    if mismatch:
        check["token_mismatch"] = mismatch
    return check


def summarize(runs: list[Run], batch_size: int) -> dict:
    """Min and median of each timing, peaks (max over runs) and img/s of one side's runs."""
    summary = {}
    for name in ("wall", "cpu", "loop_wall", "loop_cpu", "decode_wall", "decode_cpu"):
        values = [getattr(r, name) for r in runs]
        summary[f"{name}_sec"] = round(min(values), 4)
        summary[f"median_{name}_sec"] = round(statistics.median(values), 4)
    summary["img_per_s"] = round(batch_size / summary["wall_sec"], 3)
    summary["img_per_cpu_s"] = round(batch_size / summary["cpu_sec"], 3)
    for name in ("loop_peak", "decode_peak"):
        values = [getattr(r, name) for r in runs if getattr(r, name) is not None]
        summary[f"{name}_bytes"] = max(values) if values else None
    peaks = [p for p in (summary["loop_peak_bytes"], summary["decode_peak_bytes"]) if p is not None]
    summary["peak_bytes"] = max(peaks) if peaks else None
    return summary


def _ratio(numerator, denominator) -> float | None:
    return round(numerator / denominator, 3) if numerator is not None and denominator else None


def ratios(official: dict, ours: dict, kv: dict) -> dict:
    """Speed ratios (official time / ours; > 1: ours faster) and memory ratios (ours / official; < 1: leaner)."""
    result = {}
    for stat in ("min", "median"):
        prefix = "" if stat == "min" else "median_"
        for part in ("", "loop_", "decode_"):
            for clock in ("wall", "cpu"):
                key = f"{prefix}{part}{clock}_sec"
                result[f"{stat}_{part}speed_{clock}"] = _ratio(official[key], ours[key])
    result["latency"] = _ratio(ours["wall_sec"], official["wall_sec"])
    result["img_per_s"] = _ratio(ours["img_per_s"], official["img_per_s"])
    for name in ("peak_bytes", "loop_peak_bytes", "decode_peak_bytes"):
        result[name.replace("_bytes", "_memory")] = _ratio(ours[name], official[name])
    result["peak_memory_with_weights"] = _ratio(
        ours["peak_bytes"] + ours["weights_bytes"] if ours["peak_bytes"] is not None else None,
        official["peak_bytes"] + official["weights_bytes"] if official["peak_bytes"] is not None else None)
    result["kv_bytes"] = _ratio(kv["ours"], kv["official"])
    return result


def bench_pair(official: Side, ours: Side, head: dict, num_classes: int, batch_size: int,
               args: argparse.Namespace, device: torch.device) -> dict:
    """Check, warm up and time both sides at one batch size, interleaved; returns the result row."""
    labels = torch.arange(batch_size, device=device) % num_classes
    context = lambda: autocast(device, args.dtype)  # noqa: E731 - a fresh context per call
    row = {**head, "B": batch_size}
    _free(device)
    try:
        row.update(check_sides(official, ours, labels, context))
        for side in (official, ours):
            side.runs = []
            side.probe = side.probe or DecodeProbe(side.vqvae, device)
        for _ in range(max(args.warmup - 1, 0)):
            for side in (official, ours):
                with context():
                    side.call(labels)
        for index in range(args.runs):
            for side in (official, ours) if index % 2 == 0 else (ours, official):
                with context():
                    side.runs.append(side.probe.measure(lambda s=side: s.call(labels)))
    except RuntimeError as error:
        if not _is_oom(error):
            raise
        _free(device)
        return {**row, "error": f"out of memory ({str(error).splitlines()[0][:120]})"}
    kv = row.pop("kv_bytes")
    first_call = row.pop("ours_first_call_sec")
    for side in (official, ours):
        row[side.name] = {**summarize(side.runs, batch_size), "kv_bytes": kv[side.name],
                          "weights_bytes": parameter_bytes(side.vqvae, *side.transformers)}
    if args.compile:  # the first call compiled (or loaded compiled code from the cache)
        row["ours"]["compile_sec"] = round(first_call - row["ours"]["median_wall_sec"], 2)
    row["ratios"] = ratios(row["official"], row["ours"], kv)
    print(json.dumps(row), flush=True)
    return row


# ------------------------------------------------------------------------------------------------------
# the command
def configurations(models: ModuleType, code: bool, args: argparse.Namespace, device: torch.device):
    """(official side, our side, row head, class count) of each model configuration, built one at a time.

    VAR: every depth of --depths.  CoDe: the deepest of --depths drafts, --refiner-depth refines.
    """
    settings = official_settings(args)
    for depths in [(max(args.depths), args.refiner_depth)] if code else [(d,) for d in args.depths]:
        official_models = build_official(models, depths, args.tiny, device)
        vqvae, *transformers = ours_from_official(*official_models, device=device)
        if args.compile:
            for index, transformer in enumerate(transformers):
                compile_for_sampling(transformer, vqvae if index == 0 else None, args.compile)
        if code:
            official = official_code_side(*official_models, settings, args.draft_steps)
            sampler = CoDeSampler(transformers[0], vqvae, settings, refiner=transformers[1],
                                  draft_steps=args.draft_steps)
            head = {"sampler": "code", "depth": depths[0], "refiner_depth": depths[1],
                    "draft_steps": args.draft_steps}
        else:
            official = official_var_side(*official_models, settings)
            sampler = VARSampler(transformers[0], vqvae, settings)
            head = {"sampler": "var", "depth": depths[0]}
        yield official, our_side(sampler), head, transformers[0].num_classes
        del official_models, vqvae, transformers, official, sampler
        _free(device)


def official_settings(args: argparse.Namespace) -> SamplingSettings:
    """The sampling settings from the flags, limited to what the official sampling calls take (one top-k and
    top-p for every scale, temperature 1, no smoothing)."""
    settings = settings_from_args(args)
    if any(isinstance(value, list) for value in (settings.top_k, settings.top_p, settings.temperature)) \
            or settings.temperature != 1.0 or settings.more_smooth:
        raise SystemExit("var bench: error: beside the official code, give one --top-k and one --top-p "
                         "(temperature 1, no --more-smooth): the official sampling calls take no per-scale values")
    return settings


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run(args: argparse.Namespace) -> dict:
    """Entry point of ``var bench --official-var DIR [--official-code DIR]`` (called by var/bench.py)."""
    device = resolve_device(args.device)
    if args.dtype is None:
        args.dtype = "fp16" if device.type == "cuda" else "fp32"
    args.depths = args.depths or ([2] if args.tiny else [16])
    args.batch_sizes = args.batch_sizes or ([1, 2] if args.tiny else [1, 16, 64, 256])
    if args.runs < 1:
        raise SystemExit("var bench: error: --runs must be at least 1")
    if args.tiny:  # the official top-k needs k <= vocabulary size
        args.top_k = [min(k, TINY_SIZES["V"]) for k in args.top_k or [SETTINGS["top_k"].default]]
        args.refiner_depth = min(args.refiner_depth, 1)
    official_settings(args)  # fails early on settings the official code cannot take
    if args.draft_steps is None:  # CoDe's default: all but the last two scales
        args.draft_steps = len(PATCH_NUMS) - 2
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if args.official_code and not 1 <= args.draft_steps < len(PATCH_NUMS):
        raise SystemExit(f"var bench: error: --draft-steps must be in 1..{len(PATCH_NUMS) - 1} for official CoDe")
    sources = {}
    load_before = os.getloadavg()
    rows = []
    for flag, root, code in (("--official-var", args.official_var, False),
                             ("--official-code", args.official_code, True)):
        if root:
            models = import_official(root, flag)
            sources[flag[2:].replace("-", "_")] = {"path": str(Path(root).resolve()),
                                                   "models_sha256": source_digest(root)}
            for official, ours, head, num_classes in configurations(models, code, args, device):
                rows += [bench_pair(official, ours, head, num_classes, batch_size, args, device)
                         for batch_size in args.batch_sizes]
                del official, ours  # the next configuration's models must not meet these
    report = {
        "settings": {
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "dtype": args.dtype, **{name: getattr(official_settings(args), name) for name in ("cfg", "top_k", "top_p")},
            "seed": SEED,
            "sizes": "tiny" if args.tiny else "official", "weights": "random (official constructors)",
            "warmup": args.warmup, "runs": args.runs, "compile": args.compile, "vae_decode_included": True,
            "order": "interleaved, alternating which side goes first",
            "memory": ("CUDA max_memory_allocated above the loaded models" if device.type == "cuda" else
                       "peak RSS above the loaded models (VmHWM reset via /proc/self/clear_refs after malloc_trim)"),
            "ratios": "speed_*: official time / ours (>1: ours faster); *_memory, kv_bytes: ours / official "
                      "(<1: ours leaner); latency: ours / official",
            **sources,
        },
        "load_average": {"before": load_before, "after": os.getloadavg()},
        "command": "var " + " ".join(sys.argv[1:]) if Path(sys.argv[0]).name == "var" else None,
        "results": rows,
    }
    out = Path(args.out)
    atomic_write_text(out / "vs_official.json", json.dumps(report, indent=1))
    plot(rows, out / "vs_official.png", report["settings"])
    print(f"wrote {out / 'vs_official.json'} and {out / 'vs_official.png'}")
    mismatches = [f"{_label(r)}: {r['token_mismatch']}" for r in rows if "token_mismatch" in r]
    if mismatches:
        raise SystemExit("var bench: error: the same seed gave different tokens than the official code ("
                         + "; ".join(mismatches) + "); timings are in the report, but they compare different samples")
    return report


# ------------------------------------------------------------------------------------------------------
# the plot
def _label(row: dict) -> str:
    name = f"d{row['depth']}" if row["sampler"] == "var" else f"CoDe d{row['depth']}->d{row['refiner_depth']}"
    return f"{name} B={row['B']}"


def _unit(values: list[float], units: tuple[tuple[str, float], ...]) -> tuple[str, float]:
    """The largest unit in which the biggest value is at least 1."""
    biggest = max(values, default=0)
    chosen = units[0]
    for unit in units:
        if biggest >= unit[1]:
            chosen = unit
    return chosen


def plot(rows: list[dict], path: Path, settings: dict) -> None:
    """Four panels per configuration: throughput, time split into loop and decode, peak memory, ratios."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = [r for r in rows if "ratios" in r]
    fig, axes = plt.subplots(2, 2, figsize=(13, 8.5))
    (ax_speed, ax_time), (ax_memory, ax_ratio) = axes
    labels = [_label(r) for r in rows]
    x = np.arange(len(rows))
    width = 0.38
    colors = {"official": "#9e9e9e", "ours": "#1f77b4"}
    for offset, side in ((-width / 2, "official"), (width / 2, "ours")):
        ax_speed.bar(x + offset, [r[side]["img_per_s"] for r in rows], width, label=side, color=colors[side])
    ax_speed.set_ylabel("images / s (wall, min of runs)")
    ax_speed.set_title("Throughput (higher is better)")

    seconds = [r[s][k] for r in rows for s in colors for k in ("loop_wall_sec", "decode_wall_sec")]
    unit, scale = _unit(seconds, (("ms", 1e-3), ("s", 1.0)))
    for offset, side in ((-width / 2, "official"), (width / 2, "ours")):
        loop = np.array([r[side]["loop_wall_sec"] for r in rows]) / scale
        decode = np.array([r[side]["decode_wall_sec"] for r in rows]) / scale
        ax_time.bar(x + offset, loop, width, color=colors[side], label=f"{side}: scale loop")
        ax_time.bar(x + offset, decode, width, bottom=loop, color=colors[side], alpha=0.5, hatch="//",
                    label=f"{side}: VAE decode")
    ax_time.set_ylabel(f"time per batch ({unit}, wall)")
    ax_time.set_title("Latency: scale loop + VAE decode (lower is better)")

    peaks = [r[s]["peak_bytes"] or 0 for r in rows for s in colors]
    unit, scale = _unit(peaks, (("KiB", 2**10), ("MiB", 2**20), ("GiB", 2**30)))
    for offset, side in ((-width / 2, "official"), (width / 2, "ours")):
        ax_memory.bar(x + offset, [(r[side]["peak_bytes"] or 0) / scale for r in rows], width, label=side,
                      color=colors[side])
    memory_kind = "CUDA allocated" if "CUDA" in settings["memory"] else "RSS"
    ax_memory.set_ylabel(f"peak {memory_kind} above the loaded models ({unit})")
    ax_memory.set_title("Peak memory (lower is better)")

    measures = (("min_speed_cpu", "speed (CPU time)"), ("min_speed_wall", "speed (wall)"),
                ("min_decode_speed_cpu", "decode speed (CPU time)"), ("peak_memory", "peak memory"),
                ("kv_bytes", "KV bytes"))
    bar = 0.8 / len(measures)
    tallest = 1.0
    for i, (key, name) in enumerate(measures):
        values = [r["ratios"].get(key) or 0 for r in rows]
        tallest = max(tallest, *values)
        ax_ratio.bar(x - 0.4 + bar * (i + 0.5), values, bar, label=name)
    ax_ratio.axhline(1.0, color="black", linestyle="--", linewidth=1)
    ax_ratio.set_ylim(0, tallest * 1.45)  # headroom: the legend sits above the bars, never on them
    ax_ratio.set_ylabel("ours / official (speed: official time / ours)")
    ax_ratio.set_title("Ratios: speed > 1 and memory < 1 favour ours")
    for axis in axes.flat:
        axis.set_xticks(x, labels, rotation=30 if len(rows) > 4 else 0, ha="right" if len(rows) > 4 else "center")
        axis.set_xlabel("configuration (depth, batch size)")
        axis.grid(axis="y", alpha=0.3)
    for axis in (ax_speed, ax_time, ax_memory):
        axis.legend(fontsize=7)
    ax_ratio.legend(fontsize=7, ncol=3, loc="upper center")
    fig.suptitle(f"ours vs official on {settings['device']} ({settings['dtype']}, cfg {settings['cfg']}, "
                 f"top-k {settings['top_k']}, top-p {settings['top_p']}, decode included, "
                 f"{settings['runs']} interleaved runs)")
    save_figure(fig, path, dpi=120)
