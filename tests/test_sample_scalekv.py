import json

import pytest
import torch
from conftest import make_tiny_pair

from var.checkpoints import save_model
from var.cli import main
from var.models.kv_cache import KVCache, OfficialLayoutKVCache
from var.sample.kv import OfficialLayoutKVPolicy
from var.sample.logits import SamplingSettings
from var.sample.registry import build_sampler
from var.sample.scale import VARSampler
from var.sample.scalekv.budget import KVBudget, window_offsets
from var.sample.scalekv.cache import ScaleKVCache, ScaleKVPolicy
from var.sample.scalekv.calibrate import SelectivityRecorder

PATCH_NUMS = (1, 2, 3, 4, 5, 6)
SETTINGS = SamplingSettings(cfg=2.0, top_k=0, top_p=0.0)
LABELS = [0, 2, 1]


def _same_samples(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.indices, b.indices, strict=True)) and torch.equal(a.images, b.images)


@pytest.fixture(scope="module")
def pair():
    return make_tiny_pair(patch_nums=PATCH_NUMS)


@pytest.fixture(scope="module")
def base(pair):
    vqvae, model = pair
    return VARSampler(model, vqvae, SETTINGS).sample(LABELS, seed=3)


@pytest.mark.parametrize("options", [{}, {"kv_scoring": "max-pool", "kv_share_cfg": True}])
def test_full_budget_is_exactly_plain_sampling(pair, base, options):
    vqvae, model = pair
    out = build_sampler("scalekv", model, vqvae, SETTINGS, kv_budget=1.0, **options).sample(LABELS, seed=3)
    assert _same_samples(out, base)
    assert out.stats["kv_bytes"] == base.stats["kv_bytes"]


def test_code_with_kv_budget_at_full_budget_with_the_drafter_as_refiner_is_plain_sampling(pair, base):
    vqvae, model = pair
    sampler = build_sampler("code", model, vqvae, SETTINGS, refiner=model, draft_steps=3, kv_budget=1.0)
    assert _same_samples(sampler.sample(LABELS, seed=3), base)


def test_exact_savings_default_is_bit_identical_to_the_official_layout(pair):
    """Keys in the compute dtype and the last scale uncached: same samples under autocast, fewer bytes."""
    vqvae, model = pair
    cfg = model.config
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = VARSampler(model, vqvae, SETTINGS).sample(LABELS, seed=1)
        official = VARSampler(model, vqvae, SETTINGS, kv_policy=OfficialLayoutKVPolicy()).sample(LABELS, seed=1)
    assert _same_samples(ours, official)
    rows = 2 * len(LABELS)
    per_token = 2 * cfg.depth * rows * cfg.width * 2  # keys + values of every layer, bf16
    assert ours.stats["kv_bytes"] == per_token * (cfg.seq_len - cfg.tokens_per_scale[-1])
    assert official.stats["kv_bytes"] == per_token * cfg.seq_len
    # where the keys come out in float32 (CUDA autocast), the official layout keeps them so: 12 vs 16 bytes
    k, v = torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5, dtype=torch.bfloat16)
    ours_cache, official_cache = KVCache(1, 4), OfficialLayoutKVCache(1, 4)
    keys, _ = ours_cache.update(0, k, v)
    official_keys, _ = official_cache.update(0, k, v)
    assert torch.equal(keys, official_keys.to(v.dtype))  # what attention sees after its cast
    assert (ours_cache.allocated_bytes(), official_cache.allocated_bytes()) == (2 * 120 * 2, 120 * (4 + 2))


def test_small_budget_holds_fewer_bytes_and_keeps_sink_window_and_current_scale(pair):
    vqvae, model = pair
    cfg = model.config
    policy = ScaleKVPolicy(0.1)
    budget = policy.budget_for(model)
    seen = []  # (layer, scale, keys attended, keys before, kept positions)

    class Watched(ScaleKVCache):
        def after_attention(self, layer, queries, keys):
            before = keys.clone()
            seen.append([layer, self.scale_index, keys.shape[2], before, None])
            super().after_attention(layer, queries, keys)
            if self.persist and self.lengths[layer] < keys.shape[2]:
                seen[-1][4] = self.keys[layer][:, :, : self.lengths[layer]].clone()

    policy.make_cache = lambda m, rows, start=0, stop=None: Watched(budget, budget.capacities(start, stop or 6))
    out = VARSampler(model, vqvae, SETTINGS, kv_policy=policy).sample(LABELS, seed=3)
    full = VARSampler(model, vqvae, SETTINGS).sample(LABELS, seed=3)
    token_bytes = 2 * 2 * len(LABELS) * cfg.width * 4  # keys + values of both CFG halves, float32
    assert out.stats["kv_bytes"] == sum(budget.capacities(0, cfg.num_scales)) * token_bytes
    assert out.stats["kv_bytes_held"] == sum(budget.history[-1]) * token_bytes
    assert out.stats["kv_bytes"] < full.stats["kv_bytes"] / 2
    compressed = 0
    for layer, si, attended, before, kept in seen:
        # every layer attends to its whole current scale on top of its budgeted history
        assert attended == budget.history[si][layer] + cfg.tokens_per_scale[si]
        if kept is None:
            continue
        compressed += 1
        assert kept.shape[2] == budget.history[si + 1][layer]
        side = cfg.patch_nums[si]
        window = [attended - side * side + offset for offset in window_offsets(side)]
        for position in [0] + window:  # the SOS sink and the observation window survive, in order
            token = before[:, :, position: position + 1]
            assert (kept == token).all(dim=-1).any(dim=2).all()
    assert compressed > 0


def test_selection_follows_the_window_queries_attention():
    """A history key the window attends to strongly is kept; per (row, head); shared over CFG halves."""
    budget = KVBudget.uniform(make_tiny_pair(patch_nums=PATCH_NUMS)[1].config, 0.1)
    cache = ScaleKVCache(budget, [64, 64], pool_kernel=1)
    cache.begin_pass(4)  # after the 5x5 scale: 14 history tokens + 25 current ones
    rows, heads, dim = 2, 2, 8
    keys = torch.zeros(rows, heads, 14 + 25, dim)
    keys[..., 1:14, :] = -1.0  # history keys the queries avoid ...
    keys[0, 0, 7, :], keys[1, 1, 9, :] = 1.0, 1.0  # ... except one per (row, head)
    queries = torch.ones(rows, heads, 25, dim)
    kept = cache.select(queries, keys, 18)  # SOS + 16 window tokens + one chosen
    window = [14 + offset for offset in window_offsets(5)]
    assert kept[0, 0].tolist() == sorted([0, 7] + window)
    assert kept[1, 1].tolist() == sorted([0, 9] + window)
    cache.share_cfg_choice = True
    shared = cache.select(queries, keys, 18)
    assert torch.equal(shared[1], shared[0])


def test_selectivity_index_of_uniform_attention():
    """Zero queries attend uniformly: current mass n/L, top-K' history mass K'/L."""
    totals = {}
    recorder = SelectivityRecorder(1, 30, [1, 4, 9, 16], history_top_k=3, totals=totals)
    recorder.begin_pass(2)
    recorder.after_attention(0, torch.zeros(2, 2, 9, 4), torch.randn(2, 2, 14, 4))
    current, top, count = totals[(0, 2)]
    assert count == 2 * 2 * 9
    assert current / count == pytest.approx(9 / 14) and top / count == pytest.approx(3 / 14)


def test_budget_allocation_and_json_round_trip(pair, tmp_path):
    _, model = pair
    cfg = model.config  # depth 2
    selectivity = [None] + [[0.5, 0.1]] * (cfg.num_scales - 1)  # layer 1 disperses its attention more
    budget = KVBudget.from_selectivity(cfg, selectivity, fraction=0.6, drafter_fraction=0.5)
    budget.check(cfg)
    per_layer = budget.tokens_per_layer
    assert per_layer == 33  # 0.6 of the 55-token prefix of the last scale
    for k in range(1, cfg.num_scales):
        if cfg.scale_bounds[k - 1][1] > per_layer:  # compressed scales: the low-ASI layer drafts, keeps more
            assert budget.drafters[k] == [1]
            assert budget.history[k][1] > budget.history[k][0]
        else:
            assert budget.history[k] == [cfg.scale_bounds[k - 1][1]] * cfg.depth
    # the buffers (each layer's largest share) together hold the budget, which the scales use up to
    assert sum(budget.capacities(0, cfg.num_scales)) == per_layer * cfg.depth
    path = tmp_path / "budget.json"
    budget.save(path)
    assert KVBudget.load(path) == budget
    assert set(json.loads(path.read_text())["scales"]) == {f"{pn}x{pn}" for pn in PATCH_NUMS}
    # a uniform budget of 1.0 compresses nothing; wrong shapes and bad files fail with a clear line
    assert KVBudget.uniform(cfg, 1.0).capacities(0, cfg.num_scales) == [cfg.scale_bounds[-1][0]] * cfg.depth
    _, deeper = make_tiny_pair(depth=3, patch_nums=PATCH_NUMS)
    with pytest.raises(ValueError, match="budget is for 2 layers .* the model has 3 layers"):
        VARSampler(deeper, pair[0], kv_budget=budget)
    path.write_text('{"format": "something else"}')
    with pytest.raises(ValueError, match="is not a KV budget"):
        KVBudget.load(path)
    with pytest.raises(ValueError, match="fraction of the cache in .0, 1."):
        ScaleKVPolicy(1.5)


def test_code_with_kv_budget_compresses_both_phases(pair):
    vqvae, model = pair
    _, refiner = make_tiny_pair(5, depth=1, width=16, num_heads=1, patch_nums=PATCH_NUMS)
    code = build_sampler("code", model, vqvae, SETTINGS, refiner=refiner, draft_steps=4).sample(LABELS, seed=0)
    both = build_sampler("code", model, vqvae, SETTINGS, refiner=refiner, draft_steps=4,
                         kv_budget=0.1).sample(LABELS, seed=0)
    assert both.stats["kv_bytes_refiner"] < code.stats["kv_bytes_refiner"]
    assert all(torch.equal(a, b) for a, b in zip(both.indices[:3], code.indices[:3], strict=True))


def test_calibrate_kv_command_end_to_end(pair, tmp_path, capsys):
    vqvae, model = pair
    save_model(vqvae, tmp_path)
    save_model(model, tmp_path)
    budget_path = tmp_path / "kv" / "budget.json"
    main(["calibrate-kv", "--ckpt", str(tmp_path), "--kv-budget", "0.6", "--drafter-fraction", "0.5",
          "--batch-size", "2", "--out", str(budget_path)])
    assert "wrote" in capsys.readouterr().out
    budget = KVBudget.load(budget_path)
    budget.check(model.config)
    assert budget.fraction == 0.6 and any(budget.drafters)
    values = [v for row in budget.selectivity[1:] for v in row]
    assert len(values) == model.config.depth * (len(PATCH_NUMS) - 1) and all(0 < v <= 1 for v in values)
    out = tmp_path / "grid.png"
    main(["sample", "--ckpt", str(tmp_path), "--sampler", "scalekv", "--kv-budget", str(budget_path),
          "--labels", "0", "1", "--out", str(out)])
    assert out.is_file()
    with pytest.raises(SystemExit, match="not found; write one with 'var calibrate-kv'"):
        main(["sample", "--ckpt", str(tmp_path), "--sampler", "scalekv", "--kv-budget",
              str(tmp_path / "missing.json"), "--labels", "0", "--out", str(out)])


def test_smaller_window_lets_small_models_keep_fewer_tokens(pair):
    vqvae, model = pair
    wide = build_sampler("scalekv", model, vqvae, SETTINGS, kv_budget=0.1).sample(LABELS, seed=0)
    narrow = build_sampler("scalekv", model, vqvae, SETTINGS, kv_budget=0.1, kv_window=2).sample(LABELS, seed=0)
    budget = KVBudget.uniform(model.config, 0.1, window_side=2)
    assert budget.history[-1] == [5] * model.config.depth  # 10% of the 55-token prefix: SOS + 2x2 window
    assert KVBudget.uniform(model.config, 0.1).history[-1] == [17] * model.config.depth  # SOS + 4x4 window
    assert narrow.stats["kv_bytes_held"] < wide.stats["kv_bytes_held"]


@pytest.mark.parametrize("fraction", [0.05, 0.1, 0.2, 0.6])
def test_budget_is_at_most_that_fraction_of_the_full_cache_bytes_per_runner(pair, fraction, capsys):
    """--kv-budget B: every runner's buffers hold at most B of its full cache's bytes, or the run says why."""
    vqvae, model = pair
    cfg = model.config
    full = VARSampler(model, vqvae, SETTINGS).sample(LABELS, seed=0).stats["kv_bytes"]
    out = build_sampler("scalekv", model, vqvae, SETTINGS, kv_budget=fraction, kv_window=1).sample(LABELS, seed=0)
    assert out.stats["kv_bytes"] <= fraction * full
    assert out.stats["kv_fraction"] == pytest.approx(out.stats["kv_bytes"] / full)
    assert out.stats["kv_budget"] == fraction
    # roles that alternate between scales must not add up each layer's largest share
    alternating = [[] if k == 0 else [k % cfg.depth] for k in range(cfg.num_scales)]
    budget = KVBudget.from_roles(cfg, fraction, alternating, window_side=1)
    budget.check(cfg)
    assert sum(budget.capacities(0, cfg.num_scales)) <= fraction * cfg.depth * cfg.scale_bounds[-1][0]
    # CoDe: each runner (the drafter's scales, the refiner's) is held to the budget of its own full cache
    _, refiner = make_tiny_pair(5, depth=1, width=16, num_heads=1, patch_nums=PATCH_NUMS)
    plain = build_sampler("code", model, vqvae, SETTINGS, refiner=refiner, draft_steps=4).sample(LABELS, seed=0)
    both = build_sampler("code", model, vqvae, SETTINGS, refiner=refiner, draft_steps=4, kv_budget=fraction,
                         kv_window=1).sample(LABELS, seed=0)
    err = capsys.readouterr().err
    for phase in ("drafter", "refiner"):  # the drafter's full cache is 14 tokens: 5 % or 10 % is below SOS + 1
        ratio = both.stats[f"kv_bytes_{phase}"] / plain.stats[f"kv_bytes_{phase}"]
        assert ratio == pytest.approx(both.stats[f"kv_fraction_{phase}"])
        assert ratio <= fraction or (fraction * 14 < 2 and "cannot be met" in err)


def test_a_budget_below_the_window_floor_says_so(pair, capsys):
    vqvae, model = pair
    out = build_sampler("scalekv", model, vqvae, SETTINGS, kv_budget=0.05).sample(LABELS, seed=0)
    assert out.stats["kv_fraction"] > 0.05
    err = capsys.readouterr().err
    assert err.count("warning: KV budget 0.05 cannot be met") == 1 and f"{out.stats['kv_fraction']:.3f}" in err


def test_a_capped_drafter_leaves_its_surplus_to_the_refiners(pair):
    """A layer that drafts at one scale only is capped by the water-filling of the buffers; what the cap takes
    from it goes to the other layers, so every compressed scale still keeps the whole budget."""
    cfg = pair[1].config
    drafters = [[0] if k == 3 else [] for k in range(cfg.num_scales)]
    budget = KVBudget.from_roles(cfg, 0.2, drafters, window_side=1)
    budget.check(cfg)
    total = budget.tokens_per_layer * cfg.depth
    assert sum(budget.capacities(0, cfg.num_scales)) <= total
    for k in range(1, cfg.num_scales):
        available = [held + cfg.tokens_per_scale[k - 1] for held in budget.history[k - 1]]
        if max(available) > budget.tokens_per_layer:  # a compressed scale
            assert sum(budget.history[k]) == total, (k, budget.history)
