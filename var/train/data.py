"""Resumable data order: the batch sequence is a pure function of (seed, epoch, position).

Epoch e visits the dataset in the order of ``randperm(N)`` drawn from a generator seeded with (seed, e);
process r of W takes every W-th batch-sized slice.  Each item's random augmentation is drawn from a
generator seeded with (seed, epoch, index) as well, so neither worker scheduling nor a restart changes what
a step sees: resuming at optimizer step s simply starts at micro-batch s x grad_accum.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler


def _item_seed(seed: int, epoch: int, index: int) -> int:
    return ((seed * 1_000_003 + epoch) * 1_000_000_007 + index) & 0x7FFF_FFFF_FFFF_FFFF


class SeededItems(Dataset):
    """Wraps a dataset so item ``(seed, index)`` is drawn with the global torch RNG seeded by ``seed``.

    The surrounding RNG state is restored afterwards, so loading data never disturbs the training RNG.
    """

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        seed, index = key
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)  # CPU only: torch.manual_seed also queues device seeding
            return self.dataset[index]


class ResumableBatchSampler(Sampler[list[tuple[int, int]]]):
    """Endless batches of (item seed, index) keys for one process, starting at micro-batch ``start``.

    Incomplete batches at the end of an epoch are dropped, so every step has the same size.
    """

    def __init__(self, size: int, batch_size: int, seed: int, start: int = 0, rank: int = 0, world_size: int = 1):
        self.batches_per_epoch = size // (batch_size * world_size)
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"the dataset has {size} items, fewer than one global batch of {batch_size * world_size}; "
                "lower train.batch_size"
            )
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.start, self.rank, self.world_size = start, rank, world_size

    def epoch_order(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.size, generator=generator)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch, first_batch = divmod(self.start, self.batches_per_epoch)
        while True:
            order = self.epoch_order(epoch)
            for batch in range(first_batch, self.batches_per_epoch):
                first = (batch * self.world_size + self.rank) * self.batch_size
                indices = order[first: first + self.batch_size].tolist()
                yield [(_item_seed(self.seed, epoch, i), i) for i in indices]
            epoch, first_batch = epoch + 1, 0

    def __len__(self) -> int:
        return self.batches_per_epoch


def resumable_loader(dataset: Dataset, batch_size: int, seed: int, start: int, rank: int, world_size: int,
                     num_workers: int = 0) -> DataLoader:
    """An endless DataLoader over ``dataset`` that resumes exactly at micro-batch ``start``."""
    sampler = ResumableBatchSampler(len(dataset), batch_size, seed, start, rank, world_size)
    return DataLoader(
        SeededItems(dataset),
        batch_sampler=sampler,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        pin_memory=torch.cuda.is_available(),
        generator=torch.Generator().manual_seed(seed),  # otherwise each iterator draws from the training RNG
    )


class TokenizedDataset(Dataset):
    """A dataset without random augmentation, tokenized once: yields (token row (L,) int64, label).

    Transformer training then skips the tokenizer's encoder at every step.  ``tokenize(images)`` must
    return the concatenated token maps (B, L).
    """

    def __init__(self, dataset: Dataset, tokenize, device: torch.device, batch_size: int = 256):
        rows, labels = [], []
        for start in range(0, len(dataset), batch_size):
            images, batch_labels = zip(*(dataset[i] for i in range(start, min(start + batch_size, len(dataset)))),
                                       strict=True)
            rows.append(tokenize(torch.stack(images).to(device)).cpu())
            labels.extend(int(label) for label in batch_labels)
        self.tokens = torch.cat(rows)
        self.labels = torch.tensor(labels)
        self.num_classes = dataset.num_classes

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.tokens[index], int(self.labels[index])
