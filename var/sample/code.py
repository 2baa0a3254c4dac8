"""CoDe: collaborative decoding with a large drafter and a small refiner (spec_accel.md section 1).

The drafter decodes the first ``draft_steps`` scales (few tokens, the global structure); its cache is then
freed and the refiner, which may be a much smaller VAR over the same tokenizer, decodes the remaining
scales (most of the tokens, the detail).  The refiner re-encodes the drafter's prefix itself: its first
request pre-fills every drafted scale plus its first own scale in one block-causal pass, from the
continuous next-scale inputs in the shared :class:`DecodeState` and with its own class embedding.  Each
model guides its own logits with the usual ramp t = cfg * si / (S - 1).

No verification step exists, so the samples follow neither model exactly; with the refiner equal to the
drafter the result is plain VAR sampling.  One generator runs through both phases: that is the stream a
single model would use, which the official code recovers by re-seeding the refiner and drawing throw-away
tokens for the drafted scales.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from var.models.var import VAR
from var.sample.base import KVPolicy, SampleOutput, ScaleRunner, VARSampler, kv_stats, peak_memory_stats
from var.sample.logits import SamplingSettings
from var.tokenizers.vqvae import VQVAE


def check_refiner(drafter: VAR, refiner: VAR) -> None:
    """Raise a ValueError when a refiner cannot continue the drafter's scales (width and depth may differ)."""
    problems = []
    for name in ("vocab_size", "z_channels", "num_classes", "patch_nums"):
        mine, theirs = getattr(drafter.config, name), getattr(refiner.config, name)  # patch_nums are tuples
        if mine != theirs:
            problems.append(f"{name} {theirs} (drafter: {mine})")
    if problems:
        raise ValueError(
            "the refiner does not fit the drafter: " + "; ".join(problems)
            + "; a CoDe refiner must share the drafter's tokenizer, classes and scale schedule"
        )


def _now(device: torch.device) -> float:
    """Wall-clock seconds after the device has finished its queued work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


class CoDeSampler(VARSampler):
    """Drafter (``model``) for scales [0, draft_steps), refiner for [draft_steps, S).

    Args:
        model: the drafter.
        vqvae: the tokenizer shared by both models.
        settings: guidance and filtering, applied by both phases.
        refiner: the refiner transformer.
        draft_steps: N, the number of scales the drafter decodes (1..S; default S - 2, CoDe's 8 + 2 split).
        kv_policy: cache policy of the drafter; ``refiner_kv_policy`` (default: the same) of the refiner.

    ``stats`` report the KV bytes of each phase (``kv_bytes_drafter``/``_refiner`` allocated,
    ``kv_bytes_held_drafter``/``_refiner`` held at the end; ``kv_bytes``/``kv_bytes_held`` are the larger,
    since the two caches never coexist), the seconds of each phase (the image decode counts to the
    refiner's) and, on CUDA, the peak memory after the drafter phase and overall.
    """

    name = "code"

    def __init__(
        self,
        model: VAR,
        vqvae: VQVAE,
        settings: SamplingSettings | None = None,
        refiner: VAR | None = None,
        draft_steps: int | None = None,
        kv_policy: KVPolicy | None = None,
        refiner_kv_policy: KVPolicy | None = None,
    ):
        super().__init__(model, vqvae, settings, kv_policy)
        if refiner is None:
            raise ValueError("CoDe needs a refiner model (CLI: --refiner PATH, a bundle/run directory or a .pth)")
        check_refiner(model, refiner)
        self.refiner = refiner
        self.draft_steps = self.num_scales - 2 if draft_steps is None else int(draft_steps)
        if not 1 <= self.draft_steps <= self.num_scales:
            raise ValueError(f"draft_steps must be in 1..{self.num_scales} for this model, got {self.draft_steps}")
        self.refiner_kv_policy = refiner_kv_policy or self.kv_policy

    @torch.no_grad()
    def sample(
        self,
        labels: torch.Tensor | Sequence[int] | int | None,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        batch_size: int | None = None,
        record_logits: bool = False,
        decode: bool = True,
    ) -> SampleOutput:
        """Sample one image per label: drafter phase, then (its cache freed) refiner phase."""
        state = self.begin(labels, seed, generator, batch_size, record_logits)
        device = state.f_hat.device
        split = self.draft_steps
        stats = {"draft_steps": split}

        started = _now(device)
        drafter = ScaleRunner(self.model, state.labels, self.kv_policy, start=0, stop=split)
        self.run_scales(drafter, state, 0, split)
        stats.update(kv_stats(drafter.cache, "_drafter"))
        del drafter  # frees the drafter's cache before the refiner allocates its own
        stats["seconds_drafter"] = _now(device) - started
        stats.update(peak_memory_stats(device, "_drafter"))

        started = _now(device)
        if split < self.num_scales:
            refiner = ScaleRunner(self.refiner, state.labels, self.refiner_kv_policy, start=split)
            self.run_scales(refiner, state, split, self.num_scales)
            stats.update(kv_stats(refiner.cache, "_refiner"))
            del refiner
        else:
            stats.update(kv_bytes_refiner=0, kv_bytes_held_refiner=0)
        for key in ("kv_bytes", "kv_bytes_held"):  # the two caches never coexist
            stats[key] = max(stats[f"{key}_drafter"], stats[f"{key}_refiner"])
        output = self.finish(state, decode, **stats)
        output.stats["seconds_refiner"] = _now(device) - started
        return output
