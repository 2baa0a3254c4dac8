"""Every sampler, on tiny seeded models with fixed seeds, against values recorded before the sampler redesign.

The token maps must match exactly; image sums, pass counts and KV bytes as recorded.  The models' weights are
drawn here, parameter by parameter in name order from one seeded generator, so they do not depend on how the
model classes initialise themselves (which the redesign changes).  ``python tests/test_golden.py --record``
rewrites tests/golden_samplers.json from the current code: only do that for an intended change of behaviour.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from var.models.llamagen import LlamaGen
from var.models.var import VAR, VARConfig
from var.sample.logits import SamplingSettings
from var.sample.registry import build_sampler
from var.sample.scalekv.budget import KVBudget
from var.sample.scalekv.calibrate import measure_selectivity
from var.tokenizers.vqvae import VQVAE, VQVAEConfig

GOLDEN = Path(__file__).with_name("golden_samplers.json")
PATCH_NUMS = (1, 2, 3, 4, 5, 6)
SMALL_PATCH_NUMS = (1, 2, 3)
LABELS = [0, 2, 1, -1]
SETTINGS = dict(cfg=2.0, top_k=8, top_p=0.9, temperature=0.9)


def seeded_weights_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Overwrite every floating-point parameter and buffer from a generator seeded with ``seed``, in name order:
    weights scaled by 1/sqrt(fan-in), norm gains near 1, attention temperatures near 4, small biases."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in sorted(module.state_dict().items()):
            if not tensor.is_floating_point():
                continue
            noise = torch.randn(tensor.shape, generator=generator)
            if name.endswith("log_temperature"):
                value = math.log(4.0) + 0.1 * noise
            elif tensor.ndim == 1:
                value = 1 + 0.1 * noise if "norm" in name and name.endswith("weight") else 0.1 * noise
            else:
                value = noise / math.sqrt(tensor[0].numel() if tensor.ndim in (2, 4) else tensor.shape[-1])
            tensor.copy_(value)
    return module.eval()


def models() -> dict[str, torch.nn.Module]:
    vqvae = VQVAE(VQVAEConfig(vocab_size=16, z_channels=4, ch=8, ch_mult=(1, 2), num_res_blocks=1, norm_groups=4,
                              patch_nums=PATCH_NUMS))
    drafter = VAR(VARConfig(depth=2, width=32, num_heads=2, vocab_size=16, z_channels=4, num_classes=3,
                            patch_nums=PATCH_NUMS, drop_path_rate=0.0))
    refiner = VAR(VARConfig(depth=1, width=16, num_heads=1, vocab_size=16, z_channels=4, num_classes=3,
                            patch_nums=PATCH_NUMS, drop_path_rate=0.0))
    raster = LlamaGen(n_layer=2, dim=16, n_head=2, vocab_size=16, num_classes=3, block_size=PATCH_NUMS[-1] ** 2,
                      multiple_of=8)
    # a 4-code model over three scales, where speculation accepts drafted scales
    small_vqvae = VQVAE(VQVAEConfig(vocab_size=4, z_channels=4, ch=8, ch_mult=(1, 2), num_res_blocks=1,
                                    norm_groups=4, patch_nums=SMALL_PATCH_NUMS))
    small = VAR(VARConfig(depth=2, width=16, num_heads=2, vocab_size=4, z_channels=4, num_classes=3,
                          patch_nums=SMALL_PATCH_NUMS, drop_path_rate=0.0))
    return {"vqvae": seeded_weights_(vqvae, 1), "var": seeded_weights_(drafter, 2),
            "refiner": seeded_weights_(refiner, 3), "ar": seeded_weights_(raster, 4),
            "small_vqvae": seeded_weights_(small_vqvae, 5), "small": seeded_weights_(small, 6)}


def calibrated_budget(vqvae: VQVAE, model: VAR) -> KVBudget:
    selectivity = measure_selectivity(model, vqvae, torch.tensor([0, 1, 2]), history_top_k=8,
                                      settings=SamplingSettings(**SETTINGS), batch_size=2, seed=11)
    return KVBudget.from_selectivity(model.config, selectivity, fraction=0.3, drafter_fraction=0.5, window_side=2)


# case -> (sampler name, model, options, settings overrides, seed, labels)
CASES = {
    "var": ("var", "var", {}, {}, 3, LABELS),
    "var-smooth-per-scale": ("var", "var", {}, {"top_k": [0, 4, 8, 8, 12, 16], "more_smooth": True}, 4, LABELS),
    "var-gumbel": ("var", "var", {"gumbel": True}, {}, 5, LABELS),
    "var-random-labels": ("var", "var", {}, {}, 6, None),
    "code": ("code", "var", {"refiner": "refiner", "draft_steps": 3}, {}, 7, LABELS),
    "scalekv-uniform": ("scalekv", "var", {"kv_budget": 0.1, "kv_window": 2}, {}, 8, LABELS),
    "scalekv-max-pool-shared": ("scalekv", "var", {"kv_budget": 0.2, "kv_window": 2, "kv_scoring": "max-pool",
                                                    "kv_share_cfg": True}, {}, 9, LABELS),
    "scalekv-calibrated": ("scalekv", "var", {"kv_budget": "calibrated"}, {}, 10, LABELS),
    "code+scalekv": ("code", "var", {"refiner": "refiner", "draft_steps": 4, "kv_budget": 0.2,
                                             "kv_window": 2}, {}, 12, LABELS),
    "sjd-scale": ("sjd-scale", "small", {"spec_scales": 3, "spec_max_tokens": 16, "draft_source": "recycle"}, {}, 13,
                  LABELS * 2),
    "sjd-scale-gumbel": ("sjd-scale", "small", {"spec_scales": 3, "spec_max_tokens": 25, "draft_source": "guess",
                                                "gumbel": True}, {}, 14, LABELS * 2),
    "sjd-scale-gumbel-recycle": ("sjd-scale", "small", {"spec_scales": 2, "gumbel": True}, {"temperature": 0.5}, 18,
                                 LABELS * 2),
    "var-gumbel-small": ("var", "small", {"gumbel": True}, {"temperature": 0.5}, 18, LABELS * 2),
    "ar": ("ar", "ar", {}, {}, 15, LABELS),
    "sjd-above": ("sjd", "ar", {"sjd_window": 4, "draft_init": "above"}, {}, 16, LABELS),
    "sjd-random": ("sjd", "ar", {"sjd_window": 3, "draft_init": "random"}, {}, 17, LABELS),
}


SAME_AS = {"sjd-scale-gumbel-recycle": "var-gumbel-small"}


def run_case(name: str, built: dict) -> dict:
    sampler_name, model_name, options, overrides, seed, labels = CASES[name]
    options = dict(options)
    if options.get("refiner") == "refiner":
        options["refiner"] = built["refiner"]
    if options.get("kv_budget") == "calibrated":
        options["kv_budget"] = calibrated_budget(built["vqvae"], built["var"])
    settings = SamplingSettings(**{**SETTINGS, **overrides})
    tokenizer = built["small_vqvae" if model_name == "small" else "vqvae"]
    sampler = build_sampler(sampler_name, built[model_name], tokenizer, settings, **options)
    out = sampler.sample(labels, seed=seed, batch_size=None if labels else 3)
    stats = out.stats
    return {
        "indices": [scale.tolist() for scale in out.indices],
        "image_sum": out.images.double().sum().item(),
        "image_square_sum": out.images.double().square().sum().item(),
        "passes": stats["passes"],
        "passes_per_image": stats.get("passes_per_image", stats["passes"]),
        "kv_bytes": stats["kv_bytes"],
        "kv_bytes_held": stats["kv_bytes_held"],
    }


@pytest.fixture(scope="module")
def built():
    return models()


@pytest.fixture(scope="module")
def golden():
    return json.loads(GOLDEN.read_text())


@pytest.mark.parametrize("case", list(CASES))
def test_sampler_reproduces_the_recorded_samples(case, built, golden):
    expected, got = golden[case], run_case(case, built)
    assert got["indices"] == expected["indices"]
    for key in ("image_sum", "image_square_sum"):
        assert got[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-4), key
    for key in ("passes", "passes_per_image", "kv_bytes", "kv_bytes_held"):
        assert got[key] == expected[key], key


def test_the_cases_differ(golden):
    """The recorded cases are not degenerate: every sampler setting gives its own samples."""
    maps = [json.dumps(golden[case]["indices"]) for case in CASES if case not in SAME_AS]
    assert len(set(maps)) == len(maps)
    for case, same in SAME_AS.items():  # Gumbel-mode speculation returns plain Gumbel-mode samples
        assert golden[case]["indices"] == golden[same]["indices"]
    assert golden["sjd-scale-gumbel-recycle"]["passes_per_image"] < golden["var-gumbel-small"]["passes_per_image"]


if __name__ == "__main__" and "--record" in sys.argv:
    torch.set_num_threads(1)
    everything = models()
    GOLDEN.write_text(json.dumps({case: run_case(case, everything) for case in CASES}, indent=1) + "\n")
    print(f"wrote {GOLDEN}")
