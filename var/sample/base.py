"""The scale loop every VAR sampler is built from.

Three pieces, each replaceable on its own:

* :class:`DecodeState` — what has been decided so far for a batch: the token maps, the running f_hat and
  the continuous input features of every scale after the first (CoDe's "token hub").  It does not belong
  to any transformer, so one model can hand it to another.
* :class:`ScaleRunner` — one transformer bound to a batch: its class conditions (conditional half, then the
  null-class half for guidance) and its KV cache.  ``logits_for(state, si)`` returns the logits of scale si,
  first pre-filling in one block-causal pass whatever earlier scales the cache does not hold yet; so a
  model that joins half-way (the CoDe refiner) just starts asking at its first scale.
* :class:`KVPolicy` — how a runner's cache is built (full, or compressed by ScaleKV).  A runner knows the
  range of scales [start, stop) it will decode, so the policy sizes the buffers for exactly that range and
  the keys/values of scale stop-1 are never stored (nothing reads them).

:class:`VARSampler` runs ``choose_tokens`` / ``advance`` over a range of scales with one runner; add-on
samplers reuse these steps with other runners, ranges and caches.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from var.models.kv_cache import KVCache, OfficialLayoutKVCache
from var.models.var import VAR
from var.sample.logits import (
    SamplingSettings,
    draw,
    guidance_weight,
    guide,
    gumbel_max,
    gumbel_noise,
    gumbel_smooth,
    target_logits,
)
from var.tokenizers.vqvae import VQVAE


@dataclass
class SampleOutput:
    """Images in [0, 1] (B, 3, H, W), the index map of every scale, the final f_hat and run statistics."""

    images: torch.Tensor
    indices: list[torch.Tensor]
    f_hat: torch.Tensor
    stats: dict = field(default_factory=dict)
    guided_logits: list[torch.Tensor] | None = None


def reset_peak_memory(device: torch.device) -> None:
    """Start a sampler's peak-memory window (CUDA only)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_stats(device: torch.device, suffix: str = "") -> dict[str, int]:
    """``peak_cuda_bytes{suffix}`` since :func:`reset_peak_memory` on CUDA; nothing elsewhere."""
    return {f"peak_cuda_bytes{suffix}": torch.cuda.max_memory_allocated(device)} if device.type == "cuda" else {}


def decode_images(vqvae: VQVAE, f_hat: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    """Images in [0, 1] (B, 3, H, W) from f_hat, ``chunk`` at a time: at large batch the VAE's
    full-resolution activations, not the transformer, would otherwise set the peak memory."""
    return torch.cat([vqvae.fhat_to_image(part).add(1).mul(0.5).float() for part in f_hat.split(chunk)])


@dataclass
class DecodeState:
    """Everything decided so far for one batch of images."""

    labels: torch.Tensor  # (B,)
    f_hat: torch.Tensor  # (B, Cvae, h, w) running sum of the refined scale features
    generator: torch.Generator | None
    indices: list[torch.Tensor] = field(default_factory=list)  # per scale (B, pn*pn)
    features: list[torch.Tensor] = field(default_factory=list)  # input of scale si+1: (B, pn_{si+1}^2, Cvae)
    guided_logits: list[torch.Tensor] | None = None
    passes: int = 0  # transformer forward passes
    noise_seed: int | None = None  # Gumbel-max mode: seed of the counter-based noise (None: multinomial draws)

    @property
    def batch_size(self) -> int:
        return self.labels.shape[0]

    @property
    def scales_done(self) -> int:
        return len(self.indices)


def resolve_labels(
    labels: torch.Tensor | Sequence[int] | int | None,
    num_classes: int,
    device: torch.device,
    generator: torch.Generator | None = None,
    batch_size: int | None = None,
) -> torch.Tensor:
    """Validated class labels (B,) on ``device``; -1 becomes the null class, None draws ``batch_size`` at random."""
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


class KVPolicy:
    """Builds the KV cache of a runner.  The default keeps every scale except the last, uncompressed.

    The last scale's keys/values are never read again, so they are used for its own attention only;
    together with keys stored in the compute dtype this is an exact memory saving over the official code.
    """

    name = "full"

    def make_cache(self, model: VAR, rows: int, start: int = 0, stop: int | None = None) -> KVCache:
        """A cache for a runner of ``rows`` batch rows that decodes scales [start, stop) (default: all)."""
        cfg = model.config
        stop = cfg.num_scales if stop is None else stop
        return KVCache(cfg.depth, cfg.scale_bounds[stop - 1][0])


class OfficialLayoutKVPolicy(KVPolicy):
    """The official cache layout (float32 keys under autocast, last scale cached): same samples, more memory.

    Only for measuring the exact savings of the default; no sampler uses it.
    """

    name = "official-layout"

    def make_cache(self, model: VAR, rows: int, start: int = 0, stop: int | None = None) -> KVCache:
        cfg = model.config
        stop = cfg.num_scales if stop is None else stop
        return OfficialLayoutKVCache(cfg.depth, cfg.scale_bounds[stop - 1][1])


def kv_stats(cache: KVCache, suffix: str = "") -> dict[str, int]:
    """KV memory of one runner: bytes of its buffers, and bytes of the keys/values it holds at the end."""
    return {f"kv_bytes{suffix}": cache.allocated_bytes(), f"kv_bytes_held{suffix}": cache.used_bytes()}


class ScaleRunner:
    """One transformer and its KV cache, decoding a batch scale by scale.

    ``start`` and ``stop`` are the scales it will be asked for: the first request pre-fills scales < start
    in the same pass, and the keys/values of scale ``stop - 1`` are never stored.  They only size the cache.
    """

    def __init__(
        self,
        model: VAR,
        labels: torch.Tensor,
        kv_policy: KVPolicy | None = None,
        start: int = 0,
        stop: int | None = None,
    ):
        self.model = model
        self.stop = model.config.num_scales if stop is None else stop
        if not 0 <= start < self.stop <= model.config.num_scales:
            raise ValueError(f"scale range [{start}, {self.stop}) is not inside [0, {model.config.num_scales})")
        null = torch.full_like(labels, model.num_classes)
        self.cond = model.class_condition(torch.cat((labels, null)))  # (2B, C): conditional, then null class
        self.cache = (kv_policy or KVPolicy()).make_cache(model, self.cond.shape[0], start, self.stop)
        self.cached_scales = 0  # scales 0..cached_scales-1 are in the cache

    def scale_inputs(self, state: DecodeState, scale_index: int) -> torch.Tensor | None:
        """Continuous input features of a scale (None for scale 0, whose input is the SOS token)."""
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
        Returns the hidden states (2B, n_first + ... + n_last, C).
        """
        model = self.model
        if last >= self.stop:
            raise ValueError(f"this runner decodes scales below {self.stop}; scale {last} was requested")
        begin = model.config.scale_bounds[first][0]
        present = [f for f in features if f is not None]
        inputs = torch.cat(present, dim=1).repeat(2, 1, 1) if present else None  # same content for both halves
        x = model.input_tokens(self.cond, inputs, begin)
        mask = model.scale_mask(first, last, self.cache.length)
        self.cache.begin_pass(last, persist=last < self.stop - 1 if persist is None else persist)
        hidden = model.forward_hidden(x, self.cond, attn_mask=mask, cache=self.cache)
        self.cached_scales = last + 1
        state.passes += 1
        return hidden

    def rollback(self, num_scales: int) -> None:
        """Keep only scales < num_scales in the cache (speculative blocks that were rejected)."""
        self.cache.truncate(self.model.config.scale_bounds[num_scales - 1][1] if num_scales else 0)
        self.cached_scales = num_scales

    def logits_for(self, state: DecodeState, scale_index: int) -> torch.Tensor:
        """Unguided logits (2B, pn^2, V) of one scale, pre-filling any earlier scales not yet cached."""
        first = self.cached_scales
        if first > scale_index:
            raise RuntimeError(f"scale {scale_index} is already in the cache (cached up to {first - 1})")
        features = [self.scale_inputs(state, si) for si in range(first, scale_index + 1)]
        hidden = self.forward_scales(first, scale_index, features, state)
        count = self.model.config.tokens_per_scale[scale_index]
        return self.model.logits(hidden[:, -count:], self.cond)


class VARSampler:
    """Plain next-scale-prediction sampling (the official ``autoregressive_infer_cfg``), KV-cached.

    Args:
        model: the VAR transformer.
        vqvae: the tokenizer it was trained with.
        settings: guidance and filtering (:class:`SamplingSettings`).
        kv_policy: how KV caches are built (default: exact, last scale uncached).
        gumbel: draw tokens as argmax(processed logits + G) with counter-based Gumbel noise G keyed by the
            seed, instead of multinomial draws: the same law, but a deterministic function of (seed, logits),
            which lets a speculative sampler reproduce plain sampling token for token.
    """

    name = "var"

    def __init__(
        self,
        model: VAR,
        vqvae: VQVAE,
        settings: SamplingSettings | None = None,
        kv_policy: KVPolicy | None = None,
        gumbel: bool = False,
    ):
        self.model = model
        self.vqvae = vqvae
        self.settings = settings or SamplingSettings()
        self.kv_policy = kv_policy or KVPolicy()
        self.gumbel = gumbel
        self.num_scales = model.config.num_scales
        self.settings.check(self.num_scales)
        if tuple(vqvae.patch_nums) != tuple(model.config.patch_nums):
            raise ValueError(
                f"tokenizer patch_nums {vqvae.patch_nums} differ from the transformer's {model.config.patch_nums}"
            )

    # -- the steps -------------------------------------------------------------------------------------
    def begin(
        self,
        labels: torch.Tensor | Sequence[int] | int,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        batch_size: int | None = None,
        record_logits: bool = False,
    ) -> DecodeState:
        """Validate labels, seed the generator and start with an empty f_hat (and a fresh CUDA peak)."""
        device = next(self.model.parameters()).device
        reset_peak_memory(device)
        if self.gumbel and seed is None:
            raise ValueError("Gumbel-max sampling needs a seed (the noise is keyed by it); pass seed=...")
        if generator is None and seed is not None:
            generator = torch.Generator(device=device).manual_seed(seed)
        labels = self.resolve_labels(labels, device, generator, batch_size)
        side = self.model.config.patch_nums[-1]
        f_hat = torch.zeros(labels.shape[0], self.model.config.z_channels, side, side, device=device)
        return DecodeState(labels, f_hat, generator, guided_logits=[] if record_logits else None,
                           noise_seed=seed if self.gumbel else None)

    def resolve_labels(self, labels, device, generator, batch_size) -> torch.Tensor:
        return resolve_labels(labels, self.model.num_classes, device, generator, batch_size)

    def processed_logits(self, state: DecodeState, scale_index: int, logits: torch.Tensor) -> torch.Tensor:
        """Guided and filtered logits (B, pn^2, V) of one scale: the distribution its tokens are drawn from."""
        guided = guide(logits, guidance_weight(self.settings.cfg, scale_index, self.num_scales))
        if state.guided_logits is not None:
            state.guided_logits.append(guided.clone())
        return target_logits(guided, self.settings, scale_index)

    def draw_tokens(self, state: DecodeState, scale_index: int, processed: torch.Tensor) -> torch.Tensor:
        """Tokens (B, pn^2) from processed logits: a multinomial draw, or Gumbel-max in Gumbel mode."""
        if state.noise_seed is None:
            return draw(processed.softmax(dim=-1), state.generator)
        begin = self.model.config.scale_bounds[scale_index][0]
        rows, count, vocab = processed.shape
        return gumbel_max(processed, gumbel_noise(state.noise_seed, rows, begin, count, vocab, processed.device))

    def choose_tokens(self, state: DecodeState, scale_index: int, logits: torch.Tensor) -> torch.Tensor:
        """Guide, filter and draw the tokens of one scale; returns their features (B, Cvae, pn, pn)."""
        processed = self.processed_logits(state, scale_index, logits)
        indices = self.draw_tokens(state, scale_index, processed)  # (B, pn^2)
        codebook = self.vqvae.quantize.embedding.weight
        if self.settings.more_smooth:
            ratio = scale_index / (self.num_scales - 1) if self.num_scales > 1 else 1.0
            features = gumbel_smooth(processed, ratio, state.generator) @ codebook  # (B, pn^2, Cvae)
        else:
            features = codebook[indices]
        state.indices.append(indices)
        side = self.model.config.patch_nums[scale_index]
        return features.transpose(1, 2).reshape(state.batch_size, -1, side, side)

    def advance(self, state: DecodeState, scale_index: int, features: torch.Tensor) -> None:
        """Add a scale's features to f_hat and record the next scale's input."""
        _, next_features = self.vqvae.quantize.next_input(scale_index, state.f_hat, features.float())
        if next_features is not None:
            state.features.append(next_features)

    def run_scales(self, runner: ScaleRunner, state: DecodeState, start: int, stop: int) -> None:
        """Decode scales start..stop-1 with one runner."""
        for scale_index in range(start, stop):
            logits = runner.logits_for(state, scale_index)
            self.advance(state, scale_index, self.choose_tokens(state, scale_index, logits))

    def finish(self, state: DecodeState, decode: bool = True, **stats) -> SampleOutput:
        """Decode f_hat to images in [0, 1]; stats gain the pass count and, on CUDA, the peak memory.

        ``decode=False`` leaves ``images`` None (token-only timing).  The VAE runs in chunks
        (see :func:`decode_images`).
        """
        images = decode_images(self.vqvae, state.f_hat) if decode else None
        stats.setdefault("passes", state.passes)
        stats.update(peak_memory_stats(state.f_hat.device))
        return SampleOutput(images, state.indices, state.f_hat, stats, state.guided_logits)

    # -- the whole loop ----------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(
        self,
        labels: torch.Tensor | Sequence[int] | int | None,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        batch_size: int | None = None,
        record_logits: bool = False,
        decode: bool = True,
    ) -> SampleOutput:
        """Sample one image per label (-1 = unconditional; None = ``batch_size`` random labels)."""
        state = self.begin(labels, seed, generator, batch_size, record_logits)
        runner = ScaleRunner(self.model, state.labels, self.kv_policy)
        self.run_scales(runner, state, 0, self.num_scales)
        return self.finish(state, decode, **kv_stats(runner.cache))
