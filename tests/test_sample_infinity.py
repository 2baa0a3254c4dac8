"""Infinity through the samplers: the protocol, its guidance rule, CoDe and ScaleKV on it, and the exactness of
sjd-scale and of ScaleKV at budget 1.0 on bits.

The official seeded bits are reproduced in test_infinity_parity.py; here a tiny Infinity with 1-bit tokens
over the scales 1x1, 2x2, 3x2 (the h/w 1.5 template: 11 tokens) has an enumerable law: every (scale 0,
scale 1) context (2^5 = 32) is run teacher-forced, which gives the exact probabilities of the first two scales
and of each bit of the last scale given them.  The samplers must match them (chi-square, seeded); broken
variants must not.  The sample counts are small because a computed power check says they suffice: at
NUM_SAMPLES the exactness test rejects, with probability >= 0.99, a sampler that guides, tempers or filters
any scale wrongly (laws enumerated the same way), and the broken variants fall below 1e-6 at BROKEN_SAMPLES.
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest
import torch
from conftest import make_tiny_pair
from infinity_tiny import TINY_SCHEDULE, random_text, tiny_bsq, tiny_infinity, write_shards
from scipy.stats import chi2, ncx2
from test_sample_sjd import ALPHA, BROKEN, BROKEN_SJD, chi_square_p

from var.models.family import ScaleModel, ScaleSchedule, ScaleTokenizer
from var.models.infinity import PackedText
from var.models.infinity_schedules import TEMPLATES
from var.models.kv_cache import KVCache
from var.sample import speculative
from var.sample.code import CoDeSampler
from var.sample.logits import SamplingSettings
from var.sample.scale import VARSampler
from var.sample.scalekv.cache import ScaleKVCache
from var.sample.speculative.scales import ScaleSpeculativeSampler

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: a second thread only waits on a busy machine

NUM_SAMPLES = 5_000
BROKEN_SAMPLES = 1_000
CHUNK = 1_000  # rows per sampling call: the batch is vectorised, a chunk keeps its activations in cache
BITS_SCHEDULE = ScaleSchedule(TEMPLATES[1.5][:3], 1.5)  # 1x1, 2x2, 3x2
LAST_BITS = (0, 3, 5)  # bits of the last scale whose joint law with the first two scales is tested
SETTINGS = SamplingSettings(cfg=[0.5, 2.0, 1.0], temperature=[1.0, 0.8, 1.2], top_k=0, top_p=0.97)


def test_infinity_and_bsq_satisfy_the_scale_protocols():
    model, tokenizer = tiny_infinity(), tiny_bsq()
    assert isinstance(model, ScaleModel) and isinstance(tokenizer, ScaleTokenizer)
    model.use_schedule(TINY_SCHEDULE)
    assert model.draws_per_token == 4 and model.vocab_size == 2 and model.depth == 2
    with pytest.raises(ValueError, match="4-bit tokens"):
        VARSampler(model, tiny_bsq(codebook_dim=2))
    with pytest.raises(ValueError, match="give prompts"):
        VARSampler(model, tokenizer).sample(None, seed=0)
    with pytest.raises(ValueError, match="cfg_layer"):
        VARSampler(model, tokenizer, SamplingSettings(cfg_layer=-3))
    with pytest.raises(ValueError, match="cfg has 2 values"):
        VARSampler(model, tokenizer, SamplingSettings(cfg=[1.0, 2.0]))


@pytest.mark.parametrize("cfg_layer", [0, -1])
def test_sampler_equals_a_hand_written_official_loop(cfg_layer):
    """The protocol path (runner, rule, tokenizer) against the official loop spelled out on the model."""
    model, tokenizer = tiny_infinity().use_schedule(TINY_SCHEDULE), tiny_bsq()
    text, settings = random_text([3, 5]), SamplingSettings(cfg=[0.0, 2.0, 3.0], temperature=0.5, top_k=0,
                                                           top_p=0.9, cfg_layer=cfg_layer)
    with torch.no_grad():
        out = VARSampler(model, tokenizer, settings).sample(text, seed=5)
        generator = torch.Generator().manual_seed(5)
        cond = model.condition(text, guidance=True)
        weights = [1.0, 3.0, 4.0]
        if cfg_layer:
            cond.mix_layer, cond.mix_weights = model.depth + cfg_layer, tuple(weights)
        summed, inputs, cache = None, None, KVCache(model.depth, TINY_SCHEDULE.length)
        for si in range(TINY_SCHEDULE.num_scales):
            cache.begin_pass(si)
            logits = model.logits(model.forward_scales(cond, si, inputs=inputs, cache=cache), cond) / 0.5
            mixed = weights[si] * logits[:2] + (1 - weights[si]) * logits[2:]
            logits = mixed if cfg_layer == 0 and weights[si] != 1 else logits[:2]
            probs = logits.softmax(-1)
            probs = torch.where(probs <= 0.1, 0.0, probs)  # top-p 0.9 on two outcomes
            bits = torch.multinomial(probs.view(-1, 2), 1, generator=generator).view(2, -1)
            assert torch.equal(bits, out.indices[si]), si
            h, w = TINY_SCHEDULE.shapes[si]
            summed, inputs = tokenizer.next_input(si, summed, tokenizer.bits_to_codes(bits.view(2, h, w, 4)),
                                                  TINY_SCHEDULE)
    torch.testing.assert_close(out.f_hat, summed)
    assert out.images.shape == (2, 3, 8, 8)


def repeated(text: PackedText, copies: int) -> PackedText:
    return PackedText(text.features.repeat(copies, 1), text.lens * copies)


def exact_law(model, tokenizer, text: PackedText, settings: SamplingSettings) -> list[torch.Tensor]:
    """The exact law of (scale 0, scale 1) bits (32 cells) and, for each of LAST_BITS, of (scale 0, scale 1, that
    bit of the last scale) (64 cells), from teacher-forced passes over every context."""
    contexts = torch.tensor(list(itertools.product(range(2), repeat=5)))  # (32, 5): scale 0, then scale 1
    plain = VARSampler(model, tokenizer, settings)
    with torch.no_grad():
        state = plain.begin(repeated(text, len(contexts)))
        features = []
        for si, bits in enumerate((contexts[:, :1], contexts[:, 1:])):
            features.append(tokenizer.next_scale_input(si, state.f_hat, plain.scale_features(bits, si),
                                                       schedule=BITS_SCHEDULE))
        runner = plain.new_runner(state)
        hidden = runner.forward_scales(0, 2, [None, *features], state)
        logits = model.logits(hidden, runner.cond)
        probs = [plain.processed_logits(state, si, logits[:, begin:end]).softmax(-1)
                 for si, (begin, end) in enumerate(BITS_SCHEDULE.bounds)]
    first_two = probs[0][:, 0].gather(1, contexts[:, :1]).squeeze(1)
    first_two = first_two * probs[1].gather(2, contexts[:, 1:, None]).squeeze(-1).prod(dim=1)  # (32,)
    return [first_two] + [(first_two.unsqueeze(1) * probs[2][:, i]).flatten() for i in LAST_BITS]  # (64,) each


@pytest.fixture(scope="module")
def one_bit_infinity():
    """A 1-bit Infinity (a 6x head: bits far from fair coins, so guidance, temperature and top-p all move the law)
    and the exact law of its bits under SETTINGS."""
    model = tiny_infinity(bits_per_token=1, seed=3, width=32, num_heads=2, mlp_ratio=8.0, cross_attn_bf16=False,
                          head_scale=6.0)
    model.use_schedule(BITS_SCHEDULE)
    tokenizer = tiny_bsq(codebook_dim=1)
    text = random_text([4])
    return model, tokenizer, text, exact_law(model, tokenizer, text, SETTINGS)


def p_values(sampler, text, exact: list[torch.Tensor], num_samples: int, seed: int = 0) -> tuple[list[float], float]:
    """p-values of the statistics of :func:`exact_law` over ``num_samples`` samples, drawn in batches of CHUNK
    (batch i with seed + i); and the passes per image."""
    outs = [sampler.sample(repeated(text, min(CHUNK, num_samples - start)), seed=seed + i, decode=False)
            for i, start in enumerate(range(0, num_samples, CHUNK))]
    indices = [torch.cat(scale) for scale in zip(*(out.indices for out in outs), strict=True)]
    codes = indices[0][:, 0] * 16 + (indices[1] * 2 ** torch.arange(3, -1, -1)).sum(dim=1)
    values = [chi_square_p(codes, exact[0])]
    values += [chi_square_p(codes * 2 + indices[2][:, i], law) for i, law in zip(LAST_BITS, exact[1:], strict=True)]
    passes = sum(out.stats["passes_per_image"] * len(out.indices[0]) for out in outs) / num_samples
    return values, passes


def rejection_power(exact: torch.Tensor, other: torch.Tensor, num_samples: int, level: float) -> float:
    """Probability that chi_square_p of ``num_samples`` draws from law ``other`` falls below ``level`` when
    tested against ``exact`` (noncentral chi-square, on the cells chi_square_p keeps after pooling)."""
    exact, other = exact.double() / exact.sum(), other.double() / other.sum()
    small = exact * num_samples < 5
    exact = torch.cat((exact[~small], exact[small].sum().view(1)))
    other = torch.cat((other[~small], other[small].sum().view(1)))
    kept = exact > 0
    df = int(kept.sum()) - 1
    noncentrality = num_samples * ((other - exact)[kept] ** 2 / exact[kept]).sum().item()
    return float(ncx2.sf(chi2.isf(level, df), df, noncentrality))


# what a sampler that processes one step wrongly would sample from (guidance off at one scale or at all, no
# temperature, no top-p); guidance off at the last scale alone is not listed: this tiny model's last-scale bits
# barely depend on the prompt, so no affordable sample count would see it
WRONG_SETTINGS = {
    "guidance off": dataclasses.replace(SETTINGS, cfg=0.0),
    "guidance off at scale 1": dataclasses.replace(SETTINGS, cfg=[0.5, 0.0, 1.0]),
    "temperature 1": dataclasses.replace(SETTINGS, temperature=1.0),
    "no top-p": dataclasses.replace(SETTINGS, top_p=1.0),
}


def test_chi_square_sample_counts_have_the_power_to_see_wrong_processing(one_bit_infinity):
    """At NUM_SAMPLES the exactness test (Bonferroni over its statistics) rejects each wrong law with probability
    >= 0.99; so the small sample counts below lose nothing a larger run would catch from these mistakes."""
    model, tokenizer, text, exact = one_bit_infinity
    level = ALPHA / len(exact)
    for name, settings in WRONG_SETTINGS.items():
        wrong = exact_law(model, tokenizer, text, settings)
        power = max(rejection_power(law, other, NUM_SAMPLES, level) for law, other in zip(exact, wrong, strict=True))
        assert power >= 0.99, (name, power)


def test_sjd_scale_on_bits_matches_the_exact_law(one_bit_infinity):
    model, tokenizer, text, exact = one_bit_infinity
    sampler = ScaleSpeculativeSampler(model, tokenizer, SETTINGS, spec_scales=3, spec_max_tokens=16)
    values, passes = p_values(sampler, text, exact, NUM_SAMPLES)
    assert min(values) > ALPHA / len(values), values
    assert passes < 3  # speculation merged scales


@pytest.mark.parametrize("variant", list(BROKEN_SJD))
def test_sjd_scale_on_bits_broken_variants_are_detected(one_bit_infinity, monkeypatch, variant):
    model, tokenizer, text, exact = one_bit_infinity
    sampler = ScaleSpeculativeSampler(model, tokenizer, SETTINGS, spec_scales=3, spec_max_tokens=16)
    monkeypatch.setattr(speculative, *BROKEN_SJD[variant])
    values, _ = p_values(sampler, text, exact, BROKEN_SAMPLES)
    assert min(values) < BROKEN, values


def test_scalekv_full_budget_on_bits_matches_the_exact_law(one_bit_infinity):
    """ScaleKV's cache at budget 1.0 (every token kept, through the compressing cache's code path)."""
    model, tokenizer, text, exact = one_bit_infinity
    sampler = VARSampler(model, tokenizer, SETTINGS, kv_budget=1.0, kv_window=1)
    values, _ = p_values(sampler, text, exact, NUM_SAMPLES)
    assert min(values) > ALPHA / len(values), values
    assert type(sampler.kv_policy.make_cache(model, rows=2)) is ScaleKVCache


def _broken_store(change):
    """ScaleKVCache.after_attention storing ``change(keys, values)`` of the pass instead of its keys and values."""
    after_attention = ScaleKVCache.after_attention

    def broken(cache, layer, queries, keys):
        if cache.pending is not None:  # None: a pass that is not stored (the last scale)
            k, v, held = cache.pending
            cache.pending = (*change(k, v), held)
        after_attention(cache, layer, queries, keys)
    return broken


BROKEN_SCALEKV = {
    "pass never stored": lambda k, v: (k[:, :, :0], v[:, :, :0]),  # later scales see no history
    "keys and values swapped": lambda k, v: (v, k),
    "oldest token evicted": lambda k, v: (k[:, :, 1:], v[:, :, 1:]),  # the SOS sink lost, as a FIFO would
}


@pytest.mark.parametrize("variant", list(BROKEN_SCALEKV))
def test_scalekv_on_bits_broken_variants_are_detected(one_bit_infinity, monkeypatch, variant):
    """Full-budget caches that lose or mix up what they must keep are rejected."""
    model, tokenizer, text, exact = one_bit_infinity
    sampler = VARSampler(model, tokenizer, SETTINGS, kv_budget=1.0, kv_window=1)
    monkeypatch.setattr(ScaleKVCache, "after_attention", _broken_store(BROKEN_SCALEKV[variant]))
    values, _ = p_values(sampler, text, exact, BROKEN_SAMPLES)
    assert min(values) < BROKEN, values


@pytest.mark.parametrize("cfg_layer", [0, -1])
def test_sjd_scale_gumbel_mode_equals_plain_on_infinity(cfg_layer):
    model, tokenizer = tiny_infinity().use_schedule(TINY_SCHEDULE), tiny_bsq()
    settings = SamplingSettings(cfg=2.0, temperature=0.5, top_k=0, top_p=0.97, cfg_layer=cfg_layer)
    text = random_text([3, 5, 2, 7])
    plain = VARSampler(model, tokenizer, settings, gumbel=True).sample(text, seed=3)
    fast = ScaleSpeculativeSampler(model, tokenizer, settings, spec_scales=3, spec_max_tokens=16,
                                   gumbel=True).sample(text, seed=3)
    for plain_bits, fast_bits in zip(plain.indices, fast.indices, strict=True):
        assert torch.equal(plain_bits, fast_bits)
    torch.testing.assert_close(fast.images, plain.images)


@pytest.mark.parametrize("cfg_layer", [0, -1])
def test_code_drafter_and_refiner_of_two_infinity_sizes(cfg_layer):
    """CoDe on Infinity: a 2-block drafter, a smaller 1-block refiner; the refiner equal to the drafter is
    plain sampling bit for bit (one generator through both phases)."""
    drafter, tokenizer = tiny_infinity().use_schedule(TINY_SCHEDULE), tiny_bsq()
    refiner = tiny_infinity(seed=1, depth=1, width=32, num_heads=2, mlp_ratio=8.0).use_schedule(TINY_SCHEDULE)
    settings = SamplingSettings(cfg=[1.0, 2.0, 3.0], temperature=0.7, top_k=0, top_p=0.95, cfg_layer=cfg_layer)
    text = random_text([3, 5])
    plain = VARSampler(drafter, tokenizer, settings).sample(text, seed=2)
    same = CoDeSampler(drafter, tokenizer, settings, refiner=drafter, draft_steps=2).sample(text, seed=2)
    for plain_bits, code_bits in zip(plain.indices, same.indices, strict=True):
        assert torch.equal(plain_bits, code_bits)
    small = CoDeSampler(drafter, tokenizer, settings, refiner=refiner, draft_steps=2).sample(text, seed=2)
    assert torch.equal(small.indices[1], plain.indices[1])  # the drafter's scales are the plain ones
    assert small.images.shape == plain.images.shape and small.stats["draft_steps"] == 2
    with pytest.raises(ValueError, match="bits_per_token 2 .drafter: 4."):
        CoDeSampler(drafter, tokenizer, settings, refiner=tiny_infinity(bits_per_token=2).use_schedule(TINY_SCHEDULE))
    shorter = tiny_infinity().use_schedule(ScaleSchedule(TINY_SCHEDULE.shapes[:2], TINY_SCHEDULE.template))
    with pytest.raises(ValueError, match=r"refiner does not fit the drafter: scales \(\(1, 1\), \(2, 2\)\)"):
        CoDeSampler(drafter, tokenizer, settings, refiner=shorter)


# a non-square schedule: the first 5 grids of the 3:4 (h / w = 0.75) template, 1 + 4 + 12 + 48 + 108 tokens
WIDE_SCHEDULE = ScaleSchedule(TEMPLATES[0.75][:5], 0.75)


@pytest.mark.parametrize("scoring", ["softmax", "raw"])
def test_scalekv_on_a_non_square_infinity_schedule(scoring):
    model, tokenizer = tiny_infinity().use_schedule(WIDE_SCHEDULE), tiny_bsq()
    settings = SamplingSettings(cfg=2.0, temperature=0.7, top_k=0, top_p=0.95)
    text = random_text([3, 5])
    plain = VARSampler(model, tokenizer, settings).sample(text, seed=4)
    assert plain.images.shape == (2, 3, 18, 24)
    full = VARSampler(model, tokenizer, settings, kv_budget=1.0, kv_scoring=scoring).sample(text, seed=4)
    for plain_bits, bits in zip(plain.indices, full.indices, strict=True):  # budget 1.0 is the plain sampler
        assert torch.equal(plain_bits, bits)
    sampler = VARSampler(model, tokenizer, settings, kv_budget=0.3, kv_scoring=scoring, kv_window=2)
    small = sampler.sample(text, seed=4)
    budget = sampler.kv_policy.budget_for(model)
    per_token = 2 * 4 * model.config.width * 4  # k and v, 2B rows, C channels, float32
    assert small.stats["kv_bytes"] == sum(budget.capacities(0, WIDE_SCHEDULE.num_scales)) * per_token
    assert small.stats["kv_bytes"] <= 0.3 * plain.stats["kv_bytes"]  # within the budget of the full cache's bytes
    assert small.stats["kv_fraction"] <= 0.3 and small.stats["kv_budget"] == 0.3
    assert not all(torch.equal(a, b) for a, b in zip(plain.indices, small.indices, strict=True))


def test_raw_query_scoring_sees_the_projection_without_bias():
    """The released ScaleKV scores with x W_q: no q bias, normalisation, temperature or RoPE."""
    model = tiny_infinity().use_schedule(TINY_SCHEDULE)
    with torch.no_grad():
        model.blocks[0].attn.q_bias.fill_(5.0)
    seen, inputs = {}, {}

    def record_input(module, args) -> None:
        inputs.setdefault("x", args[0])

    model.blocks[0].attn.register_forward_pre_hook(record_input)

    class Recording(KVCache):
        raw_queries = True

        def after_attention(self, layer, queries, keys):
            seen.setdefault(layer, queries)

    cache = Recording(model.depth, TINY_SCHEDULE.length)
    with torch.no_grad():
        cache.begin_pass(0)
        model.forward_scales(model.condition(random_text([3])), 0, cache=cache)
    attention = model.blocks[0].attn
    expected = (inputs["x"] @ attention.qkv.weight[: model.config.width].T).view(1, 1, 4, 16).transpose(1, 2)
    torch.testing.assert_close(seen[0], expected)
    with pytest.raises(ValueError, match="kv_scoring raw"):
        vqvae, var_model = make_tiny_pair()
        VARSampler(var_model, vqvae, kv_budget=0.5, kv_scoring="raw")


def official_files(tmp_path):
    """A tiny T5 in a fake Hugging Face cache and a tiny Infinity + BSQ pair written as official files."""
    from test_text import save_tiny_t5

    from var.infinity_checkpoints import infinity_to_official
    from var.text import FLAN_T5_XL

    cache = tmp_path / "hub"
    repo = cache / f"models--{FLAN_T5_XL.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    save_tiny_t5(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    model, tokenizer = tiny_infinity(text_maxlen=16), tiny_bsq()
    torch.save(infinity_to_official(model, block_chunks=2), tmp_path / "infinity.pth")
    torch.save({"vae": tokenizer.state_dict()}, tmp_path / "bsq.pth")
    return cache, model, tokenizer


def test_var_sample_with_official_infinity_files_and_prompts(tmp_path, monkeypatch, capsys):
    """`var sample --vae BSQ --var INFINITY --prompt ...`: the family is told by the keys, the prompts are
    encoded by T5 from the local Hugging Face cache, the schedule comes from --resolution/--aspect, and the
    sampling settings not given are Infinity's official ones (cfg 4 = --cfg 3, tau 0.5, top-k 900, top-p 0.97)."""
    from huggingface_hub import constants

    from var.cli import main
    from var.models.infinity_schedules import schedule_for
    from var.text import FLAN_T5_XL, T5TextEncoder

    cache, model, tokenizer = official_files(tmp_path)
    flags = ["sample", "--vae", str(tmp_path / "bsq.pth"), "--var", str(tmp_path / "infinity.pth"),
             "--resolution", "256", "--aspect", "4:3",
             "--seed", "1", "--prompt", "a red car", "a photo of a dog"]
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    with pytest.raises(SystemExit, match=f"text encoder {FLAN_T5_XL} is not in the local Hugging Face cache"):
        main(flags + ["--out", str(tmp_path / "none.png")])
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    main(flags + ["--out", str(tmp_path / "grid.png"), "--npz", str(tmp_path / "samples.npz")])
    assert "wrote 2 samples" in capsys.readouterr().out
    samples = np.load(tmp_path / "samples.npz")
    schedule = schedule_for(0.75, "0.06M")  # 4:3 is h / w = 0.75
    assert samples["arr_0"].shape == (2, schedule.shapes[-1][0] * 2, schedule.shapes[-1][1] * 2, 3)
    assert list(samples["prompts"]) == ["a red car", "a photo of a dog"]
    text = T5TextEncoder(cache_dir=cache).encode_infinity(["a red car", "a photo of a dog"])
    settings = SamplingSettings(cfg=3.0, temperature=0.5, top_k=900, top_p=0.97)
    direct = VARSampler(model.use_schedule(schedule), tokenizer, settings).sample(text, seed=1)
    assert torch.equal(torch.from_numpy(samples["arr_0"]).permute(0, 3, 1, 2),
                       direct.images.mul(255).round().clamp(0, 255).to(torch.uint8))
    with pytest.raises(SystemExit, match="text-to-image"):
        main(flags[:-3] + ["--out", str(tmp_path / "x.png")])


def test_calibrate_kv_on_infinity_prompts_then_sample_with_the_budget(tmp_path, monkeypatch, capsys):
    from huggingface_hub import constants

    from var.cli import main
    from var.sample.scalekv.budget import KVBudget

    cache, _, _ = official_files(tmp_path)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    files = ["--vae", str(tmp_path / "bsq.pth"), "--var", str(tmp_path / "infinity.pth"), "--resolution", "256",
             "--aspect", "3:4", "--cfg", "3", "--kv-budget", "0.2", "--kv-window", "2"]
    main(["calibrate-kv", *files, "--prompt", "a red car", "a cat", "--out", str(tmp_path / "budget.json")])
    assert "calibrated on 2 prompts" in capsys.readouterr().out
    budget = KVBudget.load(tmp_path / "budget.json")
    assert budget.patch_nums == tuple(h if h == w else (h, w) for h, w in TEMPLATES[1.333][:7])  # 3:4 = h/w 1.333
    assert budget.selectivity is not None
    main(["sample", *files[:-4], "--kv-budget", str(tmp_path / "budget.json"), "--prompt", "a dog",
          "--out", str(tmp_path / "grid.png")])
    assert "wrote 1 samples" in capsys.readouterr().out


def test_var_sample_code_with_official_infinity_refiners(tmp_path, monkeypatch, capsys):
    """`var sample --sampler code --refiner FILE` on an Infinity drafter: the refiner is an official Infinity file
    (.safetensors or a folder of shards), told by its keys, decoding the drafter's --resolution/--aspect schedule;
    the images are the library's CoDe.  Refiners that cannot continue the drafter fail in one line."""
    from huggingface_hub import constants
    from safetensors.torch import save_file

    from var.checkpoints import var_to_official
    from var.cli import main
    from var.infinity_checkpoints import infinity_to_official
    from var.models.infinity_schedules import schedule_for
    from var.text import T5TextEncoder

    cache, drafter, tokenizer = official_files(tmp_path)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    refiner = tiny_infinity(seed=1, depth=1, width=32, num_heads=2, mlp_ratio=8.0, text_maxlen=16)
    official = infinity_to_official(refiner, block_chunks=1)
    save_file({k: v.contiguous() for k, v in official.items()}, tmp_path / "refiner.safetensors")
    write_shards(official, tmp_path / "refiner_shards")
    flags = ["sample", "--vae", str(tmp_path / "bsq.pth"), "--var", str(tmp_path / "infinity.pth"), "--sampler",
             "code", "--draft-steps", "3", "--cfg", "3", "--top-p", "0.9", "--resolution", "256", "--aspect", "4:3",
             "--seed", "2", "--prompt", "a red car", "a cat", "--out", str(tmp_path / "grid.png")]
    text = T5TextEncoder(cache_dir=cache).encode_infinity(["a red car", "a cat"])
    schedule = schedule_for(0.75, "0.06M")
    settings = SamplingSettings(cfg=3.0, top_p=0.9, temperature=0.5)  # the flags, then Infinity's defaults
    direct = CoDeSampler(drafter.use_schedule(schedule), tokenizer, settings,
                         refiner=refiner.use_schedule(schedule), draft_steps=3).sample(text, seed=2)
    for source in ("refiner.safetensors", "refiner_shards"):
        main(flags + ["--refiner", str(tmp_path / source), "--npz", str(tmp_path / "samples.npz")])
        assert "wrote 2 samples" in capsys.readouterr().out
        images = torch.from_numpy(np.load(tmp_path / "samples.npz")["arr_0"]).permute(0, 3, 1, 2)
        order = torch.tensor([list(np.load(tmp_path / "samples.npz")["prompts"]).index(p) for p in ["a red car",
                                                                                                    "a cat"]])
        assert torch.equal(images[order], direct.images.mul(255).round().clamp(0, 255).to(torch.uint8)), source

    _, var_model = make_tiny_pair()
    torch.save(var_to_official(var_model), tmp_path / "var.pth")
    wrong = {"var.pth": r"holds VAR weights but the model given is Infinity: give Infinity weights \(.pth",
             "bits.pth": "bits.pth: this Infinity reads 2-bit tokens but the tokenizer .BSQTokenizer. gives 4",
             "text.pth": r"refiner does not fit the drafter: text_channels 8 \(drafter: 16\)",
             "levels.pth": "levels.pth: the schedule has 7 scales but the level embedding has 5"}
    for name, overrides in (("bits.pth", dict(bits_per_token=2)), ("text.pth", dict(text_channels=8)),
                            ("levels.pth", dict(num_levels=5))):
        torch.save(infinity_to_official(tiny_infinity(depth=1, text_maxlen=16, **overrides), block_chunks=1),
                   tmp_path / name)
    for name, message in wrong.items():
        with pytest.raises(SystemExit, match=f"^var sample: error: [^\n]*{message}[^\n]*$"):
            main(flags + ["--refiner", str(tmp_path / name)])


def test_var_eval_scores_one_infinity_sample_per_prompt(tmp_path, monkeypatch, capsys):
    """`var eval --prompts FILE` on official Infinity files: one sample per prompt, the images and seeds of
    `var sample`, non-square images from --aspect, scored against a reference set (FID)."""
    import json

    from huggingface_hub import constants
    from test_eval import TOY, random_images

    from var.cli import main
    from var.eval.images import Samples, save_npz_samples
    from var.models.infinity_schedules import schedule_for

    cache, _, _ = official_files(tmp_path)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    prompts = ["a red car", "a cat", "a photo of a dog"]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    save_npz_samples(tmp_path / "ref.npz", Samples(random_images(6, 0, side=16)))
    model = ["--vae", str(tmp_path / "bsq.pth"), "--var", str(tmp_path / "infinity.pth"), "--prompts",
             str(tmp_path / "prompts.txt"), "--resolution", "256", "--aspect", "4:3", "--cfg", "3", "--batch-size",
             "2", "--seed", "5", "--device", "cpu"]
    out = tmp_path / "eval"
    main(["eval", *model, "--extractor", TOY, "--ref", str(tmp_path / "ref.npz"), "--metrics", "fid",
          "--no-progress", "--out", str(out)])
    report = json.loads((out / "report.json").read_text())
    assert report["num_samples"] == 3 and report["metrics"]["fid"] > 0
    assert report["sampling"]["num_prompts"] == 3 and "num_classes" not in report["sampling"]
    main(["sample", *model, "--out", str(tmp_path / "grid.png"), "--npz", str(tmp_path / "sampled.npz")])
    evaluated, sampled = np.load(out / "samples.npz"), np.load(tmp_path / "sampled.npz")
    height, width = schedule_for(0.75, "0.06M").shapes[-1]  # 4:3 landscape: h / w = 0.75; tokens of 2 x 2 px
    assert evaluated["arr_0"].shape == (3, 2 * height, 2 * width, 3) and height < width
    assert np.array_equal(evaluated["arr_0"], sampled["arr_0"])
    assert list(evaluated["prompts"]) == list(sampled["prompts"]) and sorted(evaluated["prompts"]) == sorted(prompts)
    with pytest.raises(SystemExit, match="text-to-image"):
        main(["eval", "--samples", str(tmp_path / "sampled.npz"), "--prompt", "a cat", "--out", str(out)])
