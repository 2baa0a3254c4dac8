"""Dataset names -> datasets, driven by the ``data:`` section of a training config."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch.utils.data import Dataset

from var.data.digits import DigitsDataset
from var.data.imagefolder import ImageFolderDataset
from var.data.shapes import ShapesDataset

SPLITS = ("train", "val")


@dataclass
class DataConfig:
    """Which images to train on.

    ``name`` is one of :data:`DATASETS`; ``root`` is the ImageFolder root (with train/ and val/ inside);
    ``num_samples`` and ``seed`` only concern the procedural ``shapes``; ``hflip`` only ImageFolder trees.
    """

    name: str = "digits"
    image_size: int = 16
    root: str | None = None
    hflip: bool = False
    num_samples: int = 2048
    seed: int = 0
    num_workers: int = 0


def _digits(config: DataConfig, split: str) -> Dataset:
    return DigitsDataset("train" if split == "train" else "test", image_size=config.image_size)


def _shapes(config: DataConfig, split: str) -> Dataset:
    # the validation split is a different random draw of the same classes
    seed = config.seed if split == "train" else config.seed + 1
    return ShapesDataset(config.num_samples, image_size=config.image_size, seed=seed)


def _imagefolder(config: DataConfig, split: str) -> Dataset:
    if not config.root:
        raise ValueError("data.name=imagefolder needs data.root=PATH (a folder with train/ and val/ inside)")
    return ImageFolderDataset(config.root, split, image_size=config.image_size, hflip=config.hflip)


DATASETS: dict[str, Callable[[DataConfig, str], Dataset]] = {
    "digits": _digits,
    "shapes": _shapes,
    "imagefolder": _imagefolder,
}


def build_dataset(config: DataConfig, split: str = "train") -> Dataset:
    """The dataset a config names; every dataset has ``num_classes`` and yields (image in [-1, 1], label)."""
    if config.name not in DATASETS:
        raise ValueError(f"unknown dataset '{config.name}'; choose one of {', '.join(DATASETS)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split '{split}'; choose one of {', '.join(SPLITS)}")
    return DATASETS[config.name](config, split)
