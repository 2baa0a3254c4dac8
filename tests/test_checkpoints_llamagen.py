"""Loading LlamaGen release files (var/checkpoints_llamagen.py) from fake files in every release layout."""

from __future__ import annotations

import argparse
import os

import pytest
import torch
from test_llamagen import tiny_condition, tiny_llamagen, tiny_vq

from var.checkpoints_llamagen import (
    check_llamagen_pair,
    load_llamagen,
    load_llamagen_vq,
    read_release_file,
)


def training_args(**fields) -> argparse.Namespace:
    return argparse.Namespace(gpt_model="GPT-B", gpt_type="c2i", vocab_size=16, data_path="/data", lr=1e-4,
                              results_dir=None, **fields)


def release_file(path, state_dict, entry: str | None = "model", **extra) -> str:
    """Save ``state_dict`` the way the released files are laid out (bare when ``entry`` is None)."""
    torch.save(state_dict if entry is None else {entry: state_dict, **extra}, path)
    return str(path)


def assert_same_model(loaded, original, *inputs):
    assert loaded.config == original.config
    assert not loaded.training
    for key, value in original.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    with torch.no_grad():
        torch.testing.assert_close(loaded(*inputs), original(*inputs), atol=0, rtol=0)


@pytest.mark.parametrize("entry, extra", [
    ("model", {"optimizer": {"state": {}, "param_groups": []}, "steps": 1000, "args": training_args(image_size=64)}),
    ("module", {}),
    ("state_dict", {"epoch": 3}),
])
def test_gpt_training_checkpoint_layouts(tmp_path, entry, extra):
    model = tiny_llamagen("c2i", n_head=2, block_size=16)
    path = release_file(tmp_path / "my_run.pt", model.state_dict(), entry, **extra)
    loaded = load_llamagen(path, image_size=64, n_head=2)  # 64 px / 16 = a 4x4 grid
    assert_same_model(loaded, model, torch.tensor([0, 3]), torch.randint(16, (2, 15)))


def test_image_size_from_args_then_file_name_then_error(tmp_path):
    model = tiny_llamagen("c2i")
    with_args = release_file(tmp_path / "c2i_B_384.pt", model.state_dict(), args=training_args(image_size=64))
    assert load_llamagen(with_args, n_head=2).config.block_size == 16  # the file's args beat its name
    assert load_llamagen(with_args, image_size=128, n_head=2).config.block_size == 64  # the argument beats both
    bare = release_file(tmp_path / "c2i_XXL_384.pt", model.state_dict(), entry=None)  # FSDP: a bare state dict
    assert load_llamagen(bare, n_head=2).config.block_size == 24 * 24
    anonymous = release_file(tmp_path / "weights.pt", model.state_dict(), entry=None)
    with pytest.raises(ValueError, match="cannot tell the image size .* pass image_size=256 or 384"):
        load_llamagen(anonymous, n_head=2)
    assert load_llamagen(anonymous, block_size=36, n_head=2).config.grid_size == 6


def test_t2i_stage_file_name_and_caption_length(tmp_path):
    model = tiny_llamagen("t2i")
    path = release_file(tmp_path / "t2i_XL_stage1_256.pt", model.state_dict(), entry=None)
    loaded = load_llamagen(path, n_head=2, block_size=16)
    assert loaded.config.cls_token_num == 4 and loaded.config.caption_dim == 8 and loaded.config.model_type == "t2i"
    assert_same_model(loaded, model, tiny_condition(model, 2), torch.randint(16, (2, 15)))
    assert load_llamagen(path, n_head=2).config.block_size == 256  # 256 px from the name


def test_heads_from_the_named_size_or_the_args(tmp_path):
    model = tiny_llamagen("c2i", dim=64, n_head=4)
    no_hint = release_file(tmp_path / "a.pt", model.state_dict(), entry=None)
    with pytest.raises(ValueError, match="depth 2 and width 64 is none of the named sizes.*pass n_head"):
        load_llamagen(no_hint, block_size=16)
    assert load_llamagen(no_hint, block_size=16, n_head=4).config.n_head == 4
    # a file whose args name a size: GPT-B's 12 heads do not divide 64, so the head count must come from it
    named = release_file(tmp_path / "b.pt", model.state_dict(), args=training_args(image_size=64))
    with pytest.raises(ValueError, match="n_head 12"):
        load_llamagen(named)


def test_kv_cache_buffers_are_dropped(tmp_path):
    model = tiny_llamagen("c2i")
    state = dict(model.state_dict())
    for i in range(2):  # what a state_dict taken after official sampling holds
        state[f"layers.{i}.attention.kv_cache.k_cache"] = torch.zeros(4, 2, 24, 16)
        state[f"layers.{i}.attention.kv_cache.v_cache"] = torch.zeros(4, 2, 24, 16)
    loaded = load_llamagen(release_file(tmp_path / "c2i_B_256.pt", state), n_head=2, block_size=16)
    assert not any("kv_cache" in key for key in loaded.state_dict())


def test_wrong_files_name_the_offending_keys(tmp_path):
    model, vq = tiny_llamagen("c2i"), tiny_vq()
    state = dict(model.state_dict())
    del state["layers.1.ffn_norm.weight"]
    state["layers.0.attention.bias"] = torch.zeros(3)
    state["norm.weight"] = torch.ones(5)
    with pytest.raises(ValueError) as error:
        load_llamagen(release_file(tmp_path / "c2i_B_256.pt", state), n_head=2, block_size=16)
    message = str(error.value)
    assert "1 missing: layers.1.ffn_norm.weight" in message and "1 unexpected: layers.0.attention.bias" in message
    assert "norm.weight: checkpoint (5,) vs model (32,)" in message and "\n" not in message
    vq_file = release_file(tmp_path / "vq_ds16_c2i.pt", vq.state_dict())
    with pytest.raises(ValueError, match="not a LlamaGen GPT state dict .* load_llamagen_vq"):
        load_llamagen(vq_file, block_size=16)
    with pytest.raises(ValueError, match="not a LlamaGen VQ state dict .* GPT file"):
        load_llamagen_vq(release_file(tmp_path / "gpt.pt", model.state_dict()))
    with pytest.raises(ValueError, match="holds no model weights: expected a 'model'"):
        read_release_file(release_file(tmp_path / "x.pt", {"steps": 3}, entry=None))
    with pytest.raises(FileNotFoundError, match="huggingface.co/FoundationVision/LlamaGen"):
        load_llamagen(tmp_path / "missing.pt")


def test_vq_release_file(tmp_path):
    vq = tiny_vq()
    discriminator = {"conv.weight": torch.zeros(2, 3, 4, 4)}
    path = release_file(tmp_path / "vq_ds16_c2i.pt", vq.state_dict(), discriminator=discriminator,
                        optimizer_disc={"state": {}}, args=argparse.Namespace(vq_model="VQ-16", image_size=256))
    loaded = load_llamagen_vq(path, norm_groups=4)  # the group count is not in the weights (official: 32)
    assert loaded.config == vq.config and loaded.config.downsample == 2
    assert_same_model(loaded, vq, torch.rand(1, 3, 8, 8) * 2 - 1)
    check_llamagen_pair(loaded, tiny_llamagen("c2i", vocab_size=32))
    with pytest.raises(ValueError, match="codebook_size 32 differs from the GPT's vocab_size 16"):
        check_llamagen_pair(loaded, tiny_llamagen("c2i"))


class Payload:
    """Pickles as a call that leaves a marker file: a checkpoint that runs code when unpickled."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("zip_format", [True, False])
def test_malicious_pickle_is_refused_without_running(tmp_path, zip_format):
    marker = tmp_path / "executed"
    path = tmp_path / "c2i_B_256.pt"
    checkpoint = {"model": tiny_llamagen("c2i").state_dict(), "args": Payload(marker)}
    torch.save(checkpoint, path, _use_new_zipfile_serialization=zip_format)
    with pytest.raises(ValueError, match=r"refusing to load .*: it pickles \w+\.system, which a safe") as error:
        load_llamagen(path, n_head=2)
    assert "\n" not in str(error.value)
    assert not marker.exists()


def test_damaged_file_fails_in_one_line(tmp_path):
    path = tmp_path / "c2i_B_256.pt"
    release_file(path, tiny_llamagen("c2i").state_dict())
    path.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(ValueError, match="cannot read .* as a checkpoint .*damaged") as error:
        load_llamagen(path, n_head=2)
    assert "\n" not in str(error.value)
