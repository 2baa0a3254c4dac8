"""Tiny Infinity models for the tests (random weights, CPU, float32)."""

from __future__ import annotations

import torch

from var.models.infinity_schedules import ScaleSchedule
from var.tokenizers.bsq import BSQConfig, BSQTokenizer

# a prefix of the ratio-1.0 template: 1 + 4 + 16 tokens, RoPE on the 64 x 64 grid
TINY_SCHEDULE = ScaleSchedule(1.0, ((1, 1), (2, 2), (4, 4)))


def tiny_bsq(seed: int = 0, **overrides) -> BSQTokenizer:
    torch.manual_seed(seed)
    base = dict(codebook_dim=4, base_ch=24, encoder_ch_mult=(1, 2), decoder_ch_mult=(1, 2), num_res_blocks=1,
                patch_size=2)
    base.update(overrides)
    return BSQTokenizer(BSQConfig(**base)).eval()
