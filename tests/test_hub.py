"""Released weights by name (var.hub) against a local fake Hugging Face cache: no network in any test."""

import dataclasses
import hashlib
import io
import json
import re

import numpy as np
import pytest
import torch
from conftest import make_tiny_pair, put_in_fake_hub, tiny_vqvae_config
from huggingface_hub.errors import LocalEntryNotFoundError

from var import hub, utils
from var.checkpoints import var_to_official, vqvae_to_official
from var.sample.scale import VARSampler
from var.tokenizers.vqvae import VQVAE
from var.utils import to_uint8


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """Hash stamps in a temporary folder; online unless a test says otherwise; downloading fails the test."""
    monkeypatch.setenv("VAR_CACHE_DIR", str(tmp_path / "var-cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hub.constants, "HF_HUB_OFFLINE", False)

    def no_download(*args, **kwargs):
        raise AssertionError("hf_hub_download called")

    monkeypatch.setattr(hub, "hf_hub_download", no_download)


def _tensor_bytes(state: dict) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


@pytest.fixture
def official_files():
    """A tiny (VQ-VAE, VAR) pair and its official-format .pth bytes."""
    torch.manual_seed(0)
    vqvae = VQVAE(tiny_vqvae_config(norm_groups=8)).eval()  # what the official importer assumes for ch=8
    _, model = make_tiny_pair()
    return vqvae, model, _tensor_bytes(vqvae_to_official(vqvae)), _tensor_bytes(var_to_official(model))


def _as_published(monkeypatch, name: str, files: dict[str, bytes], **changes) -> hub.Release:
    """Registry entry ``name`` with the sha256 of the given file contents (the tiny stand-ins) as published."""
    entry = hub.RELEASES[name]
    components = {role: tuple(dataclasses.replace(f, sha256=hashlib.sha256(files[f.filename]).hexdigest())
                              for f in fs) for role, fs in entry.components.items()}
    patched = dataclasses.replace(entry, components=components, **changes)
    monkeypatch.setitem(hub.RELEASES, name, patched)
    return patched


def test_registry_is_well_formed():
    for name, entry in hub.RELEASES.items():
        assert entry.name == name and entry.description
        for role, files in entry.components.items():
            assert files and len({f.filename.rsplit("/", 1)[0] if "/" in f.filename else "" for f in files}) == 1, role
            for file in files:
                assert file.sha256 is None or re.fullmatch(r"[0-9a-f]{64}", file.sha256), (name, file)
    assert {"var-d16", "var-d20", "var-d24", "var-d30", "var-d36", "code-n8", "llamagen-c2i-l-384",
            "llamagen-t2i-xl-512", "infinity-2b", "infinity-8b", "flan-t5-xl"} <= set(hub.RELEASES)
    assert hub.RELEASES["var-d16"].components["tokenizer"] == hub.RELEASES["code-n8"].components["tokenizer"]
    with pytest.raises(ValueError, match="did you mean var-d16"):
        hub.release("var-d17")


def test_cache_hit_offline_loads_end_to_end(tmp_path, monkeypatch, official_files):
    vqvae, model, vae_bytes, var_bytes = official_files
    cache = tmp_path / "hf"
    put_in_fake_hub(cache, hub.VAR_REPO, "vae_ch160v4096z32.pth", vae_bytes)
    put_in_fake_hub(cache, hub.VAR_REPO, "var_d16.pth", var_bytes)
    _as_published(monkeypatch, "var-d16", {"vae_ch160v4096z32.pth": vae_bytes, "var_d16.pth": var_bytes})
    monkeypatch.setattr(hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    paths = hub.resolve("var-d16")
    assert paths["transformer"].name == "var_d16.pth" and paths["tokenizer"].read_bytes() == vae_bytes
    loaded_vqvae, loaded = hub.load_pair("var-d16")
    reference = VARSampler(model, vqvae).sample([0, 2], seed=3)
    again = VARSampler(loaded, loaded_vqvae).sample([0, 2], seed=3)
    assert all(torch.equal(a, b) for a, b in zip(reference.indices, again.indices, strict=True))
    assert torch.equal(reference.images, again.images)


def test_missing_files_offline_stop_before_any_model_work(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("var.loading.load_pair", lambda *a, **k: pytest.fail("a model was built"))
    with pytest.raises(FileNotFoundError) as error:
        hub.resolve("var-d30", tmp_path / "empty")
    message = str(error.value)
    assert "\n" not in message and "HF_HUB_OFFLINE" in message
    assert "FoundationVision/var: vae_ch160v4096z32.pth, var_d30.pth" in message and str(tmp_path / "empty") in message
    monkeypatch.setattr(hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="var_d30.pth"):
        hub.load_pair("var-d30")


def test_no_network_tries_once_and_names_every_missing_file(tmp_path, monkeypatch):
    calls = []

    def unreachable(repo_id, filename, **kwargs):
        calls.append(filename)
        raise LocalEntryNotFoundError("An error happened while trying to locate the file on the Hub")

    monkeypatch.setattr(hub, "hf_hub_download", unreachable)
    with pytest.raises(FileNotFoundError) as error:
        hub.resolve("code-n8", tmp_path / "empty")
    message = str(error.value)
    assert calls == ["vae_ch160v4096z32.pth"]  # one failed attempt, not one time-out per file
    assert "could not be downloaded" in message and "\n" not in message
    assert "FoundationVision/var: vae_ch160v4096z32.pth; Zigeng/VAR_CoDe: drafter_8.pth, refiner_8.pth" in message


def test_download_then_verify(tmp_path, monkeypatch):
    data = b"released weights"
    cache = tmp_path / "hf"
    _as_published(monkeypatch, "var-d20", {"vae_ch160v4096z32.pth": data, "var_d20.pth": data})

    def download(repo_id, filename, cache_dir=None, **kwargs):
        return str(put_in_fake_hub(cache_dir, repo_id, filename, data))

    monkeypatch.setattr(hub, "hf_hub_download", download)
    paths = hub.resolve("var-d20", cache, roles=["transformer"])
    assert list(paths) == ["transformer"] and paths["transformer"].read_bytes() == data
    assert hub.cached_path(hub.RELEASES["var-d20"].components["tokenizer"][0], cache) is None  # not asked for


def test_sha_mismatch_is_refused_in_one_line(tmp_path, monkeypatch):
    cache = tmp_path / "hf"
    put_in_fake_hub(cache, hub.VAR_REPO, "vae_ch160v4096z32.pth", b"not the released tokenizer")
    put_in_fake_hub(cache, hub.VAR_REPO, "var_d16.pth", b"not the released transformer")
    monkeypatch.setattr("var.loading.load_pair", lambda *a, **k: pytest.fail("a model was built"))
    monkeypatch.setattr(hub.constants, "HF_HUB_CACHE", str(cache))
    with pytest.raises(ValueError) as error:
        hub.load_pair("var-d16")
    message = str(error.value)
    assert "\n" not in message and "vae_ch160v4096z32.pth" in message
    assert hub.VAR_VAE.sha256 in message  # the published hash
    assert hashlib.sha256(b"not the released tokenizer").hexdigest() in message  # and the file's


def test_hash_checked_once_until_the_file_changes(tmp_path, monkeypatch):
    cache = tmp_path / "hf"
    files = {"vae_ch160v4096z32.pth": b"tokenizer", "var_d24.pth": b"transformer"}
    path = put_in_fake_hub(cache, hub.VAR_REPO, "var_d24.pth", files["var_d24.pth"])
    put_in_fake_hub(cache, hub.VAR_REPO, "vae_ch160v4096z32.pth", files["vae_ch160v4096z32.pth"])
    _as_published(monkeypatch, "var-d24", files)
    hashed = []
    monkeypatch.setattr(hub, "sha256_of", lambda p: hashed.append(p) or utils.sha256_of(p))
    hub.resolve("var-d24", cache)
    hub.resolve("var-d24", cache)
    assert len(hashed) == 2  # two files, each hashed once over both calls
    report = hub.cache_report("var-d24", cache)
    assert all(cached is not None and verified for _, cached, verified in report)
    path.resolve().write_bytes(b"transformer, corrupted")
    with pytest.raises(ValueError, match="var_d24.pth"):
        hub.resolve("var-d24", cache)


def test_sharded_role_resolves_to_its_folder(tmp_path, monkeypatch):
    cache = tmp_path / "hf"
    for file in hub.FLAN_T5_XL:
        put_in_fake_hub(cache, file.repo_id, file.filename, file.filename.encode())
    monkeypatch.setitem(hub.RELEASES, "flan-t5-xl", dataclasses.replace(
        hub.RELEASES["flan-t5-xl"], components={"text_encoder": tuple(
            dataclasses.replace(f, sha256=None) for f in hub.FLAN_T5_XL)}))
    folder = hub.resolve("flan-t5-xl", cache)["text_encoder"]
    assert (folder / "config.json").read_bytes() == b"config.json" and (folder / "spiece.model").exists()
    with pytest.raises(ValueError, match="no infinity loader"):
        hub.load_component("infinity-2b", "transformer")  # Infinity loads as a pair only


def _fake_release(tmp_path, monkeypatch, official_files, name: str = "var-d16", **changes) -> None:
    """``name`` in an offline fake Hugging Face cache, published as the tiny official-format files."""
    _, _, vae_bytes, var_bytes = official_files
    cache = tmp_path / "hf"
    transformer = hub.RELEASES[name].components["transformer"][0].filename
    put_in_fake_hub(cache, hub.VAR_REPO, "vae_ch160v4096z32.pth", vae_bytes)
    put_in_fake_hub(cache, hub.VAR_REPO, transformer, var_bytes)
    _as_published(monkeypatch, name, {"vae_ch160v4096z32.pth": vae_bytes, transformer: var_bytes}, **changes)
    monkeypatch.setattr(hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_sample_and_eval_take_a_released_model_by_name(tmp_path, monkeypatch, official_files, capsys):
    from var.cli import main

    vqvae, model, _, _ = official_files
    _fake_release(tmp_path, monkeypatch, official_files, sampling={"cfg": 2.0, "top_k": 5, "top_p": 0.9})
    main(["sample", "--model", "var-d16", "--labels", "0", "2", "--seed", "3", "--out", str(tmp_path / "grid.png"),
          "--npz", str(tmp_path / "samples.npz")])
    # the release's sampling settings fill what the command line left out
    from var.sample.logits import SamplingSettings

    expected = VARSampler(model, vqvae, SamplingSettings(cfg=2.0, top_k=5, top_p=0.9)).sample([0, 2], seed=3)
    with np.load(tmp_path / "samples.npz") as data:
        assert np.array_equal(data["arr_0"], to_uint8(expected.images).permute(0, 2, 3, 1).numpy())
    main(["eval", "--model", "var-d16", "--per-class", "1", "--no-metrics", "--no-progress", "--cfg", "1.0",
          "--out", str(tmp_path / "eval")])
    report = json.loads((tmp_path / "eval" / "report.json").read_text())["sampling"]
    assert report["model"]["release"] == "var-d16" and report["model"]["files"]["transformer"].endswith("var_d16.pth")
    assert (report["cfg"], report["top_k"], report["top_p"]) == (1.0, 5, 0.9)  # given on the command line: kept
    capsys.readouterr()


@pytest.mark.parametrize("argv, fragment", [
    (["--model", "var-d17"], "unknown released model 'var-d17': did you mean var-d16"),
    (["--model", "var-d16", "--ckpt", "run"], "--model var-d16 is a whole released model"),
    (["--model", "var-d20"], "var-d20: 1 file(s) not in the Hugging Face cache"),
])
def test_a_released_model_problem_stops_before_any_model_work(argv, fragment, tmp_path, monkeypatch,
                                                              official_files, capsys):
    from var.cli import main

    _fake_release(tmp_path, monkeypatch, official_files)
    monkeypatch.setattr("var.loading.load_pair", lambda *a, **k: pytest.fail("a model was built"))
    with pytest.raises(SystemExit) as stop:
        main(["sample", *argv, "--out", str(tmp_path / "grid.png")])
    assert fragment in str(stop.value.code) and "\n" not in str(stop.value.code)
    assert not (tmp_path / "grid.png").exists()


def test_infinity_release_loads_from_the_cache_by_name(tmp_path, monkeypatch):
    from infinity_tiny import TINY_SCHEDULE, random_text, tiny_bsq, tiny_infinity

    from var.infinity_checkpoints import infinity_to_official

    model, tokenizer = tiny_infinity().use_schedule(TINY_SCHEDULE), tiny_bsq()
    files = {"infinity_vae_d32reg.pth": _tensor_bytes({"vae": tokenizer.state_dict()}),
             "infinity_2b_reg.pth": _tensor_bytes(infinity_to_official(model, block_chunks=2))}
    cache = tmp_path / "hf"
    for filename, data in files.items():
        put_in_fake_hub(cache, hub.INFINITY_REPO, filename, data)
    entry = hub.RELEASES["infinity-2b"]  # the T5 files are another role, not needed to load the pair
    monkeypatch.setitem(hub.RELEASES, "infinity-2b", dataclasses.replace(
        entry, components={role: fs for role, fs in entry.components.items() if role != "text_encoder"}))
    _as_published(monkeypatch, "infinity-2b", files)
    monkeypatch.setattr(hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded_tokenizer, loaded = hub.load_pair("infinity-2b")
    text = random_text([3, 5])
    reference = VARSampler(model, tokenizer).sample(text, seed=3)
    again = VARSampler(loaded.use_schedule(TINY_SCHEDULE), loaded_tokenizer).sample(text, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(reference.indices, again.indices, strict=True))
    assert torch.equal(reference.images, again.images)
