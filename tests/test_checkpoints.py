import pytest
import torch
from conftest import make_tiny_pair

from var.checkpoints import (
    load_model,
    load_official_var,
    load_official_vqvae,
    save_model,
    var_to_official,
    vqvae_to_official,
)
from var.cli import main
from var.loading import load_official
from var.sample.scale import VARSampler


def test_official_format_round_trip_through_safetensors(tmp_path):
    vqvae, model = make_tiny_pair()
    official_var, official_vae = var_to_official(model), vqvae_to_official(vqvae)
    assert "attn_bias_for_masking" in official_var and "blocks.0.attn.mat_qkv.weight" in official_var
    assert "quantize.quant_resi.qresi_ls.0.weight" in official_vae
    torch.save(official_var, tmp_path / "var.pth")
    torch.save(official_vae, tmp_path / "vae.pth")
    vqvae2, model2 = load_official(tmp_path / "vae.pth", tmp_path / "var.pth", vqvae_overrides={"norm_groups": 4})
    assert vqvae2.config == vqvae.config
    assert model2.config == model.config
    save_model(vqvae2, tmp_path / "bundle")
    save_model(model2, tmp_path / "bundle")
    vqvae3, model3 = load_model(tmp_path / "bundle", "vqvae"), load_model(tmp_path / "bundle", "var")
    outs = [VARSampler(m, v).sample([0, 2], seed=4) for v, m in ((vqvae, model), (vqvae3, model3))]
    assert all(torch.equal(a, b) for a, b in zip(outs[0].indices, outs[1].indices, strict=True))
    assert torch.equal(outs[0].images, outs[1].images)
    # and back to the official layout, key for key
    again = var_to_official(model3)
    assert set(again) == set(official_var)
    assert all(torch.equal(again[k], official_var[k]) for k in official_var)


def test_official_import_infers_mlp_ratio_and_takes_head_count_without_l2_norm():
    # mlp_ratio is in the fc1 shape; without per-head temperatures the head count must be passed
    _, model = make_tiny_pair(mlp_ratio=2.5, attn_l2_norm=False, num_heads=4)
    state = var_to_official(model)
    with pytest.raises(ValueError, match="pass num_heads"):
        load_official_var(state)
    loaded = load_official_var(state, num_heads=4)
    assert loaded.config == model.config
    labels, teacher = torch.tensor([0, 3]), torch.randn(2, model.config.seq_len - 1, model.config.z_channels)
    assert torch.equal(loaded(labels, teacher), model(labels, teacher))


def test_wrong_shape_and_missing_keys_name_every_offender():
    _, model = make_tiny_pair()
    state = var_to_official(model)
    state["head.bias"] = torch.zeros(5)
    del state["blocks.1.ffn.fc1.weight"]
    state["blocks.0.extra"] = torch.zeros(1)
    with pytest.raises(ValueError) as error:
        load_official_var(state)
    message = str(error.value)
    assert "head.bias" in message and "wrong shape" in message
    assert "blocks.1.ffn.fc1.weight" in message and "missing" in message
    assert "blocks.0.extra" in message and "unexpected" in message


def test_wrong_file_kind_is_explained(tmp_path):
    vqvae, model = make_tiny_pair()
    with pytest.raises(ValueError, match="not an official VAR state dict"):
        load_official_var(vqvae_to_official(vqvae))
    with pytest.raises(ValueError, match="not an official VQ-VAE state dict"):
        load_official_vqvae(var_to_official(model))
    torch.save({"trainer": {"var_wo_ddp": var_to_official(model)}, "epoch": 3}, tmp_path / "ar-ckpt-last.pth")
    with pytest.raises(ValueError, match="var_wo_ddp"):
        load_official_var(tmp_path / "ar-ckpt-last.pth")


def test_damaged_files_fail_in_one_line_naming_the_file(tmp_path):
    vqvae, model = make_tiny_pair()
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read .*garbage.pth as a checkpoint"):
        load_official_var(tmp_path / "garbage.pth")
    bundle = tmp_path / "bundle"
    save_model(vqvae, bundle)
    save_model(model, bundle)
    weights = bundle / "var.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # a copy cut short
    with pytest.raises(SystemExit, match="cannot read .*var.safetensors as a checkpoint"):
        main(["sample", "--ckpt", str(bundle), "--device", "cpu"])
    (bundle / "vqvae.json").write_text("{")
    with pytest.raises(ValueError, match="vqvae.json is not valid JSON"):
        load_model(bundle, "vqvae")
    (bundle / "vqvae.json").write_text('{"kind": "vqvae", "config": {"vocab_sise": 16}}')
    with pytest.raises(ValueError, match="config does not fit VQVAEConfig"):
        load_model(bundle, "vqvae")


def test_per_scale_settings_must_match_the_scale_count(tmp_path):
    vqvae, model = make_tiny_pair()
    save_model(vqvae, tmp_path / "ckpt")
    save_model(model, tmp_path / "ckpt")
    scales = model.config.num_scales
    with pytest.raises(SystemExit, match=f"top_k has {scales - 1} values but this model has {scales} scales"):
        main(["sample", "--ckpt", str(tmp_path / "ckpt"), "--device", "cpu", "--labels", "0",
              "--top-k", *["0"] * (scales - 1), "--out", str(tmp_path / "grid.png")])


def test_vocab_mismatch_between_tokenizer_and_transformer(tmp_path):
    vqvae, model = make_tiny_pair()
    other_vqvae, _ = make_tiny_pair()
    torch.save(var_to_official(model), tmp_path / "var.pth")
    state = vqvae_to_official(other_vqvae)
    state["quantize.embedding.weight"] = torch.zeros(32, 4)
    torch.save(state, tmp_path / "vae.pth")
    with pytest.raises(ValueError, match="vocab_size 32 vs 16"):
        load_official(tmp_path / "vae.pth", tmp_path / "var.pth")


def test_cli_reports_missing_checkpoint_in_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as error:
        main(["sample", "--ckpt", str(tmp_path / "nope"), "--device", "cpu"])
    assert "does not exist" in str(error.value)


def test_cli_sample_writes_grid(tmp_path):
    vqvae, model = make_tiny_pair()
    save_model(vqvae, tmp_path / "ckpt")
    save_model(model, tmp_path / "ckpt")
    main(["sample", "--ckpt", str(tmp_path / "ckpt"), "--device", "cpu", "--per-class", "2",
          "--out", str(tmp_path / "grid.png"), "--npz", str(tmp_path / "s.npz")])
    import numpy as np
    from PIL import Image

    assert Image.open(tmp_path / "grid.png").size[0] > 8
    data = np.load(tmp_path / "s.npz")
    assert data["arr_0"].shape == (6, 8, 8, 3) and data["arr_0"].dtype == np.uint8
    assert sorted(data["labels"].tolist()) == [0, 0, 1, 1, 2, 2]  # in the seeded shuffled export order
    with pytest.raises(SystemExit, match="label 9 is out of range"):
        main(["sample", "--ckpt", str(tmp_path / "ckpt"), "--device", "cpu", "--labels", "9",
              "--out", str(tmp_path / "x.png")])
