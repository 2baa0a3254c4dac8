"""Procedural shapes: class = (shape, colour), random position and size; unlimited, seedable, licence-free.

Fast to learn, so it is what the test suite trains on.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

SHAPES = ("square", "circle", "triangle")
COLOURS = ((230, 60, 50), (50, 120, 230))


class ShapesDataset(Dataset):
    """``len(SHAPES) * len(COLOURS)`` classes of one filled shape on a dark background.

    Item i is a deterministic function of (seed, i), so every epoch and every process sees the same data.
    """

    num_classes = len(SHAPES) * len(COLOURS)
    augmented = False  # item i is a fixed image: a trainer may tokenize it once

    def __init__(self, num_samples: int = 1024, image_size: int = 16, seed: int = 0):
        self.num_samples = num_samples
        self.image_size = image_size
        self.seed = seed

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        rng = np.random.default_rng([self.seed, index])
        label = int(rng.integers(self.num_classes))
        shape, colour = SHAPES[label // len(COLOURS)], COLOURS[label % len(COLOURS)]
        size = self.image_size
        radius = rng.uniform(0.22, 0.4) * size
        cx, cy = rng.uniform(radius, size - radius, size=2)
        canvas = Image.new("RGB", (size, size), (20, 20, 20))
        draw = ImageDraw.Draw(canvas)
        box = (cx - radius, cy - radius, cx + radius, cy + radius)
        if shape == "square":
            draw.rectangle(box, fill=colour)
        elif shape == "circle":
            draw.ellipse(box, fill=colour)
        else:
            draw.polygon([(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)], fill=colour)
        pixels = torch.from_numpy(np.asarray(canvas, dtype=np.float32) / 127.5 - 1)
        return pixels.permute(2, 0, 1).contiguous(), label
