"""Samplers: the plain VAR scale loop and add-ons behind one interface.

``build_sampler(name, model, vqvae, settings, **options)`` returns an object with
``sample(labels, seed=...) -> SampleOutput``; the CLI's ``--sampler NAME`` takes the same names.
"""

from var.sample.base import DecodeState, KVPolicy, SampleOutput, ScaleRunner, VARSampler
from var.sample.logits import SamplingSettings
from var.sample.registry import SAMPLER_NAMES, build_sampler

__all__ = [
    "DecodeState",
    "KVPolicy",
    "SAMPLER_NAMES",
    "SampleOutput",
    "SamplingSettings",
    "ScaleRunner",
    "VARSampler",
    "build_sampler",
]
