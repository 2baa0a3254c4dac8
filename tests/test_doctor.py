"""``var doctor`` and ``var --version``: offline, fast, nothing downloaded."""

import json

import pytest
from conftest import put_in_fake_hub

from var import hub
from var.cli import main
from var.eval.fidelity import INCEPTION_FILE


@pytest.fixture
def machine(tmp_path, monkeypatch):
    """A fake Hugging Face cache holding var-d16 (files not the released ones) and part of code-n8, and a torch
    hub with a wrong 'Inception' file; any download attempt fails the test."""
    cache = tmp_path / "hf"
    put_in_fake_hub(cache, hub.VAR_REPO, "vae_ch160v4096z32.pth", b"tokenizer" * 1000)
    put_in_fake_hub(cache, hub.VAR_REPO, "var_d16.pth", b"transformer" * 1000)
    monkeypatch.setattr(hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub, "hf_hub_download", lambda *a, **k: pytest.fail("doctor downloaded"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("VAR_CACHE_DIR", str(tmp_path / "var"))
    (tmp_path / "torch" / "hub" / "checkpoints").mkdir(parents=True)
    (tmp_path / "torch" / "hub" / "checkpoints" / INCEPTION_FILE).write_bytes(b"not inception")
    return tmp_path


def test_doctor_reports_versions_weights_and_a_verdict(machine, capsys):
    main(["doctor"])
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].startswith("var-toolkit ") and "torch " in lines[0]
    assert "torch-fidelity 0.4" in out and "accelerate " in out and "transformers " in out
    assert str(machine / "hf") in out and "(HF_HUB_OFFLINE)" in out
    assert any(line.split()[:3] == ["FID", "Inception", "FID,"] and "WRONG FILE" in line for line in lines)
    assert any(line.split()[:2] == ["var-d16", "cached,"] and "checked at first use" in line for line in lines)
    assert any(line.split()[:2] == ["code-n8", "partly"] and "1 of 3 files" in line for line in lines)
    assert any(line.split()[:2] == ["var-d20", "partly"] for line in lines)  # the shared tokenizer
    assert "not cached: llamagen-c2i-b-256" in out
    assert lines[-1].startswith("verdict: usable on ") and "FID needs the Inception weights" in lines[-1]
    assert "1 of " in lines[-1]  # var-d16 is complete


def test_doctor_json(machine, capsys):
    main(["doctor", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert report["released"]["var-d16"] == {**report["released"]["var-d16"], "cached": 2, "files": 2}
    assert report["released"]["flan-t5-xl"]["missing"][0].startswith("google/flan-t5-xl/")
    assert report["weights"]["FID Inception"]["sha256_ok"] is False and report["verdict"].startswith("verdict:")


def test_version(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.startswith("var-toolkit ")
