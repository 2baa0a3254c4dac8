"""LlamaGen from the command line: released-format files (written here at tiny sizes, no network) through
``var sample`` / ``var eval`` with the raster samplers, prompts through a tiny local T5, and the errors."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch
from conftest import tiny_llamagen
from test_text import save_tiny_t5

from var.cli import main
from var.eval.images import load_samples
from var.loading import load_official
from var.models.llamagen import LlamaGen
from var.tokenizers.llamagen_vq import LlamaGenVQ, LlamaGenVQConfig

# GPT-B's width/heads rule cannot be tiny, so the files carry args.gpt_model = "GPT-B" (12 heads) at width 48
TINY_GPT = dict(n_layer=1, n_head=12, dim=48, vocab_size=16, num_classes=3, block_size=16, multiple_of=256)
TINY_VQ = LlamaGenVQConfig(codebook_size=16, codebook_embed_dim=4, z_channels=8, ch=32, num_res_blocks=1,
                           encoder_ch_mult=(1, 1, 1, 1, 1), decoder_ch_mult=(1, 1, 1, 1, 1))  # x16, as VQ-16


def release_file(path, model: torch.nn.Module, **args) -> str:
    """``model`` saved as the released files are: a training checkpoint dict with an argparse Namespace."""
    torch.save({"model": model.state_dict(), "steps": 0, "args": argparse.Namespace(**args)}, path)
    return str(path)


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llamagen")
    torch.manual_seed(0)
    vq = release_file(folder / "vq_ds16_c2i.pt", LlamaGenVQ(TINY_VQ), codebook_size=16)
    c2i = release_file(folder / "c2i_B_64.pt", tiny_llamagen(**TINY_GPT), gpt_model="GPT-B", image_size=64)
    t2i = release_file(folder / "t2i_B_64.pt", tiny_llamagen(**TINY_GPT, model_type="t2i", cls_token_num=6,
                                                             caption_dim=16), gpt_model="GPT-B")
    return folder, vq, c2i, t2i


def test_load_official_tells_llamagen_from_the_state_dict(released):
    _, vq_file, c2i_file, t2i_file = released
    vq, gpt = load_official(vq_file, c2i_file)
    assert isinstance(vq, LlamaGenVQ) and isinstance(gpt, LlamaGen)
    assert gpt.grid == (4, 4) and gpt.config.n_head == 12  # 64 px / 16 from args.image_size; heads of GPT-B
    assert load_official(vq_file, t2i_file)[1].config.model_type == "t2i"  # 64 px from the file name
    with pytest.raises(ValueError, match="not a LlamaGen VQ state dict .*quantize.embedding.weight"):
        load_official(c2i_file, c2i_file)


def test_cli_samples_released_llamagen_files_with_ar_and_sjd(released, tmp_path, capsys):
    _, vq, c2i, _ = released
    common = ["sample", "--vae", vq, "--var", c2i, "--device", "cpu", "--labels", "0", "2", "--cfg", "1",
              "--top-k", "8", "--top-p", "1"]
    for extra in (["--sampler", "ar"], ["--sampler", "sjd", "--sjd-window", "4"]):
        out = tmp_path / f"{extra[1]}.png"
        main(common + extra + ["--out", str(out), "--npz", str(tmp_path / f"{extra[1]}.npz")])
        assert out.is_file()
        assert np.load(tmp_path / f"{extra[1]}.npz")["arr_0"].shape == (2, 64, 64, 3)
    assert "sjd: " in capsys.readouterr().out
    with pytest.raises(SystemExit, match="not a LlamaGen GPT state dict"):
        main(["sample", "--vae", c2i, "--var", vq, "--sampler", "ar", "--out", str(tmp_path / "x.png")])
    with pytest.raises(SystemExit, match="sampler 'var' needs a VAR model"):
        main(["sample", "--vae", vq, "--var", c2i, "--out", str(tmp_path / "x.png")])


def test_cli_samples_a_t2i_model_from_prompts(released, tmp_path, monkeypatch):
    from huggingface_hub import constants

    _, vq, _, t2i = released
    encoder = tmp_path / "t5"
    save_tiny_t5(encoder)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a cat\n\na red car on the sofa\n")
    common = ["sample", "--vae", vq, "--var", t2i, "--sampler", "ar", "--device", "cpu", "--text-encoder",
              str(encoder), "--cfg", "2"]
    main(common + ["--prompts", str(prompts), "--out", str(tmp_path / "t2i.png"), "--npz", str(tmp_path / "t.npz")])
    saved = np.load(tmp_path / "t.npz")
    assert saved["arr_0"].shape == (2, 64, 64, 3) and sorted(saved["prompts"].tolist()) == [
        "a photo of a cat", "a red car on the sofa"]  # in the export's shuffled order, beside their images
    main(common + ["--prompt", "a dog", "--sampler", "sjd", "--out", str(tmp_path / "one.png")])
    with pytest.raises(SystemExit, match="is text-to-image: give --prompt"):
        main(common + ["--out", str(tmp_path / "x.png")])
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(SystemExit, match="google/flan-t5-xl"):
        main(common[:-4] + ["--prompt", "a dog", "--out", str(tmp_path / "x.png")])


def test_eval_runs_the_raster_samplers_on_released_llamagen(released, tmp_path):
    _, vq, c2i, _ = released
    for sampler in ("ar", "sjd"):
        out = tmp_path / sampler
        main(["eval", "--vae", vq, "--var", c2i, "--sampler", sampler, "--device", "cpu", "--per-class", "1",
              "--cfg", "1", "--no-metrics", "--no-progress", "--out", str(out)])
        assert sorted(load_samples(out / "samples.npz").labels.tolist()) == [0, 1, 2]  # exported shuffled


def test_released_llamagen_by_name_from_a_local_hub_cache(released, tmp_path, monkeypatch):
    """``llamagen-c2i-b-256`` resolves from the Hugging Face cache (offline, sha256 checked) and loads as a
    LlamaGen pair with the publishers' FID settings, cfg_scale 2.0 given as our cfg 1.0."""
    import dataclasses
    import hashlib
    from pathlib import Path

    from conftest import put_in_fake_hub

    from var import hub
    from var.pretrained import load_pipeline

    _, vq_file, c2i_file, _ = released
    cache = tmp_path / "hf"
    entry = hub.RELEASES["llamagen-c2i-b-256"]
    contents = {}
    for role, source in (("tokenizer", vq_file), ("transformer", c2i_file)):
        (file,) = entry.components[role]
        contents[role] = Path(source).read_bytes()
        put_in_fake_hub(cache, file.repo_id, file.filename, contents[role])
    components = {role: tuple(dataclasses.replace(f, sha256=hashlib.sha256(contents[role]).hexdigest()) for f in fs)
                  for role, fs in entry.components.items()}
    monkeypatch.setitem(hub.RELEASES, entry.name, dataclasses.replace(entry, components=components))
    monkeypatch.setattr(hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("VAR_CACHE_DIR", str(tmp_path / "var-cache"))

    vq, gpt, settings = load_pipeline("llamagen-c2i-b-256")
    assert isinstance(vq, LlamaGenVQ) and isinstance(gpt, LlamaGen)
    assert gpt.grid == (4, 4)  # the file's args.image_size (64 px here) wins over its name
    assert (settings.cfg, settings.top_k, settings.top_p) == (1.0, 0, 1.0) and entry.sampler == "ar"
    alone = LlamaGen.from_pretrained("llamagen-c2i-b-256")
    assert alone.grid == gpt.grid and all(torch.equal(a, b) for a, b in
                                          zip(alone.state_dict().values(), gpt.state_dict().values(), strict=True))
