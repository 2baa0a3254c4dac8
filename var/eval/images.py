"""Image sets on disk: the OpenAI samples ``.npz`` (``arr_0``: uint8 NHWC, optional ``labels``) and PNG folders.

Generated sets are exported (and scored) in a seeded shuffled order (:meth:`Samples.shuffled`).

Everything is handed to feature extractors as uint8 (N, 3, H, W), the only input torch-fidelity accepts.
Exported PNGs go to ``DIR/<label>/<index>.png`` so a folder keeps its labels; reading a folder takes labels
from parent folders named by a number and otherwise leaves them unknown.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from var.utils import atomic_savez, atomic_write, open_npz

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
EXPORT_SHUFFLE_SEED = 0  # the order of exported sample sets (see Samples.shuffled)


@dataclass
class Samples:
    """uint8 images (N, 3, H, W) and their class labels (N,), if known."""

    images: torch.Tensor
    labels: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.labels is not None and len(self.labels) != len(self.images):
            raise ValueError(f"{len(self.labels)} labels for {len(self.images)} images")

    def shuffled(self, seed: int = EXPORT_SHUFFLE_SEED) -> Samples:
        """The samples in a seeded random order, labels kept aligned.

        Samplers emit class-ordered sets; Inception Score over consecutive splits (the OpenAI evaluator) then
        sees a few classes per split and comes out far too low.  The permutation depends only on ``seed`` and
        the count, so two same-seed sample sets stay paired image by image.
        """
        order = export_order(len(self.images), seed)
        return Samples(self.images[order], None if self.labels is None else self.labels[order])


def export_order(count: int, seed: int = EXPORT_SHUFFLE_SEED) -> torch.Tensor:
    """The seeded permutation of :meth:`Samples.shuffled` (for data kept beside the samples, e.g. prompts)."""
    return torch.randperm(count, generator=torch.Generator().manual_seed(seed))


def nhwc_to_tensor(array: np.ndarray, source: str) -> torch.Tensor:
    """uint8 (N, H, W, 3) array -> uint8 (N, 3, H, W) tensor; grayscale (N, H, W[, 1]) is replicated to RGB."""
    if array.dtype != np.uint8:
        raise ValueError(f"{source}: images must be uint8 0..255 (the OpenAI samples format), got {array.dtype}")
    if array.ndim == 3 or (array.ndim == 4 and array.shape[-1] == 1):
        array = np.repeat(array.reshape(*array.shape[:3], 1), 3, axis=-1)
    if array.ndim != 4 or array.shape[-1] != 3:
        raise ValueError(f"{source}: images must be NHWC with 3 channels, got shape {array.shape}")
    return torch.from_numpy(np.ascontiguousarray(array)).permute(0, 3, 1, 2).contiguous()


def load_npz_samples(path: str | os.PathLike) -> Samples:
    """Read ``arr_0`` (uint8 NHWC) and, when present, ``labels`` from a samples npz."""
    with open_npz(path) as data:
        if "arr_0" not in data.files:
            raise ValueError(f"{path} has no 'arr_0' image array (keys: {', '.join(data.files)})")
        images = nhwc_to_tensor(data["arr_0"], str(path))
        labels = torch.from_numpy(data["labels"].astype(np.int64)) if "labels" in data.files else None
    return Samples(images, labels)


def save_npz_samples(path: str | os.PathLike, samples: Samples, **extra: np.ndarray) -> None:
    """Write the OpenAI evaluator's format: ``arr_0`` uint8 (N, H, W, 3), plus ``labels`` when known and the
    ``extra`` arrays (e.g. ``prompts``)."""
    arrays = {"arr_0": samples.images.permute(0, 2, 3, 1).contiguous().numpy(), **extra}
    if samples.labels is not None:
        arrays["labels"] = samples.labels.numpy().astype(np.int64)
    atomic_savez(path, **arrays)


def save_pngs(directory: str | os.PathLike, samples: Samples) -> None:
    """One PNG per image: ``DIR/<label>/<index>.png`` (or ``DIR/<index>.png`` without labels)."""
    directory = Path(directory)
    for index, image in enumerate(samples.images):
        folder = directory / f"{int(samples.labels[index]):04d}" if samples.labels is not None else directory
        folder.mkdir(parents=True, exist_ok=True)
        picture = Image.fromarray(image.permute(1, 2, 0).numpy())
        atomic_write(folder / f"{index:06d}.png", lambda tmp, picture=picture: picture.save(tmp, format="PNG"))


def center_crop_resize(image: Image.Image, size: int) -> Image.Image:
    """Square crop of side ``size``: box-halve while at least twice too big, bicubic resize, centre crop.

    The preprocessing of the ImageNet reference batches of the ADM / VAR evaluations.
    """
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(side // 2 for side in image.size), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(side * scale) for side in image.size), resample=Image.BICUBIC)
    left, top = (image.size[0] - size) // 2, (image.size[1] - size) // 2
    return image.crop((left, top, left + size, top + size))


class ImageFolder(Dataset):
    """Every PNG/JPEG under ``root`` (sorted, recursive) as uint8 (3, H, W), read lazily.

    Args:
        root: the folder.
        resize: centre-crop and resize every image to this side; None requires all images to share one size.
    """

    def __init__(self, root: str | os.PathLike, resize: int | None = None):
        self.root = Path(root)
        self.paths = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.paths:
            raise ValueError(f"{root} contains no {'/'.join(IMAGE_SUFFIXES)} images")
        self.resize = resize
        parents = [p.parent.relative_to(self.root) for p in self.paths]
        numbered = all(len(parent.parts) == 1 and parent.name.isdigit() for parent in parents)
        self.labels = torch.tensor([int(parent.name) for parent in parents]) if numbered else None
        self.size = None if resize else self._read(0).shape[1:]

    def __len__(self) -> int:
        return len(self.paths)

    def _read(self, index: int) -> torch.Tensor:
        path = self.paths[index]
        try:
            with Image.open(path) as image:
                image = image.convert("RGB")
        except OSError as error:
            raise ValueError(f"cannot read image {path}: {error}") from None
        if self.resize:
            image = center_crop_resize(image, self.resize)
        return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)  # (3, H, W) uint8

    def __getitem__(self, index: int) -> torch.Tensor:
        image = self._read(index)
        if self.size is not None and image.shape[1:] != self.size:
            raise ValueError(
                f"{self.paths[index]} is {tuple(image.shape[1:])} but {self.paths[0]} is {tuple(self.size)}; "
                "pass a resize side (--ref-resize) for folders of mixed sizes"
            )
        return image


def load_samples(path: str | os.PathLike) -> Samples:
    """A samples ``.npz`` or a folder of PNGs, fully in memory."""
    path = Path(path)
    if path.is_dir():
        folder = ImageFolder(path)
        return Samples(torch.stack([folder[i] for i in range(len(folder))]), folder.labels)
    if path.suffix == ".npz" and path.is_file():
        return load_npz_samples(path)
    raise FileNotFoundError(f"{path} is neither a samples .npz (arr_0: uint8 NHWC) nor a folder of images")
