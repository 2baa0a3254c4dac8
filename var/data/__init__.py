"""Datasets: the embedded scikit-learn digits, procedural shapes, and ImageFolder trees.

Every dataset yields ``(image, label)`` with image a float tensor (3, H, W) in [-1, 1].
"""

from var.data.digits import DigitsDataset
from var.data.shapes import ShapesDataset

__all__ = ["DigitsDataset", "ShapesDataset"]
