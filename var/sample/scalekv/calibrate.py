"""ScaleKV calibration (spec_accel.md 2.2): the attention selectivity of every layer at every scale, measured
while sampling with the plain sampler, from which :meth:`KVBudget.from_selectivity` allots the budget.
"""

from __future__ import annotations

import torch

from var.models.family import ScaleModel, ScaleTokenizer
from var.models.kv_cache import KVCache
from var.models.var import VARConfig
from var.sample.kv import KVPolicy
from var.sample.logits import SamplingSettings
from var.sample.scale import VARSampler
from var.sample.scalekv.cache import budget_shape


class SelectivityRecorder(KVCache):
    """A full cache that, after each attention, adds up the two ASI factors for (layer, scale).

    ``totals[(layer, scale)]`` = [sum of current-scale mass, sum of top-K' history mass, query count], over
    every (row, head, query) of the scale; rows include both CFG halves, as the cache serves both.
    """

    def __init__(self, num_layers: int, capacity: int, tokens_per_scale: list[int], history_top_k: int, totals):
        super().__init__(num_layers, capacity)
        self.tokens_per_scale = tokens_per_scale
        self.history_top_k = history_top_k
        self.totals = totals

    def after_attention(self, layer: int, queries: torch.Tensor, keys: torch.Tensor) -> None:
        count = self.tokens_per_scale[self.scale_index]
        history = keys.shape[2] - count
        if history == 0:
            return
        # queries (rows, heads, n, head_dim) of the current scale; keys (rows, heads, history + n, head_dim)
        attention = (queries[:, :, -count:].float() @ keys.float().transpose(-1, -2)).softmax(dim=-1)
        current = attention[..., history:].sum(dim=-1)
        top = attention[..., :history].topk(min(self.history_top_k, history), dim=-1).values.sum(dim=-1)
        entry = self.totals.setdefault((layer, self.scale_index), [0.0, 0.0, 0])
        entry[0] += float(current.sum())
        entry[1] += float(top.sum())
        entry[2] += current.numel()


class SelectivityPolicy(KVPolicy):
    """Caches built by this policy record attention selectivity into one shared table."""

    name = "selectivity"

    def __init__(self, history_top_k: int):
        self.history_top_k = history_top_k
        self.totals: dict[tuple[int, int], list] = {}

    def make_cache(self, model: ScaleModel, rows: int, start: int = 0, stop: int | None = None) -> KVCache:
        cfg = budget_shape(model)
        stop = cfg.num_scales if stop is None else stop
        return SelectivityRecorder(cfg.depth, cfg.scale_bounds[stop - 1][0], cfg.tokens_per_scale,
                                   self.history_top_k, self.totals)

    def selectivity(self, config: VARConfig) -> list[list[float] | None]:
        """ASI[scale][layer] = mean current mass * mean top-K' history mass (None for scale 0)."""
        table: list[list[float] | None] = [None]
        for k in range(1, config.num_scales):
            row = []
            for layer in range(config.depth):
                current, top, count = self.totals[(layer, k)]
                row.append((current / count) * (top / count))
            table.append(row)
        return table


@torch.no_grad()
def measure_selectivity(
    model: ScaleModel,
    vqvae: ScaleTokenizer,
    labels,
    history_top_k: int,
    settings: SamplingSettings | None = None,
    batch_size: int = 16,
    seed: int = 0,
) -> list[list[float] | None]:
    """ASI of every (scale, layer) while sampling ``labels`` (class labels, or Infinity's prompts) with the plain
    sampler (batch i: seed + i).

    ``history_top_k`` is K', the number of largest history attentions whose mass counts (naturally the
    tokens a layer keeps under the budget being calibrated).
    """
    policy = SelectivityPolicy(history_top_k)
    sampler = VARSampler(model, vqvae, settings, kv_policy=policy)
    for i, start in enumerate(range(0, len(labels), batch_size)):
        sampler.sample(labels[start:start + batch_size], seed=seed + i, decode=False)
    return policy.selectivity(budget_shape(model))
