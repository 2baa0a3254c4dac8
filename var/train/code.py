"""CoDe's training recipes (spec_accel 1.6), and the standard objective they refine.

* ``standard``: train from scratch (or from ``base``) on all scales, progressively when configured.
* ``code-drafter``: fine-tune ``base`` with cross-entropy on its own scales < ``draft_steps`` only.
* ``code-refiner``: distil the frozen ``teacher``'s logits, per-token KL(teacher/T || student/T) * T^2;
  stage 1 (the first ``stage1_fraction`` of the run) on all scales, stage 2 with a weight decaying linearly
  1 -> 0 on the drafter's scales < ``draft_steps``.  ``kd_alpha`` < 1 mixes in (1 - kd_alpha) x
  cross-entropy.  The student is ``base`` if given, else a new model from ``var.model`` (it may be smaller
  than the teacher).

A recipe plugs into :class:`~var.train.var_trainer.VARTrainer` at four points: checks, set-up with the
model, which scales (and token weights) a step trains, and the logits and loss of a step.  CoDe's sampler is
var/sample/code.py.
"""

from __future__ import annotations

import contextlib

import torch

from var.loading import load_one
from var.models.var import VAR
from var.sample.code import check_refiner
from var.train.losses import distillation_kl, weighted_mean


@contextlib.contextmanager
def labels_as_given(model: torch.nn.Module):
    """Suspend a model's internal label dropout (the caller has already dropped labels itself)."""
    rate = model.config.cond_drop_rate
    model.config.cond_drop_rate = 0.0
    try:
        yield
    finally:
        model.config.cond_drop_rate = rate


class StandardRecipe:
    """Cross-entropy on every trained scale; the base of the CoDe recipes."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.config = trainer.recipe_config

    def check(self) -> None:
        """Raise a ValueError for an incomplete recipe config (before anything is loaded)."""

    def setup(self, model: VAR) -> None:
        """Set-up once the model exists."""

    def scales_and_weights(self) -> tuple[int, torch.Tensor]:
        return self.trainer.progressive_scales()

    def logits(self, labels: torch.Tensor, features: torch.Tensor, num_scales: int
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.trainer.model(labels, features, num_scales=num_scales), None

    def objective(self, ce: torch.Tensor, weights: torch.Tensor, logits: torch.Tensor,
                  teacher_logits: torch.Tensor | None) -> tuple[torch.Tensor, dict]:
        return weighted_mean(ce, weights), {}


class CoDeRecipe(StandardRecipe):
    """What both CoDe recipes need: a drafter/refiner split ``draft_steps`` inside the schedule."""

    def setup(self, model: VAR) -> None:
        num_scales = model.config.num_scales
        if not 1 <= self.config.draft_steps < num_scales:
            raise ValueError(f"var.recipe.draft_steps must be in 1..{num_scales - 1} for {num_scales} scales, "
                             f"got {self.config.draft_steps}")

    def drafted_tokens(self) -> int:
        """Tokens of the drafter's scales < draft_steps."""
        return self.trainer.model_config.scale_bounds[self.config.draft_steps - 1][1]


class DrafterRecipe(CoDeRecipe):
    """Fine-tune a base VAR with cross-entropy on its own scales < draft_steps only."""

    def check(self) -> None:
        if not self.config.base:
            raise ValueError("recipe code-drafter fine-tunes a base VAR: set var.recipe.base=RUN_OR_BUNDLE")

    def scales_and_weights(self) -> tuple[int, torch.Tensor]:
        return self.config.draft_steps, self.trainer.token_weights[: self.drafted_tokens()]


class RefinerRecipe(CoDeRecipe):
    """Distil a frozen teacher's logits into a (possibly smaller) student, fading out the drafted scales."""

    teacher: VAR | None = None

    def check(self) -> None:
        if not self.config.teacher:
            raise ValueError("recipe code-refiner distils a teacher VAR: set var.recipe.teacher=RUN_OR_BUNDLE")

    def setup(self, model: VAR) -> None:
        super().setup(model)
        self.teacher = load_one(self.config.teacher, "var", self.trainer.device).requires_grad_(False)
        check_refiner(self.teacher, model)  # the student refines what the teacher would: same token space

    def drafted_scale_weight(self) -> float:
        """Stage 1: 1 on every scale; stage 2: decays linearly 1 -> 0 on the drafter's scales."""
        step, total = self.trainer.step, self.trainer.total_steps
        stage2_start = self.config.stage1_fraction * total
        if step < stage2_start:
            return 1.0
        return max(0.0, 1.0 - (step - stage2_start) / max(1.0, total - stage2_start))

    def scales_and_weights(self) -> tuple[int, torch.Tensor]:
        num_scales, weights = super().scales_and_weights()
        weights[: self.drafted_tokens()] *= self.drafted_scale_weight()
        return num_scales, weights

    def logits(self, labels: torch.Tensor, features: torch.Tensor, num_scales: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Student and frozen-teacher logits for the same (label-dropped) conditions."""
        student = self.trainer.unwrap(self.trainer.model)
        labels = student.drop_labels(labels)  # the model is in train mode here
        with labels_as_given(student):
            logits = self.trainer.model(labels, features, num_scales=num_scales)
        with torch.no_grad(), self.trainer.accelerator.autocast():
            teacher_logits = self.teacher(labels, features, num_scales=num_scales)
        return logits, teacher_logits

    def objective(self, ce, weights, logits, teacher_logits) -> tuple[torch.Tensor, dict]:
        kl = weighted_mean(distillation_kl(logits, teacher_logits, self.config.kd_temperature), weights)
        alpha = self.config.kd_alpha
        loss = alpha * kl + (1 - alpha) * weighted_mean(ce, weights) if alpha < 1 else kl
        return loss, {"kl": kl}


RECIPES = {"standard": StandardRecipe, "code-drafter": DrafterRecipe, "code-refiner": RefinerRecipe}
