"""``var train``: the VAR next-scale transformer, with per-scale loss weights, progressive training and the
CoDe recipes (var/train/code.py).

The transformer sees the teacher-forcing inputs (area-downsampled running f_hat) and predicts every token of
every scale in one block-causal pass.  Per-scale loss weights and progressive coarse-to-fine training are
``var.loss``; ``var.recipe`` picks the objective (standard, or CoDe's drafter / refiner fine-tuning).
"""

from __future__ import annotations

import bisect

import torch

from var.config import TransformerLossConfig
from var.models.var import VAR, TransformerConfig, VARConfig
from var.train.code import RECIPES
from var.train.losses import scale_token_weights
from var.train.optim import warmup_steps
from var.train.transformer import TransformerTrainer


def progressive_stage(step: int, total_steps: int, warmup: int, loss: TransformerLossConfig, num_scales: int
                      ) -> tuple[int, float]:
    """Progressive training (spec_var 4.4): (index of the newest trained scale, its loss weight).

    The newest scale grows from ``progressive_start_scale`` (during warm-up) to the last one, reached at
    ``progressive`` x the run; each newly added scale's loss ramps in from 0.01 to 1 over
    ``progressive_ramp_steps`` (the first stage is not ramped).  Without progressive training: (last, 1).
    """
    last = num_scales - 1
    if loss.progressive <= 0:
        return last, 1.0
    first = min(loss.progressive_start_scale, last)
    end = loss.progressive * total_steps

    def stage_at(s: int) -> int:
        if s < warmup:
            return first
        if s >= end:
            return last
        return first + round((s - warmup) / max(1.0, end - warmup) * (last - first))

    stage = stage_at(step)
    if stage == first:
        return stage, 1.0
    began = bisect.bisect_left(range(step + 1), stage, key=stage_at)  # stage_at is non-decreasing
    ramp = loss.progressive_ramp_steps or max(1, round(total_steps / 300))
    return stage, min(1.0, max(0.01, (step - began) / ramp))


class VARTrainer(TransformerTrainer):
    """Trains a :class:`VAR` on a frozen multi-scale tokenizer with the configured recipe."""

    kind = "var"
    model_class = VAR

    def check_config(self) -> None:
        name = self.recipe_config.name
        if name not in RECIPES:
            raise ValueError(f"unknown recipe '{name}'; choose one of {', '.join(RECIPES)}")
        self.recipe = RECIPES[name](self)
        self.recipe.check()
        super().check_config()
        if self.loss_config.progressive > 0 and self.config.optim.schedule == "lin0":
            self.config.optim.schedule = f"lin{self.loss_config.progressive:g}"  # as the official trainer does
            self.say(f"progressive training: lr schedule {self.config.optim.schedule}")

    def new_model_config(self, architecture: TransformerConfig) -> VARConfig:
        tokenizer = self.tokenizer.config
        return VARConfig(**self.architecture(architecture), vocab_size=tokenizer.vocab_size,
                         z_channels=tokenizer.z_channels, num_classes=self.num_classes,
                         patch_nums=tokenizer.patch_nums)

    def setup_model(self, model: VAR) -> None:
        weights = self.loss_config.scale_weights or [1.0] * model.config.num_scales
        self.token_weights = scale_token_weights(model.config.tokens_per_scale, weights, self.device)
        self.recipe.setup(model)

    @property
    def teacher(self) -> VAR | None:
        """The frozen model distilled by the refiner recipe (None otherwise)."""
        return getattr(self.recipe, "teacher", None)

    @torch.no_grad()
    def tokenize(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(targets (B, L), teacher-forcing features (B, L - 1, Cvae))."""
        targets = inputs if inputs.dtype == torch.long else self.encode(inputs)
        indices = targets.split([pn * pn for pn in self.tokenizer.patch_nums], dim=1)
        return targets, self.tokenizer.quantize.teacher_forcing_input(indices)

    def progressive_scales(self) -> tuple[int, torch.Tensor]:
        """Scales trained at this step and their token weights, the newest scale ramped in (spec_var 4.4)."""
        bounds = self.model_config.scale_bounds
        newest, newest_weight = progressive_stage(self.step, self.total_steps,
                                                  warmup_steps(self.config.optim, self.total_steps),
                                                  self.loss_config, self.model_config.num_scales)
        weights = self.token_weights[: bounds[newest][1]].clone()
        weights[bounds[newest][0]:] *= newest_weight
        return newest + 1, weights

    def scales_and_weights(self) -> tuple[int, torch.Tensor]:
        return self.recipe.scales_and_weights()

    def logits(self, labels, targets, features, num_scales) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.recipe.logits(labels, features, num_scales)

    def objective(self, ce, weights, logits, teacher_logits) -> tuple[torch.Tensor, dict]:
        return self.recipe.objective(ce, weights, logits, teacher_logits)

    def tail_tokens(self, length: int) -> int:
        """Index of the first token of the last trained scale."""
        return next(begin for begin, end in self.model_config.scale_bounds if end == length)
