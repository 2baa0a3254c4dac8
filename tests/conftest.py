"""Shared tiny models for the test suite (random weights, CPU, float32)."""

from __future__ import annotations

import pytest
import torch

from var.models.var import VAR, VARConfig
from var.tokenizers.vqvae import VQVAE, VQVAEConfig

torch.set_num_threads(min(2, torch.get_num_threads()))


def tiny_vqvae_config(**overrides) -> VQVAEConfig:
    base = dict(vocab_size=16, z_channels=4, ch=8, ch_mult=(1, 2), num_res_blocks=1, norm_groups=4,
                patch_nums=(1, 2, 3, 4))
    base.update(overrides)
    return VQVAEConfig(**base)


def tiny_var_config(**overrides) -> VARConfig:
    base = dict(depth=2, width=32, num_heads=2, vocab_size=16, z_channels=4, num_classes=3,
                patch_nums=(1, 2, 3, 4))
    base.update(overrides)
    return VARConfig(**base)


def make_tiny_pair(seed: int = 0, **var_overrides) -> tuple[VQVAE, VAR]:
    torch.manual_seed(seed)
    vqvae = VQVAE(tiny_vqvae_config(patch_nums=var_overrides.get("patch_nums", (1, 2, 3, 4)))).eval()
    model = VAR(tiny_var_config(**var_overrides))
    model.init_weights(init_adaln_gamma=0.5, init_head=1.0)  # large gates: every part of the block matters
    return vqvae, model.eval()


@pytest.fixture
def tiny_pair():
    return make_tiny_pair()


@pytest.fixture(scope="session")
def digit_classifier():
    """The digit classifier, trained once per test session (6 epochs at 16 px); do not modify it in place."""
    from var.eval.classifier import train_digit_classifier

    return train_digit_classifier(image_size=16, epochs=6)
