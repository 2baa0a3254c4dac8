"""AdamW with the official parameter grouping and per-step learning-rate / weight-decay schedules (spec_var 4.2)."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from var.config import OptimConfig

# Name fragments that exempt a parameter from weight decay: the official list (spec_var 4.2), plus this
# package's names for the same tensors (lvl_embed -> level_embed, ada_gss -> modulation_offset,
# scale_mul_1H11 -> log_temperature; pos_1LC is pos_embed here).
NO_DECAY_NAME_PARTS = (
    "cls_token", "start_token", "task_token", "cfg_uncond", "pos_embed", "pos_1LC", "pos_start", "start_pos",
    "lvl_embed", "gamma", "beta", "ada_gss", "moe_bias", "scale_mul",
    "level_embed", "modulation_offset", "log_temperature",
)


def param_groups(named_parameters: Iterable[tuple[str, nn.Parameter]], weight_decay: float) -> list[dict]:
    """Split trainable parameters into a decayed and a non-decayed AdamW group.

    The official rule: a parameter is *not* decayed when it is 1-d (norm scales, per-channel vectors), its
    name ends in "bias" (including q_bias / v_bias), or its name contains one of :data:`NO_DECAY_NAME_PARTS`
    (positional / level embeddings, pos_start, attention temperatures, shared-AdaLN offsets).  Everything
    else is decayed: every Linear / Conv weight and the class, word and token embeddings.
    Groups carry ``base_weight_decay`` so :func:`apply_schedules` can rescale them.
    """
    decay, no_decay = [], []
    for name, parameter in named_parameters:
        if not parameter.requires_grad:
            continue
        exempt = parameter.ndim <= 1 or name.endswith("bias") or any(part in name for part in NO_DECAY_NAME_PARTS)
        (no_decay if exempt else decay).append(parameter)
    groups = [
        {"params": decay, "weight_decay": weight_decay, "base_weight_decay": 1.0},
        {"params": no_decay, "weight_decay": 0.0, "base_weight_decay": 0.0},
    ]
    return [group for group in groups if group["params"]]


def build_optimizer(model: nn.Module, config: OptimConfig, peak_lr: float) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups` (fused on CUDA); the lr schedule is checked here, before training."""
    check_schedule(config)
    groups = param_groups(model.named_parameters(), config.weight_decay)
    fused = all(p.is_cuda for group in groups for p in group["params"])
    return torch.optim.AdamW(groups, lr=peak_lr, betas=tuple(config.betas), eps=config.eps, fused=fused or None)


def peak_learning_rate(config: OptimConfig, effective_batch: int) -> float:
    """``lr`` if set, else the official ``base_lr * effective_batch / 256``."""
    return config.lr if config.lr is not None else config.base_lr * effective_batch / 256


def warmup_steps(config: OptimConfig, total_steps: int) -> int:
    """Configured warm-up, or the official ep/50, i.e. 2 % of the run."""
    return config.warmup_steps if config.warmup_steps is not None else round(total_steps / 50)


# official schedules that stay at the peak for a fraction of the run after warm-up, then fall linearly
FLAT_THEN_LINEAR = {"lin": 0.15, "lin0": 0.05, "lin00": 0.0}
EXP_FLAT = 0.15  # 'exp' stays at the peak this long, then decays exponentially to end_ratio
SCHEDULES = (*FLAT_THEN_LINEAR, "lin<T>", "cos", "exp", "const")


def split_point(schedule: str) -> float | None:
    """T of a 'lin<T>' schedule (0 < T <= 1, e.g. 'lin0.8'), else None."""
    if not schedule.startswith("lin") or schedule in FLAT_THEN_LINEAR:
        return None
    try:
        split = float(schedule[3:])
    except ValueError:
        return None
    return split if 0 < split <= 1 else None


def check_schedule(config: OptimConfig) -> None:
    """Reject an unknown ``schedule`` before training starts."""
    if config.schedule not in SCHEDULES and split_point(config.schedule) is None:
        raise ValueError(f"unknown lr schedule '{config.schedule}'; choose one of {', '.join(SCHEDULES)} "
                         "(lin<T>: 0 < T <= 1, e.g. lin0.8)")


def lr_multiplier(step: int, total_steps: int, config: OptimConfig) -> float:
    """Learning-rate multiplier of the peak lr at optimizer step ``step`` (0-based), spec_var 4.2."""
    warmup = warmup_steps(config, total_steps)
    if step < warmup:
        return config.warmup_start + (1 - config.warmup_start) * step / warmup
    progress = (step - warmup) / max(1, total_steps - 1 - warmup)  # 0 -> 1 over the rest of the run
    rest, end, schedule = 1 - progress, config.end_ratio, config.schedule
    if schedule in FLAT_THEN_LINEAR:
        flat = FLAT_THEN_LINEAR[schedule]
        return 1.0 if progress < flat else end + (1 - end) * rest / (1 - flat)
    if schedule == "cos":
        return end + (1 - end) * 0.5 * (1 + math.cos(math.pi * progress))
    if schedule == "exp":
        return 1.0 if progress < EXP_FLAT else math.exp((progress - EXP_FLAT) / (1 - EXP_FLAT) * math.log(end))
    if schedule == "const":
        return 1.0
    check_schedule(config)  # what is left is 'lin<T>'
    split = split_point(schedule)
    # 'lin<T>' (progressive training): two linear pieces, 1 -> middle over the first T of the run, then
    # middle -> end_ratio; middle is halfway between 1 and where a plain linear decay would be at T
    middle = (1 + end + (1 - end) * (1 - split)) / 2
    if progress < split or split == 1:
        return 1 + (middle - 1) * progress / split
    return end + (middle - end) * rest / (1 - split)


def weight_decay_at(step: int, total_steps: int, config: OptimConfig) -> float:
    """Cosine from ``weight_decay`` to ``weight_decay_end`` over the whole run (constant by default)."""
    start = config.weight_decay
    end = start if config.weight_decay_end is None else config.weight_decay_end
    return end + (start - end) * (0.5 + 0.5 * math.cos(math.pi * step / max(1, total_steps - 1)))


def apply_schedules(optimizer: torch.optim.Optimizer, step: int, total_steps: int, config: OptimConfig,
                    peak_lr: float) -> float:
    """Set every group's lr and weight decay for ``step``; returns the lr."""
    lr = peak_lr * lr_multiplier(step, total_steps, config)
    weight_decay = weight_decay_at(step, total_steps, config)
    for group in optimizer.param_groups:
        group["lr"] = lr
        group["weight_decay"] = weight_decay * group.get("base_weight_decay", 1.0)
    return lr
