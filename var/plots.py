"""What every figure the toolkit writes shares: a headless backend, units scaled to the data, and a title that
says which direction is better.  matplotlib is imported only when a figure is drawn."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from var.utils import atomic_write, byte_unit

LOWER, HIGHER = "lower", "higher"
ARROWS = {LOWER: "\u2193", HIGHER: "\u2191"}


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def better_title(title: str, better: str) -> str:
    """'FID' -> 'FID (lower is better ↓)'."""
    if better not in ARROWS:
        raise ValueError(f"better must be '{LOWER}' or '{HIGHER}', got {better!r}")
    return f"{title} ({better} is better {ARROWS[better]})"


def byte_scale(values: Iterable[float]) -> tuple[str, int]:
    """(unit, divisor) that shows the largest of ``values`` bytes as 1..1000: ([3.1e4, 6.2e4]) -> ('kB', 1000)."""
    return byte_unit(max((abs(v) for v in values), default=0))


def save_figure(figure, path: str | os.PathLike, dpi: int = 110) -> None:
    """Lay out, write atomically (creating the folder) and close ``figure``; the format follows the suffix."""
    figure.tight_layout()
    file_format = Path(path).suffix.lstrip(".") or "png"
    atomic_write(path, lambda tmp: figure.savefig(tmp, format=file_format, dpi=dpi, bbox_inches="tight"))
    pyplot().close(figure)
