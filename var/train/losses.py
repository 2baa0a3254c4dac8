"""Token-level objectives of transformer training: weighted cross-entropy and logit distillation."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def token_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Per-token cross-entropy (B, L) of logits (B, L, V) against targets (B, L)."""
    return F.cross_entropy(logits.transpose(1, 2), targets, label_smoothing=label_smoothing, reduction="none")


def distillation_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0
                    ) -> torch.Tensor:
    """Per-token KL(softmax(teacher / T) || softmax(student / T)) * T^2, summed over the vocabulary: (B, L).

    The T^2 factor keeps gradient magnitudes comparable across temperatures (CoDe's distillation_loss).
    """
    teacher_log_probs = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    student_log_probs = F.log_softmax(student_logits.float() / temperature, dim=-1)
    kl = (teacher_log_probs.exp() * (teacher_log_probs - student_log_probs)).sum(dim=-1)
    return kl * temperature**2


def weighted_mean(per_token: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum(w * x) / sum(w) over tokens, averaged over the batch; weights (L,) broadcast over (B, L).

    With unit weights this is the official token average (each token weighted 1/L, then the batch mean).
    """
    return (per_token * weights).sum(dim=-1).mean() / weights.sum().clamp_min(1e-12)


def scale_token_weights(tokens_per_scale: Sequence[int], scale_weights: Sequence[float],
                        device: torch.device | None = None) -> torch.Tensor:
    """Expand one weight per scale to one weight per token (L,)."""
    if len(scale_weights) != len(tokens_per_scale):
        raise ValueError(f"{len(scale_weights)} scale weights given for {len(tokens_per_scale)} scales; "
                         "give one weight per scale")
    return torch.cat([torch.full((n,), float(w), device=device) for n, w in zip(tokens_per_scale, scale_weights,
                                                                              strict=True)])
