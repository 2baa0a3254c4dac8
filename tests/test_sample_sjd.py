"""Speculative samplers: exact in distribution, equal to plain sampling under shared Gumbel noise.

The exactness tests draw 100k samples from a tiny model with a 4-code vocabulary (one batch: the model is
cheap, the batch is the cost) and compare their histogram with the exact joint law, enumerated by
teacher-forced passes over every context, with a chi-square test.  The runs are seeded, so CI is
deterministic; a correct sampler would fail a fresh seed with probability ALPHA.  Deliberately broken
variants, made by patching one step of the real code path, must fail the same test with p < 1e-6; a
quarter of the samples is plenty for that (at 100k their p-values underflow to 0 or sit below 1e-60),
which keeps the file fast.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import make_tiny_pair, tiny_llamagen
from scipy.stats import chisquare

from var.checkpoints import save_model
from var.cli import main
from var.models.var import VAR, VARConfig
from var.sample import speculative
from var.sample.logits import SamplingSettings, gumbel_max, gumbel_noise
from var.sample.raster import ARSampler
from var.sample.registry import build_sampler, model_name_for
from var.sample.scale import VARSampler
from var.sample.speculative.ragged_cache import RaggedKVCache
from var.sample.speculative.scales import ScaleSpeculativeSampler
from var.sample.speculative.sjd import SJDSampler
from var.tokenizers.vqvae import VQVAE, VQVAEConfig

NUM_SAMPLES = 100_000
BROKEN_SAMPLES = 25_000
CHUNK = 25_000  # rows per sampling call: big enough to amortise the passes, small enough to stay in cache
ALPHA = 1e-3  # family-wise level of the seeded exactness runs (Bonferroni over their statistics)
BROKEN = 1e-6  # a broken variant must be rejected at least this strongly
VOCAB = 4
SETTINGS = SamplingSettings(cfg=1.5, top_k=3, top_p=0.95, temperature=1.2)  # every processing step active
pytestmark = pytest.mark.usefixtures("one_thread")  # 25k-row batches of a tiny model: a second thread only waits


def tiny_tokenizer(patch_nums: tuple[int, ...]) -> VQVAE:
    """The smallest tokenizer that decodes (images are irrelevant here, decoding 100k of them is not)."""
    config = VQVAEConfig(vocab_size=VOCAB, z_channels=4, ch=2, ch_mult=(1,), num_res_blocks=0, norm_groups=1,
                         use_attn=False, use_mid_attn=False, patch_nums=patch_nums)
    return VQVAE(config).eval()


def sample_indices(sampler, num_samples: int, seed: int) -> tuple[list[torch.Tensor], dict]:
    """Token maps of ``num_samples`` samples of class 1, drawn in chunks (chunk i uses seed + i)."""
    outs = [sampler.sample(1, seed=seed + i, batch_size=min(CHUNK, num_samples - start))
            for i, start in enumerate(range(0, num_samples, CHUNK))]
    indices = [torch.cat(scale) for scale in zip(*(out.indices for out in outs), strict=True)]
    passes = sum(out.stats["passes_per_image"] * len(out.indices[0]) for out in outs) / num_samples
    return indices, {"passes_per_image": passes}


def chi_square_p(codes: torch.Tensor, exact: torch.Tensor) -> float:
    """Goodness of fit of sample cell indices ``codes`` to the cell probabilities ``exact``.

    Cells expected fewer than 5 times are pooled; a sample in a cell of probability 0 gives p = 0.
    """
    observed = torch.bincount(codes, minlength=len(exact)).double()
    expected = exact.double() / exact.double().sum() * len(codes)
    small = expected < 5
    observed = torch.cat((observed[~small], observed[small].sum().view(1)))
    expected = torch.cat((expected[~small], expected[small].sum().view(1)))
    if expected[-1] < 1e-9:
        if observed[-1] > 0:
            return 0.0
        observed, expected = observed[:-1], expected[:-1]
    return float(chisquare(observed.numpy(), expected.numpy()).pvalue)


# ------------------------------------------------------------------------------------------------------
# raster AR: side 2 (4 tokens), 4^4 = 256 outcomes
@pytest.fixture(scope="module")
def tiny_ar():
    model = tiny_llamagen(n_layer=2, n_head=1, dim=8, vocab_size=VOCAB, block_size=4)
    vqvae = tiny_tokenizer((1, 2))
    sequences = torch.tensor(list(itertools.product(range(VOCAB), repeat=4)))  # (256, 4)
    with torch.no_grad():
        labels = torch.ones(len(sequences), dtype=torch.long)
        fed = sequences[:, :-1]  # row j of the teacher-forced logits predicts token j (T = 1)
        logits = torch.cat((model(labels, fed), model(torch.full_like(labels, 3), fed)))
        probs = ARSampler(model, vqvae, SETTINGS).target_probs(logits)  # (256, 4, V)
    exact = probs.gather(-1, sequences.unsqueeze(-1)).squeeze(-1).prod(dim=1)
    return model, vqvae, exact


def ar_p_value(sampler, exact: torch.Tensor, num_samples: int = NUM_SAMPLES, seed: int = 0) -> float:
    indices, _ = sample_indices(sampler, num_samples, seed)
    codes = (indices[0] * VOCAB ** torch.arange(3, -1, -1)).sum(dim=1)
    return chi_square_p(codes, exact)


def test_ar_baseline_matches_exact_law(tiny_ar):
    model, vqvae, exact = tiny_ar
    assert abs(exact.sum().item() - 1) < 1e-5
    assert ar_p_value(ARSampler(model, vqvae, SETTINGS), exact) > ALPHA


def test_sjd_matches_exact_law_with_ragged_rows(tiny_ar):
    """Window 3 on 4 tokens: recycled drafts, one-hot guesses (above, left, random) and full acceptances."""
    model, vqvae, exact = tiny_ar
    sampler = SJDSampler(model, vqvae, SETTINGS, sjd_window=3, draft_init="above")
    assert ar_p_value(sampler, exact) > ALPHA


BROKEN_SJD = {
    "accept without ratio": ("acceptance_probability", lambda p, q: torch.ones_like(p)),
    "resample from p": ("residual_distribution", lambda p, q: p),
}


@pytest.mark.parametrize("variant", [*BROKEN_SJD, "advance by batch minimum"])
def test_sjd_broken_variants_are_detected(tiny_ar, monkeypatch, variant):
    model, vqvae, exact = tiny_ar
    sampler = SJDSampler(model, vqvae, SETTINGS, sjd_window=3, draft_init="random")
    if variant in BROKEN_SJD:
        monkeypatch.setattr(speculative, *BROKEN_SJD[variant])
    else:  # the reference code's batch > 1 bug: accepted tokens of faster rows are verified again
        monkeypatch.setattr(sampler, "rows_advance", lambda accepted: accepted.min().expand_as(accepted))
    p_value = ar_p_value(sampler, exact, BROKEN_SAMPLES)
    assert p_value < BROKEN, p_value


def test_sjd_greedy_equals_plain_greedy_in_fewer_passes():
    """With top-k 1 both samplers are deterministic: SJD must return the same tokens, in fewer passes."""
    model = tiny_llamagen(1, vocab_size=8)
    vqvae = VQVAE(VQVAEConfig(vocab_size=8, z_channels=4, ch=2, ch_mult=(1,), num_res_blocks=0, norm_groups=1,
                              use_attn=False, use_mid_attn=False, patch_nums=(1, 2, 4))).eval()
    greedy = SamplingSettings(cfg=2.0, top_k=1, top_p=0.0)
    plain = ARSampler(model, vqvae, greedy).sample([0, 1, 2, 0], seed=0)
    for draft_init in ("random", "left", "above"):
        fast = SJDSampler(model, vqvae, greedy, sjd_window=16, draft_init=draft_init).sample([0, 1, 2, 0], seed=5)
        assert torch.equal(fast.indices[0], plain.indices[0])
        assert fast.stats["passes_per_image"] < plain.stats["passes"] == 16
        torch.testing.assert_close(fast.images, plain.images)


def test_ragged_cache_windows_equal_teacher_forcing():
    """Rows at different lengths, each with its own window and rollback, see exactly their causal prefix."""
    model = tiny_llamagen(vocab_size=8, block_size=9)
    tokens, labels = torch.randint(0, 8, (3, 9)), torch.tensor([0, 1, 2])
    window, offsets = 3, torch.arange(3)
    with torch.no_grad():
        teacher = model(labels, tokens[:, :-1])  # row j predicts token j (T = 1)
        cond = model.condition(labels, guided=False)
        cache = RaggedKVCache(model.depth, capacity=9 + window, rows=3)
        lengths = torch.zeros(3, dtype=torch.long)
        for accepted in ([1, 3, 2], [2, 1, 3], [3, 2, 1]):
            accepted = torch.tensor(accepted).unsqueeze(1)
            positions = lengths.unsqueeze(1) + offsets  # (3, window)
            true_inputs = tokens.gather(1, (positions - 1).clamp(min=0))
            wrong_inputs = (true_inputs + 1) % 8  # rejected drafts
            fed = torch.where(offsets < accepted, true_inputs, wrong_inputs)
            hidden = model.forward_positions(cond, fed, positions, cache, cache.open_window(window))
            logits = model.logits(hidden, cond)
            correct = (offsets < accepted).unsqueeze(-1).expand_as(logits)  # outputs of all-true prefixes
            expected = teacher.gather(1, positions.unsqueeze(-1).expand(-1, -1, 8))
            torch.testing.assert_close(logits[correct], expected[correct], atol=1e-5, rtol=1e-5)
            assert not torch.allclose(logits[~correct], expected[~correct], atol=1e-3)
            lengths = lengths + accepted.squeeze(1)
            cache.truncate(lengths)  # roll every row back to its own accepted prefix
        assert cache.row_lengths.tolist() == lengths.tolist() == [6, 6, 6]


# ------------------------------------------------------------------------------------------------------
# scale-wise speculation: VAR with patch_nums (1, 2, 3); cells (r0, r1) = 4^5 and (r0, r1, r2[i]) = 4^6
SCALE_POSITIONS = (0, 4, 8)  # positions of the last scale whose joint law with (r0, r1) is tested


@pytest.fixture(scope="module")
def tiny_scale_var():
    torch.manual_seed(0)
    patch_nums = (1, 2, 3)
    model = VAR(VARConfig(depth=2, width=8, num_heads=1, mlp_ratio=1.0, vocab_size=VOCAB, z_channels=4,
                          num_classes=3, patch_nums=patch_nums, drop_path_rate=0.0))
    model.init_weights(init_adaln_gamma=0.5, init_head=1.0)
    model.eval()
    vqvae = tiny_tokenizer(patch_nums)
    contexts = torch.tensor(list(itertools.product(range(VOCAB), repeat=5)))  # (r0, r1): (1024, 5)
    plain = VARSampler(model, vqvae, SETTINGS)
    with torch.no_grad():
        last = torch.zeros(len(contexts), 9, dtype=torch.long)  # not an input of any scale
        teacher = vqvae.quantize.teacher_forcing_input([contexts[:, :1], contexts[:, 1:], last])
        labels = torch.ones(len(contexts), dtype=torch.long)
        logits = torch.cat((model(labels, teacher), model(torch.full_like(labels, 3), teacher)))
        state = plain.begin(labels)
        probs = [plain.processed_logits(state, si, logits[:, begin:end]).softmax(dim=-1)
                 for si, (begin, end) in enumerate(model.config.scale_bounds)]
    first_two = probs[0][:, 0].gather(1, contexts[:, :1]).squeeze(1)
    first_two = first_two * probs[1].gather(2, contexts[:, 1:, None]).squeeze(-1).prod(dim=1)  # (1024,)
    with_last = [(first_two.unsqueeze(1) * probs[2][:, i]).flatten() for i in SCALE_POSITIONS]  # (4096,) each
    return model, vqvae, first_two, with_last


def scale_p_values(
    sampler, first_two, with_last, num_samples: int = NUM_SAMPLES, seed: int = 0
) -> tuple[list[float], float]:
    """p-values of (r0, r1) and of (r0, r1, r2[i]) for each tested i; and the passes per image."""
    indices, stats = sample_indices(sampler, num_samples, seed)
    codes = indices[0][:, 0] * VOCAB**4 + (indices[1] * VOCAB ** torch.arange(3, -1, -1)).sum(dim=1)
    p_values = [chi_square_p(codes, first_two)]
    for i, exact in zip(SCALE_POSITIONS, with_last, strict=True):
        p_values.append(chi_square_p(codes * VOCAB + indices[2][:, i], exact))
    return p_values, stats["passes_per_image"]


def test_sjd_scale_matches_exact_law(tiny_scale_var):
    """Window 3 over 3 scales: guessed drafts, recycled stale drafts, ragged rows, bonus blocks."""
    model, vqvae, first_two, with_last = tiny_scale_var
    sampler = ScaleSpeculativeSampler(model, vqvae, SETTINGS, spec_scales=3, draft_source="recycle")
    p_values, passes = scale_p_values(sampler, first_two, with_last)
    assert min(p_values) > ALPHA / len(p_values), p_values
    assert passes < 3  # speculation merged scales


@pytest.mark.parametrize("variant", [*BROKEN_SJD, "rewind to batch minimum"])
def test_sjd_scale_broken_variants_are_detected(tiny_scale_var, monkeypatch, variant):
    model, vqvae, first_two, with_last = tiny_scale_var
    sampler = ScaleSpeculativeSampler(model, vqvae, SETTINGS, spec_scales=3, draft_source="recycle")
    if variant in BROKEN_SJD:
        monkeypatch.setattr(speculative, *BROKEN_SJD[variant])
    else:  # decided scales of faster rows are verified again
        monkeypatch.setattr(sampler, "rows_frontier", lambda decided: decided.min().expand_as(decided))
    p_values, _ = scale_p_values(sampler, first_two, with_last, BROKEN_SAMPLES)
    assert min(p_values) < BROKEN, p_values


# ------------------------------------------------------------------------------------------------------
# Gumbel mode
def test_gumbel_max_draws_from_the_processed_distribution():
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.0])
    draws = gumbel_max(probs.log(), gumbel_noise(seed=7, rows=NUM_SAMPLES, begin=3, count=1, vocab=5))
    assert chi_square_p(draws.flatten(), probs) > ALPHA
    assert not torch.equal(gumbel_noise(7, 2, 0, 3, 5), gumbel_noise(8, 2, 0, 3, 5))
    torch.testing.assert_close(gumbel_noise(7, 2, 0, 3, 5)[:, 1:], gumbel_noise(7, 2, 1, 2, 5), rtol=0, atol=0)


@pytest.mark.parametrize(("window", "draft_source"), [(2, "recycle"), (3, "recycle"), (4, "guess")])
def test_sjd_scale_gumbel_mode_equals_plain_gumbel_token_for_token(window, draft_source):
    torch.manual_seed(1)  # a model on which every setting below accepts some drafted scale
    patch_nums = (1, 2, 3, 4)
    model = VAR(VARConfig(depth=2, width=32, num_heads=2, vocab_size=16, z_channels=4, num_classes=3,
                          patch_nums=patch_nums, drop_path_rate=0.0))
    model.init_weights(init_adaln_gamma=0.5, init_head=1.0)
    model.eval()
    vqvae = VQVAE(VQVAEConfig(vocab_size=16, z_channels=4, ch=8, ch_mult=(1, 2), num_res_blocks=1, norm_groups=4,
                              patch_nums=patch_nums)).eval()
    settings = SamplingSettings(cfg=2.0, top_k=8, top_p=0.9, temperature=0.5)
    labels = [0, 1, 2, 0, 1, 2, 0, 1]
    plain = VARSampler(model, vqvae, settings, gumbel=True).sample(labels, seed=3)
    fast = ScaleSpeculativeSampler(model, vqvae, settings, spec_scales=window, spec_max_tokens=16,
                                   draft_source=draft_source, gumbel=True).sample(labels, seed=3)
    for plain_tokens, fast_tokens in zip(plain.indices, fast.indices, strict=True):
        assert torch.equal(plain_tokens, fast_tokens)
    torch.testing.assert_close(fast.images, plain.images)
    assert fast.stats["passes_per_image"] < plain.stats["passes"] == 4
    # the last scale's block is transient: sjd-scale's cache is exactly plain VAR's at the same batch
    assert 0 < fast.stats["kv_bytes"] <= plain.stats["kv_bytes"]
    other = VARSampler(model, vqvae, settings, gumbel=True).sample(labels, seed=4)
    assert not all(torch.equal(a, b) for a, b in zip(plain.indices, other.indices, strict=True))


def test_gumbel_mode_needs_a_seed(tiny_pair):
    vqvae, model = tiny_pair
    with pytest.raises(ValueError, match="needs a seed"):
        VARSampler(model, vqvae, gumbel=True).sample([0])


def test_small_block_policy_limits_passes(tiny_pair):
    vqvae, model = tiny_pair  # patch_nums (1, 2, 3, 4)
    sampler = ScaleSpeculativeSampler(model, vqvae, spec_scales=3, spec_max_tokens=9)
    assert [sampler.last_block(first) for first in range(4)] == [2, 2, 2, 3]
    assert ScaleSpeculativeSampler(model, vqvae, spec_scales=1).last_block(0) == 0


# ------------------------------------------------------------------------------------------------------
# entry points
def test_registry_builds_every_sampler_and_rejects_bad_options(tiny_pair):
    vqvae, model = tiny_pair
    ar = tiny_llamagen(n_layer=1)
    assert isinstance(build_sampler("sjd", ar, vqvae, sjd_window=4, draft_init="left"), SJDSampler)
    assert isinstance(build_sampler("sjd-scale", model, vqvae, spec_scales=2, gumbel=True), ScaleSpeculativeSampler)
    assert model_name_for("sjd") == "ar" and model_name_for("sjd-scale") == "var"
    with pytest.raises(ValueError, match=r"sampler 'ar' does not take sjd_window \(it takes gumbel\)"):
        build_sampler("ar", ar, vqvae, sjd_window=3)
    with pytest.raises(ValueError, match=r"sampler 'var' does not take spec_scales \(it takes gumbel, kv_budget"):
        build_sampler("var", model, vqvae, spec_scales=3)
    with pytest.raises(ValueError, match="needs a VAR model"):
        build_sampler("sjd-scale", ar, vqvae)
    with pytest.raises(ValueError, match="needs a raster model: LlamaGen"):
        build_sampler("sjd", model, vqvae)
    with pytest.raises(ValueError, match="unknown draft_init 'below'"):
        build_sampler("sjd", ar, vqvae, draft_init="below")
    with pytest.raises(ValueError, match="top_k must be one value"):
        build_sampler("ar", ar, vqvae, SamplingSettings(top_k=[5, 6]))
    with pytest.raises(ValueError, match="more_smooth"):
        build_sampler("sjd-scale", model, vqvae, SamplingSettings(more_smooth=True))


def test_cli_samples_the_ar_baseline_and_both_speculative_samplers(tmp_path, capsys):
    vqvae, model = make_tiny_pair()
    ar = tiny_llamagen()
    bundle = tmp_path / "bundle"
    for module, name in ((vqvae, "vqvae"), (model, "var"), (ar, "ar")):
        save_model(module, bundle, name)
    common = ["sample", "--ckpt", str(bundle), "--device", "cpu", "--labels", "0", "2", "1"]
    for extra in (["--sampler", "ar"], ["--sampler", "sjd", "--sjd-window", "4", "--draft-init", "left"],
                  ["--sampler", "sjd-scale", "--spec-scales", "2", "--spec-max-tokens", "9", "--gumbel"]):
        out = tmp_path / f"{extra[1]}.png"
        main(common + extra + ["--out", str(out)])
        assert out.is_file()
        assert "forward passes per image" in capsys.readouterr().out
    (bundle / "ar.json").unlink()
    with pytest.raises(SystemExit, match="ar.json"):
        main(common + ["--sampler", "sjd", "--out", str(tmp_path / "x.png")])
