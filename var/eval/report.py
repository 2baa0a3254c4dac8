"""Evaluation outputs: the JSON report and, for a sweep, a plot of every metric against the swept setting."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from var.utils import atomic_write

PLOTTED_METRICS = ("fid", "is", "kid", "precision", "recall", "class_consistency")


def write_json(path: str | os.PathLike, data: dict) -> None:
    """Write ``data`` as indented JSON, atomically."""
    text = json.dumps(data, indent=2, default=str)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text + "\n"))


def plot_sweep(path: str | os.PathLike, setting: str, values: list, metrics: list[dict]) -> list[str]:
    """One panel per metric present in ``metrics`` (one dict per value of ``setting``); returns their names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [name for name in PLOTTED_METRICS if any(name in m for m in metrics)]
    if not names:
        return []
    numeric = all(isinstance(v, (int, float)) for v in values)
    positions = values if numeric else list(range(len(values)))
    columns = min(3, len(names))
    rows = math.ceil(len(names) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4 * columns, 3.2 * rows), squeeze=False)
    for axis, name in zip(axes.flat, names, strict=False):
        axis.plot(positions, [m.get(name, float("nan")) for m in metrics], marker="o")
        axis.set_xlabel(setting)
        axis.set_title(name)
        axis.grid(alpha=0.3)
        if not numeric:
            axis.set_xticks(positions, [str(v) for v in values])
    for axis in list(axes.flat)[len(names):]:
        axis.set_visible(False)
    figure.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return names
