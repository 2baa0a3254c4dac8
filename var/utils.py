"""Small helpers shared across the package: devices, precision, image conversion, seeding, atomic writes,
the cache folder.

Library code raises exceptions (ValueError, FileNotFoundError) with one clear line; ``var.cli.main`` turns them
into the command's error message.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' -> CUDA when available, else CPU; otherwise the named device (clear error if unavailable)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device '{name}' requested but CUDA is not available here; use --device cpu")
    return device


def autocast(device: torch.device, dtype: str = "fp32") -> contextlib.AbstractContextManager:
    """Mixed-precision context for 'bf16' / 'fp16'; a no-op for 'fp32'."""
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype '{dtype}'; choose one of {', '.join(DTYPES)}")
    if dtype == "fp32":
        return contextlib.nullcontext()
    if device.type == "cpu" and dtype == "fp16":
        raise ValueError("fp16 autocast is not supported on CPU; use --dtype bf16 or fp32")
    return torch.autocast(device_type=device.type, dtype=DTYPES[dtype])


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] (B, 3, H, W) -> uint8 (B, 3, H, W), rounded (what PNG export stores)."""
    return images.clamp(0, 1).mul(255).round().to(torch.uint8)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def save_grid(images: torch.Tensor, path: str | os.PathLike, nrow: int, padding: int = 2,
              min_side: int = 64, row_labels: Sequence[str] | None = None) -> torch.Tensor:
    """Write images (N, 3, H, W; float in [0, 1] or uint8) as one PNG grid, ``nrow`` per row; returns the grid
    (3, H', W') in [0, 1].

    Images smaller than ``min_side`` (16 px digits) are enlarged by an integer nearest-neighbour factor so
    the grid can be looked at; the pixels themselves are unchanged (sample ``.npz`` files keep the true size).
    ``row_labels`` (one per row) are written in a white strip left of the rows ("original", "class 3", ...).
    """
    from torchvision.utils import make_grid, save_image

    images = images.detach().cpu()
    images = images.float() / 255 if images.dtype == torch.uint8 else images.float().clamp(0, 1)
    factor = -(-min_side // images.shape[-1])  # ceil
    if factor > 1:
        images = images.repeat_interleave(factor, dim=-2).repeat_interleave(factor, dim=-1)
    grid = make_grid(images, nrow=nrow, padding=padding, pad_value=1.0)
    if row_labels is not None:
        grid = label_rows(grid, row_labels, images.shape[-2], padding)
    atomic_write(path, lambda tmp: save_image(grid, tmp, format="PNG"))  # Ctrl-C never leaves a partial PNG
    return grid


def label_rows(grid: torch.Tensor, labels: Sequence[str], row_height: int, padding: int) -> torch.Tensor:
    """A grid (3, H, W) in [0, 1] with a white strip on its left naming each row (rows of ``row_height`` pixels
    between ``padding``-pixel gaps, as torchvision's make_grid lays them out)."""
    from PIL import Image, ImageDraw, ImageFont
    from torchvision.transforms.functional import pil_to_tensor, to_pil_image

    font = ImageFont.load_default()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    strip = 8 + max(int(measure.textlength(label, font=font)) for label in labels)
    picture = Image.new("RGB", (strip + grid.shape[-1], grid.shape[-2]), "white")
    picture.paste(to_pil_image(grid), (strip, 0))
    draw = ImageDraw.Draw(picture)
    for row, label in enumerate(labels):
        middle = padding + row * (row_height + padding) + row_height // 2
        draw.text((4, middle), label, fill="black", font=font, anchor="lm")
    return pil_to_tensor(picture).float() / 255


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Write a file through ``write(tmp_path)`` then rename it into place (never a half-written file).

    Every file the toolkit writes goes through here (grids, plots, JSON, YAML, npz, checkpoints): the data
    is written to a temporary file beside ``path``, flushed to disk and renamed over ``path``, so a kill or
    Ctrl-C at any moment leaves either the previous file or the new one, and no temporary file.  ``write``
    gets a name that does not end in the target's suffix: pass the format explicitly (PIL, matplotlib).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """``Path.write_text`` through :func:`atomic_write`."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def atomic_savez(path: str | os.PathLike, **arrays) -> None:
    """``np.savez`` through :func:`atomic_write` (a file handle, so numpy adds no '.npz' to the temporary name)."""

    def write(tmp: str) -> None:
        with open(tmp, "wb") as handle:
            np.savez(handle, **arrays)

    atomic_write(path, write)


def open_npz(path: str | os.PathLike):
    """``np.load`` of an ``.npz`` archive, never unpickling (``allow_pickle=False``); a ValueError naming the file
    when it is not one (damaged, a pickle, a single .npy)."""
    try:
        archive = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as error:
        reason = (str(error).strip() or type(error).__name__).splitlines()[0].split(". ")[0][:160]
        raise ValueError(f"cannot read {path} as an .npz archive ({reason})") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise ValueError(f"{path} is a single .npy array, not an .npz archive of named arrays")
    return archive


def cache_dir() -> Path:
    """Where the toolkit caches what it computes once (reference statistics, trained judges, weight hashes):
    ``$VAR_CACHE_DIR`` or ``~/.cache/var``."""
    return Path(os.environ.get("VAR_CACHE_DIR") or Path.home() / ".cache" / "var")


def sha256_of(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 4 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


BYTE_UNITS = (("B", 1), ("kB", 10**3), ("MB", 10**6), ("GB", 10**9), ("TB", 10**12))


def byte_unit(largest: float) -> tuple[str, int]:
    """(name, divisor) of the decimal byte unit that shows ``largest`` bytes as a number from 1 to 1000."""
    for name, divisor in reversed(BYTE_UNITS):
        if abs(largest) >= divisor:
            return name, divisor
    return BYTE_UNITS[0]


def format_bytes(count: float) -> str:
    """12_345_678 -> '12.3 MB'."""
    name, divisor = byte_unit(count)
    return f"{count / divisor:.3g} {name}" if divisor > 1 else f"{int(count)} B"
