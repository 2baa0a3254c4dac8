"""Samplers: every way of turning a model's logits into images, behind one interface.

``build_sampler(name, model, tokenizer, settings, **options)`` returns a :class:`Sampler`:
``sample(conditions, seed=..., generator=..., batch_size=..., decode=...) -> SampleOutput`` with one stats
schema (:data:`STATS`).  Names (the CLI's ``--sampler``): ``var`` (plain next-scale), ``scalekv`` (``var``
with a 10 % KV budget), ``code`` (CoDe), ``sjd-scale`` (scale-wise speculation) for next-scale models; ``ar``
(plain raster) and ``sjd`` (speculative Jacobi decoding) for raster models.  Add-ons are options any fitting
sampler takes (``kv_budget``, ``gumbel``, ...), declared once per sampler (var/sample/options.py).

Layout: base.py (the protocol and its one implementation), rules.py (each model family's guidance and token
processing), scale.py / raster.py (the two loops' shared steps and plain samplers), code.py (CoDe),
scalekv/ (ScaleKV), speculative/ (SJD and scale-wise speculation), registry.py (names), cli.py (``var sample``).
"""

from var.sample.base import STATS, BaseSampler, SampleOutput, Sampler
from var.sample.code import CoDeSampler
from var.sample.logits import SamplingSettings
from var.sample.raster import ARSampler
from var.sample.registry import SAMPLER_NAMES, build_sampler
from var.sample.scale import DecodeState, ScaleRunner, VARSampler
from var.sample.scalekv import KVBudget, ScaleKVPolicy
from var.sample.speculative.scales import ScaleSpeculativeSampler
from var.sample.speculative.sjd import SJDSampler

__all__ = [
    "ARSampler",
    "BaseSampler",
    "CoDeSampler",
    "DecodeState",
    "KVBudget",
    "SAMPLER_NAMES",
    "SJDSampler",
    "STATS",
    "SampleOutput",
    "Sampler",
    "SamplingSettings",
    "ScaleKVPolicy",
    "ScaleRunner",
    "ScaleSpeculativeSampler",
    "VARSampler",
    "build_sampler",
]
