"""Speculative Jacobi decoding (SJD) for the raster AR baseline: several tokens per forward pass, same law.

Each pass feeds a window of ``window`` positions per row: the last accepted token, then ``window - 1`` draft
tokens.  The output at every window position gives the target distribution p of the next token; drafts
are verified left to right with the speculative rule (var/sample/speculative.py) until the first
rejection, whose token is redrawn from the residual; if every draft passes, the sample drawn at the last
position is a bonus token.  So 1..window tokens are accepted per pass, each an exact draw from plain AR
sampling's distribution.

* Drafts: the samples drawn at positions after a rejection (conditioned on a now-invalid prefix) are
  recycled as the next pass's leading drafts with their p as q (the Jacobi iteration); the rest of the
  window is initialised with one-hot guesses: ``random`` tokens, the ``left`` neighbour, or the token
  ``above`` (one row up; spatial locality).
* Batches are exact with ragged acceptance: every row keeps its own accepted length, its own window
  offset and its own KV-cache length (:class:`RaggedKVCache`).  The reference implementation advanced every
  row by the batch minimum and re-verified tokens a row had already accepted, which biases them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from var.models.ar import RasterAR
from var.models.kv_cache import RaggedKVCache
from var.sample.ar import ARSampler
from var.sample.base import SampleOutput, kv_stats
from var.sample.logits import SamplingSettings, draw
from var.sample.speculative import verify_drafts
from var.tokenizers.vqvae import VQVAE

DRAFT_INITS = ("random", "left", "above")


class SJDSampler(ARSampler):
    """Speculative Jacobi decoding of the raster AR baseline.

    Args:
        model, vqvae, settings: as for :class:`ARSampler`.
        window: positions fed per pass (1 accepted token + window - 1 drafts); at most ``window`` tokens
            are accepted per pass.  16 saturates the gain in the SJD paper.
        draft_init: one-hot guess for draft slots that have no recycled sample: ``random``, ``left``
            (copy the left neighbour; random in the first column) or ``above`` (copy the token one row up;
            the left neighbour in the first row).
    """

    name = "sjd"

    def __init__(
        self,
        model: RasterAR,
        vqvae: VQVAE,
        settings: SamplingSettings | None = None,
        window: int = 16,
        draft_init: str = "above",
    ):
        super().__init__(model, vqvae, settings)
        if window < 2:
            raise ValueError(f"window must be at least 2 for SJD, got {window} (window 1 is plain decoding: 'ar')")
        if draft_init not in DRAFT_INITS:
            raise ValueError(f"unknown draft_init '{draft_init}'; choose one of {', '.join(DRAFT_INITS)}")
        self.window = window
        self.draft_init = draft_init

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
        side = self.model.config.side
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
                guess = torch.where(position % side != 0, left, guess)
            if self.draft_init == "above":
                above = tokens[rows, (position - side).clamp(min=0)]
                guess = torch.where(position >= side, above, guess)
            tokens[rows, position] = torch.where(fresh, guess, tokens[rows, position])
            one_hot = F.one_hot(tokens[rows, position], vocab).to(draft_q.dtype)
            draft_q[:, offset] = torch.where(fresh.unsqueeze(1), one_hot, draft_q[:, offset])

    @torch.no_grad()
    def sample(
        self,
        labels: torch.Tensor | Sequence[int] | int | None,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        batch_size: int | None = None,
        decode: bool = True,
    ) -> SampleOutput:
        """Sample one image per label; stats report forward passes and accepted tokens per pass."""
        labels, generator, cond = self.begin(labels, seed, generator, batch_size)
        model, seq_len, window = self.model, self.seq_len, self.window
        batch, vocab, device = labels.shape[0], model.config.vocab_size, labels.device
        tokens = labels.new_zeros(batch, seq_len + window)  # slot t = token t: accepted, then drafts
        draft_q = torch.zeros(batch, window - 1, vocab, device=device)
        recycled = torch.zeros(batch, window - 1, dtype=torch.bool, device=device)
        length = labels.new_zeros(batch)  # accepted tokens of every row
        cache = RaggedKVCache(model.config.depth, seq_len + window, 2 * batch, device)
        offsets = torch.arange(window, device=device)
        passes, row_passes = 0, torch.zeros(batch, device=device)
        while bool((length < seq_len).any()):
            self.initialise_drafts(tokens, draft_q, recycled, length, generator)
            positions = length.unsqueeze(1) + offsets  # (B, W); windows of finished rows run past the end
            fed = tokens.gather(1, (positions - 1).clamp(min=0))  # previous token (position 0: start token)
            x = model.inputs_at(cond, fed.repeat(2, 1), positions.clamp(max=seq_len - 1).repeat(2, 1))
            mask = cache.open_window(window)
            p = self.target_probs(model.logits(model.forward_hidden(x, cond, mask, cache), cond))  # (B, W, V)

            drafts = tokens.gather(1, positions[:, :-1])  # the draft of position length+o sits at offset o
            verified, accepted = verify_drafts(p[:, :-1], draft_q, drafts, generator)
            samples = draw(p, generator)  # (B, W): the bonus token, and recycled drafts after a rejection
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
            cache.truncate(length.repeat(2))  # roll back to each row's accepted prefix
            # recycle: window offsets after the advance become the next drafts, aligned to the new length
            source = advance.unsqueeze(1) + offsets[:-1]  # (B, W - 1)
            recycled = source < window
            index = source.clamp(max=window - 1).unsqueeze(-1).expand(-1, -1, vocab)
            draft_q = outcome_q.gather(1, index)
            passes += 1
        passes_per_image = row_passes.mean().item()
        return self.finish(
            tokens[:, :seq_len], decode, passes=passes, passes_per_image=passes_per_image,
            tokens_per_pass=seq_len / passes_per_image, **kv_stats(cache),
        )
