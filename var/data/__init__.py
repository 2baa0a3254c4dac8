"""Datasets: the embedded scikit-learn digits, procedural shapes, and ImageFolder trees.

Every dataset yields ``(image, label)`` with image a float tensor (3, H, W) in [-1, 1] and has
``num_classes``; :func:`build_dataset` picks one from the ``data:`` section of a config.
"""

from var.data.digits import DigitsDataset
from var.data.imagefolder import ImageFolderDataset, official_transform
from var.data.registry import DATASETS, DataConfig, build_dataset
from var.data.shapes import ShapesDataset

__all__ = [
    "DATASETS",
    "DataConfig",
    "DigitsDataset",
    "ImageFolderDataset",
    "ShapesDataset",
    "build_dataset",
    "official_transform",
]
