"""ImageFolder trees (the ImageNet layout) with the official VAR transforms.

Layout: ``ROOT/train/<class>/*.jpg`` and ``ROOT/val/<class>/*.jpg``; classes are the sub-folder names in
sorted order, so ``train`` and ``val`` agree on label numbers.  A corrupt or unreadable file is skipped:
the dataset warns once naming the file and returns the next readable image instead, so one bad JPEG
never stops an epoch.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".pgm", ".tif", ".tiff", ".gif")
MID_RESOLUTION_RATIO = 1.125  # resize the shorter side to 1.125 x the crop size before cropping


def to_signed(image: torch.Tensor) -> torch.Tensor:
    """[0, 1] -> [-1, 1] (a named function so DataLoader workers can pickle the transform)."""
    return image.mul(2).sub_(1)


def official_transform(image_size: int, train: bool, hflip: bool = False) -> transforms.Compose:
    """spec_var 4.5: [hflip,] resize shorter side to round(1.125 * size) (LANCZOS), random/center crop, [-1, 1]."""
    steps = [transforms.RandomHorizontalFlip()] if (train and hflip) else []
    steps += [
        transforms.Resize(round(MID_RESOLUTION_RATIO * image_size), interpolation=transforms.InterpolationMode.LANCZOS),
        transforms.RandomCrop(image_size) if train else transforms.CenterCrop(image_size),
        transforms.ToTensor(),
        to_signed,
    ]
    return transforms.Compose(steps)


class ImageFolderDataset(Dataset):
    """Class-labelled images from ``root/split/<class>/``; yields (image (3, S, S) in [-1, 1], label).

    Args:
        root: dataset root holding the split folders.
        split: split folder name ("train", "val").
        image_size: crop side.
        hflip: random horizontal flips (train split only; off in the official recipe).
        transform: replaces the official transform (PIL image -> tensor).
    """

    def __init__(self, root: str | Path, split: str = "train", image_size: int = 256, hflip: bool = False,
                 transform=None):
        folder = Path(root) / split
        self.root = folder
        if not folder.is_dir():
            raise FileNotFoundError(
                f"{folder} is not a directory; an ImageFolder dataset needs {root}/{split}/<class name>/<images>"
            )
        self.classes = sorted(entry.name for entry in folder.iterdir() if entry.is_dir())
        if not self.classes:
            raise FileNotFoundError(f"{folder} has no class sub-folders (expected {folder}/<class name>/<images>)")
        self.samples = [
            (path, label)
            for label, name in enumerate(self.classes)
            for path in sorted((folder / name).rglob("*"))
            if path.suffix.lower() in IMAGE_EXTENSIONS
        ]
        if not self.samples:
            raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {folder}")
        self.num_classes = len(self.classes)
        self.transform = transform or official_transform(image_size, train=split == "train", hflip=hflip)
        self.augmented = transform is not None or split == "train"  # random crops: re-tokenize every time
        self.unreadable: set[int] = set()  # indices found broken by this process
        self.first_readable()  # a folder of nothing but broken files fails here, before any run is written

    def first_readable(self) -> int:
        """Index of the first image that can be read (usually 0: one file is opened); a ValueError if none can."""
        for index in range(len(self.samples)):
            if index not in self.unreadable and self.load(index) is not None:
                return index
        raise self.nothing_readable()

    def nothing_readable(self) -> ValueError:
        """The error for a folder in which no image can be read."""
        return ValueError(f"none of the {len(self.samples)} image files under {self.root} can be read (all damaged "
                          "or not images); check the dataset folder")

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> Image.Image | None:
        """The RGB image at ``index``, or None (after one warning naming the file) if it cannot be read."""
        path = self.samples[index][0]
        try:
            with Image.open(path) as image:
                return image.convert("RGB")  # convert() forces a full decode, so truncation shows up here
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
            self.unreadable.add(index)
            warnings.warn(f"skipping unreadable image {path}: {error}", stacklevel=2)
            return None

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        # a broken file is replaced by the next readable one, so batches keep their size
        for offset in range(len(self.samples)):
            candidate = (index + offset) % len(self.samples)
            if candidate in self.unreadable:
                continue
            image = self.load(candidate)
            if image is not None:
                return self.transform(image), self.samples[candidate][1]
        raise self.nothing_readable()  # every file has turned out unreadable
