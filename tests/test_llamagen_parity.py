"""Parity with the official LlamaGen code (GPT c2i/t2i and VQ tokenizer), from fixtures it produced.

The fixture folder comes from ``LLAMAGEN_PARITY_FIXTURES`` (default ``../shared/fixtures/official_llamagen_small``
beside the project).  Only the files in that folder are used (config.json, the three state dicts and cases.pth)
and every size comes from config.json, so any fixture set of that layout is checked the same way.  Each stage
is fed the stored inputs of that stage, so an error upstream does not cascade.  Models are loaded through the
release-file loaders (var/checkpoints_llamagen.py), so the inferred architecture is checked too.

Sampling (``cases[m]["generate"]``: CFG, cfg_interval, top-k/top-p, seeded draws) goes through our samplers
(``ar``, and ``sjd`` on the greedy runs): the tokens must equal the official ones exactly.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch
from conftest import SHARED, needs_shared

from var.checkpoints_llamagen import (
    llamagen_config_from_state_dict,
    llamagen_vq_config_from_state_dict,
    load_llamagen,
    load_llamagen_vq,
)
from var.models.kv_cache import KVCache
from var.models.llamagen import Captions, LlamaGen, attention_mask
from var.sample.logits import SamplingSettings
from var.sample.registry import build_sampler

DEFAULT_FIXTURES = SHARED / "fixtures" / "official_llamagen_small"
FIXTURES = Path(os.environ.get("LLAMAGEN_PARITY_FIXTURES", DEFAULT_FIXTURES))

pytestmark = needs_shared(FIXTURES / "cases.pth", "LLAMAGEN_PARITY_FIXTURES")

# Max-abs tolerances from the fixture README (fp32; a correct re-implementation differs by ~1e-5).
LOGITS_ATOL = 1e-4
VQ_ATOL = 1e-4
INDEX_MARGIN = 1e-5  # an index may differ only where the official best/second-best distance gap is below this


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, f"shape {tuple(a.shape)} vs {tuple(b.shape)}"
    return (a.float() - b.float()).abs().max().item()


def _state_dict(name: str) -> dict[str, torch.Tensor]:
    return torch.load(FIXTURES / name, weights_only=True)


def _gpt_sizes(config: dict, family: str) -> dict:
    """What the weights cannot tell: the head count and the token grid."""
    kwargs = config[f"gpt_{family}"]["ModelArgs_kwargs"]
    return dict(n_head=kwargs["n_head"], block_size=kwargs["block_size"])


def _vq_norm_groups(config: dict) -> int:
    return int(re.match(r"GroupNorm\((\d+) groups", config["vq"]["norm"]).group(1))


@pytest.fixture(scope="module")
def fixture():
    config = json.loads((FIXTURES / "config.json").read_text())
    cases = torch.load(FIXTURES / "cases.pth", weights_only=True)
    models = {
        family: load_llamagen(_state_dict(f"gpt_{family}_state_dict.pth"), **_gpt_sizes(config, family))
        for family in ("c2i", "t2i")
    }
    vq = load_llamagen_vq(_state_dict("vq_state_dict.pth"), norm_groups=_vq_norm_groups(config))
    # one thread, as the fixtures were made (and tiny one-token steps run faster on one thread anyway)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.set_grad_enabled(False)
    yield config, cases, models, vq
    torch.set_grad_enabled(True)
    torch.set_num_threads(threads)


def cached_logits(model: LlamaGen, cond: torch.Tensor, tokens: torch.Tensor, text_mask: torch.Tensor | None):
    """Predictions of every token of ``tokens`` (B, L) through the KV cache: prefill the T condition rows, then
    one token per call; (B, L, V)."""
    batch, length = tokens.shape
    T = model.config.cls_token_num

    def mask(positions: torch.Tensor, keys: int) -> torch.Tensor | None:
        return None if text_mask is None else attention_mask(positions.expand(batch, -1), keys, text_mask)

    cache = KVCache(model.config.n_layer, T + length)
    rows = [model.prefill(cond, cache, mask(torch.arange(T), T))[:, -1]]
    for j in range(length - 1):
        position = torch.full((batch, 1), T + j)
        rows.append(model.step(tokens[:, j: j + 1], position, cache, mask(position, T + j + 1))[:, 0])
    return torch.stack(rows, dim=1)


def _condition(cases: dict, family: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The generation condition and caption mask of a family (c2i: labels, no mask)."""
    if family == "c2i":
        return cases["c2i"]["labels"], None
    return cases["t2i"]["caption_embs"], cases["t2i"]["emb_masks"]


# -- architecture from the weights ---------------------------------------------------------------------
@pytest.mark.parametrize("family", ["c2i", "t2i"])
def test_parity_gpt_config_inferred_from_state_dict(family):
    config = json.loads((FIXTURES / "config.json").read_text())
    official, derived = config[f"gpt_{family}"]["ModelArgs_full"], config[f"gpt_{family}"]["derived"]
    state_dict = _state_dict(f"gpt_{family}_state_dict.pth")
    ours = llamagen_config_from_state_dict(state_dict, **_gpt_sizes(config, family))
    for field, value in ours.to_dict().items():  # every field of ours is an official ModelArgs field
        expected = official[field] if not (field == "n_kv_head" and official[field] is None) else official["n_head"]
        assert value == expected, field
    assert (ours.head_dim, ours.ffn_hidden, ours.grid_size) == (
        derived["head_dim"], derived["ffn_hidden_dim"], derived["grid_size"])
    model = load_llamagen(state_dict, **_gpt_sizes(config, family))
    assert len(model.state_dict()) == len(state_dict) == derived["n_state_dict_entries"]
    assert model.num_params() == derived["n_params"]


def test_parity_vq_config_inferred_from_state_dict():
    config = json.loads((FIXTURES / "config.json").read_text())["vq"]
    official = config["VQModel_ModelArgs"]
    ours = llamagen_vq_config_from_state_dict(_state_dict("vq_state_dict.pth"))
    for field in ("codebook_size", "codebook_embed_dim", "codebook_l2_norm", "z_channels", "dropout_p"):
        assert getattr(ours, field) == official[field], field
    assert list(ours.encoder_ch_mult) == official["encoder_ch_mult"]
    assert list(ours.decoder_ch_mult) == official["decoder_ch_mult"]
    assert (ours.ch, ours.num_res_blocks, ours.downsample) == (
        config["encoder_decoder_ch"], config["num_res_blocks"], config["downsample_factor"])


# -- VQ tokenizer -----------------------------------------------------------------------------------------
def _assert_indices(ours: torch.Tensor, cases: dict) -> None:
    differ = ours.view_as(cases["indices"]) != cases["indices"]
    assert bool((cases["index_margin"][differ] < INDEX_MARGIN).all()), "an index with a clear margin differs"


def test_parity_vq_encoder_and_quantizer(fixture):
    _, cases, _, vq = fixture
    case = cases["vq"]
    assert _max_diff(vq.encode_latent(case["images"]), case["pre_quant"]) <= VQ_ATOL
    quant, indices = vq.quantize(case["pre_quant"])
    assert _max_diff(quant, case["quant"]) <= VQ_ATOL
    _assert_indices(indices, case)
    _assert_indices(vq.tokenize(case["images"]), case)  # from pixels: encoder error must not flip a clear index


def test_parity_vq_decoder(fixture):
    _, cases, _, vq = fixture
    case = cases["vq"]
    assert _max_diff(vq.decode(case["quant"]), case["decoded"]) <= VQ_ATOL
    assert _max_diff(vq.decode_code(case["indices_flat"], case["qzshape"]), case["decoded_from_indices"]) <= VQ_ATOL
    assert _max_diff(vq.decode_code(case["random_indices"], case["qzshape"]),
                     case["decoded_from_random_indices"]) <= VQ_ATOL


@pytest.mark.parametrize("family", ["c2i", "t2i"])
def test_parity_vq_decodes_generated_tokens(fixture, family):
    _, cases, models, vq = fixture
    # e2e_decoded_images decodes the first "sample_*" run (greedy_topk1_multinomial draws, but is greedy)
    tokens = next(run for name, run in cases[family]["generate"].items() if name.startswith("sample"))["tokens"]
    grid = models[family].config.grid_size
    shape = [tokens.shape[0], vq.config.codebook_embed_dim, grid, grid]
    assert _max_diff(vq.decode_code(tokens, shape), cases[family]["e2e_decoded_images"]) <= VQ_ATOL


# -- GPT ---------------------------------------------------------------------------------------------------
def test_parity_c2i_teacher_forcing(fixture):
    _, cases, models, _ = fixture
    case, model = cases["c2i"], models["c2i"]
    assert not model.training  # eval mode: labels used as given, no dropout
    logits = model(case["tf_labels"], case["tf_tokens"][:, :-1])  # the last label is the null class
    assert _max_diff(logits, case["tf_logits"]) <= LOGITS_ATOL


def test_parity_t2i_teacher_forcing(fixture):
    _, cases, models, _ = fixture
    case, model = cases["t2i"], models["t2i"]
    tokens = case["tf_tokens"][:, :-1]
    batch, length = tokens.shape[0], model.config.cls_token_num + tokens.shape[1]
    mask = attention_mask(torch.arange(length).expand(batch, -1), length, case["emb_masks"])
    assert torch.equal(mask, case["tf_mask"])
    assert _max_diff(model(case["caption_embs"], tokens, mask), case["tf_logits"]) <= LOGITS_ATOL
    assert _max_diff(model(model.null_condition(batch), tokens, mask), case["tf_null_logits"]) <= LOGITS_ATOL
    assert _max_diff(model(case["caption_embs"], tokens), case["tf_logits_causal_nomask"]) <= LOGITS_ATOL


@pytest.mark.parametrize("family", ["c2i", "t2i"])
def test_parity_kv_cached_steps(fixture, family):
    _, cases, models, _ = fixture
    case = cases[family]
    batch = case["tf_cached_step_logits"].shape[0]
    cond = case["tf_labels"][:batch] if family == "c2i" else case["caption_embs"]
    text_mask = case.get("emb_masks")
    logits = cached_logits(models[family], cond, case["tf_tokens"][:batch], text_mask)
    assert _max_diff(logits, case["tf_cached_step_logits"]) <= LOGITS_ATOL


@pytest.mark.parametrize("family", ["c2i", "t2i"])
def test_parity_unguided_generation_logits_by_teacher_forcing(fixture, family):
    """The step logits of every official run without guidance are the model's predictions for its tokens."""
    _, cases, models, _ = fixture
    cond, text_mask = _condition(cases, family)
    runs = [run for run in cases[family]["generate"].values() if run["kwargs"]["cfg_scale"] <= 1.0]
    assert runs, "the fixture has no unguided generation run"
    for run in runs:
        mask = text_mask if run.get("uses_emb_masks", True) else None
        logits = cached_logits(models[family], cond, run["tokens"].long(), mask)
        assert _max_diff(logits, run["step_logits"]) <= LOGITS_ATOL


# -- sampling: the official generate() through our samplers ------------------------------------------------
def _settings(run: dict) -> SamplingSettings:
    """Our settings for an official generate() run: cfg = cfg_scale - 1 (the same guidance, VAR's meaning of
    cfg); a greedy run (sample_logits False, argmax) is top_k = 1, one code left to draw."""
    kwargs = run["kwargs"]
    greedy = not kwargs["sample_logits"]
    return SamplingSettings(
        cfg=max(kwargs["cfg_scale"] - 1.0, 0.0), cfg_interval=run["cfg_interval"],
        temperature=1.0 if greedy else kwargs["temperature"], top_k=1 if greedy else kwargs["top_k"],
        top_p=kwargs["top_p"],
    )


def _generate_runs(cases: dict) -> list[tuple[str, str]]:
    return [(family, name) for family in ("c2i", "t2i") for name in cases[family]["generate"]]


@pytest.mark.parametrize("sampler", ["ar", "sjd"])
def test_parity_generate_tokens_exact(fixture, sampler):
    """Seeded sampling reproduces the official generate() tokens exactly, for every run of the fixture (CFG,
    cfg_interval, temperature, top-k, top-p; c2i and t2i with and without caption masks), and the guided step
    logits match the official ones.  ``sjd`` is checked in distribution by the chi-square tests; here it must
    give the official greedy (top_k = 1) tokens."""
    _, cases, models, vq = fixture
    for family, name in _generate_runs(cases):
        run = cases[family]["generate"][name]
        greedy = not run["kwargs"]["sample_logits"] or run["kwargs"]["top_k"] == 1
        if sampler == "sjd" and not greedy:
            continue
        cond, text_mask = _condition(cases, family)
        if family == "t2i":
            cond = Captions(cond, text_mask if run.get("uses_emb_masks", True) else None)
        options = {"sjd_window": 4} if sampler == "sjd" else {}
        out = build_sampler(sampler, models[family], vq, _settings(run), **options).sample(
            cond, seed=max(run["seed"], 0), decode=False, record_logits=sampler == "ar")
        assert torch.equal(out.indices[0], run["tokens"].long()), f"{family} {name}: tokens differ"
        if sampler == "ar":
            step_logits = torch.cat(out.guided_logits, dim=1)
            assert _max_diff(step_logits, run["step_logits"]) <= LOGITS_ATOL, f"{family} {name}"


def test_parity_generate_probs(fixture):
    """The distribution our rule draws from is the official step_probs (after temperature, top-k, top-p)."""
    _, cases, models, vq = fixture
    for family, name in _generate_runs(cases):
        run = cases[family]["generate"][name]
        if "step_probs" not in run:
            continue
        sampler = build_sampler("ar", models[family], vq, _settings(run))
        batch, length = run["tokens"].shape
        positions = torch.arange(length).expand(batch, -1)
        probs = sampler.rule.process(run["step_logits"], sampler.settings, positions).softmax(dim=-1)
        assert _max_diff(probs, run["step_probs"]) <= 1e-5, f"{family} {name}"
