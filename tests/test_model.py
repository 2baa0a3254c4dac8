import pytest
import torch
from conftest import make_tiny_pair

from var.models.kv_cache import KVCache
from var.models.var import build_var
from var.sample.logits import SamplingSettings
from var.sample.scale import DecodeState, ScaleRunner, VARSampler


def _teacher_logits(vqvae, model, labels, indices):
    teacher = vqvae.quantize.teacher_forcing_input(indices)
    return model(labels, teacher)


@pytest.mark.parametrize("variant", [{}, {"shared_aln": True}, {"attn_l2_norm": False}])
def test_kv_cached_decoding_equals_teacher_forcing(variant):
    """The scale loop (KV cache, one scale per pass) computes the same logits as the masked full pass."""
    vqvae, model = make_tiny_pair(**variant)
    labels = torch.tensor([0, 2])
    sampler = VARSampler(model, vqvae, SamplingSettings(cfg=0.0, top_k=0, top_p=0.0))
    with torch.no_grad():
        out = sampler.sample(labels, seed=3)
        teacher = _teacher_logits(vqvae, model, labels, out.indices)
        state = sampler.begin(labels)
        runner = ScaleRunner(model, state)
        for si in range(model.config.num_scales):
            logits = runner.logits_for(state, si)[:2]  # conditional half
            begin, end = model.config.scale_bounds[si]
            torch.testing.assert_close(logits, teacher[:, begin:end], atol=1e-5, rtol=1e-5)
            pn = model.config.patch_nums[si]
            sampler.advance(state, si, vqvae.quantize.lookup(out.indices[si], pn))


def test_prefill_in_one_block_causal_pass_equals_step_by_step():
    vqvae, model = make_tiny_pair()
    sampler = VARSampler(model, vqvae, SamplingSettings(top_k=0, top_p=0.0))
    with torch.no_grad():
        out = sampler.sample([1, 0, 2], seed=5)
        state = sampler.begin([1, 0, 2])
        for si, pn in enumerate(model.config.patch_nums):
            sampler.advance(state, si, vqvae.quantize.lookup(out.indices[si], pn))
        stepwise = ScaleRunner(model, state)
        step_logits = [stepwise.logits_for(state, si) for si in range(3)]
        joined = ScaleRunner(model, state)
        prefill_logits = joined.logits_for(state, 2)  # scales 0..2 in one pass
        assert state.passes == 4
        torch.testing.assert_close(prefill_logits, step_logits[2], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(joined.logits_for(state, 3), stepwise.logits_for(state, 3), atol=1e-5, rtol=1e-5)


def test_last_scale_is_not_cached():
    vqvae, model = make_tiny_pair()
    sampler = VARSampler(model, vqvae)
    out = sampler.sample([0, 1], seed=0)
    cfg = model.config
    rows, heads, head_dim = 4, cfg.num_heads, cfg.width // cfg.num_heads
    cached = cfg.seq_len - cfg.tokens_per_scale[-1]
    assert out.stats["kv_bytes"] == 2 * cfg.depth * rows * heads * cached * head_dim * 4


def test_kv_cache_accounting_and_rollback():
    cache = KVCache(num_layers=2, capacity=10)
    k = torch.randn(2, 3, 4, 5)
    for layer in range(2):
        keys, values = cache.update(layer, k, k.double())
        assert keys.dtype == torch.float64  # keys are stored in the compute dtype of the values
    assert cache.length == 4
    assert cache.used_bytes() == 2 * 2 * (2 * 3 * 4 * 5 * 8)
    assert cache.allocated_bytes() == 2 * 2 * (2 * 3 * 10 * 5 * 8)
    cache.truncate(1)
    assert cache.lengths == [1, 1]
    with pytest.raises(RuntimeError, match="holds 10 tokens"):
        cache.update(0, torch.randn(2, 3, 10, 5), torch.randn(2, 3, 10, 5))


def test_labels_out_of_range_are_rejected():
    vqvae, model = make_tiny_pair()
    sampler = VARSampler(model, vqvae)
    with pytest.raises(ValueError, match="label 3 is out of range: this model has 3 classes"):
        sampler.sample([0, 3])
    with pytest.raises(ValueError, match="out of range"):
        model(torch.tensor([7]), torch.zeros(1, model.config.seq_len - 1, 4))
    assert sampler.sample(-1, batch_size=2, seed=0).images.shape[0] == 2  # -1 = unconditional


def test_official_size_rule():
    with torch.device("meta"):  # sizes only: no memory, no initialisation cost
        model = build_var(depth=16)
    assert model.num_params() == 310_283_520  # spec_var.md table, d16
    assert model.config.width == 1024 and model.config.num_heads == 16


def test_label_dropout_only_in_training():
    vqvae, model = make_tiny_pair(drop_path_rate=0.0)
    model.config.cond_drop_rate = 1.0
    teacher = torch.zeros(2, model.config.seq_len - 1, 4)
    labels = torch.tensor([0, 1])
    with torch.no_grad():
        eval_logits = model(labels, teacher)
        model.train()
        dropped = model(labels, teacher)
        null = model.eval()(torch.tensor([3, 3]), teacher)
    assert not torch.allclose(eval_logits, dropped)
    torch.testing.assert_close(dropped, null)


def test_decode_state_is_model_independent():
    state = DecodeState(conditions=torch.tensor([0]), batch_size=1, f_hat=torch.zeros(1, 4, 4, 4))
    assert state.scales_done == 0 and state.batch_size == 1
