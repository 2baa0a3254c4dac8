"""Parity with the official VAR implementation, from fixtures it produced.

The fixture folder comes from ``VAR_PARITY_FIXTURES`` (default ``../shared/fixtures/official_var_small``
beside the project).  Only the files in that folder are used (config.json, the two state dicts and
cases.pth), so any fixture set in that format (other image sizes, vocabularies, scale schedules, depths,
shared AdaLN) is checked the same way.  Each stage is fed the stored inputs of that stage, so an error
upstream does not cascade.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import SHARED, needs_shared

from var.checkpoints import load_official_var, load_official_vqvae, var_config_from_official, vqvae_config_from_official
from var.sample.logits import SamplingSettings
from var.sample.scale import VARSampler
from var.tokenizers.quantizer import phi_index_per_scale

DEFAULT_FIXTURES = SHARED / "fixtures" / "official_var_small"
FIXTURES = Path(os.environ.get("VAR_PARITY_FIXTURES", DEFAULT_FIXTURES))

pytestmark = needs_shared(FIXTURES / "cases.pth", "VAR_PARITY_FIXTURES")

# Max-abs tolerances from the fixture README.
TOLERANCE = {
    "enc_f": 1e-5,
    "fhat": 1e-5,
    "recon": 1e-4,
    "x_teacher": 1e-5,
    "var_x_in": 1e-6,
    "block_out": 1e-5,
    "logits": 2e-5,
    "guided_logits": 5e-5,
    "sample_fhat": 1e-5,
    "sample_images": 1e-4,
    "smooth_fhat": 2e-4,
    "smooth_images": 1e-3,
}


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, f"shape {tuple(a.shape)} vs {tuple(b.shape)}"
    return (a.float() - b.float()).abs().max().item()


def _state_dict(name: str) -> dict[str, torch.Tensor]:
    return torch.load(FIXTURES / name, weights_only=True)


@pytest.fixture(scope="module")
def fixture():
    config = json.loads((FIXTURES / "config.json").read_text())
    cases = torch.load(FIXTURES / "cases.pth", weights_only=True)
    # what the weights cannot tell (selection rule, phi ratio, eps, norm groups, and the head count when
    # attention has no per-head temperature) comes from config.json
    var_kwargs, vae_kwargs = config["var_kwargs"], config["vqvae_kwargs"]
    var = load_official_var(
        _state_dict("var_state_dict.pth"),
        patch_nums=var_kwargs["patch_nums"],
        norm_eps=var_kwargs["norm_eps"],
        num_heads=var_kwargs["num_heads"],
    )
    vae = load_official_vqvae(
        _state_dict("vae_state_dict.pth"),
        patch_nums=vae_kwargs["v_patch_nums"],
        using_znorm=vae_kwargs["using_znorm"],
        quant_resi=vae_kwargs["quant_resi"],
        beta=vae_kwargs["beta"],
        norm_groups=config["vqvae_fixed_architecture"]["groupnorm_groups"],
    )
    torch.set_grad_enabled(False)
    yield config, cases, vae, var
    torch.set_grad_enabled(True)


def test_parity_config_inferred_from_state_dicts():
    # the weights alone must give every size they determine; the head count is in them only with l2-norm attention
    config = json.loads((FIXTURES / "config.json").read_text())
    var_kwargs, vae_kwargs = config["var_kwargs"], config["vqvae_kwargs"]
    heads = {} if var_kwargs["attn_l2_norm"] else {"num_heads": var_kwargs["num_heads"]}
    var_config = var_config_from_official(_state_dict("var_state_dict.pth"), **heads)
    assert var_config.depth == var_kwargs["depth"]
    assert var_config.width == var_kwargs["embed_dim"]
    assert var_config.num_heads == var_kwargs["num_heads"]
    assert var_config.mlp_ratio == var_kwargs["mlp_ratio"]
    assert var_config.num_classes == var_kwargs["num_classes"]
    assert var_config.vocab_size == vae_kwargs["vocab_size"]
    assert var_config.z_channels == vae_kwargs["z_channels"]
    assert var_config.shared_aln == var_kwargs["shared_aln"]
    assert var_config.attn_l2_norm == var_kwargs["attn_l2_norm"]
    assert list(var_config.patch_nums) == list(var_kwargs["patch_nums"])  # from the lvl_1L buffer
    assert var_config.seq_len == config["derived"]["L"]
    vae_config = vqvae_config_from_official(_state_dict("vae_state_dict.pth"))
    architecture = config["vqvae_fixed_architecture"]
    assert vae_config.vocab_size == vae_kwargs["vocab_size"]
    assert vae_config.z_channels == vae_kwargs["z_channels"]
    assert vae_config.ch == vae_kwargs["ch"]
    assert list(vae_config.ch_mult) == list(architecture["ch_mult"])
    assert vae_config.num_res_blocks == architecture["num_res_blocks"]
    assert vae_config.in_channels == architecture["in_channels"]
    assert (vae_config.use_attn, vae_config.use_mid_attn) == (architecture["using_sa"], architecture["using_mid_sa"])
    assert vae_config.quant_conv_ks == vae_kwargs["quant_conv_ks"]
    assert vae_config.share_quant_resi == vae_kwargs["share_quant_resi"]


def test_parity_phi_index_per_scale(fixture):
    config, cases, vae, _ = fixture
    num_scales = len(vae.patch_nums)
    expected = cases["phi_index_per_scale"]
    assert phi_index_per_scale(num_scales, len(vae.quantize.phi), vae.config.share_quant_resi) == expected
    assert expected == config["derived"]["phi_index_per_scale"]


def test_parity_official_tie_breaking_tables():
    # spec_var.md 1.4: exact real-number ties resolve to the higher index by float64 rounding
    assert phi_index_per_scale(4, 4, 4) == [0, 1, 2, 3]
    assert phi_index_per_scale(5, 4, 4) == [0, 1, 2, 2, 3]
    assert phi_index_per_scale(6, 4, 4) == [0, 0, 1, 2, 3, 3]
    assert phi_index_per_scale(10, 4, 4) == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]
    assert phi_index_per_scale(14, 4, 4) == [0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3]


def test_parity_encoder_and_quantizer(fixture):
    _, cases, vae, _ = fixture
    f = vae.encode_latent(cases["images"])
    assert _max_diff(f, cases["enc_f"]) <= TOLERANCE["enc_f"]
    indices, fhat_per_scale = vae.quantize.quantize(cases["enc_f"])
    for ours, ref in zip(indices, cases["idx_Bl"], strict=True):
        assert torch.equal(ours, ref)
    for ours, ref in zip(fhat_per_scale, cases["fhat_per_scale"], strict=True):
        assert _max_diff(ours, ref) <= TOLERANCE["fhat"]
    assert _max_diff(fhat_per_scale[-1], cases["f_hat"]) <= TOLERANCE["fhat"]
    # end to end from pixels too (the encoder error must not flip any index)
    assert all(torch.equal(a, b) for a, b in zip(vae.encode(cases["images"]), cases["idx_Bl"], strict=True))


def test_parity_decoder(fixture):
    _, cases, vae, _ = fixture
    assert _max_diff(vae.fhat_to_image(cases["f_hat"]), cases["recon"]) <= TOLERANCE["recon"]
    assert _max_diff(vae.quantize.indices_to_fhat(cases["idx_Bl"]), cases["f_hat"]) <= TOLERANCE["fhat"]
    assert _max_diff(vae.decode(cases["idx_Bl"]), cases["recon_from_idx"]) <= TOLERANCE["recon"]


def test_parity_teacher_forcing_input(fixture):
    _, cases, vae, _ = fixture
    ours = vae.quantize.teacher_forcing_input(cases["idx_Bl"])
    assert _max_diff(ours, cases["x_BLCv_wo_first_l"]) <= TOLERANCE["x_teacher"]


def test_parity_transformer_forward(fixture):
    _, cases, _, var = fixture
    labels, teacher = cases["labels"], cases["x_BLCv_wo_first_l"]
    cond = var.class_condition(labels)
    x = var.input_tokens(cond, teacher, begin=0)
    assert _max_diff(x, cases["var_x_in"]) <= TOLERANCE["var_x_in"]
    mask = var.scale_mask(0, var.config.num_scales - 1, 0)
    modulations = var.block_modulations(cond)
    for block, mods, ref in zip(var.blocks, modulations, cases["var_block_out"], strict=True):
        x = block(cases["var_x_in"] if block is var.blocks[0] else x, mods, mask)
        assert _max_diff(x, ref) <= TOLERANCE["block_out"]
    assert var.training is False  # eval mode: labels are used as given (no label dropout)
    assert _max_diff(var(labels, teacher), cases["logits"]) <= TOLERANCE["logits"]


@pytest.mark.parametrize("case", ["sample_greedy", "sample_topk_topp", "sample_smooth"])
def test_parity_sampling(fixture, case):
    _, cases, vae, var = fixture
    spec = cases[case]
    settings = SamplingSettings(
        cfg=spec["cfg"], top_k=spec["top_k"], top_p=spec["top_p"], more_smooth=spec["more_smooth"]
    )
    sampler = VARSampler(var, vae, settings)
    out = sampler.sample(spec["label_B"], seed=spec["g_seed"], record_logits=True)
    for ours, ref in zip(out.indices, spec["idx_Bl"], strict=True):
        assert torch.equal(ours, ref)
    for ours, ref in zip(out.guided_logits, spec["guided_logits"], strict=True):
        assert _max_diff(ours, ref) <= TOLERANCE["guided_logits"]
    smooth = spec["more_smooth"]
    assert _max_diff(out.f_hat, spec["f_hat"]) <= TOLERANCE["smooth_fhat" if smooth else "sample_fhat"]
    assert _max_diff(out.images, spec["images"]) <= TOLERANCE["smooth_images" if smooth else "sample_images"]
    # the same seed gives the same samples again
    again = sampler.sample(spec["label_B"], seed=spec["g_seed"])
    assert all(torch.equal(a, b) for a, b in zip(again.indices, out.indices, strict=True))
    assert torch.equal(again.images, out.images)
