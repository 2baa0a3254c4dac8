import json
import os
import subprocess
import sys
from pathlib import Path

from var.bench import anchor_ratios, base_ratios
from var.cli import main


def test_bench_tiny_cpu_writes_report_and_plot(tmp_path):
    main(["bench", "--device", "cpu", "--tiny", "--runs", "1", "--batch-sizes", "1", "2",
          "--samplers", "var", "scalekv", "ar", "sjd", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "bench.json").read_text())
    assert report["settings"]["vae_decode_included"] is True
    rows = report["results"]
    assert [(r["sampler"], r["B"]) for r in rows] == [
        ("var", 1), ("var", 2), ("scalekv", 1), ("scalekv", 2), ("ar", 1), ("ar", 2), ("sjd", 1), ("sjd", 2)]
    assert all(r["img_per_s"] > 0 and r["sec"] <= r["median_sec"] for r in rows)
    assert all(r["first_call_sec"] > 0 and r["compile_sec"] is None for r in rows)  # compile time: --compile only
    assert rows[1]["kv_bytes"] == 2 * rows[0]["kv_bytes"]  # the cache grows linearly with the batch
    assert rows[4]["passes"] == 16 and rows[6]["passes"] < 16  # tiny LlamaGen: a 4x4 token map, one token per pass
    assert rows[4]["architecture"] == "tiny LlamaGen" and rows[4]["depth"] == 2
    ratios = {(r["sampler"], r["B"]): r for r in report["vs_base"]}
    assert set(ratios) == {("scalekv", 1), ("scalekv", 2), ("sjd", 1), ("sjd", 2)}  # each against its own base
    assert ratios[("scalekv", 1)]["kv_ratio"] < 1
    assert ratios[("sjd", 2)]["kv_ratio"] == rows[7]["kv_bytes"] / rows[5]["kv_bytes"]
    assert (tmp_path / "bench.png").stat().st_size > 1000


def test_bench_infinity_rows_plain_and_scalekv(tmp_path):
    main(["bench", "--device", "cpu", "--tiny", "--runs", "1", "--batch-sizes", "2", "--depths", "1",
          "--samplers", "var", "scalekv:kv_budget=0.3,kv_window=2", "code", "--infinity", "infinity_2b",
          "--aspect", "4:3", "--out", str(tmp_path)])
    rows = [r for r in json.loads((tmp_path / "bench.json").read_text())["results"] if r["depth"] == "infinity_2b"]
    assert [r["sampler"] for r in rows] == ["var", "scalekv"]  # CoDe's random refiner is a VAR: not on Infinity
    assert all(r["params"] == 2_204_564_032 and r["img_per_s"] > 0 for r in rows)  # the official 2B, counted on meta
    assert rows[1]["kv_bytes"] < rows[0]["kv_bytes"]


def test_base_ratios_report_what_only_the_add_on_fits():
    rows = [
        {"sampler": "var", "depth": 30, "B": 64, "img_per_s": 100.0, "peak_GB": 40.0, "kv_bytes": 1000},
        {"sampler": "var", "depth": 30, "B": 512, "error": "out of memory"},
        {"sampler": "code", "depth": 30, "B": 64, "img_per_s": 180.0, "peak_GB": 20.0, "kv_bytes": 400},
        {"sampler": "scalekv", "depth": 30, "B": 512, "img_per_s": 90.0, "peak_GB": 70.0, "kv_bytes": 800},
    ]
    code, scalekv = base_ratios(rows)
    assert (code["speedup"], code["memory_ratio"], code["kv_ratio"]) == (1.8, 0.5, 0.4)
    assert scalekv["base_error"] == "out of memory" and "error" not in scalekv and "speedup" not in scalekv


def test_anchor_ratios_compare_like_with_like():
    anchors = {"results": [
        {"impl": "official-VAR", "depth": 16, "B": 64, "sec": 0.5085, "img_per_s": 125.9, "peak_GB": 11.99},
        {"impl": "official-VAR", "depth": 24, "B": 256, "error": "CUDA out of memory (80 GB card)"},
        {"impl": "official-CoDe", "drafter": 30, "refiner": 16, "draft_steps": 8, "B": 64, "sec": 0.8811,
         "img_per_s": 72.6, "peak_GB": 20.55},
    ]}
    rows = [
        {"sampler": "var", "depth": 16, "B": 64, "sec": 0.2542, "img_per_s": 251.8, "peak_GB": 6.0},
        {"sampler": "var", "depth": 24, "B": 256, "sec": 3.2, "img_per_s": 80.0, "peak_GB": 70.0},
        {"sampler": "code", "depth": 30, "refiner_depth": 16, "draft_steps": 8, "B": 64, "sec": 0.4,
         "img_per_s": 160.0, "peak_GB": 10.3},
        {"sampler": "code", "depth": 30, "refiner_depth": 16, "draft_steps": 6, "B": 64, "sec": 0.4,
         "img_per_s": 160.0},  # no official run with 6 draft steps at this batch in the anchors above
        {"sampler": "scalekv", "depth": 16, "kv_budget": 0.1, "B": 64, "sec": 0.3, "img_per_s": 213.3},
    ]
    ratios = anchor_ratios(rows, anchors)
    assert len(ratios) == 3
    assert ratios[0]["speedup"] == 2.0 and ratios[0]["memory_ratio"] == 0.5
    assert ratios[1]["official"].startswith("CUDA out of memory")
    assert ratios[2]["sampler"] == "code" and ratios[2]["speedup"] == 2.204 and ratios[2]["memory_ratio"] == 0.501


def test_gpu_acceptance_script_runs_every_part_on_tiny_models(tmp_path):
    """The script a device session runs in one call per part; here every part but the compiled one, on CPU."""
    script = Path(__file__).resolve().parents[1] / "scripts" / "gpu_acceptance.py"
    subprocess.run([sys.executable, str(script), "--tiny", "--device", "cpu", "--runs", "1",
                    "--parts", "bench", "addons", "sjd", "fid", "--out", str(tmp_path)], check=True,
                   capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})  # tiny: 1 thread
    summary = json.loads((tmp_path / "acceptance.json").read_text())
    assert set(summary) == {"device", "bench", "addons", "sjd", "fid"}
    assert {r["sampler"] for r in summary["addons"]["rows"]} == {"var", "code", "scalekv"}
    assert any("KV bytes vs full cache" in name for name in summary["addons"]["checks"])
    assert {e["sampler"] for e in summary["sjd"]["vs_base"]} == {"sjd"}
    assert summary["fid"]["num_samples"] == 20 and summary["fid"]["extraction_images_per_s"] > 0


def test_llamagen_bench_sizes_have_the_released_parameter_counts():
    """The bench's LlamaGen rows are the released sizes: c2i at 1000 classes over the 16384-code VQ-16 (meta
    device, nothing allocated).  GPT-B is exactly the released 110,888,448 values (spec 1.8)."""
    import torch

    from var.models.llamagen import LlamaGen, llamagen_config

    released = {"GPT-B": 111e6, "GPT-L": 343e6, "GPT-XL": 775e6, "GPT-XXL": 1.4e9, "GPT-3B": 3.1e9}
    counts = {}
    for size in released:
        with torch.device("meta"):
            counts[size] = LlamaGen(llamagen_config(size, block_size=576)).num_params()
    assert counts["GPT-B"] == 110_888_448
    for size, expected in released.items():
        assert abs(counts[size] - expected) / expected < 0.03, (size, counts[size])
