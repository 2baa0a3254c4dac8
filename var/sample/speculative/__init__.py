"""Speculative decoding: raster SJD (sjd.py, with its ragged KV cache, ragged_cache.py) and scale-wise
speculation for next-scale models (scales.py), both verified with the rule defined here.

The speculative-sampling lemma: draw a draft d ~ q with fresh randomness, accept it with probability
min(1, p(d) / q(d)), otherwise draw from the residual norm(max(0, p - q)); the result is distributed exactly
as p.  q may be anything fixed before d is drawn: a stale distribution recycled from an earlier pass, or a
one-hot guess.  Two conditions keep the samplers exact: p is the *processed* distribution plain sampling
draws from (guidance, top-k, top-p, temperature), and the residual is *not* filtered again (re-applying
top-p to it would bias the result).
"""

from __future__ import annotations

import torch

from var.sample.logits import draw


def acceptance_probability(p_draft: torch.Tensor, q_draft: torch.Tensor) -> torch.Tensor:
    """min(1, p(d) / q(d)) for drafts d ~ q (so q(d) > 0)."""
    return (p_draft / q_draft).clamp(max=1.0)


def residual_distribution(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """norm(max(0, p - q)) over the last axis, without re-filtering.

    Where it has no mass (p <= q everywhere, i.e. p == q) a rejection is impossible; p is returned there so
    the tensor stays a valid distribution for batched draws.
    """
    residual = (p - q).clamp_(min=0)
    mass = residual.sum(dim=-1, keepdim=True)
    return torch.where(mass > 0, residual / mass.clamp(min=torch.finfo(p.dtype).tiny), p)


def verify_drafts(
    p: torch.Tensor, q: torch.Tensor, drafts: torch.Tensor, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Verify every draft independently.

    Args:
        p: target distributions (..., V); q: the draft distributions (..., V) the drafts were drawn from.
        drafts: draft tokens (...).
    Returns ``(tokens, accepted)``: the draft where accepted, else a residual draw; each token is an exact
    draw from p.  A sequential (raster) verifier uses the positions up to the first rejection.
    """
    p_draft = p.gather(-1, drafts.unsqueeze(-1)).squeeze(-1)
    q_draft = q.gather(-1, drafts.unsqueeze(-1)).squeeze(-1)
    uniforms = torch.rand(drafts.shape, generator=generator, device=p.device)
    accepted = uniforms < acceptance_probability(p_draft, q_draft)
    replacement = draw(residual_distribution(p, q), generator)
    return torch.where(accepted, drafts, replacement), accepted
