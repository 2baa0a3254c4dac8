"""Paired fidelity (``var compare``): PSNR and SSIM against known values and an independent implementation."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from var.cli import main
from var.eval.images import Samples, save_npz_samples
from var.eval.paired import SSIM_K1, SSIM_K2, compare_images, psnr, ssim


def reference_ssim(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM the way scikit-image computes it (gaussian_weights=True, sigma 1.5, population covariance):
    scipy Gaussian filtering per channel (truncate 3.5 -> an 11-tap window), borders cropped, mean."""
    c1, c2 = SSIM_K1**2, SSIM_K2**2
    maps = []
    for x, y in zip(a, b, strict=True):  # channels
        def blur(image):
            return gaussian_filter(image, sigma=1.5, truncate=3.5)

        mx, my = blur(x), blur(y)
        vx, vy, cxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
        value = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
        maps.append(value[5:-5, 5:-5])
    return float(np.mean(maps))


def smooth_pair(seed: int, side: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    base = torch.nn.functional.interpolate(torch.rand(1, 3, 8, 8, generator=generator), size=side, mode="bilinear")
    noisy = (base + 0.05 * torch.randn(base.shape, generator=generator)).clamp(0, 1)
    return base.double(), noisy.double()


def test_ssim_matches_an_independent_implementation():
    for seed in range(3):
        a, b = smooth_pair(seed)
        ours = ssim(a, b).item()
        assert ours == pytest.approx(reference_ssim(a[0].numpy(), b[0].numpy()), abs=1e-10)
        assert 0.3 < ours < 0.99
    assert ssim(a, a).item() == pytest.approx(1.0, abs=1e-12)


def test_ssim_and_psnr_known_values():
    a = torch.full((1, 3, 16, 16), 0.5, dtype=torch.float64)
    b = torch.full((1, 3, 16, 16), 0.25, dtype=torch.float64)
    c1 = SSIM_K1**2  # flat images: only the luminance term is left
    assert ssim(a, b).item() == pytest.approx((2 * 0.5 * 0.25 + c1) / (0.5**2 + 0.25**2 + c1), rel=1e-12)
    assert psnr(a, b).item() == pytest.approx(10 * math.log10(1 / 0.25**2), rel=1e-12)
    assert psnr(a, a).item() == pytest.approx(100.0)  # identical images are capped, not inf
    uint8_a = torch.full((2, 3, 8, 8), 100, dtype=torch.uint8)
    results = compare_images(uint8_a, uint8_a + 51)  # 51 / 255 = 0.2 everywhere
    assert results["psnr_db"] == pytest.approx(10 * math.log10(25), rel=1e-9)
    assert results["psnr_db_pooled"] == pytest.approx(10 * math.log10(25), rel=1e-9)
    # one identical pair (capped at 100 dB) lifts the per-image mean, not the pooled figure: MSE 0.04 / 2
    results = compare_images(torch.cat([uint8_a, uint8_a]), torch.cat([uint8_a, uint8_a + 51]))
    assert results["psnr_db"] == pytest.approx((100 + 10 * math.log10(25)) / 2, rel=1e-9)
    assert results["psnr_db_pooled"] == pytest.approx(10 * math.log10(50), rel=1e-9)
    assert results["ssim_window"] == 7 and any("window" in note for note in results["notes"])


def test_compare_cli(tmp_path, capsys):
    labels = torch.tensor([0, 1, 2, 3])
    a, b = smooth_pair(0)
    images_a = (torch.cat([a] * 4) * 255).round().to(torch.uint8)
    images_b = (torch.cat([b] * 4) * 255).round().to(torch.uint8)
    save_npz_samples(tmp_path / "a.npz", Samples(images_a, labels))
    save_npz_samples(tmp_path / "b.npz", Samples(images_b, labels))
    main(["compare", str(tmp_path / "a.npz"), str(tmp_path / "b.npz"), "--json", str(tmp_path / "paired.json")])
    printed = capsys.readouterr().out
    assert "4 pairs (32x32)" in printed and "PSNR" in printed and "SSIM" in printed and "LPIPS" in printed
    numbers = json.loads((tmp_path / "paired.json").read_text())
    assert numbers["ssim"] == pytest.approx(reference_ssim(*(x[0].numpy() for x in smooth_pair(0))), abs=2e-3)
    assert 20 < numbers["psnr_db"] < 40
    save_npz_samples(tmp_path / "c.npz", Samples(images_b, labels.flip(0)))
    with pytest.raises(SystemExit, match="different labels"):
        main(["compare", str(tmp_path / "a.npz"), str(tmp_path / "c.npz")])
    save_npz_samples(tmp_path / "d.npz", Samples(images_b[:3]))
    with pytest.raises(SystemExit, match="differ in shape"):
        main(["compare", str(tmp_path / "a.npz"), str(tmp_path / "d.npz")])
