"""Class-balanced (or one-per-prompt) sample sets for evaluation, sharded over processes with accelerate.

The set is fixed by (conditions, batch size, seed) alone: global batch b holds conditions[b*B : (b+1)*B] (class
labels, or a text-to-image model's encoded prompts) and is
sampled with seed ``seed + b`` (the convention of ``var sample``).  Under ``accelerate launch`` process p
samples batches p, p+P, p+2P, ...; after each round the round's batches are gathered, which puts them in
global order, so the result is identical for any number of processes.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

import torch
from accelerate import PartialState
from accelerate.utils import gather
from tqdm import tqdm

from var.distributed import check_launch, quiet_other_processes
from var.eval.images import Samples
from var.sample.batches import sample_in_batches
from var.utils import resolve_device

COLLECTIVE_TIMEOUT_S = 3 * 3600


def class_balanced_labels(num_classes: int, per_class: int) -> torch.Tensor:
    """(num_classes * per_class,) labels, class-major: sample i has class i // per_class."""
    if per_class < 1:
        raise ValueError(f"--per-class must be at least 1, got {per_class}")
    return torch.arange(num_classes).repeat_interleave(per_class)


@contextmanager
def processes(device: str = "auto") -> Iterator[tuple[PartialState, torch.device]]:
    """accelerate's process state and this process's device ('cpu' runs the processes over gloo), for one command.

    The collective timeout is long because the other processes wait in the next collective while the main
    process writes exports (minutes for 50k samples).  Python warnings show on the main process only.  When the
    command succeeds every process waits for the others and then destroys the process group: a gloo group left
    for the interpreter's shutdown aborts the process (SIGABRT, "terminate called without an active exception").
    After an error nothing waits, so a failed process never hangs the others in a barrier they cannot reach.
    """
    cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
    state = PartialState(cpu=cpu, timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    check_launch(state.num_processes)  # e.g. ``accelerate launch --cpu --num_processes 2`` runs one process
    quiet_other_processes(state.is_main_process)
    yield state, (state.device if device == "auto" or state.num_processes > 1 else resolve_device(device))
    state.wait_for_everyone()
    state.destroy_process_group()


def image_shape(sampler) -> tuple[int, int]:
    """(height, width) of the sampler's images: the VQ-VAE's image size, the last scale of a schedule (Infinity)
    or the token grid (LlamaGen) times the tokenizer's pixels per token."""
    config, model = sampler.tokenizer.config, sampler.model
    side = getattr(config, "image_size", None)
    if side is not None:
        return side, side
    if hasattr(model, "schedule"):  # Infinity: BSQ latent pixels of patch_size, 2 x 2 per token with patchify
        factor = config.patch_size * (2 if config.spatial_patchify else 1)
        height, width = model.schedule.shapes[-1]
        return height * factor, width * factor
    return model.grid[0] * sampler.tokenizer.downsample, model.grid[1] * sampler.tokenizer.downsample


@torch.no_grad()
def generate_samples(
    sampler,
    labels,
    batch_size: int,
    seed: int,
    device: torch.device,
    dtype: str = "fp32",
    state: PartialState | None = None,
    progress: bool = True,
    stats: dict | None = None,
) -> Samples | None:
    """Sample one image per label (class labels, or encoded prompts: the samples then carry no labels), sharded
    over processes; the main process gets them all, in order.

    Returns the uint8 samples on the main process and None on the others; there ``stats`` (when given) gets
    ``passes_per_image``, the mean number of model forward passes per image (what speculative samplers save).
    """
    state = state or PartialState()
    count, num_processes, rank = len(labels), state.num_processes, state.process_index
    num_batches = math.ceil(count / batch_size)
    height, width = image_shape(sampler)
    images_out, ids_out, passes_out = [], [], []
    bar = tqdm(total=count, desc="sampling", unit="img", disable=not (progress and state.is_main_process))
    for round_start in range(0, num_batches, num_processes):
        batch = round_start + rank
        images = torch.zeros(batch_size, 3, height, width, dtype=torch.uint8)  # padding where this rank is idle
        ids = torch.full((batch_size,), -1, dtype=torch.long)
        passes = torch.zeros(batch_size)  # the batch's mean passes per image, for each of its images
        if batch < num_batches:
            batch_stats: list[dict] = []
            sampled = sample_in_batches(sampler, labels, batch_size, seed, device, dtype, False, [batch],
                                        batch_stats)
            images[:len(sampled)] = sampled
            ids[:len(sampled)] = torch.arange(batch * batch_size, batch * batch_size + len(sampled))
            passes[:len(sampled)] = batch_stats[0]["passes_per_image"]
        images, ids, passes = gather((images.to(state.device), ids.to(state.device), passes.to(state.device)))
        if state.is_main_process:  # (P * B, ...) in rank order
            keep = ids >= 0
            images_out.append(images[keep].cpu())
            ids_out.append(ids[keep].cpu())
            passes_out.append(passes[keep].cpu())
            bar.update(int(keep.sum()))
    bar.close()
    if not state.is_main_process:
        return None
    ids = torch.cat(ids_out)
    if not torch.equal(ids, torch.arange(count)):
        raise RuntimeError(f"sharded sampling returned {len(ids)} samples out of order or incomplete (of {count})")
    if stats is not None:
        stats["passes_per_image"] = round(torch.cat(passes_out).mean().item(), 3)
    return Samples(torch.cat(images_out), labels.cpu() if isinstance(labels, torch.Tensor) else None)
