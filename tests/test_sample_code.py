import pytest
import torch
from conftest import make_tiny_pair

from var.checkpoints import save_model, var_to_official
from var.cli import main
from var.models.var import VAR
from var.sample.code import CoDeSampler
from var.sample.logits import SamplingSettings
from var.sample.registry import build_sampler
from var.sample.scale import VARSampler

PATCH_NUMS = (1, 2, 3, 4, 5)
SETTINGS = SamplingSettings(cfg=2.0, top_k=0, top_p=0.0)
LABELS = [0, 2, 1]


def _same_samples(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.indices, b.indices, strict=True)) and torch.equal(a.images, b.images)


def _tiny_refiner(seed: int = 7) -> VAR:
    """A smaller transformer over the same tokenizer: other width, depth and head count."""
    torch.manual_seed(seed)
    _, refiner = make_tiny_pair(seed, depth=1, width=16, num_heads=1, patch_nums=PATCH_NUMS)
    return refiner


@pytest.mark.parametrize("draft_steps", [5, 3, 1])
def test_code_with_the_drafter_as_refiner_is_plain_sampling(draft_steps):
    """N = S is the drafter alone; N < S hands over through the one-pass pre-fill, which is exact too."""
    vqvae, model = make_tiny_pair(patch_nums=PATCH_NUMS)
    base = VARSampler(model, vqvae, SETTINGS).sample(LABELS, seed=4, record_logits=True)
    code = build_sampler("code", model, vqvae, SETTINGS, refiner=model, draft_steps=draft_steps)
    out = code.sample(LABELS, seed=4, record_logits=True)
    assert _same_samples(out, base)
    for mine, reference in zip(out.guided_logits, base.guided_logits, strict=True):
        torch.testing.assert_close(mine, reference, atol=1e-5, rtol=1e-5)


def test_code_drafts_like_the_drafter_and_refines_with_the_refiners_own_conditioning():
    vqvae, drafter = make_tiny_pair(patch_nums=PATCH_NUMS)
    refiner = _tiny_refiner()
    split = 3
    out = CoDeSampler(drafter, vqvae, SETTINGS, refiner=refiner, draft_steps=split).sample(LABELS, seed=2,
                                                                                         record_logits=True)
    alone = VARSampler(drafter, vqvae, SETTINGS).sample(LABELS, seed=2)
    for si in range(split):  # same generator, same model: the drafted scales are the drafter's own samples
        assert torch.equal(out.indices[si], alone.indices[si])
    # the refined scales' logits are the refiner's teacher-forced logits on the final token maps, guided
    labels = torch.tensor(LABELS)
    with torch.no_grad():
        teacher = vqvae.quantize.teacher_forcing_input(out.indices)
        cond = refiner(labels, teacher)
        uncond = refiner(torch.full_like(labels, refiner.num_classes), teacher)
    for si in range(split, len(PATCH_NUMS)):
        begin, end = refiner.config.scale_bounds[si]
        weight = SETTINGS.cfg * si / (len(PATCH_NUMS) - 1)
        expected = (1 + weight) * cond[:, begin:end] - weight * uncond[:, begin:end]
        torch.testing.assert_close(out.guided_logits[si], expected, atol=1e-5, rtol=1e-5)


def test_code_cache_sizes_per_phase():
    """The drafter caches scales < N-1 (N-1 is its last), the refiner all but the last; never both at once."""
    vqvae, drafter = make_tiny_pair(patch_nums=PATCH_NUMS)
    refiner = _tiny_refiner()
    out = CoDeSampler(drafter, vqvae, SETTINGS, refiner=refiner, draft_steps=3).sample([0, 1], seed=0)
    rows = 4  # two labels, conditional and unconditional halves

    def kv_bytes(model, tokens):
        cfg = model.config
        return 2 * cfg.depth * rows * cfg.width * tokens * 4  # keys + values, float32

    bounds = drafter.config.scale_bounds
    assert out.stats["kv_bytes_drafter"] == kv_bytes(drafter, bounds[2][0])
    assert out.stats["kv_bytes_refiner"] == kv_bytes(refiner, bounds[-1][0])
    assert out.stats["kv_bytes"] == max(out.stats["kv_bytes_drafter"], out.stats["kv_bytes_refiner"])
    assert out.stats["passes"] == 3 + 2  # three drafter scales, then pre-fill + one scale


def test_code_rejects_a_refiner_that_does_not_fit_and_bad_draft_steps():
    vqvae, drafter = make_tiny_pair(patch_nums=PATCH_NUMS)
    _, other = make_tiny_pair(vocab_size=8, patch_nums=PATCH_NUMS)
    with pytest.raises(ValueError, match="vocab_size 8 .drafter: 16."):
        CoDeSampler(drafter, vqvae, refiner=other)
    with pytest.raises(ValueError, match="draft_steps must be in 1..5"):
        CoDeSampler(drafter, vqvae, refiner=drafter, draft_steps=6)
    with pytest.raises(ValueError, match="needs a refiner"):
        build_sampler("code", drafter, vqvae)
    with pytest.raises(ValueError, match="sampler 'var' does not take refiner"):
        build_sampler("var", drafter, vqvae, refiner=drafter)


def test_code_from_the_command_line_with_bundle_and_official_refiners(tmp_path, capsys):
    vqvae, drafter = make_tiny_pair(patch_nums=PATCH_NUMS)
    save_model(vqvae, tmp_path / "drafter")
    save_model(drafter, tmp_path / "drafter")
    refiner = _tiny_refiner()
    save_model(refiner, tmp_path / "refiner")
    torch.save(var_to_official(refiner), tmp_path / "refiner_3.pth")
    grids = []
    for source in ("refiner", "refiner_3.pth"):
        out = tmp_path / f"{source}.png"
        main(["sample", "--ckpt", str(tmp_path / "drafter"), "--sampler", "code", "--refiner", str(tmp_path / source),
              "--draft-steps", "3", "--labels", "0", "1", "--out", str(out), "--seed", "1"])
        grids.append(out.read_bytes())
    assert grids[0] == grids[1]  # both formats load the same refiner
    with pytest.raises(SystemExit, match="--refiner does not apply to --sampler var"):
        main(["sample", "--ckpt", str(tmp_path / "drafter"), "--refiner", str(tmp_path / "refiner"),
              "--labels", "0", "--out", str(tmp_path / "x.png")])
