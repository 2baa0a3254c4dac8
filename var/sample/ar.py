"""Plain sampling for the raster-order AR baseline (var/models/ar.py): one token per forward pass.

Classifier-free guidance doubles the batch (conditional rows, then null-class rows) with a constant weight
``cfg``: logits = (1 + cfg) * cond - cfg * uncond.  Top-k / top-p / temperature are the same
:class:`SamplingSettings` as for VAR (one value each; per-scale lists do not apply to a single token map).
The token map is decoded by the tokenizer as a one-scale schedule ``(side,)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from var.models.ar import RasterAR
from var.models.kv_cache import KVCache
from var.sample.base import (
    SampleOutput,
    decode_images,
    kv_stats,
    peak_memory_stats,
    reset_peak_memory,
    resolve_labels,
)
from var.sample.logits import SamplingSettings, draw, guide, target_logits
from var.tokenizers.vqvae import VQVAE


class ARSampler:
    """Raster-order decoding with a KV cache, ``side * side`` passes per image.

    Args:
        model: the raster AR transformer.
        vqvae: the tokenizer whose ``side x side`` single-scale token map the model predicts.
        settings: guidance weight and filtering (scalars).
    """

    name = "ar"

    def __init__(self, model: RasterAR, vqvae: VQVAE, settings: SamplingSettings | None = None):
        if not isinstance(model, RasterAR):
            raise ValueError(
                f"sampler '{self.name}' decodes the raster AR baseline, got a {type(model).__name__}; "
                "load an 'ar' checkpoint (ar.json + ar.safetensors)"
            )
        self.model = model
        self.vqvae = vqvae
        self.settings = settings or SamplingSettings()
        for name in ("top_k", "top_p", "temperature"):
            if not isinstance(getattr(self.settings, name), (int, float)):
                raise ValueError(f"{name} must be one value for the raster AR baseline (it has a single token map)")
        if self.settings.more_smooth:
            raise ValueError("more_smooth applies to VAR's scale features, not to the raster AR baseline")
        cfg = model.config
        if cfg.vocab_size != vqvae.config.vocab_size:
            raise ValueError(f"tokenizer vocab_size {vqvae.config.vocab_size} differs from the AR's {cfg.vocab_size}")
        if cfg.side != vqvae.patch_nums[-1]:
            raise ValueError(
                f"the AR predicts a {cfg.side}x{cfg.side} token map but the tokenizer's latent is "
                f"{vqvae.patch_nums[-1]}x{vqvae.patch_nums[-1]}"
            )
        self.seq_len = cfg.seq_len

    # -- shared steps ----------------------------------------------------------------------------------
    def begin(
        self,
        labels: torch.Tensor | Sequence[int] | int | None,
        seed: int | None,
        generator: torch.Generator | None,
        batch_size: int | None,
    ) -> tuple[torch.Tensor, torch.Generator | None, torch.Tensor]:
        """(labels (B,), generator, class conditions (2B, C): conditional rows, then null-class rows)."""
        device = next(self.model.parameters()).device
        reset_peak_memory(device)
        if generator is None and seed is not None:
            generator = torch.Generator(device=device).manual_seed(seed)
        labels = resolve_labels(labels, self.model.num_classes, device, generator, batch_size)
        null = torch.full_like(labels, self.model.num_classes)
        return labels, generator, self.model.class_condition(torch.cat((labels, null)))

    def target_probs(self, logits: torch.Tensor) -> torch.Tensor:
        """The distribution (B, n, V) plain sampling draws from: guided, filtered, tempered, normalised."""
        return target_logits(guide(logits, self.settings.cfg), self.settings, 0).softmax(dim=-1)

    def finish(self, tokens: torch.Tensor, decode: bool = True, **stats) -> SampleOutput:
        """Decode the token maps (B, side*side) through the tokenizer's one-scale schedule
        (``decode=False``: images None, for token-only timing)."""
        side = self.model.config.side
        f_hat = self.vqvae.quantize.indices_to_fhat([tokens], patch_nums=(side,))
        images = decode_images(self.vqvae, f_hat) if decode else None
        return SampleOutput(images, [tokens], f_hat, {**stats, **peak_memory_stats(f_hat.device)})

    # -- the loop -------------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(
        self,
        labels: torch.Tensor | Sequence[int] | int | None,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        batch_size: int | None = None,
        decode: bool = True,
    ) -> SampleOutput:
        """Sample one image per label (-1 = unconditional; None = random labels)."""
        labels, generator, cond = self.begin(labels, seed, generator, batch_size)
        model = self.model
        cache = KVCache(model.config.depth, self.seq_len)
        tokens = labels.new_zeros(labels.shape[0], self.seq_len)
        for position in range(self.seq_len):
            fed = tokens[:, position - 1: position].repeat(2, 1) if position else None  # same for both halves
            hidden = model.forward_hidden(model.input_tokens(cond, fed, position), cond, cache=cache)
            tokens[:, position] = draw(self.target_probs(model.logits(hidden, cond))[:, 0], generator)
        return self.finish(
            tokens, decode, passes=self.seq_len, passes_per_image=float(self.seq_len), tokens_per_pass=1.0,
            **kv_stats(cache),
        )
