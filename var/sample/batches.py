"""Sampling a long list of conditions in seeded batches (``var sample``, ``var eval``, ``var demo``)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from tqdm import tqdm

from var.utils import autocast, to_uint8


def sample_in_batches(sampler, labels: torch.Tensor, batch_size: int, seed: int, device, dtype: str,
                      progress: bool = True, batch_ids: Sequence[int] | None = None,
                      stats: list | None = None) -> torch.Tensor:
    """Sample one image per label in batches; batch i (labels[i*batch_size:(i+1)*batch_size]) uses seed
    ``seed + i``, so any subset of batches (``batch_ids``, default all) reproduces the same images.
    Returns uint8 (n, 3, H, W) for the chosen batches, in order; each batch's ``SampleOutput.stats`` is
    appended to ``stats`` when given.
    """
    if batch_ids is None:
        batch_ids = range(math.ceil(len(labels) / batch_size))
    chunks = []
    for i in tqdm(batch_ids, desc="sampling", unit="batch", disable=not progress):
        with autocast(device, dtype):
            out = sampler.sample(labels[i * batch_size:(i + 1) * batch_size], seed=seed + i)
        chunks.append(to_uint8(out.images).cpu())
        if stats is not None:
            stats.append(out.stats)
    return torch.cat(chunks)
