"""Static key/value cache shared by every sampler.

One buffer per attention layer, allocated once with room for ``capacity`` tokens, plus a length pointer:
appending writes in place (no ``torch.cat`` per scale), rolling back is moving the pointer, and the bytes
held are known exactly.  Samplers plug in other policies by subclassing: ScaleKV compresses a layer after
its attention in :meth:`after_attention`; speculative decoding rolls back with :meth:`truncate` (and keeps
rows of different lengths in var/sample/speculative/ragged_cache.py).

Keys are stored in the dtype of the values (the compute dtype): under autocast the l2-normalised keys come
out in float32, and caching them in fp16/bf16 gives bit-identical attention (the attention kernel casts
them anyway) at half the memory.  :class:`OfficialLayoutKVCache` keeps the official layout (float32 keys,
last scale cached) only to measure what these exact savings are worth.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class KVCache:
    """Per-layer key/value buffers of shape (rows, heads, capacity, head_dim) with a length pointer.

    Args:
        num_layers: number of attention layers.
        capacity: tokens each layer can hold (one int for all layers, or one per layer).
    """

    keys_in_value_dtype = True

    def __init__(self, num_layers: int, capacity: int | Sequence[int]):
        if isinstance(capacity, int):
            capacity = [capacity] * num_layers
        if len(capacity) != num_layers:
            raise ValueError(f"got {len(capacity)} capacities for {num_layers} layers")
        self.capacity = list(capacity)
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.lengths = [0] * num_layers
        self.persist = True
        self.scale_index = 0

    @property
    def num_layers(self) -> int:
        return len(self.lengths)

    @property
    def length(self) -> int:
        """Tokens held by the first layer (all layers hold the same count unless a policy compresses)."""
        return self.lengths[0]

    def begin_pass(self, scale_index: int, persist: bool = True) -> None:
        """Announce the next forward pass: which scale it ends at and whether to keep its keys/values.

        ``persist=False`` is for the last scale: nothing will ever attend to its keys, so they are used for
        the pass and never written into the buffers.
        """
        self.scale_index = scale_index
        self.persist = persist

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add this pass's k, v (rows, heads, n, head_dim); return every key/value the queries attend to."""
        if self.keys_in_value_dtype:
            k = k.to(v.dtype)
        start = self.lengths[layer]
        if not self.persist:
            if start == 0:
                return k, v
            return (torch.cat((self.keys[layer][:, :, :start], k), dim=2),
                    torch.cat((self.values[layer][:, :, :start], v), dim=2))
        end = start + k.shape[2]
        if self.keys[layer] is None:
            rows, heads, _, head_dim = k.shape
            shape = (rows, heads, self.capacity[layer], head_dim)
            self.keys[layer] = k.new_empty(shape)
            self.values[layer] = v.new_empty(shape)
        if end > self.capacity[layer]:
            raise RuntimeError(
                f"KV cache of layer {layer} holds {self.capacity[layer]} tokens; {end} were requested"
            )
        self.keys[layer][:, :, start:end] = k
        self.values[layer][:, :, start:end] = v
        self.lengths[layer] = end
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def after_attention(self, layer: int, queries: torch.Tensor, keys: torch.Tensor) -> None:
        """Hook called with the exact (normalised, scaled) queries and keys of a layer; no-op here."""

    def truncate(self, length: int) -> None:
        """Roll every layer back to its first ``length`` tokens (speculative decoding)."""
        self.lengths = [min(length, current) for current in self.lengths]

    def stats(self) -> dict[str, float]:
        """A policy's own figures for the sampler stats (ScaleKV: requested and real fraction of the bytes)."""
        return {}

    def allocated_bytes(self) -> int:
        """Bytes of the buffers (what the cache costs in memory)."""
        return sum(t.numel() * t.element_size() for t in self.keys + self.values if t is not None)

    def used_bytes(self) -> int:
        """Bytes of the keys/values currently held (length pointer times row size)."""
        total = 0
        for keys, values, length in zip(self.keys, self.values, self.lengths, strict=True):
            if keys is not None:
                rows, heads, _, head_dim = keys.shape
                total += rows * heads * head_dim * length * (keys.element_size() + values.element_size())
        return total


class OfficialLayoutKVCache(KVCache):
    """The official VAR cache layout: keys kept in the dtype they come out in (float32 under autocast) and
    every pass cached, the last scale included.  Attention is bit-identical to :class:`KVCache`; only the
    memory differs, which is what this class exists to measure."""

    keys_in_value_dtype = False

    def begin_pass(self, scale_index: int, persist: bool = True) -> None:
        super().begin_pass(scale_index, persist=True)
