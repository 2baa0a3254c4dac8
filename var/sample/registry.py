"""Sampler names -> classes.  Add-on samplers register here so every entry point accepts them."""

from __future__ import annotations

from var.models.var import VAR
from var.sample.base import VARSampler
from var.sample.logits import SamplingSettings
from var.tokenizers.vqvae import VQVAE

SAMPLER_NAMES = ("var",)


def build_sampler(
    name: str,
    model: VAR,
    vqvae: VQVAE,
    settings: SamplingSettings | None = None,
    **options,
) -> VARSampler:
    """Build the sampler called ``name`` around ``model`` and ``vqvae``."""
    if name == "var":
        if options:
            raise ValueError(f"sampler 'var' takes no options, got {sorted(options)}")
        return VARSampler(model, vqvae, settings)
    raise ValueError(f"unknown sampler '{name}'; choose one of {', '.join(SAMPLER_NAMES)}")
