"""save_pretrained / from_pretrained on the models and the sampler pipeline (var.pretrained)."""

import dataclasses
import hashlib
import io
import json

import pytest
import torch
from conftest import make_tiny_pair, put_in_fake_hub, tiny_vqvae_config

from var import hub
from var.checkpoints import var_to_official, vqvae_to_official
from var.models.llamagen import LlamaGen
from var.models.var import VAR
from var.pretrained import load_pipeline, save_pipeline
from var.sample.logits import SamplingSettings
from var.sample.scale import VARSampler
from var.tokenizers.vqvae import VQVAE


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_model_round_trip(tmp_path):
    vqvae, model = make_tiny_pair()
    ar = LlamaGen(n_layer=1, dim=16, n_head=2, vocab_size=16, num_classes=3, block_size=16).eval()
    for original in (vqvae, model, ar):
        folder = original.save_pretrained(tmp_path / type(original).__name__)
        assert sorted(p.name for p in folder.iterdir()) == ["model.json", "model.safetensors"]
        assert json.loads((folder / "model.json").read_text())["config"]["vocab_size"] == 16
        loaded = type(original).from_pretrained(folder)
        assert type(loaded) is type(original) and loaded.config == original.config
        assert _same_weights(loaded, original) and not loaded.training
    with pytest.raises(ValueError, match="holds a VQVAE, not a VAR"):
        VAR.from_pretrained(tmp_path / "VQVAE")
    with pytest.raises(FileNotFoundError, match="nor the name of a released model .*var-d16"):
        VAR.from_pretrained(tmp_path / "nothing-here")


def test_pipeline_round_trip_samples_the_same(tmp_path):
    vqvae, model = make_tiny_pair()
    settings = SamplingSettings(cfg=2.0, top_k=[4, 4, 8, 8], top_p=0.9, temperature=1.1)
    folder = save_pipeline(tmp_path / "pipe", vqvae, model, settings)
    assert sorted(p.name for p in folder.iterdir()) == ["sampling.json", "tokenizer", "transformer"]
    vqvae2, model2, settings2 = load_pipeline(folder)
    assert settings2 == settings
    outs = [VARSampler(m, v, s).sample([0, 1, 2], seed=5) for v, m, s in
            ((vqvae, model, settings), (vqvae2, model2, settings2))]
    assert all(torch.equal(a, b) for a, b in zip(outs[0].indices, outs[1].indices, strict=True))
    with pytest.raises(ValueError, match="top_k has 2 values but this model has 4 scales"):
        save_pipeline(tmp_path / "bad", vqvae, model, {"top_k": [1, 2]})
    other_vqvae = VQVAE(tiny_vqvae_config(vocab_size=32))
    with pytest.raises(ValueError, match="vocab_size"):
        save_pipeline(tmp_path / "bad", other_vqvae, model)


def _torch_bytes(state: dict) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def test_from_pretrained_by_released_name(tmp_path, monkeypatch):
    """VAR/VQVAE.from_pretrained("var-d16") and load_pipeline("var-d16") through a fake offline hub cache."""
    torch.manual_seed(0)
    vqvae = VQVAE(tiny_vqvae_config(norm_groups=8)).eval()
    _, model = make_tiny_pair()
    files = {"vae_ch160v4096z32.pth": _torch_bytes(vqvae_to_official(vqvae)),
             "var_d16.pth": _torch_bytes(var_to_official(model))}
    cache = tmp_path / "hf"
    for filename, data in files.items():
        put_in_fake_hub(cache, hub.VAR_REPO, filename, data)
    entry = hub.RELEASES["var-d16"]
    components = {role: tuple(dataclasses.replace(f, sha256=hashlib.sha256(files[f.filename]).hexdigest())
                              for f in fs) for role, fs in entry.components.items()}
    monkeypatch.setitem(hub.RELEASES, "var-d16", dataclasses.replace(
        entry, components=components, loader_args={"patch_nums": vqvae.patch_nums}))
    monkeypatch.setattr(hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("VAR_CACHE_DIR", str(tmp_path / "var-cache"))

    assert _same_weights(VAR.from_pretrained("var-d16"), model)
    assert _same_weights(VQVAE.from_pretrained("var-d16"), vqvae)
    with pytest.raises(ValueError, match="holds a VAR, not a LlamaGen"):
        LlamaGen.from_pretrained("var-d16")
    _, loaded, settings = load_pipeline("var-d16")
    assert settings == SamplingSettings(cfg=1.5, top_k=900, top_p=0.96)
    assert _same_weights(loaded, model)
