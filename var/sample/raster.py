"""Raster-order sampling: the steps every raster sampler shares, and plain decoding (``ar``), one token per pass.

Written against :class:`~var.models.family.RasterModel`: ``T`` condition positions, then the image tokens;
the output at sequence position T - 1 + j predicts image token j.  Guidance and token processing are the
family's rule (var/sample/rules.py; LlamaGen: its official ``generate`` semantics, cfg_interval included).
The token map is decoded by the tokenizer's ``tokens_to_latent``.
"""

from __future__ import annotations

import torch

from var.models.family import RasterModel
from var.models.kv_cache import KVCache
from var.sample.base import BaseSampler, GumbelOption, ModelKind, SamplingState, device_of, kv_stats


class RasterSampler(BaseSampler):
    """The steps of raster sampling; subclasses run the loop."""

    kind = ModelKind(RasterModel, "a raster model: LlamaGen (an 'ar' checkpoint or a released LlamaGen file)", "ar")

    @property
    def seq_len(self) -> int:
        """Image tokens per sample."""
        height, width = self.model.grid
        return height * width

    def target_probs(self, logits: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """The distribution (B, n, V) plain sampling draws from, for the model's rows (B*2, n, V): guided,
        processed, normalised (exact laws in tests; ``positions`` (B, n) are the predicted token indices)."""
        guided = self.rule.guide(logits, self.settings, positions)
        return self.rule.process(guided, self.settings, positions).softmax(dim=-1)

    def condition_rows(self, state: SamplingState) -> tuple[object, int, int]:
        """(condition rows, copies of each image's row (2 when guided), T condition positions)."""
        copies = 2 if self.rule.guided(self.settings) else 1
        cond = self.model.condition(state.conditions, copies == 2)
        return cond, copies, self.model.condition_length(cond)

    def prefill(self, state: SamplingState, cond, copies: int, length: int, cache: KVCache) -> None:
        """Run condition positions 0..T-2 into the cache, causally; position T-1 is the input of image token 0's
        pass.  (Nothing to do for a single condition position.)"""
        count = length - 1
        if count < 1:
            return
        device = device_of(self.model)
        positions = torch.arange(count, device=device).expand(copies * state.batch_size, -1)
        if hasattr(cache, "open_window"):  # a ragged cache writes at reserved slots and gives the mask
            mask = cache.open_window(count)
        else:
            mask = torch.ones(count, count, dtype=torch.bool, device=device).tril()
        self.model.forward_positions(cond, torch.zeros_like(positions), positions, cache, mask)
        state.passes += 1

    def finish_tokens(self, tokens: torch.Tensor, stats: dict) -> tuple[list[torch.Tensor], torch.Tensor, dict]:
        """(token maps, latent, stats) of the decoded batch (B, seq_len)."""
        return [tokens], self.tokenizer.tokens_to_latent(tokens, self.model.grid), stats


class ARSampler(RasterSampler):
    """Raster-order decoding with a KV cache, one pass per token."""

    name = "ar"
    Options = GumbelOption

    def generate_tokens(self, state: SamplingState) -> tuple[list[torch.Tensor], torch.Tensor, dict]:
        device = device_of(self.model)
        cond, copies, length = self.condition_rows(state)
        cache = KVCache(self.model.depth, length - 1 + self.seq_len)
        self.prefill(state, cond, copies, length, cache)
        tokens = torch.zeros(state.batch_size, self.seq_len, dtype=torch.long, device=device)
        for index in range(self.seq_len):
            fed = tokens[:, max(index - 1, 0): max(index, 1)]  # image token 0 is fed a condition position
            positions = torch.full((copies * state.batch_size, 1), length - 1 + index, device=device)
            hidden = self.model.forward_positions(cond, fed.repeat(copies, 1), positions, cache)
            state.passes += 1
            predicted = positions[: state.batch_size] - (length - 1)  # the image token index (B, 1)
            processed = self.processed_logits(state, predicted, self.model.logits(hidden, cond))
            tokens[:, index] = self.draw(state, processed, index)[:, 0]
        return self.finish_tokens(tokens, {**kv_stats(cache), "tokens_per_pass": 1.0})
