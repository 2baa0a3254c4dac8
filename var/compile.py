"""torch.compile for sampling: one compiled setup for every scale and batch size, and a compile cache on disk.

A VAR sampling pass differs from scale to scale in its token count and KV-cache length, and from call to
call in the batch size.  Compiled with static shapes, each scale would get its own graph and the tenth would
exceed dynamo's recompile limit (8), leaving the largest scales uncompiled.  Here the transformer's block
stack is compiled with dynamic shapes: three graphs cover every scale of every batch size (the first
scale, which starts the cache; the middle scales; the last scale, whose keys and values are never stored).
benchmarks/compile_cpu.json compares this with one static graph per scale under a raised limit.

Compiled code is cached in ``~/.cache/var/compile`` (``VAR_COMPILE_CACHE`` or ``TORCHINDUCTOR_CACHE_DIR``
override it): inductor's FX-graph and AOTAutograd caches make a later process skip code generation, so it
starts in a fraction of the first one's compile time.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

BACKEND = "inductor"  # tests use "eager": same graphs and guards, no code generation


def compile_cache_dir() -> Path:
    """Where compiled code is kept between processes (``VAR_COMPILE_CACHE``, else ~/.cache/var/compile)."""
    return Path(os.environ.get("VAR_COMPILE_CACHE", Path.home() / ".cache" / "var" / "compile"))


def enable_compile_cache() -> Path:
    """Point inductor's on-disk caches at :func:`compile_cache_dir` unless TORCHINDUCTOR_CACHE_DIR is set."""
    if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(compile_cache_dir() / "inductor")
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    inductor_config.fx_graph_cache = True
    functorch_config.enable_autograd_cache = True
    return Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])


def compile_for_sampling(model: torch.nn.Module, vqvae: torch.nn.Module | None = None, mode: str = "default") -> None:
    """torch.compile the transformer's block stack (and the VAE decoder) in place, for sampling.

    The block stack is compiled with dynamic shapes (see the module docstring); the decoder with automatic
    dynamic shapes (one graph per image shape, made dynamic if a second shape appears).  Compilation happens
    on the first call.  Tokens are unchanged (tests/test_compile.py).  ``mode`` is passed to torch.compile
    ("reduce-overhead" adds CUDA graphs for small, launch-bound batches).
    """
    enable_compile_cache()
    options = {"backend": BACKEND, **({"mode": mode} if BACKEND == "inductor" else {})}
    model.forward_hidden = torch.compile(model.forward_hidden, dynamic=True, **options)
    if vqvae is not None:
        vqvae.decoder = torch.compile(vqvae.decoder, **options)
