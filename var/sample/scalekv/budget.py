"""ScaleKV budgets: how many cached tokens each layer keeps at each scale (calibrated by calibrate.py).

A budget says, for every scale k and layer l, how many history tokens (of scales < k) layer l still holds
when it decodes scale k.  A budget of fraction f holds a runner's buffers to at most f of its full cache's
bytes: a uniform one gives every layer floor(f * P) tokens, P being the prefix the runner's last scale
attends to (424 tokens at 256 px); scales whose whole history fits are never compressed, and no layer
keeps fewer than the SOS sink plus the observation window of the scale just decoded (the one thing that
can exceed f: the run then says so).

Calibration (spec_accel.md 2.2) classifies (layer, scale) pairs: the Attention Selectivity Index
ASI = E_q[attention mass on the current scale] * E_q[mass of the K' largest history attentions] is high
for "refiners" (local attention, a small cache suffices) and low for "drafters" (dispersed attention).
ASI is z-scored within each scale, and the lowest-z pairs become drafters.  Within each compressed scale
the layers share the uniform total: drafters keep as much of their history as the refiners' minimum
allows, refiners split what remains.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from var.models.var import VARConfig
from var.utils import atomic_write_text

FORMAT = "var-kv-budget/1"
WINDOW_SIDE = 4  # a 4x4 grid of observation queries, 16 tokens, as ScaleKV uses


def window_offsets(side: int | tuple[int, int], window_side: int = WINDOW_SIDE) -> list[int]:
    """Positions, inside a side x side (or h x w) map, of the observation window: the centre token of each cell
    of a window_side x window_side grid, or the whole map when it is smaller than the grid."""
    height, width = (side, side) if isinstance(side, int) else side
    if height < window_side or width < window_side:
        return list(range(height * width))
    rows = [i * (height // window_side) + (height // window_side - 1) // 2 for i in range(window_side)]
    cols = [i * (width // window_side) + (width // window_side - 1) // 2 for i in range(window_side)]
    return [row * width + col for row in rows for col in cols]


def scale_key(patch_num: int | Sequence[int]) -> str:
    """'hxw' of a square side or an (h, w) grid (Infinity's non-square scales)."""
    height, width = (patch_num, patch_num) if isinstance(patch_num, int) else patch_num
    return f"{height}x{width}"


@dataclass
class KVBudget:
    """Per-scale, per-layer history budgets for one transformer shape (patch_nums, depth).

    ``history[k][l]``: tokens of scales < k that layer l holds when it decodes scale k.
    ``drafters[k]``: layers classified as drafters at scale k (empty for a uniform budget).
    ``selectivity[k][l]``: the measured ASI (None for scale 0, or for a uniform budget).
    """

    patch_nums: tuple[int, ...]
    num_layers: int
    fraction: float
    tokens_per_layer: int
    window_side: int
    history: list[list[int]]
    drafters: list[list[int]]
    selectivity: list[list[float] | None] | None = None

    # -- building -------------------------------------------------------------------------------------
    @classmethod
    def uniform(cls, config: VARConfig, fraction: float, window_side: int = WINDOW_SIDE,
                stop: int | None = None) -> KVBudget:
        """Every layer keeps the same number of history tokens (``stop``: see :meth:`from_roles`)."""
        return cls.from_roles(config, fraction, [[] for _ in config.patch_nums], window_side, stop=stop)

    @classmethod
    def from_roles(
        cls,
        config: VARConfig,
        fraction: float,
        drafters: Sequence[Sequence[int]],
        window_side: int = WINDOW_SIDE,
        selectivity: list[list[float] | None] | None = None,
        stop: int | None = None,
    ) -> KVBudget:
        """Allocate tokens per layer and scale given which layers are drafters at each scale.

        The bytes are the buffers', each layer's sized for the most it ever keeps, so the allocation holds
        the sum over layers of those maxima to ``fraction`` of the full cache of a runner decoding scales
        [0, ``stop``) (default: all; the full cache keeps every scale but the last).  Only the SOS +
        window floor can exceed it (:meth:`fraction_of_full` says by how much).
        """
        if not 0 < fraction <= 1:
            raise ValueError(f"the KV budget is a fraction of the cache in (0, 1], got {fraction}")
        if window_side < 1:
            raise ValueError(f"the observation window side must be at least 1, got {window_side}")
        stop = config.num_scales if stop is None else stop
        per_layer = max(math.floor(fraction * config.scale_bounds[stop - 1][0] + 1e-9), 1)  # never above B
        total = per_layer * config.depth
        unlimited = [config.seq_len] * config.depth
        history = cls._allocate(config, per_layer, drafters, window_side, unlimited)
        wanted = [max(column) for column in zip(*history[:stop], strict=True)]  # each layer's buffer
        if sum(wanted) > total:  # roles differ between scales: cap every layer's buffer by water-filling
            level = max(lv for lv in range(max(wanted) + 1) if sum(min(w, lv) for w in wanted) <= total)
            history = cls._allocate(config, per_layer, drafters, window_side, [min(w, level) for w in wanted])
        return cls(tuple(config.patch_nums), config.depth, float(fraction), per_layer, window_side, history,
                   [sorted(d) for d in drafters], selectivity)

    @staticmethod
    def _allocate(config: VARConfig, per_layer: int, drafters: Sequence[Sequence[int]], window_side: int,
                  caps: list[int]) -> list[list[int]]:
        """history[k][l]: drafters keep as much as the refiners' floor allows, refiners share the rest of
        per_layer * depth; no layer keeps more than its cap or fewer than the SOS + window floor."""
        tokens, depth = config.tokens_per_scale, config.depth
        history = [[0] * depth]
        for k in range(1, config.num_scales):
            available = [held + tokens[k - 1] for held in history[-1]]  # before compressing after scale k-1
            floor = 1 + len(window_offsets(config.patch_nums[k - 1], window_side))  # SOS sink + window
            if all(a <= min(per_layer, cap) for a, cap in zip(available, caps, strict=True)):
                history.append(available)  # the whole history fits: nothing to compress
                continue
            total = per_layer * depth
            drafting = sorted(drafters[k])
            refining = [layer for layer in range(depth) if layer not in drafting]
            kept = [0] * depth
            if drafting:
                cap = max((total - floor * len(refining)) // len(drafting), floor)
                for layer in drafting:  # capped first, so the refiners' share gets what a cap leaves
                    kept[layer] = min(cap, caps[layer])
            if refining:
                share = (total - sum(min(kept[layer], available[layer]) for layer in drafting)) // len(refining)
                for layer in refining:
                    kept[layer] = share
            history.append([min(available[layer], max(min(kept[layer], caps[layer]), floor))
                            for layer in range(depth)])
        return history

    @classmethod
    def from_selectivity(
        cls,
        config: VARConfig,
        selectivity: list[list[float] | None],
        fraction: float,
        drafter_fraction: float = 0.1,
        window_side: int = WINDOW_SIDE,
    ) -> KVBudget:
        """Classify (layer, scale) pairs by z-scored ASI and allocate: the lowest ``drafter_fraction`` of the
        pairs at compressed scales become drafters."""
        if not 0 <= drafter_fraction <= 1:
            raise ValueError(f"drafter_fraction must be in [0, 1], got {drafter_fraction}")
        per_layer = cls.uniform(config, fraction, window_side).tokens_per_layer
        compressed = [k for k in range(1, config.num_scales) if config.scale_bounds[k - 1][1] > per_layer]
        pairs = []  # (z, scale, layer)
        for k in compressed:
            values = torch.tensor(selectivity[k], dtype=torch.float64)
            z = (values - values.mean()) / (values.std(unbiased=False) + 1e-6)
            pairs += [(float(z[layer]), k, layer) for layer in range(config.depth)]
        drafters = [[] for _ in config.patch_nums]
        for _, k, layer in sorted(pairs)[: round(drafter_fraction * len(pairs))]:
            drafters[k].append(layer)
        return cls.from_roles(config, fraction, drafters, window_side, selectivity)

    # -- using ----------------------------------------------------------------------------------------
    def check(self, config: VARConfig) -> None:
        """Raise a ValueError unless this budget fits a model of ``config`` and is self-consistent."""
        if tuple(self.patch_nums) != tuple(config.patch_nums) or self.num_layers != config.depth:
            raise ValueError(
                f"the KV budget is for {self.num_layers} layers and patch_nums {tuple(self.patch_nums)}, the model "
                f"has {config.depth} layers and patch_nums {tuple(config.patch_nums)}: calibrate a budget for it "
                "with 'var calibrate-kv' (for a CoDe refiner pass it as --refiner-kv-budget)"
            )
        tokens = config.tokens_per_scale
        for k in range(1, config.num_scales):
            floor = 1 + len(window_offsets(config.patch_nums[k - 1], self.window_side))
            for layer in range(self.num_layers):
                available = self.history[k - 1][layer] + tokens[k - 1]
                if not min(available, floor) <= self.history[k][layer] <= available:
                    raise ValueError(
                        f"KV budget: layer {layer} at scale {k} keeps {self.history[k][layer]} tokens, outside "
                        f"[{min(available, floor)}, {available}] (SOS + window .. all it holds)"
                    )

    def fraction_of_full(self, config: VARConfig, start: int = 0, stop: int | None = None) -> float:
        """Bytes of a runner's buffers for scales [start, stop) over those of the full cache (every scale
        below stop - 1 kept): what the budget really costs, above ``fraction`` only where floors force it."""
        stop = config.num_scales if stop is None else stop
        full = config.scale_bounds[stop - 1][0] * self.num_layers
        return sum(self.capacities(start, stop)) / full if full else 1.0

    def capacities(self, start: int, stop: int) -> list[int]:
        """Tokens each layer's buffer needs for a runner decoding scales [start, stop): the most it keeps
        after any pass whose keys are stored (the pre-fill up to ``start``, then scales up to stop - 2)."""
        stored = [self.history[k + 1] for k in range(start, stop - 1)]
        return [max(kept) for kept in zip(*stored, strict=True)] if stored else [0] * self.num_layers

    # -- JSON -----------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        scales = {}
        for k, pn in enumerate(self.patch_nums):
            scales[scale_key(pn)] = {
                "history_tokens": self.history[k],
                "drafter_layers": self.drafters[k],
                "selectivity": self.selectivity[k] if self.selectivity else None,
            }
        return {
            "format": FORMAT,
            "patch_nums": list(self.patch_nums),
            "num_layers": self.num_layers,
            "fraction": self.fraction,
            "tokens_per_layer": self.tokens_per_layer,
            "window_side": self.window_side,
            "scales": scales,
        }

    @classmethod
    def from_dict(cls, data: dict, source: str = "KV budget") -> KVBudget:
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"{source} is not a KV budget (expected \"format\": \"{FORMAT}\"); write one with "
                             "'var calibrate-kv'")
        try:
            patch_nums = tuple(int(pn) if isinstance(pn, int) else tuple(int(v) for v in pn)
                               for pn in data["patch_nums"])
            scales = [data["scales"][scale_key(pn)] for pn in patch_nums]
            selectivity = [scale["selectivity"] for scale in scales]
            return cls(
                patch_nums=patch_nums,
                num_layers=int(data["num_layers"]),
                fraction=float(data["fraction"]),
                tokens_per_layer=int(data["tokens_per_layer"]),
                window_side=int(data["window_side"]),
                history=[[int(t) for t in scale["history_tokens"]] for scale in scales],
                drafters=[[int(layer) for layer in scale["drafter_layers"]] for scale in scales],
                selectivity=None if all(s is None for s in selectivity) else selectivity,
            )
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"{source} is malformed ({type(error).__name__}: {error}); rewrite it with "
                             "'var calibrate-kv'") from error

    def save(self, path: str | os.PathLike) -> None:
        atomic_write_text(path, json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> KVBudget:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"KV budget file {path} not found; write one with 'var calibrate-kv'")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"{path} is not valid JSON ({error})") from error
        return cls.from_dict(data, str(path))
