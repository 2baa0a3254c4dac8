"""The sampler protocol, and the base class that implements it once for every sampler.

Every sampler, raster or scale-wise, plain or add-on, is used the same way::

    out = sampler.sample(conditions, seed=0)      # labels (-1: unconditional; None: batch_size random ones)
    out.images, out.indices, out.f_hat, out.stats

:class:`BaseSampler` owns that call: it resolves the conditions through the model family, seeds the
generator (or the counter-based Gumbel noise), times the token loop and the decode, decodes only after the
loop has returned (so every KV cache the loop built is already freed), and fills one stats schema
(:data:`STATS`).  A sampler provides ``generate_tokens(state)``, its loop, built from the shared steps here
(guide, process, draw) and in its family base (var/sample/scale.py, var/sample/raster.py), and declares its
options once (``Options``, var/sample/options.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch

from var.models.kv_cache import KVCache
from var.sample.logits import SamplingSettings, draw, gumbel_max, gumbel_noise, gumbel_noise_at
from var.sample.options import NoOptions, SamplerOptions, option
from var.sample.rules import rule_for

# the keys every sampler's stats have; add-ons add their own (per-phase KV bytes and seconds, draft steps, ...)
STATS = (
    "passes",  # forward passes of the batch (the latency figure: a batch runs until its slowest image is done)
    "passes_per_image",  # forward passes an image needed, averaged over the batch
    "kv_bytes",  # bytes of the KV-cache buffers allocated (the largest of phases that never coexist)
    "kv_bytes_held",  # bytes of keys/values held when the loop ended
    "peak_cuda_bytes",  # CUDA peak since the call began (None off CUDA)
    "seconds_tokens",  # the token loop
    "seconds_decode",  # the tokenizer's decode (0 with decode=False)
)


@dataclass
class SampleOutput:
    """Images in [0, 1] (B, 3, H, W) (None with ``decode=False``), the token maps (one per scale; one for a
    raster model), the latent they decode from, the run statistics (:data:`STATS`) and, with
    ``record_logits=True``, the guided logits of every computed step."""

    images: torch.Tensor | None
    indices: list[torch.Tensor]
    f_hat: torch.Tensor
    stats: dict = field(default_factory=dict)
    guided_logits: list[torch.Tensor] | None = None


@runtime_checkable
class Sampler(Protocol):
    """What every sampler offers."""

    name: str

    def sample(self, conditions: Any = None, seed: int | None = None, generator: torch.Generator | None = None,
               batch_size: int | None = None, decode: bool = True, record_logits: bool = False) -> SampleOutput:
        """One image per condition."""


@dataclass(kw_only=True)
class SamplingState:
    """One ``sample`` call: the resolved conditions and the randomness and bookkeeping every family shares."""

    conditions: Any
    batch_size: int
    generator: torch.Generator | None = None
    noise_seed: int | None = None  # Gumbel mode: the seed of the counter-based noise (None: multinomial draws)
    guided_logits: list[torch.Tensor] | None = None
    passes: int = 0  # transformer forward passes of the batch


@dataclass
class GumbelOption(SamplerOptions):
    """Gumbel-keyed noise, an option of every sampler that draws tokens."""

    gumbel: bool = option(False, "draw tokens as argmax(logits + Gumbel noise keyed by the seed and the token "
                                 "position): the same law, but deterministic per seed, so speculative samplers "
                                 "return exactly the plain sampler's tokens")


@dataclass(frozen=True)
class ModelKind:
    """The models a family of samplers decodes."""

    protocol: type  # what the transformer must offer (var/models/family.py)
    description: str  # what a sampler of this kind needs, in error messages
    checkpoint: str  # the transformer a checkpoint bundle holds for it: "var" or "ar"


def device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def now(device: torch.device) -> float:
    """Wall-clock seconds after the device has finished its queued work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def reset_peak_memory(device: torch.device) -> None:
    """Start a sampler's peak-memory window (CUDA only)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> int | None:
    """CUDA bytes allocated at the peak since :func:`reset_peak_memory`; None elsewhere."""
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def kv_stats(cache: KVCache, suffix: str = "") -> dict[str, int]:
    """KV memory of one cache: bytes of its buffers, bytes of the keys/values it holds at the end, and the
    policy's own figures (ScaleKV: ``kv_budget`` requested, ``kv_fraction`` of the full cache's bytes)."""
    stats = {f"kv_bytes{suffix}": cache.allocated_bytes(), f"kv_bytes_held{suffix}": cache.used_bytes()}
    return stats | {f"{key}{suffix}": value for key, value in cache.stats().items()}


def decode_images(tokenizer, latent: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    """Images in [0, 1] (B, 3, H, W) from the latent, ``chunk`` at a time: at large batch the decoder's
    full-resolution activations, not the transformer, would otherwise set the peak memory."""
    return torch.cat([tokenizer.fhat_to_image(part).add(1).mul(0.5).float() for part in latent.split(chunk)])


class BaseSampler:
    """Implements :class:`Sampler` for a model family; subclasses implement :meth:`generate_tokens`.

    Args:
        model: the transformer (it must satisfy the protocol of the sampler's ``kind``).
        tokenizer: what decodes its tokens.
        settings: guidance and filtering (:class:`SamplingSettings`), applied by the family's token rule.
        **options: the sampler's declared options (``Options``); unknown ones fail in one line.
    """

    name: ClassVar[str]
    Options: ClassVar[type[SamplerOptions]] = NoOptions
    kind: ClassVar[ModelKind]

    def __init__(self, model, tokenizer, settings: SamplingSettings | None = None, **options):
        if not isinstance(model, self.kind.protocol):
            raise ValueError(f"sampler '{self.name}' needs {self.kind.description}; got {type(model).__name__}")
        self.options = self.Options.build(self.name, **options)
        self.model = model
        self.tokenizer = tokenizer
        self.settings = settings or SamplingSettings()
        self.rule = rule_for(model)
        self.rule.check(self.settings)
        model.check_tokenizer(tokenizer)

    # -- the one public call ---------------------------------------------------------------------------
    @torch.no_grad()
    def sample(
        self,
        conditions: Any = None,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        batch_size: int | None = None,
        decode: bool = True,
        record_logits: bool = False,
    ) -> SampleOutput:
        """Sample one image per condition (class labels: -1 = unconditional; None = ``batch_size`` random ones).

        ``seed`` seeds a fresh generator (or, with ``gumbel``, keys the noise); ``decode=False`` leaves
        ``images`` None (token-only timing); ``record_logits`` keeps the guided logits of every step.
        """
        state = self.begin(conditions, seed, generator, batch_size, record_logits)
        device = device_of(self.model)
        started = now(device)
        indices, latent, extra = self.generate_tokens(state)  # every KV cache of the loop is freed on return
        stats = {"passes": state.passes, "passes_per_image": float(state.passes), **extra}
        stats["seconds_tokens"] = now(device) - started
        started = now(device)
        images = decode_images(self.tokenizer, latent) if decode else None
        stats["seconds_decode"] = now(device) - started if decode else 0.0
        stats["peak_cuda_bytes"] = peak_memory(device)
        return SampleOutput(images, indices, latent, stats, state.guided_logits)

    def begin(self, conditions: Any = None, seed: int | None = None, generator: torch.Generator | None = None,
              batch_size: int | None = None, record_logits: bool = False) -> SamplingState:
        """Resolve the conditions, seed the generator and start a fresh CUDA peak: the state of one call."""
        device = device_of(self.model)
        reset_peak_memory(device)
        gumbel = getattr(self.options, "gumbel", False)
        if gumbel and seed is None:
            raise ValueError("Gumbel-max sampling needs a seed (the noise is keyed by it); pass seed=...")
        if generator is None and seed is not None:
            generator = torch.Generator(device=device).manual_seed(seed)
        conditions = self.model.resolve_conditions(conditions, batch_size, generator)
        return self.start(SamplingState(
            conditions=conditions, batch_size=self.model.condition_batch_size(conditions), generator=generator,
            noise_seed=seed if gumbel else None, guided_logits=[] if record_logits else None))

    def start(self, state: SamplingState) -> SamplingState:
        """The family's state for one call (scale-wise samplers add the latent and token maps)."""
        return state

    def generate_tokens(self, state: SamplingState) -> tuple[list[torch.Tensor], torch.Tensor, dict]:
        """The sampler's loop: (token maps, latent, stats: kv_bytes, kv_bytes_held and its own keys).

        It must not keep a KV cache alive after it returns (the decode runs next).
        """
        raise NotImplementedError

    # -- shared steps ----------------------------------------------------------------------------------
    def guided(self, state: SamplingState, logits: torch.Tensor, step) -> torch.Tensor:
        """The family's guidance on the model's rows (B, n, V); recorded when the call records logits."""
        guided = self.rule.guide(logits, self.settings, step)
        if state.guided_logits is not None:
            state.guided_logits.append(guided.clone())
        return guided

    def processed_logits(self, state: SamplingState, step, logits: torch.Tensor) -> torch.Tensor:
        """Guided and processed logits (B, n, V) of a step: the distribution tokens are drawn from (softmax)."""
        return self.rule.process(self.guided(state, logits, step), self.settings, step)

    def draw(self, state: SamplingState, processed: torch.Tensor, positions: int | torch.Tensor) -> torch.Tensor:
        """Tokens (B, n) from processed logits: one multinomial draw each, or in Gumbel mode argmax(processed +
        G) with the noise of the token ``positions`` (the first index of a contiguous block, or (B, n))."""
        if state.noise_seed is None:
            return draw(processed.softmax(dim=-1), state.generator)
        rows, count, vocab = processed.shape
        if isinstance(positions, int):
            noise = gumbel_noise(state.noise_seed, rows, positions, count, vocab, processed.device)
        else:
            noise = gumbel_noise_at(state.noise_seed, positions, vocab)
        return gumbel_max(processed, noise)
