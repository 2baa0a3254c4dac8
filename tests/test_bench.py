import json

from var.bench import anchor_ratios
from var.cli import main


def test_bench_tiny_cpu_writes_report_and_plot(tmp_path):
    main(["bench", "--device", "cpu", "--tiny", "--runs", "1", "--batch-sizes", "1", "2", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "bench.json").read_text())
    assert report["settings"]["vae_decode_included"] is True
    rows = report["results"]
    assert [r["B"] for r in rows] == [1, 2]
    assert all(r["img_per_s"] > 0 and r["sec"] <= r["median_sec"] for r in rows)
    assert rows[1]["kv_bytes"] == 2 * rows[0]["kv_bytes"]  # the cache grows linearly with the batch
    assert (tmp_path / "bench.png").stat().st_size > 1000


def test_anchor_ratios_compare_like_with_like():
    anchors = {"results": [
        {"impl": "official-VAR", "depth": 16, "B": 64, "img_per_s": 125.9, "peak_GB": 11.99},
        {"impl": "official-VAR", "depth": 24, "B": 256, "error": "CUDA out of memory (80 GB card)"},
        {"impl": "official-CoDe", "drafter": 30, "refiner": 16, "B": 64, "img_per_s": 72.6},
    ]}
    rows = [
        {"sampler": "var", "depth": 16, "B": 64, "img_per_s": 251.8, "peak_GB": 6.0},
        {"sampler": "var", "depth": 24, "B": 256, "img_per_s": 80.0, "peak_GB": 70.0},
        {"sampler": "code", "depth": 16, "B": 64, "img_per_s": 300.0},
    ]
    ratios = anchor_ratios(rows, anchors)
    assert ratios[0]["speedup"] == 2.0 and ratios[0]["memory_ratio"] == 0.5
    assert ratios[1]["official"].startswith("CUDA out of memory")
    assert len(ratios) == 2
