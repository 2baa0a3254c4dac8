"""Speculative Jacobi decoding (SJD) for raster models: several tokens per forward pass, same law.

Each pass feeds a window of ``sjd_window`` positions per row: the last accepted token, then
``sjd_window - 1`` draft tokens.  The output at every window position gives the target distribution p of the
next token; drafts are verified left to right with the speculative rule (var/sample/speculative/__init__.py)
until the first rejection, whose token is redrawn from the residual; if every draft passes, the sample drawn
at the last position is a bonus token.  So 1..sjd_window tokens are accepted per pass, each an exact draw from
plain sampling's distribution.

* Drafts: the samples drawn at positions after a rejection (conditioned on a now-invalid prefix) are
  recycled as the next pass's leading drafts with their p as q (the Jacobi iteration); the rest of the
  window is initialised with one-hot guesses: ``random`` tokens, the ``left`` neighbour, or the token
  ``above`` (one row up; spatial locality).
* Batches are exact with ragged acceptance: every row keeps its own accepted length, its own window
  offset and its own KV-cache length (:class:`RaggedKVCache`).  The reference implementation advanced every
  row by the batch minimum and re-verified tokens a row had already accepted, which biases them.
* Gumbel mode (the ``gumbel`` option): every position's token is argmax(processed logits + G) with the
  counter-based noise of its token index; a draft passes iff it equals that, so the result equals plain
  Gumbel-mode raster sampling (``ar``) token for token, in fewer passes.
* Condition prefixes (T > 1, LlamaGen t2i) are pre-filled once; windows then start at position T - 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from var.models.family import RasterModel
from var.sample.base import GumbelOption, SamplingState, device_of, kv_stats
from var.sample.logits import SamplingSettings, draw
from var.sample.options import option
from var.sample.raster import RasterSampler
from var.sample.speculative import verify_drafts
from var.sample.speculative.ragged_cache import RaggedKVCache

DRAFT_INITS = ("random", "left", "above")


@dataclass
class SJDOptions(GumbelOption):
    """Speculative Jacobi decoding."""

    sjd_window: int = option(16, "sjd: tokens fed per forward pass (1 accepted + drafts; at most this many are "
                                 "accepted per pass; 16 saturates the gain in the SJD paper)", minimum=2)
    draft_init: str = option("above", "sjd: one-hot guess for new drafts: random, the left neighbour, or the "
                                      "token one row up", choices=DRAFT_INITS)


class SJDSampler(RasterSampler):
    """Speculative Jacobi decoding of a raster model (options: :class:`SJDOptions`)."""

    name = "sjd"
    Options = SJDOptions

    def __init__(self, model: RasterModel, tokenizer, settings: SamplingSettings | None = None, **options):
        super().__init__(model, tokenizer, settings, **options)
        self.window = self.options.sjd_window
        self.draft_init = self.options.draft_init

    def rows_advance(self, accepted: torch.Tensor) -> torch.Tensor:
        """How many positions each row moves after a pass: its own accepted count (ragged rows).

        Moving every row by the batch minimum (the reference code) would feed tokens a row has already
        accepted back in as drafts with their old q and verify them a second time, which is biased.
        """
        return accepted

    def initialise_drafts(
        self,
        tokens: torch.Tensor,
        draft_q: torch.Tensor,
        recycled: torch.Tensor,
        length: torch.Tensor,
        generator: torch.Generator | None,
    ) -> None:
        """Fill the draft slots without a recycled sample with one-hot guesses, left to right, in place.

        tokens (B, L + W): accepted tokens, then drafts; draft_q (B, W - 1, V): q of the draft at each window
        offset; recycled (B, W - 1): which offsets already hold a recycled draft; length (B,) accepted tokens.
        """
        width = self.model.grid[1]
        vocab = draft_q.shape[-1]
        rows = torch.arange(len(length), device=length.device)
        for offset in range(draft_q.shape[1]):
            fresh = ~recycled[:, offset]
            if not bool(fresh.any()):
                continue
            position = length + offset
            guess = torch.randint(vocab, position.shape, generator=generator, device=position.device)
            if self.draft_init in ("left", "above"):
                left = tokens[rows, (position - 1).clamp(min=0)]
                guess = torch.where(position % width != 0, left, guess)
            if self.draft_init == "above":
                above = tokens[rows, (position - width).clamp(min=0)]
                guess = torch.where(position >= width, above, guess)
            tokens[rows, position] = torch.where(fresh, guess, tokens[rows, position])
            one_hot = F.one_hot(tokens[rows, position], vocab).to(draft_q.dtype)
            draft_q[:, offset] = torch.where(fresh.unsqueeze(1), one_hot, draft_q[:, offset])

    def verify(self, state: SamplingState, processed: torch.Tensor, draft_q: torch.Tensor, drafts: torch.Tensor,
               positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(verified drafts, accepted (B, W - 1), a sample at every window position (B, W), the p each sample
        was drawn from); in Gumbel mode every position's sample is its Gumbel-max token and drafts pass iff
        they equal it."""
        if state.noise_seed is not None:
            samples = self.draw(state, processed, positions)
            return samples[:, :-1], drafts == samples[:, :-1], samples, processed
        p = processed.softmax(dim=-1)
        verified, accepted = verify_drafts(p[:, :-1], draft_q, drafts, state.generator)
        return verified, accepted, draw(p, state.generator), p

    def generate_tokens(self, state: SamplingState) -> tuple[list[torch.Tensor], torch.Tensor, dict]:
        """Jacobi passes until every row has accepted its whole token map."""
        model, seq_len, window, batch = self.model, self.seq_len, self.window, state.batch_size
        vocab, device = model.vocab_size, device_of(model)
        cond, copies, prefix = self.condition_rows(state)
        cache = RaggedKVCache(model.depth, prefix - 1 + seq_len + window, copies * batch, device)
        self.prefill(state, cond, copies, prefix, cache)
        tokens = torch.zeros(batch, seq_len + window, dtype=torch.long, device=device)  # slot t = image token t
        draft_q = torch.zeros(batch, window - 1, vocab, device=device)
        recycled = torch.zeros(batch, window - 1, dtype=torch.bool, device=device)
        length = torch.zeros(batch, dtype=torch.long, device=device)  # accepted tokens of every row
        offsets = torch.arange(window, device=device)
        row_passes = torch.zeros(batch, device=device)
        while bool((length < seq_len).any()):
            self.initialise_drafts(tokens, draft_q, recycled, length, state.generator)
            positions = length.unsqueeze(1) + offsets  # (B, W) image tokens predicted; finished rows run past the end
            fed = tokens.gather(1, (positions - 1).clamp(min=0))  # the previous token (token 0: a condition position)
            sequence = positions.clamp(max=seq_len - 1) + prefix - 1  # absolute positions of the inputs
            mask = cache.open_window(window)
            hidden = model.forward_positions(cond, fed.repeat(copies, 1), sequence.repeat(copies, 1), cache, mask)
            state.passes += 1
            processed = self.processed_logits(state, positions, model.logits(hidden, cond))  # (B, W, V)

            drafts = tokens.gather(1, positions[:, :-1])  # the draft of position length+o sits at offset o
            verified, accepted, samples, p = self.verify(state, processed, draft_q, drafts, positions)
            leading = accepted.long().cumprod(dim=1).sum(dim=1)  # drafts accepted before the first rejection
            # the window's outcome: accepted drafts, the corrected (or bonus) token, then stale samples, each
            # with the q it would be re-verified against: its draft q if accepted, else its p
            decided = offsets[:-1] <= leading.unsqueeze(1)
            outcome = torch.cat((torch.where(decided, verified, samples[:, :-1]), samples[:, -1:]), dim=1)
            kept_q = (offsets[:-1] < leading.unsqueeze(1)).unsqueeze(-1)
            outcome_q = torch.cat((torch.where(kept_q, draft_q, p[:, :-1]), p[:, -1:]), dim=1)  # (B, W, V)
            tokens.scatter_(1, positions, outcome)

            row_passes += (length < seq_len).float()
            advance = self.rows_advance(leading + 1)
            length = (length + advance).clamp(max=seq_len)
            cache.truncate((length + prefix - 1).repeat(copies))  # roll back to each row's accepted prefix
            # recycle: window offsets after the advance become the next drafts, aligned to the new length
            source = advance.unsqueeze(1) + offsets[:-1]  # (B, W - 1)
            recycled = source < window
            index = source.clamp(max=window - 1).unsqueeze(-1).expand(-1, -1, vocab)
            draft_q = outcome_q.gather(1, index)
        passes_per_image = row_passes.mean().item()
        stats = {**kv_stats(cache), "passes_per_image": passes_per_image, "tokens_per_pass": seq_len / passes_per_image}
        return self.finish_tokens(tokens[:, :seq_len], stats)
