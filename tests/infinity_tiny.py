"""Tiny Infinity models for the tests (random weights, CPU, float32)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from var.models.family import ScaleSchedule
from var.models.infinity import Infinity, InfinityConfig, PackedText
from var.tokenizers.bsq import BSQConfig, BSQTokenizer

# a prefix of the ratio-1.0 template: 1 + 4 + 16 tokens, RoPE on the 64 x 64 grid
TINY_SCHEDULE = ScaleSchedule(((1, 1), (2, 2), (4, 4)), template=1.0)


def tiny_infinity_config(**overrides) -> InfinityConfig:
    base = dict(depth=2, width=64, num_heads=4, bits_per_token=4, text_channels=16, text_pool_heads=4,
                text_maxlen=8, cond_drop_rate=0.0)
    base.update(overrides)
    return InfinityConfig(**base)


def tiny_infinity(seed: int = 0, head_scale: float = 1.0, **overrides) -> Infinity:
    torch.manual_seed(seed)
    model = Infinity(tiny_infinity_config(**overrides))
    model.init_weights(aln_init=0.5, aln_gamma_init=0.5, head_scale=head_scale)  # large gates: every part matters
    return model.eval()


def tiny_bsq(seed: int = 0, **overrides) -> BSQTokenizer:
    torch.manual_seed(seed)
    base = dict(codebook_dim=4, base_ch=24, encoder_ch_mult=(1, 2), decoder_ch_mult=(1, 2), num_res_blocks=1,
                patch_size=2)
    base.update(overrides)
    return BSQTokenizer(BSQConfig(**base)).eval()


def random_text(lens: list[int], channels: int = 16, seed: int = 0) -> PackedText:
    generator = torch.Generator().manual_seed(seed)
    return PackedText(torch.randn(sum(lens), channels, generator=generator), tuple(lens))


def write_shards(state: dict[str, torch.Tensor], folder: Path, first: int = 20) -> Path:
    """``state`` as a folder of two shards (the first ``first`` keys as safetensors, the rest as a torch file) with
    the ``*.index.json`` of Infinity-8B's download."""
    folder.mkdir()
    keys = sorted(state)
    names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.bin"]
    save_file({k: state[k].contiguous() for k in keys[:first]}, folder / names[0])
    torch.save({k: state[k] for k in keys[first:]}, folder / names[1])
    weight_map = {k: names[i >= first] for i, k in enumerate(keys)}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return folder
