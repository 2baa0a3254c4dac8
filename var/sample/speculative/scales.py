"""Scale-wise speculative decoding for next-scale models (VAR, Infinity): several scales per forward pass,
exactly the plain sampler's law (Infinity's bits are verified as draws, each a position of vocabulary 2).

Plain VAR spends one pass per scale.  A speculative pass over scales first..last feeds block ``first`` from
the decided scales (exact) and every later block j+1 from *drafted* tokens of scale j, all in one
block-causal pass on top of the KV cache.  Verification then walks up from ``first``: a drafted scale is
verified position by position with the speculative rule (var/sample/speculative/__init__.py), so its tokens are an
exact draw of that scale whatever the draft; only if *every* position kept its draft does the next block
have the context plain sampling would have given it, and verification continues there.  The block after
the last drafted scale (or the first block with a rejected context) is sampled directly.  Rejected blocks
are cut from the cache.

* Drafts: ``recycle`` reuses a block computed on a rejected context (its stale p) as the next pass's draft
  distribution (Jacobi iteration), with one-hot guesses where none exists; ``guess`` uses only one-hot
  guesses: the previous scale's token map upsampled (nearest), a random token for the first scale.
* Small-block policy: a pass adds blocks only while the next block has at most ``spec_max_tokens`` tokens
  (discarded late blocks cost the most), up to ``spec_scales`` blocks per pass.
* Batches: every row keeps its own decided scales (rows that decided more than the batch's slowest row
  take their decided tokens as fixed inputs, never re-verified); the cache keeps what every row shares.
* Gumbel mode: tokens are argmax(logits + G) with counter-based noise G (the ``gumbel`` option), drafts
  are argmax(q + G) and a drafted scale passes iff it equals the verifier's argmax, so the output equals plain
  Gumbel-mode sampling token for token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from var.models.family import ScaleModel
from var.models.kv_cache import KVCache
from var.sample.base import GumbelOption, kv_stats
from var.sample.kv import KVPolicy
from var.sample.logits import SamplingSettings
from var.sample.options import option
from var.sample.scale import DecodeState, ScaleRunner, ScaleSampler
from var.sample.speculative import verify_drafts

DRAFT_SOURCES = ("recycle", "guess")


@dataclass
class ScaleSpeculationOptions(GumbelOption):
    """Scale-wise speculation.  No KV budget: rejected scales are rolled back, which a compressed cache cannot."""

    spec_scales: int = option(3, "sjd-scale: scales one forward pass may decode (drafted scales + 1; 1 is plain "
                                 "VAR)", minimum=1)
    spec_max_tokens: int = option(36, "sjd-scale: a scale joins a pass only if it has at most this many tokens",
                                  minimum=1)
    draft_source: str = option("recycle", "sjd-scale: drafts from the stale outputs of rejected passes (recycle, "
                                          "one-hot guesses where none exist) or guesses only (guess)",
                               choices=DRAFT_SOURCES)


class LastScaleTransientCache(KVCache):
    """Plain VAR's cache (every scale but the last), for passes that may reach the last scale.

    A speculative pass ending at the last scale must keep the keys of its earlier blocks (they may be
    decided) but never needs the last scale's: nothing attends to them after the pass.  So the keys/values
    beyond ``capacity`` (the last scale's block) are used for the pass's own attention and never stored,
    and the buffers are exactly plain VAR's.
    """

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        room = self.capacity[layer] - self.lengths[layer]
        if not self.persist or k.shape[2] <= room:
            return super().update(layer, k, v)
        held_k, held_v = super().update(layer, k[:, :, :room], v[:, :, :room])
        return torch.cat((held_k, k[:, :, room:].to(held_k.dtype)), dim=2), torch.cat((held_v, v[:, :, room:]), dim=2)


class SpeculativeKVPolicy(KVPolicy):
    """Plain VAR's cache size; when the last scale can join a speculative pass its block stays transient."""

    name = "speculative"

    def __init__(self, last_scale_speculated: bool):
        self.last_scale_speculated = last_scale_speculated

    def make_cache(self, model: ScaleModel, rows: int, start: int = 0, stop: int | None = None) -> KVCache:
        cache = super().make_cache(model, rows, start, stop)
        if self.last_scale_speculated:
            return LastScaleTransientCache(cache.num_layers, cache.capacity)
        return cache


class ScaleSpeculativeSampler(ScaleSampler):
    """Speculative next-scale sampling (options: :class:`ScaleSpeculationOptions`).

    ``more_smooth`` is not supported: it feeds random soft codes, so a scale's input would not be a function
    of its tokens.  With ``gumbel`` the result equals plain Gumbel-mode sampling token for token.
    """

    name = "sjd-scale"
    Options = ScaleSpeculationOptions

    def __init__(self, model: ScaleModel, tokenizer, settings: SamplingSettings | None = None, **options):
        super().__init__(model, tokenizer, settings, **options)
        if self.settings.more_smooth:
            raise ValueError("more_smooth feeds random soft codes to later scales; it cannot be speculated exactly")
        self.spec_scales = self.options.spec_scales
        self.spec_max_tokens = self.options.spec_max_tokens
        self.draft_source = self.options.draft_source
        sizes = model.schedule.tokens
        last_speculated = self.spec_scales > 1 and len(sizes) > 1 and sizes[-1] <= self.spec_max_tokens
        self.kv_policy = SpeculativeKVPolicy(last_speculated)
        # scales that can be drafted: those followed by a block small enough to join a pass
        self.draftable_scales = [scale for scale in range(len(sizes) - 1) if self.last_block(scale) > scale]

    # -- policy and seams ------------------------------------------------------------------------------
    def last_block(self, first: int) -> int:
        """The last scale of a pass starting at ``first`` (small-block policy, at most ``spec_scales`` blocks)."""
        sizes, last = self.model.schedule.tokens, first
        while (last + 1 < self.num_scales and last + 1 - first < self.spec_scales
               and sizes[last + 1] <= self.spec_max_tokens):
            last += 1
        return last

    def rows_frontier(self, decided: torch.Tensor) -> torch.Tensor:
        """Scales each row has decided after a pass: its own count (ragged rows).

        Rewinding every row to the batch minimum would re-verify scales a row had already decided, which is
        biased (the batch > 1 bug of the SJD reference code).
        """
        return decided

    def guess(self, state: DecodeState, tokens: list[torch.Tensor], scale_index: int) -> torch.Tensor:
        """One-hot draft (B, h*w*draws): the previous scale's draws upsampled (nearest); random for scale 0."""
        shapes, draws = self.model.schedule.shapes, self.model.draws_per_token
        if scale_index == 0:
            count = self.model.schedule.tokens[0] * draws
            return torch.randint(self.model.vocab_size, (state.batch_size, count), generator=state.generator,
                                 device=state.f_hat.device)
        previous = tokens[scale_index - 1].view(-1, *shapes[scale_index - 1], draws).permute(0, 3, 1, 2)
        upsampled = F.interpolate(previous.float(), size=shapes[scale_index], mode="nearest").long()
        return upsampled.permute(0, 2, 3, 1).flatten(1)  # (B, h*w*draws), draws of a token together

    # -- the steps of a pass ---------------------------------------------------------------------------
    def prepare_draft(self, state: DecodeState, scale_index: int, book: DraftBook, decided: torch.Tensor) -> None:
        """Give every row that has not decided this scale a draft: recycled if allowed and known, else a guess."""
        fresh = decided <= scale_index
        if self.draft_source == "recycle":
            fresh &= ~book.computed[scale_index]
        guess = self.guess(state, book.tokens, scale_index)
        q = F.one_hot(guess, self.model.vocab_size).float()
        if state.noise_seed is not None:
            q = q.log()  # Gumbel mode keeps log q: argmax(log one-hot + G) is the guess under any noise
        book.put(scale_index, fresh, guess, q, computed=False)

    def forward_pass(self, runner: ScaleRunner, state: DecodeState, book: DraftBook, first: int, last: int):
        """One block-causal pass over scales first..last; yields (scale, processed logits (B, n, V))."""
        # block `first` reads the decided scales; block j+1 reads each row's tokens of scale j (decided or draft)
        scratch = DecodeState(conditions=state.conditions, batch_size=state.batch_size, f_hat=state.f_hat.clone(),
                              features=list(state.features))
        for scale in range(first, last):
            self.advance(scratch, scale, self.scale_features(book.tokens[scale], scale))
        features = [runner.scale_inputs(scratch, scale) for scale in range(first, last + 1)]
        hidden = runner.forward_scales(first, last, features, state, persist=True if last > first else None)
        logits = self.model.logits(hidden, runner.cond)  # (rows, (n_first + ... + n_last) * draws, V)
        begin = 0
        for scale in range(first, last + 1):
            count = self.model.schedule.tokens[scale] * self.model.draws_per_token
            yield scale, self.processed_logits(state, scale, logits[:, begin: begin + count])
            begin += count

    def verify_block(
        self, state: DecodeState, scale_index: int, processed: torch.Tensor, drafted: bool, book: DraftBook
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Decide one block for the rows whose context was exact; draw recycled drafts for the others.

        Returns (tokens, passed, kept_q, sampled_q), all (B, ...): ``tokens`` are the decided tokens for rows
        deciding this scale and a fresh draw (the next draft) for rows on a rejected context; ``passed``
        says a drafted scale kept every draft; ``kept_q`` is the q a decided token would be re-verified
        against (its draft's q if accepted, else p), ``sampled_q`` the q of the fresh draw (p).
        """
        # plain draw: bonus token or recycled draft
        sample = self.draw(state, processed, self.draw_offset(scale_index))
        none_passed = torch.zeros(state.batch_size, dtype=torch.bool, device=processed.device)
        if state.noise_seed is not None:  # Gumbel mode: the draw is the verifier's argmax
            passed = (sample == book.tokens[scale_index]).all(dim=1) if drafted else none_passed
            return sample, passed, processed, processed
        p = processed.softmax(dim=-1)
        if not drafted:
            return sample, none_passed, p, p
        draft_q = book.q[scale_index]
        verified, accepted = verify_drafts(p, draft_q, book.tokens[scale_index], state.generator)
        return verified, accepted.all(dim=1), torch.where(accepted.unsqueeze(-1), draft_q, p), p

    # -- the loop -------------------------------------------------------------------------------------
    def generate_tokens(self, state: DecodeState) -> tuple[list[torch.Tensor], torch.Tensor, dict]:
        """Speculative passes until every row has decided every scale; stats report passes per image."""
        runner = self.new_runner(state, self.kv_policy)
        book = DraftBook(state, self.model, self.draftable_scales)
        device = state.f_hat.device
        decided = torch.zeros(state.batch_size, dtype=torch.long, device=device)  # scales each row has decided
        row_passes = torch.zeros(state.batch_size, device=device)
        while state.scales_done < self.num_scales:
            first = state.scales_done
            last = self.last_block(first)
            for scale in range(first, last):
                self.prepare_draft(state, scale, book, decided)
            row_passes += (decided < self.num_scales).float()
            exact = torch.ones_like(decided, dtype=torch.bool)  # rows whose blocks so far had exact inputs
            for scale, processed in self.forward_pass(runner, state, book, first, last):
                deciding = exact & (decided == scale)
                stale = ~exact  # rejected earlier in this pass: this block's output becomes their next draft
                tokens, passed, kept_q, sampled_q = self.verify_block(state, scale, processed, scale < last, book)
                book.put(scale, deciding, tokens, kept_q)
                book.put(scale, stale, tokens, sampled_q)
                exact &= ~deciding | passed
                decided = decided + deciding.long()
            decided = self.rows_frontier(decided)
            shared = int(decided.min())
            runner.rollback(shared)  # drop blocks some row rejected; keep what every row decided
            for scale in range(first, shared):
                state.indices.append(book.tokens[scale])
                self.advance(state, scale, self.scale_features(book.tokens[scale], scale))
        return state.indices, state.f_hat, {**kv_stats(runner.cache), "passes_per_image": row_passes.mean().item()}


class DraftBook:
    """Per scale, every row's tokens (decided, or its current draft) and, for scales that can be drafted,
    the q they are verified against (probabilities; processed logits in Gumbel mode) and whether they come
    from a computed block (decided, or recycled from a stale block) rather than a guess."""

    def __init__(self, state: DecodeState, model: ScaleModel, draftable: Sequence[int]):
        batch, device = state.batch_size, state.f_hat.device
        sizes = [tokens * model.draws_per_token for tokens in model.schedule.tokens]  # draws per scale
        self.tokens = [torch.zeros(batch, n, dtype=torch.long, device=device) for n in sizes]
        self.q = {scale: torch.zeros(batch, sizes[scale], model.vocab_size, device=device) for scale in draftable}
        self.computed = {scale: torch.zeros(batch, dtype=torch.bool, device=device) for scale in draftable}

    def put(self, scale: int, rows: torch.Tensor, tokens: torch.Tensor, q: torch.Tensor, computed: bool = True) -> None:
        """Overwrite the entries of the rows selected by the mask ``rows`` (B,)."""
        self.tokens[scale] = torch.where(rows.unsqueeze(1), tokens, self.tokens[scale])
        if scale in self.q:
            self.q[scale] = torch.where(rows.view(-1, 1, 1), q, self.q[scale])
            self.computed[scale] = torch.where(rows, computed, self.computed[scale])
