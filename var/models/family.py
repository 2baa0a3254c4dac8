"""Model families: what a sampler may ask of a transformer and its tokenizer.

Every sampler in var/sample is written against these protocols, never against a model class, so a new family
(LlamaGen's raster GPT, Infinity's bitwise next-scale transformer) plugs into every sampler that fits it by
offering these methods.  Two kinds exist:

* **next-scale** (:class:`ScaleModel` + :class:`ScaleTokenizer`): VAR and Infinity.  An image is a
  schedule of token grids, coarse to fine (:class:`ScaleSchedule`, (h, w) per scale: Infinity's are not
  square).  One block-causal pass decodes one or more scales on top of a KV cache; the tokenizer turns a
  scale's tokens into features, accumulates them into the latent f_hat and derives the next scale's input
  (VAR: area-downsampled f_hat; Infinity: trilinear), then decodes f_hat to images.
* **raster** (:class:`RasterModel` + :class:`RasterTokenizer`): LlamaGen (trained by ``var train --model ar``
  on our tokenizers, or loaded from its released files).
  ``T = condition_length(cond)`` condition positions come first (1 class token; LlamaGen t2i: 120 text
  tokens), then the image tokens; the output at sequence position p predicts image token p - T + 1.  A
  forward takes any number of new tokens at explicit per-row absolute positions (ragged speculative windows,
  2-D RoPE), causal among themselves over the KV cache.

**Draws.** A step's logits are ``(rows, draws, vocab_size)``: VAR and the raster models draw one code per
token over their codebook; Infinity draws ``draws_per_token = d`` bits per token over a vocabulary of 2, so
a scale of h*w tokens is h*w*d draws.  Samplers count, filter, verify and store draws; the tokenizer turns a
scale's draws into features.

**Conditions and guidance.** ``resolve_conditions`` validates a batch of conditions (class labels; text
later) and ``condition(conditions, guided)`` embeds them as the rows the transformer runs on: the batch,
then, when guided, its unconditional copy (the null class, an empty prompt).  The condition object is
opaque to samplers: it goes back into ``forward_*`` and ``logits``.  How the two halves are mixed and how
logits become a distribution (guidance ramp or constant weight, tau, temperature before or after top-k/top-p,
cfg intervals) is the family's sampling rule, named by ``sampling_rule`` and implemented in
var/sample/rules.py; the sampler loops never hard-code it.

**KV caches** are the samplers' (var/models/kv_cache.py and add-on policies): a model's attention calls
``cache.update(layer, k, v)`` with the keys exactly as attention uses them (after normalisation and RoPE)
and returns what the queries attend to, then ``cache.after_attention(layer, q, k)`` (ScaleKV's hook).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate
from typing import Any, Protocol, runtime_checkable

import torch

Conditions = Any  # a validated batch: class labels (B,) for class-conditional families, encoded text later
Condition = Any  # the embedded rows a transformer runs on (opaque to samplers)


@dataclass(frozen=True)
class ScaleSchedule:
    """The token grid of every scale, coarse to fine: ``shapes[si] = (h, w)``.

    ``template`` is set for Infinity schedules: the aspect-ratio key h / w of the official dynamic-resolution
    table the grids come from, which fixes the 2-D RoPE grid every scale is placed on (helpers in
    var/models/infinity_schedules.py: ``rope_grid``, ``image_size``, ``level_of``).  VAR's are square, no template.
    """

    shapes: tuple[tuple[int, int], ...]
    template: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "shapes", tuple((int(h), int(w)) for h, w in self.shapes))

    @classmethod
    def square(cls, sides) -> ScaleSchedule:
        return cls(tuple((int(side), int(side)) for side in sides))

    @property
    def num_scales(self) -> int:
        return len(self.shapes)

    @property
    def tokens(self) -> list[int]:
        """Tokens per scale (h * w)."""
        return [h * w for h, w in self.shapes]

    @property
    def length(self) -> int:
        """Tokens of all scales."""
        return sum(self.tokens)

    @property
    def bounds(self) -> list[tuple[int, int]]:
        """(begin, end) token range of every scale in the whole sequence."""
        ends = list(accumulate(self.tokens))
        return list(zip([0] + ends[:-1], ends, strict=True))

    @property
    def is_square(self) -> bool:
        return all(h == w for h, w in self.shapes)


def resolve_labels(
    labels: torch.Tensor | Sequence[int] | int | None,
    num_classes: int,
    device: torch.device | str,
    batch_size: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Validated class labels (B,) on ``device`` for a class-conditional family: -1 becomes the null class
    (``num_classes``), None draws ``batch_size`` labels uniformly with ``generator``, one int is repeated
    ``batch_size`` times."""
    if labels is None:
        if batch_size is None:
            raise ValueError("pass labels or batch_size")
        uniform = torch.ones(num_classes, device=device)
        return torch.multinomial(uniform, batch_size, replacement=True, generator=generator)
    if isinstance(labels, int):
        labels = [labels] * (batch_size or 1)
    labels = torch.as_tensor(labels, dtype=torch.long, device=device).flatten()
    bad = (labels < -1) | (labels >= num_classes)
    if bool(bad.any()):
        raise ValueError(
            f"label {int(labels[bad][0])} is out of range: this model has {num_classes} classes "
            f"(0..{num_classes - 1}; -1 samples unconditionally)"
        )
    return torch.where(labels < 0, torch.full_like(labels, num_classes), labels)  # -1: the null class


@runtime_checkable
class ConditionedModel(Protocol):
    """What every family offers about its conditions and its shape."""

    sampling_rule: str  # key of the family's token rule in var/sample/rules.py

    @property
    def depth(self) -> int:
        """Attention layers (the KV cache has one buffer per layer)."""

    @property
    def vocab_size(self) -> int:
        """Size of the vocabulary one draw is over (Infinity: 2, one bit)."""

    def resolve_conditions(self, conditions: Any, batch_size: int | None = None,
                           generator: torch.Generator | None = None) -> Conditions:
        """A validated batch on the model's device; raises ValueError naming a bad condition.  Class labels:
        -1 = unconditional, None = ``batch_size`` labels drawn with ``generator``."""

    def condition_batch_size(self, conditions: Conditions) -> int:
        """Images in a resolved batch."""

    def condition(self, conditions: Conditions, guided: bool) -> Condition:
        """The rows the transformer runs on: the batch, then (``guided``) its unconditional copy."""

    def check_tokenizer(self, tokenizer: Any) -> None:
        """Raise a ValueError when ``tokenizer`` cannot decode this model's tokens."""


@runtime_checkable
class ScaleModel(ConditionedModel, Protocol):
    """A next-scale-prediction transformer (VAR; Infinity)."""

    @property
    def schedule(self) -> ScaleSchedule:
        """The scales it decodes."""

    @property
    def draws_per_token(self) -> int:
        """Draws per token: 1 for a codebook index, d for Infinity's bits."""

    def forward_scales(self, cond: Condition, first: int, last: int, inputs: torch.Tensor | None,
                       cache: Any) -> torch.Tensor:
        """One block-causal pass over scales first..last on top of the scales < first held in ``cache``.

        ``inputs`` (rows, n, C_in) are the next-scale inputs of scales max(first, 1)..last, concatenated in
        scale order and already repeated for the guidance halves (scale 0's input is the start token, built
        from ``cond``); None when the pass is scale 0 alone.  Tokens of a scale attend to their own scale and
        every earlier one.  Returns the hidden states (rows, tokens of first..last, C).
        """

    def logits(self, hidden: torch.Tensor, cond: Condition) -> torch.Tensor:
        """Float32 logits (rows, tokens * draws_per_token, vocab_size) of the tokens whose hidden states these are."""


@runtime_checkable
class ScaleTokenizer(Protocol):
    """A multi-scale tokenizer (VAR's VQ-VAE; Infinity's BSQ-VAE).

    One with a codebook may also offer ``soft_scale_features(weights (B, h*w, V), scale)``, the features of
    soft code mixtures, which VAR's ``more_smooth`` setting feeds to f_hat.  ``schedule`` is the model's
    (Infinity's tokenizer serves any schedule; VAR's VQ-VAE has its own and ignores it).
    """

    def empty_latent(self, batch: int, device: torch.device | str, schedule: ScaleSchedule | None = None
                     ) -> torch.Tensor:
        """The latent f_hat before any scale: zeros."""

    def scale_features(self, tokens: torch.Tensor, scale: int, schedule: ScaleSchedule | None = None
                       ) -> torch.Tensor:
        """Features (B, C, [1,] h, w) of a scale's draws (B, h * w * draws_per_token)."""

    def next_scale_input(self, scale: int, f_hat: torch.Tensor, features: torch.Tensor,
                         schedule: ScaleSchedule | None = None) -> torch.Tensor | None:
        """Add scale ``scale``'s features to f_hat in place; return the input (B, n_next, C_in) of the next
        scale, or None after the last one."""

    def fhat_to_image(self, f_hat: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1]."""


@runtime_checkable
class RasterModel(ConditionedModel, Protocol):
    """A raster-order next-token transformer (LlamaGen)."""

    @property
    def grid(self) -> tuple[int, int]:
        """(h, w) of the token map it predicts, row-major."""

    def condition_length(self, cond: Condition) -> int:
        """T: the condition positions before the first image token."""

    def forward_positions(self, cond: Condition, tokens: torch.Tensor, positions: torch.Tensor, cache: Any,
                          attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Run new inputs at absolute sequence positions (rows, n), rows at different positions allowed.

        Position p < T is condition token p (``tokens`` ignored there); p >= T is image token
        ``tokens[r, i] = token p - T``.  Keys/values are written into ``cache``; ``attn_mask`` (rows, 1, n,
        keys) is the causal mask of the new tokens over the cache (None: a single new token sees everything
        cached); the model adds its own condition-padding mask (t2i).  Returns hidden states (rows, n, C);
        the output at p predicts image token p - T + 1.
        """

    def logits(self, hidden: torch.Tensor, cond: Condition) -> torch.Tensor:
        """Float32 logits (rows, n, vocab_size)."""


@runtime_checkable
class RasterTokenizer(Protocol):
    """A single-scale tokenizer (the VQ-VAE read as one scale; LlamaGen's VQ-16)."""

    def tokens_to_latent(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """The quantised latent of token maps (B, h * w)."""

    def fhat_to_image(self, latent: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1]."""
