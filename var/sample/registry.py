"""Sampler names -> classes.  Add-on samplers register here so every entry point accepts them.

``build_sampler(name, model, vqvae, settings, **options)`` passes the options to the sampler's constructor
and rejects, with one clear line, any option that sampler does not take.
"""

from __future__ import annotations

import inspect

from var.models.var import VAR
from var.sample.base import VARSampler
from var.sample.code import CoDeSampler
from var.sample.logits import SamplingSettings
from var.sample.scalekv import CoDeScaleKVSampler, ScaleKVSampler
from var.tokenizers.vqvae import VQVAE

SAMPLERS: dict[str, type[VARSampler]] = {
    "var": VARSampler,
    "code": CoDeSampler,
    "scalekv": ScaleKVSampler,
    "code+scalekv": CoDeScaleKVSampler,
}
SAMPLER_NAMES = tuple(SAMPLERS)
_NOT_OPTIONS = {"self", "model", "vqvae", "settings", "kv_policy", "refiner_kv_policy"}


def sampler_options(name: str) -> list[str]:
    """The keyword options sampler ``name`` accepts."""
    parameters = inspect.signature(SAMPLERS[name].__init__).parameters
    return [option for option in parameters if option not in _NOT_OPTIONS]


def build_sampler(
    name: str,
    model: VAR,
    vqvae: VQVAE,
    settings: SamplingSettings | None = None,
    **options,
) -> VARSampler:
    """Build the sampler called ``name`` around ``model`` and ``vqvae``."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler '{name}'; choose one of {', '.join(SAMPLER_NAMES)}")
    accepted = sampler_options(name)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        takes = ", ".join(accepted) if accepted else "no options"
        raise ValueError(f"sampler '{name}' does not take {', '.join(unknown)} (it takes {takes})")
    return SAMPLERS[name](model, vqvae, settings, **options)
