"""The scale loop every next-scale sampler is built from, and plain next-scale sampling (``var``).

Three pieces, each replaceable on its own:

* :class:`DecodeState` — what has been decided so far for a batch: the token maps, the running f_hat and
  the continuous input features of every scale after the first (CoDe's "token hub").  It does not belong
  to any transformer, so one model can hand it to another.
* :class:`ScaleRunner` — one transformer bound to a batch: its condition rows (the batch, then its
  unconditional half for guidance) and its KV cache.  ``logits_for(state, si)`` returns the logits of scale
  si, first pre-filling in one block-causal pass whatever earlier scales the cache does not hold yet; so a
  model that joins half-way (the CoDe refiner) just starts asking at its first scale.
* the KV policy (var/sample/kv.py) — how a runner's cache is built: full, or compressed by ScaleKV, chosen
  by the ``kv_budget`` option any scale-wise sampler that keeps its cache accepts.

Samplers are written against the family protocols of var/models/family.py (``ScaleModel``,
``ScaleTokenizer``), so VAR today and Infinity later run through the same loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from var.models.family import ScaleModel
from var.sample.base import BaseSampler, GumbelOption, ModelKind, SamplingState, device_of, kv_stats
from var.sample.kv import KVPolicy
from var.sample.logits import SamplingSettings, gumbel_smooth
from var.sample.scalekv.cache import KVOptions, policy_from_options


@dataclass(kw_only=True)
class DecodeState(SamplingState):
    """Everything decided so far for one batch of images."""

    f_hat: torch.Tensor  # (B, C, h, w) running sum of the refined scale features
    indices: list[torch.Tensor] = field(default_factory=list)  # per scale (B, draws of the scale)
    features: list[torch.Tensor] = field(default_factory=list)  # input of scale si+1: (B, n_{si+1}, C_in)

    @property
    def scales_done(self) -> int:
        return len(self.indices)


class ScaleRunner:
    """One transformer and its KV cache, decoding a batch scale by scale.

    ``start`` and ``stop`` are the scales it will be asked for: the first request pre-fills scales < start
    in the same pass, and the keys/values of scale ``stop - 1`` are never stored.  They only size the cache.
    """

    def __init__(
        self,
        model: ScaleModel,
        state: DecodeState,
        guided: bool = True,
        kv_policy: KVPolicy | None = None,
        start: int = 0,
        stop: int | None = None,
    ):
        self.model = model
        num_scales = model.schedule.num_scales
        self.stop = num_scales if stop is None else stop
        if not 0 <= start < self.stop <= num_scales:
            raise ValueError(f"scale range [{start}, {self.stop}) is not inside [0, {num_scales})")
        self.copies = 2 if guided else 1  # rows per image: conditional, then unconditional
        self.cond = model.condition(state.conditions, guided)
        self.cache = (kv_policy or KVPolicy()).make_cache(model, self.copies * state.batch_size, start, self.stop)
        self.cached_scales = 0  # scales 0..cached_scales-1 are in the cache

    def scale_inputs(self, state: DecodeState, scale_index: int) -> torch.Tensor | None:
        """Continuous input features of a scale (None for scale 0, whose input is the start token)."""
        return state.features[scale_index - 1] if scale_index > 0 else None

    def forward_scales(
        self,
        first: int,
        last: int,
        features: Sequence[torch.Tensor | None],
        state: DecodeState,
        persist: bool | None = None,
    ) -> torch.Tensor:
        """One transformer pass over scales first..last on top of the cached scales < first.

        ``features[j]`` is the input of scale first+j (None for scale 0).  Blocks attend block-causally;
        their keys/values are appended to the cache unless the pass reaches the runner's last scale (``persist``
        overrides this: a speculative pass that may be rolled back keeps them).
        Returns the hidden states (rows, n_first + ... + n_last, C).
        """
        if last >= self.stop:
            raise ValueError(f"this runner decodes scales below {self.stop}; scale {last} was requested")
        present = [f for f in features if f is not None]
        # the same inputs for every guidance half
        inputs = torch.cat(present, dim=1).repeat(self.copies, 1, 1) if present else None
        self.cache.begin_pass(last, persist=last < self.stop - 1 if persist is None else persist)
        hidden = self.model.forward_scales(self.cond, first, last, inputs, self.cache)
        self.cached_scales = last + 1
        state.passes += 1
        return hidden

    def rollback(self, num_scales: int) -> None:
        """Keep only scales < num_scales in the cache (speculative blocks that were rejected)."""
        self.cache.truncate(self.model.schedule.bounds[num_scales - 1][1] if num_scales else 0)
        self.cached_scales = num_scales

    def logits_for(self, state: DecodeState, scale_index: int) -> torch.Tensor:
        """Unguided logits (rows, draws of the scale, V) of one scale, pre-filling earlier scales not yet cached."""
        first = self.cached_scales
        if first > scale_index:
            raise RuntimeError(f"scale {scale_index} is already in the cache (cached up to {first - 1})")
        features = [self.scale_inputs(state, si) for si in range(first, scale_index + 1)]
        hidden = self.forward_scales(first, scale_index, features, state)
        count = self.model.schedule.tokens[scale_index]
        return self.model.logits(hidden[:, -count:], self.cond)  # (rows, count * draws_per_token, V)


class ScaleSampler(BaseSampler):
    """The steps of next-scale sampling (choose a scale's tokens, advance f_hat); subclasses run the loop."""

    kind = ModelKind(ScaleModel, "a VAR model (a next-scale-prediction transformer)", "var")

    @property
    def num_scales(self) -> int:
        return self.model.schedule.num_scales

    def start(self, state: SamplingState) -> DecodeState:
        f_hat = self.tokenizer.empty_latent(state.batch_size, device_of(self.model), schedule=self.model.schedule)
        return DecodeState(**vars(state), f_hat=f_hat)

    def new_runner(self, state: DecodeState, kv_policy: KVPolicy | None = None, model: ScaleModel | None = None,
                   start: int = 0, stop: int | None = None) -> ScaleRunner:
        runner = ScaleRunner(model or self.model, state, self.rule.guided(self.settings), kv_policy, start, stop)
        self.rule.prepare(runner.cond, runner.model, self.settings)
        return runner

    def draw_offset(self, scale_index: int) -> int:
        """Index of a scale's first draw in the whole sequence (the Gumbel noise counter)."""
        return self.model.schedule.bounds[scale_index][0] * self.model.draws_per_token

    def scale_features(self, tokens: torch.Tensor, scale_index: int) -> torch.Tensor:
        """The tokenizer's features of a scale's draws (B, draws of the scale)."""
        return self.tokenizer.scale_features(tokens, scale_index, schedule=self.model.schedule)

    def choose_tokens(self, state: DecodeState, scale_index: int, logits: torch.Tensor) -> torch.Tensor:
        """Guide, process and draw the tokens of one scale; returns their features (B, C, h, w)."""
        processed = self.processed_logits(state, scale_index, logits)
        indices = self.draw(state, processed, self.draw_offset(scale_index))  # (B, draws)
        if self.settings.more_smooth:
            ratio = scale_index / (self.num_scales - 1) if self.num_scales > 1 else 1.0
            features = self.tokenizer.soft_scale_features(gumbel_smooth(processed, ratio, state.generator),
                                                          scale_index)
        else:
            features = self.scale_features(indices, scale_index)
        state.indices.append(indices)
        return features

    def advance(self, state: DecodeState, scale_index: int, features: torch.Tensor) -> None:
        """Add a scale's features to f_hat and record the next scale's input."""
        next_features = self.tokenizer.next_scale_input(scale_index, state.f_hat, features.float(),
                                                        schedule=self.model.schedule)
        if next_features is not None:
            state.features.append(next_features)

    def run_scales(self, runner: ScaleRunner, state: DecodeState, start: int, stop: int) -> None:
        """Decode scales start..stop-1 with one runner."""
        for scale_index in range(start, stop):
            logits = runner.logits_for(state, scale_index)
            self.advance(state, scale_index, self.choose_tokens(state, scale_index, logits))


@dataclass
class VAROptions(KVOptions, GumbelOption):
    """Plain next-scale sampling: the KV policy and Gumbel noise."""


class VARSampler(ScaleSampler):
    """Plain next-scale-prediction sampling (the official ``autoregressive_infer_cfg``), KV-cached.

    Options (:class:`VAROptions`): ``kv_budget`` (with ``kv_scoring``, ``kv_share_cfg``, ``kv_window``)
    compresses the cache with ScaleKV (``--sampler scalekv`` is this sampler with a 10 % budget); ``gumbel``
    draws tokens with counter-based Gumbel noise keyed by the seed.  ``kv_policy`` overrides the policy
    (for measuring the official layout and for calibration).
    """

    name = "var"
    Options = VAROptions

    def __init__(self, model: ScaleModel, tokenizer, settings: SamplingSettings | None = None,
                 kv_policy: KVPolicy | None = None, **options):
        super().__init__(model, tokenizer, settings, **options)
        self.kv_policy = kv_policy or policy_from_options(self.options, model)

    def generate_tokens(self, state: DecodeState) -> tuple[list[torch.Tensor], torch.Tensor, dict]:
        runner = self.new_runner(state, self.kv_policy)
        self.run_scales(runner, state, 0, self.num_scales)
        return state.indices, state.f_hat, kv_stats(runner.cache)
