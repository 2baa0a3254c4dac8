"""Evaluation outputs: the JSON report and, for a sweep, a plot of every metric against the swept setting."""

from __future__ import annotations

import json
import math
import os

from var.plots import HIGHER, LOWER, better_title, pyplot, save_figure
from var.utils import atomic_write_text

# metric -> (axis label, which direction is better, the key of its spread, what the spread is over)
PLOTTED_METRICS = {
    "fid": ("FID", LOWER, None, None),
    "is": ("Inception Score", HIGHER, "is_std", "IS splits"),
    "kid": ("KID", LOWER, "kid_std", "KID subsets"),
    "precision": ("precision", HIGHER, None, None),
    "recall": ("recall", HIGHER, None, None),
    "class_consistency": ("class consistency", HIGHER, None, None),
}


def write_json(path: str | os.PathLike, data: dict) -> None:
    """Write ``data`` as indented JSON, atomically."""
    text = json.dumps(data, indent=2, default=str)
    atomic_write_text(path, text + "\n")


def plot_sweep(path: str | os.PathLike, setting: str, values: list, metrics: list[dict]) -> list[str]:
    """One panel per metric present in ``metrics`` (one dict per value of ``setting``), titled with which direction
    is better, the best value marked, spreads as error bars; returns the plotted metric names."""
    names = [name for name in PLOTTED_METRICS if any(name in m for m in metrics)]
    if not names:
        return []
    plt = pyplot()
    numeric = all(isinstance(v, (int, float)) for v in values)
    positions = values if numeric else list(range(len(values)))
    columns = min(3, len(names))
    rows = math.ceil(len(names) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.4 * columns, 3.6 * rows), squeeze=False)
    for axis, name in zip(axes.flat, names, strict=False):
        label, better, spread, spread_over = PLOTTED_METRICS[name]
        points = [m.get(name, float("nan")) for m in metrics]
        errors = [m.get(spread, 0.0) for m in metrics] if spread and any(spread in m for m in metrics) else None
        axis.errorbar(positions, points, yerr=errors, marker="o", capsize=3,
                      label=label + (f" (bars: ± std over {spread_over})" if errors else ""))
        measured = [i for i, point in enumerate(points) if not math.isnan(point)]
        if len({points[i] for i in measured}) > 1:  # a tie everywhere has no best value
            best = (min if better == LOWER else max)(measured, key=points.__getitem__)
            axis.plot(positions[best], points[best], marker="*", markersize=14, linestyle="none", color="tab:red",
                      label=f"best: {setting}={values[best]}")
        axis.set_title(better_title(label, better), fontsize=10)
        axis.set_xlabel(setting)
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
        axis.set_xticks(positions, [str(v) for v in values])  # exactly the swept values
    for axis in list(axes.flat)[len(names):]:
        axis.set_visible(False)
    counts = sorted({m["num_samples"] for m in metrics if "num_samples" in m})
    samples = f", {counts[0]} samples per value" if len(counts) == 1 else ""
    figure.suptitle(f"Evaluation metrics vs {setting}{samples}")
    save_figure(figure, path)
    return names
