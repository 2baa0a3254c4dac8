"""compile_for_sampling: every scale of every batch size compiled, no graph break, no recompile limit, same tokens.

Dynamo's graphs, guards and recompiles do not depend on the backend, so the test compiles with the "eager"
backend (no code generation: seconds instead of minutes on two cores).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch._dynamo
from conftest import make_tiny_pair
from torch._dynamo.utils import counters

import var.compile
from var.compile import compile_cache_dir, compile_for_sampling, enable_compile_cache
from var.sample.logits import SamplingSettings
from var.sample.scale import VARSampler

TEN_SCALES = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)  # more scales than dynamo's default recompile limit (8)


def test_compiled_sampling_covers_every_scale_and_batch_without_recompile_limit(monkeypatch, tmp_path):
    monkeypatch.setattr(var.compile, "BACKEND", "eager")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    vqvae, model = make_tiny_pair(patch_nums=TEN_SCALES)
    vqvae.requires_grad_(False), model.requires_grad_(False)
    sampler = VARSampler(model, vqvae, SamplingSettings(top_k=8, top_p=0.9))
    batches = ([0, 1], [2, 0, 1], [1])
    eager = [sampler.sample(labels, seed=3) for labels in batches]

    torch._dynamo.reset()
    counters.clear()
    compile_for_sampling(model, vqvae)
    compiled = [sampler.sample(labels, seed=3) for labels in batches]

    assert torch._dynamo.config.recompile_limit == 8  # not raised: dynamic shapes make it unnecessary
    assert not any("recompile limit" in reason.lower() for reason in counters["unimplemented"])
    assert not counters["graph_break"], dict(counters["graph_break"])
    # the block stack: first scale (empty cache), middle scales, last scale (not cached), reused by every batch
    # size; the decoder (small images decode a whole batch per call, automatic dynamic shapes): the first batch
    # size, one dynamic graph for the others, and batch 1 (dynamo specialises sizes 0 and 1)
    assert counters["stats"]["unique_graphs"] == counters["frames"]["ok"] == 3 + 3
    for ours, reference in zip(compiled, eager, strict=True):
        assert all(torch.equal(a, b) for a, b in zip(ours.indices, reference.indices, strict=True))
        assert torch.allclose(ours.images, reference.images, atol=1e-5)
    torch._dynamo.reset()


def test_compile_cache_lives_in_the_var_cache_dir_unless_inductor_is_told_otherwise(monkeypatch, tmp_path):
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setenv("VAR_COMPILE_CACHE", str(tmp_path / "var-cache"))
    assert compile_cache_dir() == tmp_path / "var-cache"
    assert enable_compile_cache() == tmp_path / "var-cache" / "inductor"
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "var-cache" / "inductor")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert enable_compile_cache() == tmp_path / "mine"
    monkeypatch.delenv("VAR_COMPILE_CACHE")
    assert compile_cache_dir() == Path.home() / ".cache" / "var" / "compile"
