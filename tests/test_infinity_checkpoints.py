"""Loading official Infinity files: real key/shape lists on the meta device, both tokenizer spellings, shards,
wrong files named key by key."""

import re

import pytest
import torch
from conftest import SHARED, require_shared
from infinity_tiny import TINY_SCHEDULE, random_text, tiny_bsq, tiny_infinity, write_shards

from var.checkpoints import strict_load
from var.infinity_checkpoints import (
    bsq_config_from_official,
    infinity_config_from_official,
    infinity_to_official,
    load_official_bsq,
    load_official_infinity,
    load_official_infinity_pair,
    official_bsq_to_ours,
    official_infinity_to_ours,
)
from var.models.infinity import INFINITY_SIZES, Infinity, InfinityConfig
from var.tokenizers.bsq import BSQTokenizer

REFERENCE = SHARED / "reference"


def _meta_state_dict(name: str) -> dict[str, torch.Tensor]:
    """The official key/shape list as meta tensors (what the released file holds, without the bytes)."""
    path = REFERENCE / name
    require_shared(path)
    state = {}
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            continue
        key, shape, dtype = line.split("\t")
        state[key] = torch.empty(eval(shape), dtype=getattr(torch, dtype), device="meta")
    return state


def test_infinity_2b_key_list_maps_exactly():
    official = _meta_state_dict("infinity_2b_keys.txt")
    config = infinity_config_from_official(official)
    assert (config.depth, config.width, config.num_heads, config.bits_per_token) == (32, 2048, 16, 32)
    assert (config.text_channels, config.text_maxlen, config.text_pool_heads) == (2048, 512, 16)
    with torch.device("meta"):
        model = Infinity(config)
    assert model.num_params() == 2_204_564_032
    strict_load(model, official_infinity_to_ours(official), "infinity_2b_keys.txt")  # keys and shapes equal
    back = infinity_to_official(model, block_chunks=8)
    assert set(back) == set(official)
    assert all(back[k].shape == official[k].shape for k in official)
    assert not any(key.startswith("block_chunks") for key in model.state_dict())  # our layout: a blocks list


def test_infinity_8b_layout_round_trips():
    with torch.device("meta"):
        model = Infinity(InfinityConfig(**INFINITY_SIZES["infinity_8b"]))
    official = infinity_to_official(model, block_chunks=8)
    assert "block_chunks.7.module.4.ffn.fc2.weight" in official  # 40 blocks in 8 chunks of 5
    config = infinity_config_from_official(official)
    assert (config.depth, config.width, config.num_heads, config.bits_per_token) == (40, 3584, 28, 56)
    assert config.text_pool_heads == 16 and config.ffn_hidden == 14336
    with torch.device("meta"):
        again = Infinity(config)
    strict_load(again, official_infinity_to_ours(official), "8b layout")


def test_bsq_d32_key_list_in_both_spellings():
    official = _meta_state_dict("infinity_vae_d32_keys.txt")
    config = bsq_config_from_official(official)
    assert (config.codebook_dim, config.base_ch, config.patch_size, config.num_res_blocks) == (32, 128, 16, 2)
    assert config.encoder_ch_mult == config.decoder_ch_mult == (1, 2, 4, 4, 4)
    with torch.device("meta"):
        model = BSQTokenizer(config)
    assert sum(p.numel() for p in model.parameters()) == 110_118_051
    strict_load(model, official_bsq_to_ours(official, model), "wrapped spelling")
    plain = {re.sub(r"\.(conv|norm)\.(weight|bias)$", r".\2", k): v for k, v in official.items()}
    assert "encoder.down.0.downsample.conv.weight" in plain and "encoder.conv_in.weight" in plain
    assert bsq_config_from_official(plain) == config
    strict_load(model, official_bsq_to_ours(plain, model), "plain spelling")


def _wrapped(state: dict[str, torch.Tensor], model: BSQTokenizer) -> dict[str, torch.Tensor]:
    """Our tokenizer keys in the official wrapper spelling (conv.weight / norm.weight), plus the mask buffers."""
    norms = {name for name, module in model.named_modules() if isinstance(module, torch.nn.GroupNorm)}
    out = {}
    for key, value in state.items():
        module, leaf = key.rsplit(".", 1)
        out[f"{module}.{'norm' if module in norms else 'conv'}.{leaf}"] = value
    mask = 2 ** torch.arange(model.codebook_dim - 1, -1, -1)
    out["quantizer.lfq.mask"], out["quantize.lfq.mask"] = mask, mask.clone()
    return out


def test_bsq_file_round_trip(tmp_path):
    bsq = tiny_bsq(seed=3)
    path = tmp_path / "infinity_vae.pth"
    torch.save({"vae": _wrapped(bsq.state_dict(), bsq)}, path)
    loaded = load_official_bsq(path)
    assert loaded.config == bsq.config
    images = torch.rand(1, 3, 8, 8) * 2 - 1
    with torch.no_grad():
        assert torch.equal(loaded.encode_features(images), bsq.encode_features(images))


def test_infinity_file_round_trip_and_shards(tmp_path):
    model = tiny_infinity(seed=4)
    official = infinity_to_official(model, block_chunks=2)
    torch.save(official, tmp_path / "infinity.pth")
    shards = write_shards(official, tmp_path / "sharded")
    text, inputs = random_text([2, 3]), torch.randn(2, TINY_SCHEDULE.length - 1, 4)
    with torch.no_grad():
        expected = model(text, inputs, TINY_SCHEDULE)
        for source in (tmp_path / "infinity.pth", shards):
            loaded = load_official_infinity(source, cond_drop_rate=0.0)
            torch.testing.assert_close(loaded(text, inputs, TINY_SCHEDULE), expected, atol=0, rtol=0)


def test_empty_text_truncated_or_extended_to_text_maxlen():
    model = tiny_infinity(text_maxlen=8)
    official = infinity_to_official(model, block_chunks=1)
    shorter = load_official_infinity(official, text_maxlen=5)
    assert torch.equal(shorter.null_text, model.null_text[:5])
    longer = load_official_infinity(official, text_maxlen=12)
    assert torch.equal(longer.null_text[:8], model.null_text)
    assert torch.equal(longer.null_text[8:], Infinity(longer.config).null_text[8:])  # the official fixed draw


def test_wrong_files_fail_naming_the_keys(tmp_path):
    model = tiny_infinity()
    official = infinity_to_official(model, block_chunks=2)
    broken = dict(official)
    del broken["head.bias"]
    broken["block_chunks.1.module.0.ffn.fc1.weight"] = torch.zeros(3, 3)
    broken["extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError) as error:
        load_official_infinity(broken)
    message = str(error.value)
    assert "1 missing: head.bias" in message and "1 unexpected: extra.weight" in message
    assert "blocks.1.ffn.fc1.weight: checkpoint (3, 3)" in message
    with pytest.raises(ValueError, match="not an official Infinity BSQ tokenizer"):
        load_official_bsq(official)
    bsq = tiny_bsq()
    with pytest.raises(ValueError, match="not an official Infinity transformer"):
        load_official_infinity(bsq.state_dict())
    with pytest.raises(FileNotFoundError, match="FoundationVision/Infinity"):
        load_official_infinity(tmp_path / "missing.pth")
    (tmp_path / "damaged.pth").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="cannot read"):
        load_official_bsq(tmp_path / "damaged.pth")
    torch.save({"vae": {"weights": [1, 2]}}, tmp_path / "odd.pth")
    with pytest.raises(ValueError, match="not a state dict of tensors"):
        load_official_bsq(tmp_path / "odd.pth")


def test_pair_infers_spatial_patchify(tmp_path):
    bsq = tiny_bsq()
    torch.save({"vae": bsq.state_dict()}, tmp_path / "vae.pth")
    torch.save(infinity_to_official(tiny_infinity(bits_per_token=16), block_chunks=1), tmp_path / "patchify.pth")
    tokenizer, model = load_official_infinity_pair(tmp_path / "vae.pth", tmp_path / "patchify.pth")
    assert tokenizer.config.spatial_patchify and tokenizer.bits_per_token == model.config.bits_per_token == 16
    torch.save(infinity_to_official(tiny_infinity(bits_per_token=6), block_chunks=1), tmp_path / "other.pth")
    with pytest.raises(ValueError, match="bits per token"):
        load_official_infinity_pair(tmp_path / "vae.pth", tmp_path / "other.pth")
