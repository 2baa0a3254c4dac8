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
from collections.abc import Callable
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
              min_side: int = 64) -> None:
    """Write images (N, 3, H, W; float in [0, 1] or uint8) as one PNG grid, ``nrow`` per row.

    Images smaller than ``min_side`` (16 px digits) are enlarged by an integer nearest-neighbour factor so
    the grid can be looked at; the pixels themselves are unchanged (sample ``.npz`` files keep the true size).
    """
    from torchvision.utils import make_grid, save_image

    images = images.detach().cpu()
    images = images.float() / 255 if images.dtype == torch.uint8 else images.float().clamp(0, 1)
    factor = -(-min_side // images.shape[-1])  # ceil
    if factor > 1:
        images = images.repeat_interleave(factor, dim=-2).repeat_interleave(factor, dim=-1)
    save_image(make_grid(images, nrow=nrow, padding=padding, pad_value=1.0), path)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Write a file through ``write(tmp_path)`` then rename it into place (never a half-written file)."""
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


def atomic_savez(path: str | os.PathLike, **arrays) -> None:
    """``np.savez`` through :func:`atomic_write` (a file handle, so numpy adds no '.npz' to the temporary name)."""

    def write(tmp: str) -> None:
        with open(tmp, "wb") as handle:
            np.savez(handle, **arrays)

    atomic_write(path, write)


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
