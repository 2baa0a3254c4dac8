"""scikit-learn's handwritten digits: 1797 real 8x8 images of 10 classes, shipped inside the wheel.

The embedded default dataset: it needs no download, so the demo, the tests and the offline quality metrics
(class-consistency, classifier-space FID) all run on real data anywhere.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

SPLITS = ("train", "test", "all")
# nearest keeps every real pixel (each becomes a block); bilinear blurs the strokes, and a generator trained
# on blurred digits is judged against sharp ones by nothing but its blur
UPSAMPLING = "nearest"


def load_digit_arrays() -> tuple[np.ndarray, np.ndarray]:
    """(images float32 (1797, 8, 8) in [0, 1], labels int64 (1797,))."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return (bunch.images / 16.0).astype(np.float32), bunch.target.astype(np.int64)


def split_indices(labels: np.ndarray, split: str, test_fraction: float, seed: int) -> np.ndarray:
    """Deterministic stratified split: the same ``test_fraction`` of every class is held out."""
    if split not in SPLITS:
        raise ValueError(f"unknown split '{split}'; choose one of {', '.join(SPLITS)}")
    if split == "all":
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    chosen = []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        held_out = int(round(len(members) * test_fraction))
        chosen.append(members[:held_out] if split == "test" else members[held_out:])
    return np.sort(np.concatenate(chosen))


class DigitsDataset(Dataset):
    """Digits upsampled to ``image_size`` (:data:`UPSAMPLING`), gray replicated to 3 channels, scaled to [-1, 1].

    Args:
        split: "train" (80 %), "test" (the held-out 20 %, same in every run) or "all".
        image_size: output side (8 = native resolution).
        test_fraction: share of every class held out for "test".
        seed: seed of the split (keep the default to compare numbers across runs).
    """

    num_classes = 10
    augmented = False  # items are fixed tensors: a trainer may tokenize them once

    def __init__(self, split: str = "train", image_size: int = 16, test_fraction: float = 0.2, seed: int = 0):
        images, labels = load_digit_arrays()
        keep = split_indices(labels, split, test_fraction, seed)
        pixels = torch.from_numpy(images[keep]).unsqueeze(1)  # (N, 1, 8, 8)
        if image_size != 8:
            pixels = F.interpolate(pixels, size=(image_size, image_size), mode=UPSAMPLING)
        self.images = pixels.clamp(0, 1).mul(2).sub(1).expand(-1, 3, -1, -1).contiguous()  # (N, 3, S, S)
        self.labels = torch.from_numpy(labels[keep])
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self.labels[index])
