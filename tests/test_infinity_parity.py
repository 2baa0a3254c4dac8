"""Parity with the official Infinity implementation, from fixtures it produced (no sampler needed).

The fixture folder comes from ``INFINITY_PARITY_FIXTURES`` (default ``../shared/fixtures/official_infinity_small``
beside the project).  Every size is read from its config.json and the state dicts, and the inference cases are
whatever ``cases["infer"]`` holds, so another set of the same layout (other sizes, other cases) is checked the
same way.  The inference cases are replayed on their recorded bits: each scale's input is built from the bits
the official sampler drew, so the transformer's guided logits, the next-scale inputs, the summed codes and the
decoded image are all checked without drawing anything (seeded draws are the sampler's test).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import SHARED, needs_shared

from var.infinity_checkpoints import (
    bsq_config_from_official,
    infinity_config_from_official,
    load_official_bsq,
    load_official_infinity,
)
from var.models.infinity import PackedText, bit_logits
from var.models.infinity_schedules import level_of, resolve_schedule
from var.models.kv_cache import KVCache
from var.sample.logits import SamplingSettings
from var.sample.scale import VARSampler

DEFAULT_FIXTURES = SHARED / "fixtures" / "official_infinity_small"
FIXTURES = Path(os.environ.get("INFINITY_PARITY_FIXTURES", DEFAULT_FIXTURES))

pytestmark = needs_shared(FIXTURES / "cases.pth", "INFINITY_PARITY_FIXTURES")

# Max-abs tolerances from the fixture README ("suggested checks"); bits are compared exactly.
TOLERANCE = {
    "vae": 1e-4,
    "teacher_inputs": 1e-4,
    "text": 1e-4,
    "logits_bf16_ca": 5e-3,  # the official bf16 cross-attention emulated: a rounding flip is ~1e-3
    "logits_fp32_ca": 1e-4,
    "infer_logits_bf16_ca": 3e-2,  # amplified by cfg / tau
    "infer_logits_fp32_ca": 1e-4,
    "image": 1e-4,
}


def _max_diff(ours: torch.Tensor, reference: torch.Tensor) -> float:
    """Largest absolute difference (shapes must agree)."""
    if ours.shape != reference.shape:
        raise AssertionError(f"shape {tuple(ours.shape)}, expected {tuple(reference.shape)}")
    return (ours.double() - reference.double()).abs().max().item()


def _state_dict(name: str) -> dict[str, torch.Tensor]:
    return torch.load(FIXTURES / name, weights_only=True)


@pytest.fixture(scope="module")
def fixture():
    config = json.loads((FIXTURES / "config.json").read_text())
    cases = torch.load(FIXTURES / "cases.pth", weights_only=True)
    kwargs = config["infinity_kwargs"]
    # what the weights cannot tell: the text dropout (0 in the fixtures) and the norm eps (official default)
    model = load_official_infinity(
        _state_dict("infinity_state_dict.pth"),
        text_maxlen=kwargs["text_maxlen"],
        cond_drop_rate=kwargs.get("cond_drop_rate", 0.1),
        norm_eps=kwargs.get("norm_eps", 1e-6),
    )
    vae = load_official_bsq(_state_dict("vae_state_dict.pth"))
    text = cases["text"]
    prompts = PackedText.coerce((text["kv_compact"], text["lens"], text["cu_seqlens_k"], text["max_seqlen_k"]))
    torch.set_grad_enabled(False)
    yield config, cases, vae, model, prompts
    torch.set_grad_enabled(True)


def test_parity_sizes_inferred_from_state_dicts():
    config = json.loads((FIXTURES / "config.json").read_text())
    kwargs, derived = config["infinity_kwargs"], config["derived"]
    model_config = infinity_config_from_official(_state_dict("infinity_state_dict.pth"))
    assert model_config.depth == kwargs["depth"]
    assert model_config.width == kwargs["embed_dim"]
    assert model_config.num_heads == kwargs["num_heads"]
    assert model_config.ffn_hidden == derived["ffn_hidden"]  # (the mlp ratio itself is not in the weights)
    assert model_config.text_channels == kwargs["text_channels"]
    assert model_config.text_maxlen == kwargs["text_maxlen"]
    assert model_config.text_pool_heads == derived["text_pool_heads"]
    assert model_config.width // model_config.text_pool_heads == derived["text_pool_head_dim"]
    assert model_config.head_dim == derived["head_dim"]
    assert model_config.num_levels == derived["lvl_embed_rows"]
    assert 2 * model_config.bits_per_token == derived["V_logits"]
    builder, vae_args = config["vae_builder"], config["vae_args"]
    vae_config = bsq_config_from_official(_state_dict("vae_state_dict.pth"))
    assert vae_config.codebook_dim == builder["codebook_dim"] == derived["codebook_dim"]
    assert vae_config.patch_size == builder["patch_size"] == derived["vae_stride"]
    assert list(vae_config.encoder_ch_mult) == builder["encoder_ch_mult"]
    assert list(vae_config.decoder_ch_mult) == builder["decoder_ch_mult"]
    assert vae_config.base_ch == vae_args["base_ch"]
    assert vae_config.num_res_blocks == vae_args["num_res_blocks"]


def test_parity_scale_schedule(fixture):
    config, cases, _, model, _ = fixture
    schedule = resolve_schedule(cases["scale_schedule"])
    assert schedule.template == config["h_div_w_template"]
    assert level_of(schedule) == config["pn"]
    assert schedule.length == config["seq_len"]


def test_parity_tokenizer(fixture):
    _, cases, vae, _, _ = fixture
    expected, schedule = cases["vae"], cases["scale_schedule"]
    encoding = vae.encode(cases["images"], schedule)
    assert _max_diff(encoding.raw_features, expected["raw_features"]) <= TOLERANCE["vae"]
    assert _max_diff(encoding.summed_codes, expected["summed_codes"]) <= TOLERANCE["vae"]
    assert len(encoding.bits) == len(expected["bit_labels"])
    for ours, ref in zip(encoding.bits, expected["bit_labels"], strict=True):
        assert torch.equal(ours, ref.to(ours.dtype))
    assert _max_diff(vae.decode(expected["summed_codes"]), expected["decoded"]) <= TOLERANCE["vae"]
    summed, decoded = vae.decode_from_bits(expected["bit_labels"], schedule)
    assert _max_diff(summed, expected["summed_codes_from_bits"]) <= TOLERANCE["vae"]
    gap = _max_diff(decoded, expected["decoded"])
    assert abs(gap - expected["decoded_from_bits_maxabs_vs_decoded"]) <= TOLERANCE["vae"]


def test_parity_teacher_forcing_input(fixture):
    _, cases, vae, _, _ = fixture
    teacher = cases["teacher_forcing"]
    inputs, bits = vae.teacher_forcing_input(cases["vae"]["raw_features"], cases["scale_schedule"])
    assert _max_diff(inputs, teacher["x_BLC_wo_prefix"]) <= TOLERANCE["teacher_inputs"]
    for ours, ref in zip(bits, teacher["gt_bits"], strict=True):
        assert torch.equal(ours, ref.to(ours.dtype))


def test_parity_text_condition(fixture):
    _, cases, _, model, prompts = fixture
    teacher = cases["teacher_forcing"]
    cond = model.condition(prompts)
    assert _max_diff(cond.pooled, teacher["cond_BD"]) <= TOLERANCE["text"]
    assert _max_diff(cond.memory, teacher["text_kv_after_proj"]) <= TOLERANCE["text"]


def test_parity_teacher_forced_blocks_and_logits(fixture):
    _, cases, _, model, prompts = fixture
    teacher, schedule = cases["teacher_forcing"], resolve_schedule(cases["scale_schedule"])
    assert not model.training  # eval: prompts are used as given (the official model drops them in eval too)
    model.set_cross_attention_bf16(True)
    recorded = {}

    def record(layer: int, x: torch.Tensor) -> torch.Tensor:
        recorded[layer] = x[0].clone()
        return x

    cond = model.condition(prompts)
    model.forward_scales(cond, 0, schedule.num_scales - 1, inputs=teacher["x_BLC_wo_prefix"], schedule=schedule,
                         after_layer=record)
    for layer, ref in enumerate(teacher["block_outputs_sample0_first5scales"]):
        assert _max_diff(recorded[layer][: ref.shape[0]], ref) <= TOLERANCE["logits_bf16_ca"]
    logits = model(prompts, teacher["x_BLC_wo_prefix"], schedule)
    assert _max_diff(logits, teacher["logits"]) <= TOLERANCE["logits_bf16_ca"]
    model.set_cross_attention_bf16(False)
    try:
        logits_fp32 = model(prompts, teacher["x_BLC_wo_prefix"], schedule)
    finally:
        model.set_cross_attention_bf16(True)
    assert _max_diff(logits_fp32, teacher["logits_fp32ca"]) <= TOLERANCE["logits_fp32_ca"]


def test_parity_cached_forward_equals_teacher_forcing(fixture):
    """Scale by scale on a KV cache (RoPE offsets from the scale index) = the block-causal full pass."""
    _, cases, _, model, prompts = fixture
    inputs, schedule = cases["teacher_forcing"]["x_BLC_wo_prefix"], resolve_schedule(cases["scale_schedule"])
    model.set_cross_attention_bf16(False)  # float32 end to end, so only summation order differs
    try:
        cond = model.condition(prompts)
        full = model.forward_scales(cond, 0, schedule.num_scales - 1, inputs=inputs, schedule=schedule)
        cache = KVCache(model.config.depth, schedule.length)
        for si, (begin, end) in enumerate(schedule.bounds):
            cache.begin_pass(si)
            scale_inputs = inputs[:, begin - 1: end - 1] if si else None
            hidden = model.forward_scales(cond, si, inputs=scale_inputs, schedule=schedule, cache=cache)
            assert _max_diff(hidden, full[:, begin:end]) <= TOLERANCE["logits_fp32_ca"]
    finally:
        model.set_cross_attention_bf16(True)


def _replay(model, vae, prompts, case, schedule, stored_inputs: bool = False):
    """Run the official inference loop on the case's recorded bits (or, with ``stored_inputs``, on its stored
    word inputs): guided logits (after CFG and 1/tau) of every scale, the next-scale inputs, the summed codes."""
    settings = case["settings"]
    batch, cfg_list, tau_list = settings["B"], settings["cfg_list"], settings["tau_list"]
    insertion = settings["cfg_insertion_layer"]
    guided = any(weight != 1 for weight in cfg_list[: schedule.num_scales])
    mix_layers = {model.config.depth + k for k in insertion if k < 0}
    model.set_cross_attention_bf16(not _fp32_ca(case))
    cond = model.condition(prompts, guidance=guided)
    cache = KVCache(model.config.depth, schedule.length)
    summed, inputs, logits_per_scale, inputs_per_scale = None, None, [], []
    try:
        for si in range(schedule.num_scales):
            weight, tau = cfg_list[si], tau_list[si]

            def mix(layer: int, x: torch.Tensor, weight: float = weight) -> torch.Tensor:
                if not guided or weight == 1 or layer not in mix_layers:
                    return x
                mixed = weight * x[:batch] + (1 - weight) * x[batch:]
                return torch.cat((mixed, mixed))

            if stored_inputs and si:
                inputs = case["next_scale_inputs"][si - 1]
            cache.begin_pass(si, persist=si < schedule.num_scales - 1)
            hidden = model.forward_scales(cond, si, inputs=inputs, schedule=schedule, cache=cache, after_layer=mix)
            if guided and weight != 1 and 0 in insertion:
                logits = model.logits(hidden, cond).mul(1 / tau)
                logits = weight * logits[:batch] + (1 - weight) * logits[batch:]
            else:
                logits = model.logits(hidden[:batch], cond).mul(1 / tau)
            logits_per_scale.append(bit_logits(logits))
            summed, inputs = vae.next_input(si, summed, vae.bits_to_codes(case["bits_per_scale"][si]), schedule)
            if inputs is not None:
                inputs_per_scale.append(inputs)
    finally:
        model.set_cross_attention_bf16(True)
    return logits_per_scale, inputs_per_scale, summed


def _fp32_ca(case: dict) -> bool:
    return bool(case.get("fp32ca", False))


def _logit_tolerance(case: dict) -> float:
    return TOLERANCE["infer_logits_fp32_ca" if _fp32_ca(case) else "infer_logits_bf16_ca"]


def test_parity_inference_cases_on_recorded_bits(fixture):
    _, cases, vae, model, prompts = fixture
    schedule = resolve_schedule(cases["scale_schedule"])
    assert cases["infer"], "the fixture holds no inference case"
    for name, case in _infer_cases(cases):
        logits, inputs, summed = _replay(model, vae, prompts, case, schedule)
        tolerance = _logit_tolerance(case)
        for si, (ours, ref) in enumerate(zip(logits, case["logits_per_scale"], strict=True)):
            assert _max_diff(ours, ref) <= tolerance, f"{name}: scale {si}"
        if case["settings"]["top_k"] == 1:  # greedy: the bits are the argmax wherever the margin is clear
            for ours, ref, bits in zip(logits, case["logits_per_scale"], case["bits_per_scale"], strict=True):
                clear = (ref[..., 1] - ref[..., 0]).abs() > 2 * tolerance
                assert torch.equal(ours.argmax(-1)[clear], bits.reshape(ours.shape[:2])[clear].long()), name
        for si, ref in enumerate(case.get("next_scale_inputs", [])):
            assert _max_diff(inputs[si], ref) <= TOLERANCE["vae"], f"{name}: input of scale {si + 1}"
        assert _max_diff(summed.squeeze(2), case["summed_codes"]) <= TOLERANCE["vae"], name
        image = vae.decode(summed)
        if "image_float" in case:
            assert _max_diff(image, case["image_float"]) <= TOLERANCE["image"], name
        if "image_uint8_bgr" in case:  # the official returned image: truncated, channels last, BGR
            uint8 = ((image + 1) / 2).permute(0, 2, 3, 1).mul(255).to(torch.uint8).flip(dims=(3,))
            assert _max_diff(uint8, case["image_uint8_bgr"]) <= 1, name


def test_parity_greedy_case_on_stored_inputs(fixture):
    """A case's stored word inputs, fed scale by scale through the cached forward, give its guided logits."""
    _, cases, vae, model, prompts = fixture
    schedule = resolve_schedule(cases["scale_schedule"])
    stored = [(name, case) for name, case in _infer_cases(cases) if "next_scale_inputs" in case]
    if not stored:
        pytest.skip("this fixture set stores no next_scale_inputs")
    for name, case in stored:
        logits, _, _ = _replay(model, vae, prompts, case, schedule, stored_inputs=True)
        for si, (ours, ref) in enumerate(zip(logits, case["logits_per_scale"], strict=True)):
            assert _max_diff(ours, ref) <= _logit_tolerance(case), f"{name}: scale {si}"


def _infer_cases(cases: dict):
    """(name, case) of every inference case; ``*_fp32ca`` cases ran with float32 cross-attention."""
    for name, case in cases["infer"].items():
        yield name, {**case, "fp32ca": name.endswith("_fp32ca")}


def _settings(case: dict) -> tuple[SamplingSettings, torch.Generator | None]:
    """The sampler settings of an official inference case (official cfg_s = 1 + our t_s, tau = temperature)."""
    official = case["settings"]
    insertion = list(official["cfg_insertion_layer"])
    assert len(insertion) == 1, "one cfg insertion layer per case"
    settings = SamplingSettings(cfg=[float(c) - 1 for c in official["cfg_list"]],
                                temperature=[float(t) for t in official["tau_list"]], top_k=int(official["top_k"]),
                                top_p=float(official["top_p"]), cfg_layer=int(insertion[0]))
    seed = official["g_seed"]
    generator = None if seed is None or seed < 0 else torch.Generator("cpu").manual_seed(int(seed))
    return settings, generator


def test_parity_seeded_sampler_reproduces_official_bits(fixture):
    """The ``var`` sampler on Infinity, seeded as the official run (CPU generator, one multinomial per scale):
    every bit of every case exactly, and the guided logits, summed codes and image within tolerance."""
    _, cases, vae, model, prompts = fixture
    model.use_schedule(cases["scale_schedule"])
    for name, case in _infer_cases(cases):
        settings, generator = _settings(case)
        if generator is None:
            assert settings.top_k == 1, f"{name}: an unseeded case must be greedy to be reproducible"
        model.set_cross_attention_bf16(not _fp32_ca(case))
        try:
            out = VARSampler(model, vae, settings).sample(prompts, generator=generator, record_logits=True,
                                                          decode="image_float" in case)
        finally:
            model.set_cross_attention_bf16(True)
        for si, (ours, ref) in enumerate(zip(out.indices, case["bits_per_scale"], strict=True)):
            assert torch.equal(ours, ref.reshape(ours.shape).to(ours.dtype)), f"{name}: bits of scale {si}"
        for si, (ours, ref) in enumerate(zip(out.guided_logits, case["logits_per_scale"], strict=True)):
            assert _max_diff(ours, ref) <= _logit_tolerance(case), f"{name}: logits of scale {si}"
        assert _max_diff(out.f_hat.squeeze(2), case["summed_codes"]) <= TOLERANCE["vae"], name
        if "image_float" in case:
            assert _max_diff(out.images, (case["image_float"] + 1) / 2) <= TOLERANCE["image"], name
