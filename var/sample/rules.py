"""Token rules: how a model family turns one step's logits into the distribution its tokens are drawn from.

Guidance and token processing are conventions of a model family's official sampler, not of a sampler loop:
VAR ramps its guidance weight over the scales and applies the temperature after top-k/top-p; LlamaGen (the
raster family) guides with uncond + s (cond - uncond), s = 1 + cfg, only when s > 1 (and only inside its cfg
interval) and applies the temperature first; Infinity scales logits by 1/tau and mixes
cfg * cond + (1 - cfg) * uncond per scale.  Each family names its rule (``model.sampling_rule``); every
sampler asks :func:`rule_for` and never hard-codes one, so adding a family means adding a rule here.

A rule's ``step`` is the scale index for next-scale families and the token indices (B, n) being predicted
for raster ones.
"""

from __future__ import annotations

import torch

from var.sample.logits import SamplingSettings, filter_logits_, guidance_weight, guide, target_logits


class TokenRule:
    """Guidance and processing of one family; subclasses override what differs."""

    supports_more_smooth = False
    supports_infinity_guidance = False  # per-scale cfg lists and cfg_layer
    supports_cfg_interval = False

    def __init__(self, model):
        self.model = model

    def default_settings(self) -> dict:
        """The family's own sampling settings (its official sample script's), for every setting a user does not
        give; the declared defaults of :class:`SamplingSettings` are VAR's, so VAR's rule adds none."""
        return {}

    def guided(self, settings: SamplingSettings) -> bool:
        """Whether the batch carries an unconditional half (the rows double)."""
        return True

    def check(self, settings: SamplingSettings) -> None:
        """Raise a ValueError for settings this family cannot use."""
        if settings.more_smooth and not self.supports_more_smooth:
            raise ValueError(f"more_smooth applies to VAR's scale features, not to {type(self.model).__name__}")
        if not self.supports_infinity_guidance:
            if not isinstance(settings.cfg, (int, float)):
                raise ValueError(f"cfg must be one value for {type(self.model).__name__} (per-scale cfg lists are "
                                 "Infinity's)")
            if settings.cfg_layer != 0:
                raise ValueError(f"cfg_layer is Infinity's hidden-state guidance; {type(self.model).__name__} "
                                 "guides its logits (leave it at 0)")
        if settings.cfg_interval != -1 and not self.supports_cfg_interval:
            raise ValueError(f"cfg_interval is LlamaGen's guidance window; {type(self.model).__name__} guides "
                             "every token (leave it at -1)")

    def prepare(self, cond, model, settings: SamplingSettings) -> None:
        """Adjust a runner's condition rows before its first pass (Infinity: hidden-state guidance)."""

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
        super().check(settings)
        settings.check(self.model.schedule.num_scales)

    def guide(self, logits: torch.Tensor, settings: SamplingSettings, step: int) -> torch.Tensor:
        return guide(logits, guidance_weight(settings.cfg, step, self.model.schedule.num_scales))

    def process(self, guided: torch.Tensor, settings: SamplingSettings, step: int) -> torch.Tensor:
        return target_logits(guided, settings, step)


class LlamaGenRule(TokenRule):
    """LlamaGen's ``generate`` (autoregressive/models/generate.py), exactly.

    Guidance: the official ``cfg_scale`` s = 1 + ``cfg``, so ``cfg`` keeps the meaning it has for VAR (the
    weight t of (1 + t) cond - t uncond) and the official ``--cfg-scale 4.0`` is ``--cfg 3.0``.  The batch is
    guided only when s > 1 (``cfg`` > 0), as ``uncond + (cond - uncond) * s``.  ``cfg_interval`` >= 0 guides
    image tokens 0..cfg_interval+1 and uses the conditional logits alone after them (the unconditional half
    keeps running).  Processing: logits / max(temperature, 1e-5), then top-k (ties at the k-th value kept),
    then top-p on the result (the first token crossing top_p kept); ``top_p`` 0 or 1 and ``top_k`` 0 filter
    nothing.  One value each: there is one token map.
    """

    supports_cfg_interval = True
    # sample_c2i.py / sample_t2i.py: --cfg-scale 4.0 / 7.5 (our cfg 3.0 / 6.5), --top-k 2000 / 1000, top-p and
    # temperature 1.0; VAR's top-k 900 / top-p 0.96 are not LlamaGen's
    OFFICIAL_DEFAULTS = {
        "c2i": {"cfg": 3.0, "top_k": 2000, "top_p": 1.0, "temperature": 1.0},
        "t2i": {"cfg": 6.5, "top_k": 1000, "top_p": 1.0, "temperature": 1.0},
    }

    def default_settings(self) -> dict:
        return dict(self.OFFICIAL_DEFAULTS[self.model.config.model_type])

    def guided(self, settings: SamplingSettings) -> bool:
        return settings.cfg > 0

    def check(self, settings: SamplingSettings) -> None:
        super().check(settings)
        for name in ("top_k", "top_p", "temperature"):
            if not isinstance(getattr(settings, name), (int, float)):
                raise ValueError(f"{name} must be one value for {type(self.model).__name__} (it has a single "
                                 "token map)")

    def guide(self, logits: torch.Tensor, settings: SamplingSettings, step: torch.Tensor | None) -> torch.Tensor:
        if not self.guided(settings):
            return logits
        batch = logits.shape[0] // 2
        cond, uncond = logits[:batch], logits[batch:]
        guided = uncond + (cond - uncond) * (1.0 + settings.cfg)
        if settings.cfg_interval < 0 or step is None:
            return guided
        after = (step > settings.cfg_interval + 1).unsqueeze(-1)  # (B, n, 1): tokens past the interval
        return torch.where(after, cond, guided)

    def process(self, guided: torch.Tensor, settings: SamplingSettings, step) -> torch.Tensor:
        top_k, top_p, temperature = settings.at(0)
        logits = guided / max(temperature, 1e-5)
        vocab = logits.shape[-1]
        if top_k > 0:
            kth = logits.topk(min(top_k, vocab), dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if 0 < top_p < 1:
            sorted_logits, order = logits.sort(dim=-1, descending=True)
            remove = sorted_logits.softmax(dim=-1).cumsum(dim=-1) > top_p
            remove = torch.cat((torch.zeros_like(remove[..., :1]), remove[..., :-1]), dim=-1)  # keep the crossing one
            logits = logits.masked_fill(remove.scatter(-1, order, remove), float("-inf"))
        return logits


class InfinityRule(TokenRule):
    """Infinity's ``autoregressive_infer_cfg`` (spec_infinity.md section 4), exactly.

    ``cfg`` is the VAR-style weight t, the official cfg_s = 1 + t, one value or one per scale; the batch is
    guided when some cfg_s != 1.  ``temperature`` is the official tau: the logits of both halves are
    multiplied by 1 / tau_s *before* guidance.  ``cfg_layer`` 0 mixes the logits, cfg_s cond + (1 - cfg_s)
    uncond; k < 0 mixes the hidden state after block depth + k instead (the condition does it, see
    :meth:`prepare`) and the conditional rows' logits are used.  Processing: top-k (min(k, 2) per bit: 900 is a
    no-op, 1 is argmax) then top-p (the weaker bit goes when its probability <= 1 - top_p).
    """

    supports_infinity_guidance = True
    # the released infer.sh / run_infinity: --cfg 4 (our cfg 3.0), --tau 0.5, top-k 900, top-p 0.97, guidance on
    # the logits (cfg_insertion_layer [0]); VAR's top-p 0.96 and temperature 1 are not Infinity's
    OFFICIAL_DEFAULTS = {"cfg": 3.0, "top_k": 900, "top_p": 0.97, "temperature": 0.5, "cfg_layer": 0}

    def default_settings(self) -> dict:
        return dict(self.OFFICIAL_DEFAULTS)

    def weights(self, settings: SamplingSettings) -> list[float]:
        """The official cfg_s = 1 + t_s of every scale."""
        num_scales = self.model.schedule.num_scales
        cfg = settings.cfg
        return [1.0 + float(cfg)] * num_scales if isinstance(cfg, (int, float)) else [1.0 + float(t) for t in cfg]

    def guided(self, settings: SamplingSettings) -> bool:
        return any(weight != 1 for weight in self.weights(settings))

    def check(self, settings: SamplingSettings) -> None:
        super().check(settings)
        settings.check(self.model.schedule.num_scales)
        if -settings.cfg_layer > self.model.depth:
            raise ValueError(f"cfg_layer {settings.cfg_layer} is below block 0 of this {self.model.depth}-block "
                             f"model: use 0 (logits) or -1..-{self.model.depth}")

    def prepare(self, cond, model, settings: SamplingSettings) -> None:
        if settings.cfg_layer < 0:
            cond.mix_layer = model.depth + settings.cfg_layer
            cond.mix_weights = tuple(self.weights(settings))

    def guide(self, logits: torch.Tensor, settings: SamplingSettings, step: int) -> torch.Tensor:
        _, _, tau = settings.at(step)
        weight = self.weights(settings)[step]
        batch = logits.shape[0] // 2 if self.guided(settings) else logits.shape[0]
        if settings.cfg_layer < 0 or weight == 1:
            return logits[:batch] * (1 / tau)
        scaled = logits * (1 / tau)
        return weight * scaled[:batch] + (1 - weight) * scaled[batch:]

    def process(self, guided: torch.Tensor, settings: SamplingSettings, step: int) -> torch.Tensor:
        top_k, top_p, _ = settings.at(step)
        return filter_logits_(guided.clone(), top_k, top_p)


RULES: dict[str, type[TokenRule]] = {"var": VARRule, "llamagen": LlamaGenRule, "infinity": InfinityRule}


def rule_for(model) -> TokenRule:
    """The token rule of ``model``'s family."""
    name = getattr(model, "sampling_rule", None)
    if name not in RULES:
        raise ValueError(f"{type(model).__name__} names no known sampling rule ({name!r}); add its TokenRule "
                         f"to var/sample/rules.py (known: {', '.join(RULES)})")
    return RULES[name](model)
