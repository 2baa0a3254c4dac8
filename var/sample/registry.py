"""Sampler names -> classes.  Add-on samplers register here so every entry point accepts them."""

from __future__ import annotations

import torch.nn as nn

from var.models.ar import RasterAR
from var.sample.ar import ARSampler
from var.sample.base import VARSampler
from var.sample.logits import SamplingSettings
from var.sample.sjd import SJDSampler
from var.sample.sjd_scale import ScaleSpeculativeSampler
from var.tokenizers.vqvae import VQVAE

# name -> (class, the options it accepts)
SAMPLERS: dict[str, tuple[type, tuple[str, ...]]] = {
    "var": (VARSampler, ("gumbel",)),
    "ar": (ARSampler, ()),
    "sjd": (SJDSampler, ("window", "draft_init")),
    "sjd-scale": (ScaleSpeculativeSampler, ("window", "spec_max_tokens", "draft_source", "gumbel")),
}
SAMPLER_NAMES = tuple(SAMPLERS)
AR_SAMPLERS = ("ar", "sjd")  # these decode the raster AR baseline instead of VAR


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
    sampler_cls, accepted = SAMPLERS[name]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        takes = f"takes only {', '.join(accepted)}" if accepted else "takes no options"
        raise ValueError(f"sampler '{name}' {takes}; got {', '.join(unknown)}")
    if isinstance(model, RasterAR) and name not in AR_SAMPLERS:
        raise ValueError(f"sampler '{name}' needs a VAR model; this is the raster AR baseline: use 'ar' or 'sjd'")
    return sampler_cls(model, vqvae, settings, **options)
