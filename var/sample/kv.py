"""KV policies: how a scale-wise runner's cache is built.

A runner knows the range of scales [start, stop) it will decode, so a policy sizes the buffers for exactly
that range, and the keys/values of scale stop-1 are never stored (nothing reads them).  The default keeps
every other scale uncompressed; ScaleKV (var/sample/scalekv/) compresses; speculative decoding
(var/sample/speculative/) keeps the last scale when it can be part of a pass that is rolled back.
"""

from __future__ import annotations

from var.models.kv_cache import KVCache, OfficialLayoutKVCache


class KVPolicy:
    """The full cache, every scale but the last, keys in the compute dtype.

    The last scale's keys/values are never read again, so they are used for its own attention only;
    together with keys stored in the compute dtype this is an exact memory saving over the official code.
    """

    name = "full"

    def make_cache(self, model, rows: int, start: int = 0, stop: int | None = None) -> KVCache:
        """A cache for a runner of ``rows`` batch rows that decodes scales [start, stop) (default: all)."""
        bounds = model.schedule.bounds
        stop = len(bounds) if stop is None else stop
        return KVCache(model.depth, bounds[stop - 1][0])


class OfficialLayoutKVPolicy(KVPolicy):
    """The official cache layout (float32 keys under autocast, last scale cached): same samples, more memory.

    Only for measuring the exact savings of the default; no sampler uses it.
    """

    name = "official-layout"

    def make_cache(self, model, rows: int, start: int = 0, stop: int | None = None) -> KVCache:
        bounds = model.schedule.bounds
        stop = len(bounds) if stop is None else stop
        return OfficialLayoutKVCache(model.depth, bounds[stop - 1][1])
