"""Sampler names -> classes.  Add-on samplers register here so every entry point accepts them.

``build_sampler(name, model, vqvae, settings, **options)`` passes the options to the sampler's constructor
and rejects, with one clear line, any option that sampler does not take.
"""

from __future__ import annotations

import inspect

from torch import nn

from var.models.ar import RasterAR
from var.sample.ar import ARSampler
from var.sample.base import VARSampler
from var.sample.code import CoDeSampler
from var.sample.logits import SamplingSettings
from var.sample.scalekv import CoDeScaleKVSampler, ScaleKVSampler
from var.sample.sjd import SJDSampler
from var.sample.sjd_scale import ScaleSpeculativeSampler
from var.tokenizers.vqvae import VQVAE

SAMPLERS: dict[str, type] = {
    "var": VARSampler,
    "code": CoDeSampler,
    "scalekv": ScaleKVSampler,
    "code+scalekv": CoDeScaleKVSampler,
    "sjd-scale": ScaleSpeculativeSampler,
    "ar": ARSampler,
    "sjd": SJDSampler,
}
SAMPLER_NAMES = tuple(SAMPLERS)
AR_SAMPLERS = ("ar", "sjd")  # these decode the raster AR baseline instead of VAR
_NOT_OPTIONS = {"self", "model", "vqvae", "settings", "kv_policy", "refiner_kv_policy"}


def sampler_options(name: str) -> list[str]:
    """The keyword options sampler ``name`` accepts."""
    parameters = inspect.signature(SAMPLERS[name].__init__).parameters
    return [option for option in parameters if option not in _NOT_OPTIONS]


def model_name_for(sampler: str) -> str:
    """The checkpoint a sampler needs from a bundle: ``ar`` (raster baseline) or ``var``."""
    return "ar" if sampler in AR_SAMPLERS else "var"


def build_sampler(
    name: str,
    model: nn.Module,
    vqvae: VQVAE,
    settings: SamplingSettings | None = None,
    **options,
):
    """Build the sampler called ``name`` around ``model`` (VAR, or RasterAR for 'ar'/'sjd') and ``vqvae``."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler '{name}'; choose one of {', '.join(SAMPLER_NAMES)}")
    accepted = sampler_options(name)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        takes = ", ".join(accepted) if accepted else "no options"
        raise ValueError(f"sampler '{name}' does not take {', '.join(unknown)} (it takes {takes})")
    if isinstance(model, RasterAR) != (name in AR_SAMPLERS):
        needs = "the raster AR baseline (an 'ar' checkpoint)" if name in AR_SAMPLERS else "a VAR model"
        raise ValueError(f"sampler '{name}' needs {needs}; got {type(model).__name__}")
    return SAMPLERS[name](model, vqvae, settings, **options)
