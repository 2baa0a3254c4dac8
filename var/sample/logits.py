"""Token selection: classifier-free guidance, top-k / top-p filtering, temperature, Gumbel smoothing.

Kept apart from the sampler loops so that every sampler turns logits into tokens with exactly the same
primitives (combined per model family in var/sample/rules.py), and speculative verification computes the same
target distribution.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from var.sample.options import declared, option


@dataclass
class SamplingSettings:
    """How logits become tokens.  Each of top_k / top_p / temperature may be one value or one per scale.

    For VAR, ``cfg`` is the guidance weight at the last scale; the weight ramps linearly from 0 at the first
    scale (official VAR).  Temperature divides the logits *after* top-k/top-p filtering (as CoDe does); 1.0
    is the official VAR behaviour.  ``more_smooth`` feeds Gumbel-softmax mixtures of codes instead of hard
    codes to f_hat (official "more_smooth", better-looking but not used for FID).  How a model family applies
    these (its guidance formula, the order of temperature and filtering) is its rule in var/sample/rules.py.
    Every field is declared once (var/sample/options.py): the command-line flags and sweep keys come from here.
    """

    cfg: float | Sequence[float] = option(1.5, "classifier-free guidance weight t of (1 + t) cond - t uncond (VAR: "
                                          "at the last scale, ramping from 0; Infinity: official cfg = 1 + t, "
                                          "one value or one per scale)", type=float, per_scale=True)
    cfg_layer: int = option(0, "Infinity: where guidance mixes the two halves: 0 on the logits (the released "
                               "scripts), k < 0 on the hidden state after block depth + k (official "
                               "cfg_insertion_layer)", type=int, maximum=0)
    top_k: int | Sequence[int] = option(900, "keep the k most likely codes (0: all)", type=int, minimum=0,
                                        per_scale=True)
    top_p: float | Sequence[float] = option(0.96, "keep the most likely codes holding this probability mass "
                                            "(0: all)", type=float, minimum=0, maximum=1, per_scale=True)
    temperature: float | Sequence[float] = option(1.0, "divide the filtered logits by this", type=float,
                                                  minimum=0, exclusive_minimum=True, per_scale=True)
    more_smooth: bool = option(False, "Gumbel-softmax mixtures of codes in f_hat (nicer, not for FID)")
    cfg_interval: int = option(-1, "LlamaGen: guide image tokens 0..cfg_interval+1 only, later ones use the "
                                   "conditional logits (official cfg_interval; -1: guide every token)", minimum=-1)

    def __post_init__(self) -> None:
        for name, spec in declared(SamplingSettings).items():
            spec.validate(getattr(self, name))

    def check(self, num_scales: int) -> None:
        """Per-scale lists must give one value per scale of the model (caught before any sampling)."""
        for name in ("cfg", "top_k", "top_p", "temperature"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) and len(value) != num_scales:
                raise ValueError(
                    f"{name} has {len(value)} values but this model has {num_scales} scales: give one value, "
                    f"or one per scale"
                )

    def at(self, scale_index: int) -> tuple[int, float, float]:
        """(top_k, top_p, temperature) of one scale."""
        return (
            int(_per_scale(self.top_k, scale_index, "top_k")),
            float(_per_scale(self.top_p, scale_index, "top_p")),
            float(_per_scale(self.temperature, scale_index, "temperature")),
        )


def _per_scale(value, scale_index: int, name: str):
    if isinstance(value, (int, float)):
        return value
    if scale_index >= len(value):
        raise ValueError(f"{name} has {len(value)} per-scale values but scale {scale_index} was requested")
    return value[scale_index]


def guidance_weight(cfg: float, scale_index: int, num_scales: int) -> float:
    """t = cfg * si / (SN - 1): no guidance at the first scale, ``cfg`` at the last."""
    return cfg * scale_index / (num_scales - 1) if num_scales > 1 else cfg


def guide(logits: torch.Tensor, weight: float) -> torch.Tensor:
    """(1 + t) * cond - t * uncond, where logits (2B, n, V) hold the conditional half first."""
    batch = logits.shape[0] // 2
    return (1 + weight) * logits[:batch] - weight * logits[batch:]


def filter_logits_(logits: torch.Tensor, top_k: int = 0, top_p: float = 0.0) -> torch.Tensor:
    """Top-k then top-p filtering in place (filtered entries become -inf); returns ``logits``.

    Top-k keeps every logit equal to the k-th largest (ties survive).  Top-p removes the smallest
    probabilities whose cumulative mass is <= 1 - top_p but always keeps the most likely token.
    """
    vocab = logits.shape[-1]
    if 0 < top_k < vocab:
        kept, order = logits.topk(top_k, dim=-1)  # (..., k) descending
        below = logits < kept[..., -1:]
        logits.masked_fill_(below, float("-inf"))
        if top_p > 0 and bool((below.sum(dim=-1) == vocab - top_k).all()):
            # no tie at the k-th value: top-p needs only the k survivors, already sorted (k << V saves the
            # full sort); filtered entries would add exactly zero probability to the cumulative mass
            kept, order = kept.flip(-1), order.flip(-1)  # ascending, as below
            remove = kept.softmax(dim=-1).cumsum_(dim=-1) <= (1 - top_p)
            remove[..., -1:] = False
            return logits.scatter_(-1, order, kept.masked_fill_(remove, float("-inf")))
    if top_p > 0:
        sorted_logits, order = logits.sort(dim=-1, descending=False)
        remove = sorted_logits.softmax(dim=-1).cumsum_(dim=-1) <= (1 - top_p)
        remove[..., -1:] = False
        logits.masked_fill_(remove.scatter(-1, order, remove), float("-inf"))
    return logits


def target_logits(
    guided: torch.Tensor, settings: SamplingSettings, scale_index: int
) -> torch.Tensor:
    """The processed logits plain sampling draws from: filtered, then divided by the temperature."""
    top_k, top_p, temperature = settings.at(scale_index)
    processed = filter_logits_(guided.clone(), top_k, top_p)
    if temperature != 1.0:
        processed = processed / temperature
    return processed


def draw(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One multinomial draw per row of probs (..., V), in the official RNG order."""
    vocab = probs.shape[-1]
    flat = torch.multinomial(probs.reshape(-1, vocab), 1, replacement=True, generator=generator)
    return flat.view(probs.shape[:-1])


def gumbel_smooth(
    processed: torch.Tensor, ratio: float, generator: torch.Generator | None
) -> torch.Tensor:
    """Soft code weights softmax((logits * (1 + ratio) + g) / tau), g ~ Gumbel, tau shrinking with scale."""
    tau = max(0.27 * (1 - ratio * 0.95), 0.005)
    gumbel = -torch.empty_like(processed).exponential_(generator=generator).log()
    return ((processed.mul(1 + ratio) + gumbel) / tau).softmax(dim=-1)


# -- Gumbel-max draws with counter-based noise ---------------------------------------------------------
# The noise of (seed, row, token, code) is a hash of those integers, so it exists "pre-drawn" for every
# position of every scale without any generator state: two samplers that visit the scales in different
# orders or passes (plain and speculative) see exactly the same noise.
_MASK32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, constant: int) -> torch.Tensor:
    """(x * constant) mod 2^32 for x < 2^32 in int64, split in 16-bit halves so nothing overflows."""
    low = (x & 0xFFFF) * constant
    high = ((x >> 16) * constant) & 0xFFFF
    return (low + (high << 16)) & _MASK32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's finaliser: a bijection of 32-bit integers with full avalanche."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x85EBCA6B)
    x = x ^ (x >> 13)
    x = _mul32(x, 0xC2B2AE35)
    return x ^ (x >> 16)


def gumbel_noise(
    seed: int, rows: int, begin: int, count: int, vocab: int, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Gumbel noise (rows, count, vocab) for tokens begin..begin+count-1 of every row, keyed by ``seed``."""
    _check_counters(begin + count, vocab)
    return _hashed_gumbel(seed, torch.arange(begin, begin + count, device=device).expand(rows, count), vocab)


def gumbel_noise_at(seed: int, positions: torch.Tensor, vocab: int) -> torch.Tensor:
    """Gumbel noise (rows, count, vocab) for the tokens at ``positions`` (rows, count) of each row.

    Each value depends only on (seed, row, token index, code): uniforms with 53 random bits from two
    independent 32-bit hashes, then G = -log(-log(u)).  Rows may ask for different positions (ragged
    speculative windows) and get what a plain sampler drawing those tokens gets.
    """
    _check_counters(int(positions.max()) + 1, vocab)
    return _hashed_gumbel(seed, positions, vocab)


def _check_counters(tokens: int, vocab: int) -> None:
    if tokens * vocab >= 2**32:
        raise ValueError(f"{tokens} tokens x {vocab} codes exceed the 2^32 noise counters")


def _hashed_gumbel(seed: int, positions: torch.Tensor, vocab: int) -> torch.Tensor:
    rows, device = positions.shape[0], positions.device
    seed_key = _mix32(torch.tensor([(seed >> 32) & _MASK32], device=device)) ^ (seed & _MASK32)
    row_keys = _mix32(_mix32(seed_key) ^ torch.arange(rows, device=device)).view(rows, 1, 1)
    counters = positions.unsqueeze(-1) * vocab + torch.arange(vocab, device=device)  # (rows, count, vocab)
    high = _mix32(_mix32(counters ^ row_keys))  # 32 bits
    low = _mix32(_mix32(counters ^ _mix32(row_keys ^ 0x9E3779B9))) >> 11  # 21 bits
    uniforms = ((high * 2**21 + low).double() + 0.5) / 2.0**53
    return uniforms.log().neg().log().neg().float()


def gumbel_max(processed: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """argmax(processed + noise): a draw from softmax(processed); filtered (-inf) codes are never chosen."""
    return (processed + noise).argmax(dim=-1)
