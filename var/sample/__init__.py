"""Samplers: the plain VAR scale loop and add-ons behind one interface.

``build_sampler(name, model, vqvae, settings, **options)`` returns an object with
``sample(labels, seed=...) -> SampleOutput``; the CLI's ``--sampler NAME`` takes the same names
(``var``, ``code``, ``scalekv``, ``code+scalekv``).
"""

from var.sample.base import DecodeState, KVPolicy, SampleOutput, ScaleRunner, VARSampler
from var.sample.code import CoDeSampler
from var.sample.kv_budget import KVBudget
from var.sample.logits import SamplingSettings
from var.sample.registry import SAMPLER_NAMES, build_sampler
from var.sample.scalekv import CoDeScaleKVSampler, ScaleKVPolicy, ScaleKVSampler

__all__ = [
    "CoDeSampler",
    "CoDeScaleKVSampler",
    "DecodeState",
    "KVBudget",
    "KVPolicy",
    "SAMPLER_NAMES",
    "SampleOutput",
    "SamplingSettings",
    "ScaleKVPolicy",
    "ScaleKVSampler",
    "ScaleRunner",
    "VARSampler",
    "build_sampler",
]
