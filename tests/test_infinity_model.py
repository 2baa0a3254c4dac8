import pytest
import torch
from infinity_tiny import TINY_SCHEDULE, random_text, tiny_infinity

from var.models.infinity import (
    INFINITY_SIZES,
    Infinity,
    InfinityConfig,
    PackedText,
    bit_logits,
    build_infinity,
)
from var.models.kv_cache import KVCache

LENS = [3, 5]


def _inputs(batch: int = 2, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, TINY_SCHEDULE.length - 1, 4, generator=generator) * 0.5


def _scale_inputs(inputs: torch.Tensor, si: int) -> torch.Tensor | None:
    begin, end = TINY_SCHEDULE.bounds[si]
    return None if si == 0 else inputs[:, begin - 1: end - 1]


@pytest.mark.parametrize("bf16", [False, True])
def test_cached_scale_by_scale_forward_equals_teacher_forcing(bf16):
    model = tiny_infinity(cross_attn_bf16=bf16)
    text, inputs = random_text(LENS), _inputs()
    with torch.no_grad():
        teacher = model(text, inputs, TINY_SCHEDULE)  # (B, L, 2d)
        cond = model.condition(text)
        cache = KVCache(model.config.depth, TINY_SCHEDULE.length)
        for si in range(TINY_SCHEDULE.num_scales):
            cache.begin_pass(si)
            hidden = model.forward_scales(cond, si, inputs=_scale_inputs(inputs, si), schedule=TINY_SCHEDULE,
                                          cache=cache)
            begin, end = TINY_SCHEDULE.bounds[si]
            # bf16 rounding of cross-attention can flip with the summation order of a different pass length
            torch.testing.assert_close(model.head_logits(hidden, cond), teacher[:, begin:end],
                                       atol=1e-2 if bf16 else 1e-5, rtol=0)


def test_prefill_pass_over_several_scales_then_cached_scale():
    model = tiny_infinity(cross_attn_bf16=False)
    text, inputs = random_text(LENS), _inputs()
    with torch.no_grad():
        cond = model.condition(text)
        teacher = model.forward_scales(cond, 0, 2, inputs=inputs, schedule=TINY_SCHEDULE)
        cache = KVCache(model.config.depth, TINY_SCHEDULE.length)
        cache.begin_pass(1)
        prefill = model.forward_scales(cond, 0, 1, inputs=inputs[:, :4], schedule=TINY_SCHEDULE, cache=cache)
        cache.begin_pass(2, persist=False)
        last = model.forward_scales(cond, 2, inputs=_scale_inputs(inputs, 2), schedule=TINY_SCHEDULE, cache=cache)
    torch.testing.assert_close(torch.cat((prefill, last), 1), teacher, atol=1e-5, rtol=0)
    assert cache.length == 5  # the last scale was used, not stored


def test_cache_hook_sees_normalised_rotated_keys_of_all_visible_tokens():
    model = tiny_infinity()
    seen = []

    class Recording(KVCache):
        def after_attention(self, layer, queries, keys):
            seen.append((layer, queries.shape, keys.clone()))

    cache = Recording(model.config.depth, TINY_SCHEDULE.length)
    with torch.no_grad():
        cond = model.condition(random_text(LENS), guidance=True)
        for si in range(2):
            cache.begin_pass(si)
            model.forward_scales(cond, si, inputs=_scale_inputs(_inputs(), si), schedule=TINY_SCHEDULE, cache=cache)
    layer, query_shape, keys = seen[-1]
    assert layer == model.config.depth - 1
    assert query_shape == (4, 4, 4, 16)  # (2B rows, heads, this scale's tokens, head_dim)
    assert keys.shape == (4, 4, 5, 16)  # the cached scale 0 and this scale
    torch.testing.assert_close(keys.norm(dim=-1), torch.ones(4, 4, 5))  # l2-normalised, RoPE keeps the norm


def test_guidance_batch_and_empty_text():
    model = tiny_infinity()
    text = random_text(LENS)
    with torch.no_grad():
        guided = model.condition(text, guidance=True)
        cond, null = model.condition(text), model.condition(model.null_text_for(LENS))
        assert guided.rows == 4 and guided.batch_size == 2 and guided.guided and guided.lens == (3, 5, 3, 5)
        torch.testing.assert_close(guided.pooled, torch.cat((cond.pooled, null.pooled)))
        torch.testing.assert_close(guided.modulation, torch.cat((cond.modulation, null.modulation)))
        assert torch.equal(model.null_text_for([2]).features, model.null_text[:2])  # length kept
        negative = random_text([2, 4], seed=9)
        with_negative = model.condition(text, guidance=True, negative=negative)
        torch.testing.assert_close(with_negative.pooled[2:], model.condition(negative).pooled)
        # B rows of inputs are repeated for the unconditional half
        hidden = model.forward_scales(guided, 0, inputs=_scale_inputs(_inputs(), 1)[:, :0], schedule=TINY_SCHEDULE)
        assert hidden.shape == (4, 1, 64)
    with pytest.raises(ValueError, match="negative prompts"):
        model.condition(text, guidance=True, negative=random_text([2]))


def test_after_layer_callback_mixes_hidden_states():
    """CFG at a layer: the callback replaces the hidden state after the chosen block."""
    model = tiny_infinity()
    calls = []

    def mix_last(layer, x):
        calls.append(layer)
        if layer != model.config.depth - 1:
            return x
        mixed = 3.0 * x[:2] - 2.0 * x[2:]
        return torch.cat((mixed, mixed))

    with torch.no_grad():
        cond = model.condition(random_text(LENS), guidance=True)
        plain = model.forward_scales(cond, 0, schedule=TINY_SCHEDULE)
        mixed = model.forward_scales(cond, 0, schedule=TINY_SCHEDULE, after_layer=mix_last)
    assert calls == list(range(model.config.depth))
    torch.testing.assert_close(mixed[:2], 3.0 * plain[:2] - 2.0 * plain[2:])
    assert model.head_logits(mixed[:2], cond).shape == (2, 1, 8)  # the head uses the conditional rows' pooled text


def test_bit_logits_layout():
    logits = torch.arange(2 * 3 * 8, dtype=torch.float32).view(2, 3, 8)  # d = 4 bits, 2 logits each
    bits = bit_logits(logits)
    assert bits.shape == (2, 12, 2)
    assert torch.equal(bits[1, 2 * 4 + 3], logits[1, 2, 6:8])  # token 2, bit 3


def test_text_dropout_only_in_training():
    model = tiny_infinity(cond_drop_rate=1.0, drop_path_rate=0.0)
    text, inputs = random_text(LENS), _inputs()
    with torch.no_grad():
        eval_logits = model(text, inputs, TINY_SCHEDULE)
        torch.testing.assert_close(eval_logits, model(text, inputs, TINY_SCHEDULE))
        model.train()
        dropped = model(text, inputs, TINY_SCHEDULE)
        model.eval()
        torch.testing.assert_close(dropped, model(model.null_text_for(LENS), inputs, TINY_SCHEDULE))
    assert not torch.allclose(dropped, eval_logits)


def test_bf16_cross_attention_switch():
    model = tiny_infinity()
    text, inputs = random_text(LENS), _inputs()
    with torch.no_grad():
        emulated = model(text, inputs, TINY_SCHEDULE)
        model.set_cross_attention_bf16(False)
        full = model(text, inputs, TINY_SCHEDULE)
    difference = (emulated - full).abs().max().item()
    assert 0 < difference < 0.1


def test_bad_inputs_are_named():
    model = tiny_infinity()
    with pytest.raises(ValueError, match="text_maxlen"):
        model.condition(random_text([9]), guidance=True)
    with pytest.raises(ValueError, match="channels"):
        model.condition(random_text([2], channels=8))
    with pytest.raises(ValueError, match="tokens"):
        model.forward_scales(model.condition(random_text([2])), 1, inputs=torch.zeros(1, 3, 4),
                             schedule=TINY_SCHEDULE)
    with pytest.raises(ValueError, match="sum"):
        PackedText(torch.zeros(4, 16), (2, 3))
    with pytest.raises(ValueError, match="divisible by 4"):
        InfinityConfig(width=36, num_heads=2)
    with pytest.raises(ValueError, match="FFN width"):
        InfinityConfig(width=32, num_heads=2, text_pool_heads=2)


def test_packed_text_from_padded_and_official_tuple():
    text = random_text(LENS)
    padded = torch.zeros(2, 5, 16)
    padded[0, :3], padded[1] = text.features[:3], text.features[3:]
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    again = PackedText.from_padded(padded, mask)
    assert again.lens == (3, 5) and torch.equal(again.features, text.features)
    official = PackedText.coerce((text.features, [3, 5], torch.tensor([0, 3, 8], dtype=torch.int32), 5))
    assert official.lens == (3, 5) and torch.equal(official.features, text.features)
    with pytest.raises(TypeError, match="official"):
        PackedText.coerce(text.features)


def test_size_registry_and_official_init():
    with torch.device("meta"):
        two_b = Infinity(InfinityConfig(**INFINITY_SIZES["infinity_2b"]))
    assert two_b.num_params() == 2_204_564_032
    assert two_b.config.ffn_hidden == 8192 and two_b.config.text_pool_heads == 16
    assert InfinityConfig(**INFINITY_SIZES["infinity_layer32"]).ffn_hidden == 8192  # 32.5 rounds to even
    model = build_infinity("infinity_layer12", depth=1, text_channels=128, text_maxlen=4)
    gates = torch.stack([block.modulation_offset[0, 0, :2].abs().max() for block in model.blocks])
    assert gates.max() < 1e-2  # official AdaLN gate init 1e-3 * randn / sqrt(C)
    assert model.head.bias.abs().max() == 0
    with pytest.raises(ValueError, match="unknown Infinity size"):
        build_infinity("infinity_3b")
