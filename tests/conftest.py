"""Shared tiny models for the test suite (random weights, CPU, float32)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch

from var.models.llamagen import LlamaGen, LlamaGenConfig
from var.models.var import VAR, VARConfig
from var.tokenizers.vqvae import VQVAE, VQVAEConfig

torch.set_num_threads(min(2, torch.get_num_threads()))

SHARED = Path(__file__).resolve().parents[1].parent / "shared"  # ../shared beside the checkout
_missing_shared: dict[str, int] = {}  # skip reason -> tests skipped for it


def needs_shared(path: Path, variable: str | None = None) -> pytest.MarkDecorator:
    """Mark tests that read ``path`` from the shared reference material (fixtures, key lists).

    Where it is missing they fail when the environment variable ``CI`` is set (CI has the files, so a missing
    one is a broken set-up) and elsewhere skip, counted in one summary line that says why.
    """
    return pytest.mark.needs_shared(path=Path(path), variable=variable)


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "needs_shared(path, variable): reads ../shared reference files")


def require_shared(path: Path, variable: str | None = None) -> None:
    """Inside a test: fail (with CI set) or skip (elsewhere) when shared file ``path`` is missing."""
    if Path(path).exists():
        return
    reason = f"{path} not found" + (f" (set {variable} to a fixture set)" if variable else "")
    if os.environ.get("CI"):
        pytest.fail(f"{reason}; CI must provide the shared reference files", pytrace=False)
    _missing_shared[reason] = _missing_shared.get(reason, 0) + 1
    pytest.skip(reason)


def pytest_runtest_setup(item) -> None:
    for mark in item.iter_markers("needs_shared"):
        require_shared(mark.kwargs["path"], mark.kwargs.get("variable"))


def pytest_terminal_summary(terminalreporter) -> None:
    for reason, count in _missing_shared.items():
        terminalreporter.write_line(f"skipped {count} test(s) needing shared files: {reason}; with CI set they fail")


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


def tiny_llamagen(seed: int = 0, **overrides) -> LlamaGen:
    """A tiny class-conditional LlamaGen (the raster model of 'ar'/'sjd') in eval mode, with weights larger than
    the official init (which zeroes the head, so every distribution would be uniform): the context matters."""
    torch.manual_seed(seed)
    base = dict(n_layer=2, n_head=2, dim=16, vocab_size=16, num_classes=3, block_size=16, multiple_of=8)
    model = LlamaGen(LlamaGenConfig(**{**base, **overrides}))
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                torch.nn.init.normal_(module.weight, std=module.in_features ** -0.5)
            elif isinstance(module, torch.nn.Embedding):
                torch.nn.init.normal_(module.weight)
    return model.eval()


@pytest.fixture
def one_thread():
    """One intra-op thread for the test: tiny models gain nothing from more, and on a busy machine a second
    thread's barriers cost a lot."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_pair():
    return make_tiny_pair()


@pytest.fixture(scope="session")
def digit_classifier():
    """The digit classifier, trained once per test session (6 epochs at 16 px); do not modify it in place."""
    from var.eval.classifier import train_digit_classifier

    return train_digit_classifier(image_size=16, epochs=6)


def put_in_fake_hub(cache: Path, repo_id: str, filename: str, data: bytes, commit: str = "c0ffee" * 6 + "c0ff"
                    ) -> Path:
    """Place ``data`` as ``repo_id/filename`` in a Hugging Face cache laid out as hf_hub_download leaves it
    (blobs/<sha256>, snapshots/<commit>/<filename> -> blob, refs/main); returns the snapshot path."""
    repo = Path(cache) / f"models--{repo_id.replace('/', '--')}"
    blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(data)
    link = repo / "snapshots" / commit / filename
    link.parent.mkdir(parents=True, exist_ok=True)
    link.unlink(missing_ok=True)
    link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return link
