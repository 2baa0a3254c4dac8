"""ScaleKV: scale-aware KV-cache compression (spec_accel.md section 2, transferred to VAR per 2.8), the KV
policy any scale-wise sampler that keeps its cache takes through the ``kv_budget`` options (:class:`KVOptions`).

After a layer has attended at scale k (always to its whole current scale, never compressed), its cache is
cut to the budget that layer has when it decodes scale k+1 (:class:`~var.sample.kv_budget.KVBudget`).
Always kept: the SOS token (scale 0, an attention sink) and the observation window, the centre tokens of a
4x4 grid over scale k's map (the whole map when smaller).  The other kept tokens are those the window
queries attend to most: per the paper, the softmax attention of the window queries summed over them and
average-pooled along the key index (``scoring="softmax"``); or, as the released code does, their
pre-softmax logits summed and max-pooled (``scoring="max-pool"``).  Every (row, head) selects on its own,
so the conditional and unconditional CFG halves keep different tokens unless ``share_cfg_choice`` makes
the unconditional half reuse the conditional half's choice.

A pass's own keys/values stay transient (like its activations) until the layer has attended; only what
the budget keeps is written to the buffers, which are allocated per layer at the most that layer ever
keeps.  So the persistent cache really shrinks to the budget, even after CoDe's long one-pass pre-fill.
With budget 1.0 nothing is ever dropped and sampling is exactly the plain sampler.
VAR has absolute position embeddings added at the input, so kept keys need no position bookkeeping.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from var.models.kv_cache import KVCache
from var.sample.kv import KVPolicy
from var.sample.options import SamplerOptions, check_budget, option, parse_budget
from var.sample.scalekv.budget import WINDOW_SIDE, KVBudget, window_offsets

SCORINGS = ("softmax", "max-pool", "raw")


@dataclass(frozen=True)
class ScheduleShape:
    """What a KV budget reads of a model's shape (VARConfig's names), for a model with a ScaleSchedule
    instead of square ``patch_nums`` (Infinity): ``patch_nums`` holds the side of a square scale or (h, w)."""

    patch_nums: tuple
    depth: int
    tokens_per_scale: list[int]
    scale_bounds: list[tuple[int, int]]

    @classmethod
    def of(cls, model) -> ScheduleShape:
        schedule = model.schedule
        grids = tuple(h if h == w else (h, w) for h, w in schedule.shapes)
        return cls(grids, model.depth, schedule.tokens, schedule.bounds)

    @property
    def num_scales(self) -> int:
        return len(self.patch_nums)

    @property
    def seq_len(self) -> int:
        return self.scale_bounds[-1][1]


def budget_shape(model):
    """The shape a KV budget is made for: VAR's config, or the schedule view of another scale model."""
    return model.config if hasattr(model.config, "patch_nums") else ScheduleShape.of(model)


def _grid(patch_num: int | tuple[int, int]) -> tuple[int, int]:
    return (patch_num, patch_num) if isinstance(patch_num, int) else tuple(patch_num)


@dataclass
class KVOptions(SamplerOptions):
    """The KV policy, an option of every scale-wise sampler that keeps its cache (CoDe: of the drafter)."""

    kv_budget: float | str | KVBudget | None = option(
        None, "ScaleKV: compress the KV cache to this fraction in (0, 1] (uniform over layers) or to the budget "
              "JSON of 'var calibrate-kv'; default: the full cache", type=parse_budget, check=check_budget,
        metavar="FRACTION|FILE")
    kv_scoring: str = option("softmax", "ScaleKV: how kept tokens are chosen: softmax (the paper), max-pool "
                                        "(the released code) or raw (the released code on Infinity: max-pool "
                                        "scores of raw x W_q queries)", choices=SCORINGS)
    kv_share_cfg: bool = option(False, "ScaleKV: the unconditional half keeps the tokens the conditional half chose")
    kv_window: int = option(WINDOW_SIDE, "ScaleKV with a fractional budget: side of the observation-window grid "
                                         "(4: 16 tokens; smaller lets small models keep fewer)", minimum=1)


def policy_from_options(options: KVOptions, model, budget: float | str | KVBudget | None = None) -> KVPolicy:
    """The KV policy the options ask for, checked against ``model`` now (a budget of the wrong shape fails
    before sampling); ``budget`` overrides ``options.kv_budget`` (CoDe's refiner budget)."""
    budget = options.kv_budget if budget is None else budget
    if budget is None:
        return KVPolicy()
    if options.kv_scoring == "raw" and not getattr(model, "raw_query_scoring", False):
        raise ValueError(f"kv_scoring raw (the released ScaleKV's scoring on Infinity) needs the attention input, "
                         f"which {type(model).__name__} does not hand to its cache; use softmax or max-pool")
    policy = ScaleKVPolicy(budget, options.kv_scoring, options.kv_share_cfg, window_side=options.kv_window)
    policy.budget_for(model)
    return policy


class ScaleKVCache(KVCache):
    """A KV cache that stores, after each layer's attention, only the tokens of its budget.

    ``capacity`` comes from :meth:`KVBudget.capacities` for the scales the runner decodes, ``fraction``
    from :meth:`KVBudget.fraction_of_full` (reported in the stats next to the requested budget).
    """

    def __init__(
        self,
        budget: KVBudget,
        capacity: list[int],
        scoring: str = "softmax",
        share_cfg_choice: bool = False,
        pool_kernel: int = 5,
        fraction: float = 1.0,
    ):
        super().__init__(budget.num_layers, capacity)
        self.budget = budget
        self.fraction = fraction  # bytes of these buffers over those of the runner's full cache
        self.scoring = scoring
        self.share_cfg_choice = share_cfg_choice
        self.pool_kernel = pool_kernel
        self.raw_queries = scoring == "raw"  # the model hands after_attention x W_q instead of its queries
        self.pending: tuple[torch.Tensor, torch.Tensor, int] | None = None  # this layer's pass, not yet stored
        self.lengths_at_pass_start = list(self.lengths)

    def stats(self) -> dict[str, float]:
        return {"kv_budget": self.budget.fraction, "kv_fraction": self.fraction}

    def begin_pass(self, scale_index: int, persist: bool = True) -> None:
        super().begin_pass(scale_index, persist)
        self.lengths_at_pass_start = list(self.lengths)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the held history plus this pass's k, v without storing them (after_attention does)."""
        held = self.lengths[layer]
        height, width = _grid(self.budget.patch_nums[self.scale_index])
        if held != self.lengths_at_pass_start[0] and k.shape[2] != height * width:
            # the pass's block-causal mask assumes every layer holds as many tokens as the first
            raise RuntimeError("a pass over several scales cannot run on layers compressed to different lengths")
        if not self.persist:
            return super().update(layer, k, v)
        k = k.to(v.dtype)
        if held:
            k = torch.cat((self.keys[layer][:, :, :held], k), dim=2)
            v = torch.cat((self.values[layer][:, :, :held], v), dim=2)
        self.pending = (k, v, held)
        return k, v

    def after_attention(self, layer: int, queries: torch.Tensor, keys: torch.Tensor) -> None:
        if not self.persist:
            return
        keys, values, held = self.pending
        self.pending = None
        target = self.budget.history[self.scale_index + 1][layer]
        if keys.shape[2] <= target:  # everything fits: append the pass
            super().update(layer, keys[:, :, held:], values[:, :, held:])
            return
        keep = self.select(queries, keys, target)  # (rows, heads, target), ascending positions
        index = keep.unsqueeze(-1).expand(-1, -1, -1, keys.shape[-1])
        self.lengths[layer] = 0
        super().update(layer, keys.gather(2, index), values.gather(2, index))

    def select(self, queries: torch.Tensor, keys: torch.Tensor, target: int) -> torch.Tensor:
        """Positions of the ``target`` keys to keep per (row, head).

        queries (rows, heads, n_pass, head_dim) of the pass, its last scale at the end; keys (rows, heads,
        length, head_dim), everything this layer attended to, the current scale at the end.
        """
        grid = _grid(self.budget.patch_nums[self.scale_index])
        count, length = grid[0] * grid[1], keys.shape[2]
        offsets = torch.tensor(window_offsets(grid, self.budget.window_side), device=keys.device)
        window = length - count + offsets  # key positions of the window tokens
        window_queries = queries[:, :, -count:].index_select(2, offsets).float()  # (rows, heads, W, hd)
        logits = window_queries @ keys.float().transpose(-1, -2)  # (rows, heads, W, length)
        if self.raw_queries:  # raw x W_q against the normalised, rotated keys, as the released code scores
            logits = logits / keys.shape[-1] ** 0.5
        rows, heads = logits.shape[:2]
        pad = self.pool_kernel // 2
        if self.scoring == "softmax":
            scores = logits.softmax(dim=-1).sum(dim=2).view(rows * heads, 1, length)
            scores = F.avg_pool1d(scores, self.pool_kernel, stride=1, padding=pad, count_include_pad=False)
        else:
            logits[..., window] = float("-inf")
            scores = F.max_pool1d(logits.sum(dim=2).view(rows * heads, 1, length), self.pool_kernel, 1, pad)
        scores = scores.view(rows, heads, length)
        scores[..., window] = float("inf")
        scores[..., 0] = float("inf")  # the SOS sink
        keep = scores.topk(target, dim=-1).indices.sort(dim=-1).values
        if self.share_cfg_choice:  # the unconditional half (second) reuses the conditional half's choice
            half = rows // 2
            keep[half:] = keep[:half]
        return keep


class ScaleKVPolicy(KVPolicy):
    """Builds :class:`ScaleKVCache` s from a calibrated :class:`KVBudget` or a uniform fraction.

    Args:
        budget: a KVBudget for the model's shape (or the path of its JSON), or a fraction in (0, 1] for a
            uniform budget.
        scoring: "softmax" (the paper) or "max-pool" (the released code).
        share_cfg_choice: the unconditional half keeps the tokens the conditional half chose.
        pool_kernel: width of the 1-D pooling over key positions (1: none).
        window_side: observation window of a uniform budget, window_side^2 grid centres (a calibrated
            budget carries its own).
    """

    name = "scalekv"

    def __init__(
        self,
        budget: float | KVBudget | str | os.PathLike = 0.1,
        scoring: str = "softmax",
        share_cfg_choice: bool = False,
        pool_kernel: int = 5,
        window_side: int = WINDOW_SIDE,
    ):
        if scoring not in SCORINGS:
            raise ValueError(f"unknown KV scoring '{scoring}'; choose one of {', '.join(SCORINGS)}")
        if pool_kernel < 1 or pool_kernel % 2 == 0:
            raise ValueError(f"pool_kernel must be an odd positive number, got {pool_kernel}")
        if isinstance(budget, (str, os.PathLike)):
            budget = KVBudget.load(budget)
        if not isinstance(budget, KVBudget) and not 0 < float(budget) <= 1:
            raise ValueError(f"the KV budget is a fraction of the cache in (0, 1], got {budget}")
        self.budget = budget
        self.scoring = scoring
        self.share_cfg_choice = share_cfg_choice
        self.pool_kernel = pool_kernel
        self.window_side = window_side
        self.warned = False  # the budget-cannot-be-met line is printed once

    def budget_for(self, model, stop: int | None = None) -> KVBudget:
        """The budget on ``model``: the calibrated one (checked against its shape), or the uniform fraction for a
        runner that stops before scale ``stop``."""
        shape = budget_shape(model)
        if isinstance(self.budget, KVBudget):
            self.budget.check(shape)
            return self.budget
        return KVBudget.uniform(shape, float(self.budget), self.window_side, stop=stop)

    def make_cache(self, model, rows: int, start: int = 0, stop: int | None = None) -> KVCache:
        """A cache holding at most the budget's fraction of this runner's full cache (a fractional budget is
        allocated for the scales the runner decodes); where the SOS + window floor forces more, one line
        on stderr says so, once per policy, and the stats report the real fraction."""
        stop = model.schedule.num_scales if stop is None else stop
        budget = self.budget_for(model, stop)
        cache = ScaleKVCache(budget, budget.capacities(start, stop), self.scoring, self.share_cfg_choice,
                             self.pool_kernel, budget.fraction_of_full(budget_shape(model), start, stop))
        if cache.fraction > budget.fraction + 1e-9 and not self.warned:
            self.warned = True
            print(f"warning: KV budget {budget.fraction:g} cannot be met: the SOS + observation-window floor keeps "
                  f"{cache.fraction:.3f} of the full cache (a smaller --kv-window keeps fewer)", file=sys.stderr)
        return cache
