"""ScaleKV (spec_accel.md section 2): scale-aware KV-cache compression for next-scale samplers.

* budget.py — :class:`KVBudget`: tokens each layer keeps at each scale (uniform, or calibrated), as JSON;
* cache.py — the compressing cache, its KV policy and the ``kv_budget`` options every scale-wise sampler takes;
* calibrate.py — attention selectivity per (layer, scale), measured while sampling, for a calibrated budget;
* cli.py — ``var calibrate-kv``.

``var sample --sampler var --kv-budget 0.1`` (or the ``scalekv`` preset) and ``--sampler code --kv-budget 0.1``
use it; there is no ScaleKV sampler class.
"""

from var.sample.scalekv.budget import KVBudget
from var.sample.scalekv.cache import KVOptions, ScaleKVCache, ScaleKVPolicy

__all__ = ["KVBudget", "KVOptions", "ScaleKVCache", "ScaleKVPolicy"]
