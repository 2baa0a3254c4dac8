"""Samplers: the plain VAR scale loop and add-ons behind one interface.

``build_sampler(name, model, vqvae, settings, **options)`` returns an object with
``sample(labels, seed=...) -> SampleOutput``; the CLI's ``--sampler NAME`` takes the same names
(``var``, ``code``, ``scalekv``, ``code+scalekv``, ``sjd-scale``; ``ar`` and ``sjd`` decode the raster AR
baseline of var/models/ar.py instead of VAR).
"""

from var.sample.ar import ARSampler
from var.sample.base import DecodeState, KVPolicy, SampleOutput, ScaleRunner, VARSampler
from var.sample.code import CoDeSampler
from var.sample.kv_budget import KVBudget
from var.sample.logits import SamplingSettings
from var.sample.registry import SAMPLER_NAMES, build_sampler
from var.sample.scalekv import CoDeScaleKVSampler, ScaleKVPolicy, ScaleKVSampler
from var.sample.sjd import SJDSampler
from var.sample.sjd_scale import ScaleSpeculativeSampler

__all__ = [
    "ARSampler",
    "CoDeSampler",
    "CoDeScaleKVSampler",
    "DecodeState",
    "KVBudget",
    "KVPolicy",
    "SAMPLER_NAMES",
    "SJDSampler",
    "SampleOutput",
    "SamplingSettings",
    "ScaleKVPolicy",
    "ScaleKVSampler",
    "ScaleRunner",
    "ScaleSpeculativeSampler",
    "VARSampler",
    "build_sampler",
]
