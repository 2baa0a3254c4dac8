"""CoDe: collaborative decoding with a large drafter and a small refiner (spec_accel.md section 1).

The drafter decodes the first ``draft_steps`` scales (few tokens, the global structure); its cache is then
freed and the refiner, which may be a much smaller VAR over the same tokenizer, decodes the remaining
scales (most of the tokens, the detail).  The refiner re-encodes the drafter's prefix itself: its first
request pre-fills every drafted scale plus its first own scale in one block-causal pass, from the
continuous next-scale inputs in the shared :class:`DecodeState` and with its own class embedding.  Each
model guides its own logits with its family's rule (VAR: the ramp t = cfg * si / (S - 1)).

No verification step exists, so the samples follow neither model exactly; with the refiner equal to the
drafter the result is plain VAR sampling.  One generator (or one Gumbel noise) runs through both phases:
that is the stream a single model would use, which the official code recovers by re-seeding the refiner
and drawing throw-away tokens for the drafted scales.  Each phase takes its own KV policy (``kv_budget``,
``refiner_kv_budget``).  The recipes that train drafters and refiners are in var/train/code.py.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from var.models.family import ScaleModel
from var.sample.base import device_of, kv_stats, now, peak_memory
from var.sample.logits import SamplingSettings
from var.sample.options import check_budget, option, parse_budget
from var.sample.scale import DecodeState, ScaleSampler, VAROptions
from var.sample.scalekv.budget import KVBudget
from var.sample.scalekv.cache import policy_from_options

# what a refiner shares with its drafter, when their configs have it (VAR: codebook and classes; Infinity:
# bits per token and the text encoder's width); width and depth may differ
SHARED_CONFIG = ("vocab_size", "z_channels", "num_classes", "bits_per_token", "text_channels")


def check_refiner(drafter: ScaleModel, refiner: ScaleModel) -> None:
    """Raise a ValueError when a refiner cannot continue the drafter's scales (width and depth may differ)."""
    if type(refiner) is not type(drafter):
        raise ValueError(f"the refiner is a {type(refiner).__name__} but the drafter a {type(drafter).__name__}: "
                         "a CoDe refiner must be of the drafter's family")
    problems = []
    for name in SHARED_CONFIG:
        mine, theirs = getattr(drafter.config, name, None), getattr(refiner.config, name, None)
        if mine != theirs:
            problems.append(f"{name} {theirs} (drafter: {mine})")
    if refiner.schedule.shapes != drafter.schedule.shapes:
        problems.append(f"scales {refiner.schedule.shapes} (drafter: {drafter.schedule.shapes})")
    if problems:
        raise ValueError(
            "the refiner does not fit the drafter: " + "; ".join(problems)
            + "; a CoDe refiner must share the drafter's tokenizer, conditions and scale schedule"
        )


@dataclass
class CoDeOptions(VAROptions):
    """CoDe's drafter/refiner split; the KV options apply to the drafter, ``refiner_kv_budget`` to the refiner."""

    refiner: ScaleModel | None = option(
        None, "CoDe: the refiner, of the drafter's family: a bundle/run directory, an official VAR .pth, or an "
        "official Infinity .pth/.safetensors/shard folder (told by its keys; it decodes the drafter's schedule)",
        model="var", metavar="PATH")
    draft_steps: int | None = option(None, "CoDe: scales the drafter decodes (default: all but the last 2)",
                                     type=int, minimum=1)
    refiner_kv_budget: float | str | KVBudget | None = option(
        None, "CoDe: the refiner's ScaleKV budget (fraction or budget JSON; default: --kv-budget)",
        type=parse_budget, check=check_budget, metavar="FRACTION|FILE")


class CoDeSampler(ScaleSampler):
    """Drafter (``model``) for scales [0, draft_steps), refiner for [draft_steps, S).

    ``stats`` report the KV bytes of each phase (``kv_bytes_drafter``/``_refiner`` allocated,
    ``kv_bytes_held_drafter``/``_refiner`` held at the end; ``kv_bytes``/``kv_bytes_held`` are the larger,
    since the two caches never coexist), the seconds of each phase and, on CUDA, the peak memory after the
    drafter phase (``peak_cuda_bytes_drafter``).
    """

    name = "code"
    Options = CoDeOptions

    def __init__(self, model: ScaleModel, tokenizer, settings: SamplingSettings | None = None, **options):
        super().__init__(model, tokenizer, settings, **options)
        refiner = self.options.refiner
        if refiner is None:
            raise ValueError("CoDe needs a refiner model (CLI: --refiner PATH, a bundle/run directory or a .pth)")
        check_refiner(model, refiner)
        self.refiner = refiner
        draft_steps = self.num_scales - 2 if self.options.draft_steps is None else self.options.draft_steps
        if not 1 <= draft_steps <= self.num_scales:
            raise ValueError(f"draft_steps must be in 1..{self.num_scales} for this model, got {draft_steps}")
        self.options = dataclasses.replace(self.options, draft_steps=draft_steps)
        self.kv_policy = policy_from_options(self.options, model)
        self.refiner_kv_policy = policy_from_options(self.options, refiner, self.options.refiner_kv_budget)

    def generate_tokens(self, state: DecodeState) -> tuple[list[torch.Tensor], torch.Tensor, dict]:
        """Drafter phase, then (its cache freed) refiner phase."""
        device = device_of(self.model)
        split = self.options.draft_steps
        stats = {"draft_steps": split}
        started = now(device)
        drafter = self.new_runner(state, self.kv_policy, stop=split)
        self.run_scales(drafter, state, 0, split)
        stats.update(kv_stats(drafter.cache, "_drafter"))
        del drafter  # frees the drafter's cache before the refiner allocates its own
        stats["seconds_drafter"] = now(device) - started
        stats["peak_cuda_bytes_drafter"] = peak_memory(device)
        started = now(device)
        if split < self.num_scales:
            refiner = self.new_runner(state, self.refiner_kv_policy, model=self.refiner, start=split)
            self.run_scales(refiner, state, split, self.num_scales)
            stats.update(kv_stats(refiner.cache, "_refiner"))
            del refiner
        else:
            stats.update(kv_bytes_refiner=0, kv_bytes_held_refiner=0)
        stats["seconds_refiner"] = now(device) - started
        for key in ("kv_bytes", "kv_bytes_held"):  # the two caches never coexist
            stats[key] = max(stats[f"{key}_drafter"], stats[f"{key}_refiner"])
        return state.indices, state.f_hat, stats
