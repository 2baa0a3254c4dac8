"""Figures explain themselves: titles with the better direction, axis labels with units scaled to the data, legends."""

import pytest

import var.eval.report
import var.plots
from var.bench import plot
from var.eval.report import plot_sweep
from var.plots import better_title, byte_scale


@pytest.fixture
def drawn(monkeypatch):
    """The figures the plotting functions save, kept open for inspection (and the paths they would go to)."""
    figures = []

    def keep(figure, path, dpi=110):
        figures.append((figure, path))

    monkeypatch.setattr(var.plots, "save_figure", keep)
    monkeypatch.setattr(var.eval.report, "save_figure", keep)
    yield figures
    for figure, _ in figures:
        var.plots.pyplot().close(figure)


def test_units_and_directions():
    assert byte_scale([31_000, 62_000]) == ("kB", 1000)
    assert byte_scale([3e9, 4.1e10]) == ("GB", 10**9)
    assert byte_scale([]) == ("B", 1)
    assert better_title("FID", "lower") == "FID (lower is better \u2193)"
    with pytest.raises(ValueError, match="better must be"):
        better_title("FID", "smaller")


@pytest.mark.parametrize("memory, label", [
    ({"kv_bytes": 32_768}, "KV cache (kB)"),  # a CPU run: ~0.00003 GB would be unreadable
    ({"peak_GB": 11.99, "kv_bytes": 10**9}, "peak CUDA memory (GB)"),
])
def test_bench_plot(drawn, memory, label):
    rows = [{"sampler": sampler, "depth": 2, "B": batch, "img_per_s": 10.0 * batch, **memory}
            for sampler in ("var", "scalekv") for batch in (1, 4)]
    rows.append({"sampler": "var", "depth": 2, "B": 8, "error": "out of memory"})
    plot(rows, "bench.png")
    (figure, path), = drawn
    speed, memory_axis = figure.axes
    assert path == "bench.png" and figure._suptitle.get_text()
    assert speed.get_ylabel() == "images / s" and "higher is better" in speed.get_title()
    assert memory_axis.get_ylabel() == label and "lower is better" in memory_axis.get_title()
    assert max(memory_axis.lines[0].get_ydata()) < 1000  # scaled to the unit
    assert [t.get_text() for t in figure.legends[0].get_texts()] == ["scalekv d2", "var d2"]


def test_sweep_plot(drawn):
    metrics = [{"num_samples": 50, "fid": fid, "is": score, "is_std": 1.0, "recall": 0.5}
               for fid, score in ((9.0, 100.0), (6.0, 120.0), (7.0, 130.0))]
    assert plot_sweep("sweep.png", "cfg", [1.0, 1.5, 2.0], metrics) == ["fid", "is", "recall"]
    (figure, _), = drawn
    fid, inception, recall = (axis for axis in figure.axes if axis.get_visible())
    assert figure._suptitle.get_text() == "Evaluation metrics vs cfg, 50 samples per value"
    assert fid.get_title() == "FID (lower is better \u2193)" and fid.get_xlabel() == "cfg" and fid.get_ylabel() == "FID"
    assert "higher is better" in inception.get_title() and "higher is better" in recall.get_title()
    legend = [t.get_text() for t in fid.get_legend().get_texts()]
    assert "best: cfg=1.5" in legend
    assert "best: cfg=2.0" in [t.get_text() for t in inception.get_legend().get_texts()]
    assert any("std over IS splits" in t.get_text() for t in inception.get_legend().get_texts())
