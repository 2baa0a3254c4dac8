"""Token rules: how a model family turns one step's logits into the distribution its tokens are drawn from.

Guidance and token processing are conventions of a model family's official sampler, not of a sampler loop:
VAR ramps its guidance weight over the scales and applies the temperature after top-k/top-p; the raster AR
baseline guides with a constant weight; LlamaGen guides with uncond + s (cond - uncond) only when s > 1 (and
only inside its cfg interval) and applies the temperature first; Infinity scales logits by 1/tau and mixes
cfg * cond + (1 - cfg) * uncond per scale.  Each family names its rule (``model.sampling_rule``); every
sampler asks :func:`rule_for` and never hard-codes one, so adding a family means adding a rule here.

A rule's ``step`` is the scale index for next-scale families and the token indices (B, n) being predicted
for raster ones.
"""

from __future__ import annotations

import torch

from var.sample.logits import SamplingSettings, guidance_weight, guide, target_logits


class TokenRule:
    """Guidance and processing of one family; subclasses override what differs."""

    supports_more_smooth = False

    def __init__(self, model):
        self.model = model

    def guided(self, settings: SamplingSettings) -> bool:
        """Whether the batch carries an unconditional half (the rows double)."""
        return True

    def check(self, settings: SamplingSettings) -> None:
        """Raise a ValueError for settings this family cannot use."""
        if settings.more_smooth and not self.supports_more_smooth:
            raise ValueError(f"more_smooth applies to VAR's scale features, not to {type(self.model).__name__}")

    def guide(self, logits: torch.Tensor, settings: SamplingSettings, step) -> torch.Tensor:
        """Guided logits (B, n, V) from the model's rows (conditional half first)."""
        raise NotImplementedError

    def process(self, guided: torch.Tensor, settings: SamplingSettings, step) -> torch.Tensor:
        """The processed logits (B, n, V) tokens are drawn from (softmax gives the distribution)."""
        raise NotImplementedError


class VARRule(TokenRule):
    """VAR and CoDe: weight t = cfg * si / (S - 1), (1 + t) cond - t uncond; top-k, top-p, then temperature."""

    supports_more_smooth = True

    def check(self, settings: SamplingSettings) -> None:
        settings.check(self.model.schedule.num_scales)

    def guide(self, logits: torch.Tensor, settings: SamplingSettings, step: int) -> torch.Tensor:
        return guide(logits, guidance_weight(settings.cfg, step, self.model.schedule.num_scales))

    def process(self, guided: torch.Tensor, settings: SamplingSettings, step: int) -> torch.Tensor:
        return target_logits(guided, settings, step)


class RasterARRule(TokenRule):
    """The raster AR baseline: a constant weight, (1 + cfg) cond - cfg uncond; top-k, top-p, then
    temperature, one value each (there is one token map, no per-scale lists)."""

    def check(self, settings: SamplingSettings) -> None:
        super().check(settings)
        for name in ("top_k", "top_p", "temperature"):
            if not isinstance(getattr(settings, name), (int, float)):
                raise ValueError(f"{name} must be one value for {type(self.model).__name__} (it has a single "
                                 "token map)")

    def guide(self, logits: torch.Tensor, settings: SamplingSettings, step) -> torch.Tensor:
        return guide(logits, settings.cfg)

    def process(self, guided: torch.Tensor, settings: SamplingSettings, step) -> torch.Tensor:
        return target_logits(guided, settings, 0)


RULES: dict[str, type[TokenRule]] = {"var": VARRule, "raster-ar": RasterARRule}


def rule_for(model) -> TokenRule:
    """The token rule of ``model``'s family."""
    name = getattr(model, "sampling_rule", None)
    if name not in RULES:
        raise ValueError(f"{type(model).__name__} names no known sampling rule ({name!r}); add its TokenRule "
                         f"to var/sample/rules.py (known: {', '.join(RULES)})")
    return RULES[name](model)
