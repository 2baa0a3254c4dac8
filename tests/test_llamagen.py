"""The LlamaGen GPT and VQ tokenizer (var/models/llamagen.py, var/tokenizers/llamagen_vq.py): official layouts
at real size, the cached forward the samplers use, conditions, RoPE, grouped-query attention."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from conftest import SHARED, needs_shared

from var.models.kv_cache import KVCache
from var.models.llamagen import (
    LLAMAGEN_SIZES,
    LlamaGen,
    LlamaGenConfig,
    attention_mask,
    llamagen_config,
    rope_2d,
)
from var.sample.speculative.ragged_cache import RaggedKVCache
from var.tokenizers.llamagen_vq import LLAMAGEN_VQ_SIZES, LlamaGenVQ, LlamaGenVQConfig

REFERENCE = SHARED / "reference"


def tiny_llamagen(model_type: str = "c2i", seed: int = 0, **overrides) -> LlamaGen:
    """A 2-layer LlamaGen with large random weights (the official init zeroes the head: uniform logits)."""
    base = dict(dim=32, n_layer=2, n_head=2, vocab_size=16, block_size=16, model_type=model_type)
    base.update(num_classes=3) if model_type == "c2i" else base.update(cls_token_num=4, caption_dim=8)
    base.update(overrides)
    torch.manual_seed(seed)
    model = LlamaGen(LlamaGenConfig(**base))
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.3) if param.ndim > 1 else param.uniform_(0.8, 1.2)
    return model.eval()


def tiny_condition(model: LlamaGen, batch: int, seed: int = 1) -> torch.Tensor:
    cfg = model.config
    generator = torch.Generator().manual_seed(seed)
    if cfg.model_type == "c2i":
        return torch.randint(cfg.num_classes + 1, (batch,), generator=generator)
    return torch.randn(batch, cfg.cls_token_num, cfg.caption_dim, generator=generator)


def read_key_file(name: str) -> tuple[list[tuple[str, tuple[int, ...], str]], dict[str, int]]:
    """(key, shape, param|buffer) rows in state_dict order and the totals of the header."""
    rows, totals = [], {}
    for line in (REFERENCE / name).read_text().splitlines():
        if line.startswith("# total"):  # "# total entries=88, total numel=110888448, params numel=110888448"
            totals = {m[0]: int(m[1]) for m in re.findall(r"(\w+) numel=(\d+)", line)}
        elif line and not line.startswith("#"):
            key, shape, _, kind, _ = line.split("  ")
            rows.append((key, tuple(int(s) for s in shape.strip("[]").split(", ")), kind))
    return rows, totals


def layout(module: torch.nn.Module) -> list[tuple[str, tuple[int, ...], str]]:
    params = {name for name, _ in module.named_parameters()}
    return [(k, tuple(v.shape), "param" if k in params else "buffer") for k, v in module.state_dict().items()]


# -- sizes and layouts --------------------------------------------------------------------------------
@pytest.mark.parametrize("dim, hidden", [(64, 256), (96, 256), (128, 512), (768, 2048), (1024, 2816), (3200, 8704)])
def test_ffn_hidden_rule(dim, hidden):
    assert LlamaGenConfig(dim=dim, n_layer=1, n_head=dim // 32).ffn_hidden == hidden


def test_named_sizes_match_the_released_parameter_counts():
    expected = {"GPT-B": 111e6, "GPT-L": 343e6, "GPT-XL": 775e6, "GPT-XXL": 1.4e9, "GPT-XXXL": 3.9e9,
                "GPT-1B": 1.2e9, "GPT-3B": 3.1e9, "GPT-7B": 6.6e9}
    assert set(expected) == set(LLAMAGEN_SIZES)
    for name, params in expected.items():
        with torch.device("meta"):
            model = LlamaGen(llamagen_config(name, vocab_size=16384, num_classes=1000))
        assert abs(model.num_params() / params - 1) < 0.03, name


@needs_shared(REFERENCE)
@pytest.mark.parametrize("key_file, build", [
    ("llamagen_gpt_b_c2i_keys.txt", lambda: LlamaGen(llamagen_config("GPT-B", num_classes=1000))),
    ("llamagen_gpt_xl_t2i_keys.txt",
     lambda: LlamaGen(llamagen_config("GPT-XL", model_type="t2i", cls_token_num=120, block_size=1024))),
    ("llamagen_vq16_keys.txt", lambda: LlamaGenVQ(LlamaGenVQConfig(**LLAMAGEN_VQ_SIZES["VQ-16"]))),
])
def test_state_dict_layout_is_the_official_one(key_file, build):
    rows, totals = read_key_file(key_file)
    with torch.device("meta"):
        model = build()
    assert layout(model) == rows  # same keys, shapes, order, and which are buffers
    assert sum(v.numel() for v in model.state_dict().values()) == totals["total"]
    assert model.num_params() == totals["params"]


def test_config_rejects_impossible_shapes():
    with pytest.raises(ValueError, match="square"):
        LlamaGenConfig(dim=32, n_layer=1, n_head=2, block_size=20)
    with pytest.raises(ValueError, match="divisible by 4"):
        LlamaGenConfig(dim=36, n_layer=1, n_head=6)
    with pytest.raises(ValueError, match="cls_token_num=1"):
        LlamaGenConfig(dim=32, n_layer=1, n_head=2, cls_token_num=2)
    with pytest.raises(ValueError, match="unknown LlamaGen size"):
        llamagen_config("GPT-Q")


def test_official_init():
    torch.manual_seed(0)
    model = LlamaGen(llamagen_config("GPT-B", n_layer=1, vocab_size=512, num_classes=10))
    assert model.output.weight.abs().max() == 0
    assert abs(model.layers[0].attention.wqkv.weight.std().item() - 0.02) < 1e-3
    assert abs(model.tok_embeddings.weight.std().item() - 0.02) < 1e-3
    assert bool((model.norm.weight == 1).all())


# -- RoPE ------------------------------------------------------------------------------------------------
def test_rope_rows_columns_and_zero_condition_rotation():
    cfg = LlamaGenConfig(dim=64, n_layer=1, n_head=4, block_size=16, model_type="t2i", cls_token_num=3)
    cos, sin = rope_2d(torch.arange(cfg.seq_len), cfg)  # (S, 1, 8)
    assert cos.shape == (cfg.seq_len, 1, cfg.head_dim // 2)
    assert cos[:3].abs().max() == 0 and sin[:3].abs().max() == 0  # condition rows: zero, not identity
    freqs = 10000 ** (-torch.arange(4) * 2 / 8)  # hd/4 frequencies, exponent denominator hd/2
    token = 3 + 2 * 4 + 1  # image token 9 = row 2, col 1
    torch.testing.assert_close(sin[token, 0], torch.cat((2 * freqs, 1 * freqs)).sin())


# -- the cached forward ------------------------------------------------------------------------------
@pytest.mark.parametrize("model_type", ["c2i", "t2i"])
def test_cached_chunks_match_teacher_forcing(model_type):
    """Prefill, then chunks of 1..5 tokens at explicit positions (default absolute-position mask) on a KVCache."""
    model = tiny_llamagen(model_type)
    cfg, batch = model.config, 2
    cond = tiny_condition(model, batch)
    tokens = torch.randint(cfg.vocab_size, (batch, cfg.block_size))
    text_mask = None
    if model_type == "t2i":  # left-padded captions of 4 and 2 real tokens
        text_mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])
        cond = cond * text_mask.unsqueeze(-1)
    length, T = cfg.seq_len - 1, cfg.cls_token_num
    positions = torch.arange(length).expand(batch, -1)
    tf_mask = attention_mask(positions, length, text_mask) if text_mask is not None else None
    with torch.no_grad():
        expected = model(cond, tokens[:, :-1], tf_mask)
        cache = KVCache(cfg.n_layer, length)
        prefill_mask = attention_mask(positions[:, :T], T, text_mask) if text_mask is not None else None
        pieces, start = [model.prefill(cond, cache, prefill_mask)], 0
        for size in (1, 3, 5, 2, 4):
            pos = T + torch.arange(start, start + size).expand(batch, -1)
            mask = attention_mask(pos, T + start + size, text_mask) if text_mask is not None else None
            pieces.append(model.step(tokens[:, start: start + size], pos, cache, mask))
            start += size
    assert start == cfg.block_size - 1
    torch.testing.assert_close(torch.cat(pieces, dim=1), expected, atol=2e-5, rtol=0)


def test_ragged_windows_on_a_ragged_cache():
    """Rows at different positions in one call (SJD windows): RaggedKVCache's mask, rollback and rewrite."""
    model = tiny_llamagen("c2i")
    cfg, batch, window = model.config, 2, 3
    labels = tiny_condition(model, batch)
    tokens = torch.randint(cfg.vocab_size, (batch, cfg.block_size))
    with torch.no_grad():
        expected = model(labels, tokens[:, :-1])  # (B, 1 + L - 1, V): row j predicts token j
        cache = RaggedKVCache(cfg.n_layer, cfg.seq_len + window, batch)
        model.prefill(labels, cache, cache.open_window(1))  # the condition row at slot 0
        accepted = torch.tensor([0, 0])
        for advance in ([1, 3], [2, 1], [3, 2], [0, 3]):  # rows move by different counts; 0 = all rejected
            start = accepted.unsqueeze(1) + torch.arange(window)  # image positions of the window
            fed = tokens.gather(1, start.clamp(max=cfg.block_size - 1))
            logits = model.step(fed, 1 + start, cache, cache.open_window(window))  # (B, W, V)
            for row in range(batch):
                for offset in range(window):
                    position = int(start[row, offset])
                    if position < cfg.block_size - 1:
                        torch.testing.assert_close(logits[row, offset], expected[row, 1 + position], atol=2e-5, rtol=0)
            accepted = accepted + torch.tensor(advance)
            cache.truncate(1 + accepted)  # condition slot + accepted tokens


def test_grouped_query_attention_repeats_each_kv_head_for_its_group():
    grouped = tiny_llamagen("c2i", dim=64, n_head=4, n_kv_head=2)
    full = LlamaGen(LlamaGenConfig(**{**grouped.config.to_dict(), "n_kv_head": 4})).eval()
    state = grouped.state_dict()
    hd = grouped.config.head_dim
    for i in range(grouped.config.n_layer):
        q, k, v = state[f"layers.{i}.attention.wqkv.weight"].split([64, 2 * hd, 2 * hd])
        # head h uses kv head h // 2: repeat every kv head's rows twice in place
        k, v = (t.view(2, hd, 64).repeat_interleave(2, dim=0).reshape(4 * hd, 64) for t in (k, v))
        state[f"layers.{i}.attention.wqkv.weight"] = torch.cat((q, k, v))
    full.load_state_dict(state)
    labels, tokens = torch.tensor([0, 3]), torch.randint(16, (2, 15))
    with torch.no_grad():
        torch.testing.assert_close(grouped(labels, tokens), full(labels, tokens), atol=1e-5, rtol=0)
        cache = KVCache(2, 17)  # the cache holds the 2 kv heads only
        grouped.prefill(labels, cache)
        assert cache.keys[0].shape[1] == 2


def test_after_attention_hook_sees_scaled_queries_and_all_keys():
    model = tiny_llamagen("c2i")
    seen = []

    class Recording(KVCache):
        def after_attention(self, layer, queries, keys):
            seen.append((layer, queries.shape, keys.shape))

    with torch.no_grad():
        cache = Recording(2, 20)
        model.prefill(torch.tensor([1]), cache)
        model.step(torch.tensor([[3, 4]]), torch.tensor([[1, 2]]), cache)
    assert seen[-1] == (1, (1, 2, 2, 16), (1, 2, 3, 16))


# -- conditions and training ------------------------------------------------------------------------
def test_condition_checks_and_null_conditions():
    c2i, t2i = tiny_llamagen("c2i"), tiny_llamagen("t2i")
    with pytest.raises(ValueError, match="label 4 is out of range"):
        c2i.condition_rows(torch.tensor([0, 4]))
    with pytest.raises(ValueError, match=r"caption features \(B, 4, 8\)"):
        t2i.condition_rows(torch.zeros(2, 5, 8))
    assert c2i.null_condition(2).tolist() == [3, 3]
    null = t2i.null_condition(2)
    assert null.shape == (2, 4, 8) and torch.equal(null[1], t2i.cls_embedding.uncond_embedding)
    assert "cls_embedding.uncond_embedding" in t2i.state_dict()  # a buffer: saved, not trained
    assert all(p is not t2i.cls_embedding.uncond_embedding for p in t2i.parameters())


@pytest.mark.parametrize("model_type", ["c2i", "t2i"])
def test_training_drops_conditions_and_backpropagates(model_type):
    model = tiny_llamagen(model_type, class_dropout_prob=1.0)
    cond = tiny_condition(model, 3)
    model.train()
    torch.testing.assert_close(model.drop_condition(cond), model.null_condition(3).to(cond.dtype))
    model.config.class_dropout_prob = 0.0
    assert torch.equal(model.drop_condition(cond), cond)
    tokens = torch.randint(16, (3, 16))
    logits = model(cond, tokens[:, :-1])[:, model.config.cls_token_num - 1:]  # row T-1+j predicts token j
    loss = F.cross_entropy(logits.reshape(-1, 16), tokens.reshape(-1))
    loss.backward()
    assert model.layers[0].attention.wqkv.weight.grad.abs().sum() > 0


# -- VQ tokenizer ------------------------------------------------------------------------------------
def tiny_vq(seed: int = 0) -> LlamaGenVQ:
    torch.manual_seed(seed)
    cfg = LlamaGenVQConfig(codebook_size=32, codebook_embed_dim=4, encoder_ch_mult=(1, 2), decoder_ch_mult=(1, 2),
                           z_channels=8, ch=8, num_res_blocks=1, norm_groups=4)
    return LlamaGenVQ(cfg).eval()


def test_vq_round_trip_and_nearest_normalised_code():
    vq = tiny_vq()
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        latent = vq.encode_latent(images)
        quant, tokens = vq.encode(images)
        assert latent.shape == (2, 4, 8, 8) and tokens.shape == (2, 64) and tokens.dtype == torch.long
        # the nearest code by cosine similarity (both sides l2-normalised), raster order
        codebook = F.normalize(vq.quantize.embedding.weight, dim=-1)
        similarity = F.normalize(latent.permute(0, 2, 3, 1), dim=-1) @ codebook.T
        assert torch.equal(tokens, similarity.argmax(-1).view(2, 64))
        torch.testing.assert_close(vq.tokens_to_latent(tokens), quant, atol=1e-6, rtol=0)
        torch.testing.assert_close(vq.decode_code(tokens.flatten(), [2, 4, 8, 8]), vq.decode(quant), atol=1e-5, rtol=0)
        images_out = vq.decode_tokens(tokens)
    assert images_out.shape == (2, 3, 16, 16) and images_out.min() >= -1 and images_out.max() <= 1
    with pytest.raises(ValueError, match="multiple of the downsampling factor 2"):
        vq.encode_latent(torch.zeros(1, 3, 15, 16))
    with pytest.raises(ValueError, match="raster token maps"):
        vq.tokens_to_latent(torch.zeros(1, 10, dtype=torch.long))
