"""Paired fidelity between two same-seed sample sets: PSNR, SSIM and (when its weights are present) LPIPS.

An accelerated sampler (ScaleKV, CoDe) run with the same classes and seeds as the reference sampler should
reproduce its images; these metrics measure how closely, image by image.  Images are compared in [0, 1].
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

PSNR_CAP_DB = 100.0  # identical images (MSE 0) count as 100 dB instead of inf
SSIM_WINDOW, SSIM_SIGMA = 11, 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03
LPIPS_BACKBONE_FILE = "alexnet-owt-7be5be79.pth"
LPIPS_MIN_SIDE = 32  # AlexNet's second max-pool needs at least this input side


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> float64 in [0, 1]."""
    return images.double() / 255.0


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Per-image PSNR in dB of float images (N, C, H, W), capped at :data:`PSNR_CAP_DB`."""
    return _psnr_of_mse((a - b).pow(2).flatten(1).mean(dim=1), data_range)


def pooled_psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> float:
    """PSNR in dB of the mean squared error over the whole set: what torchmetrics' PeakSignalNoiseRatio
    accumulated over every image reports (ScaleKV's protocol).  Unlike the mean of per-image PSNRs, images
    that came out identical (capped at 100 dB each) cannot hide the ones that changed."""
    return _psnr_of_mse((a - b).pow(2).mean(), data_range).item()


def _psnr_of_mse(mse: torch.Tensor, data_range: float) -> torch.Tensor:
    floor = data_range**2 * 10 ** (-PSNR_CAP_DB / 10)
    return 10 * torch.log10(data_range**2 / mse.clamp_min(floor))


def gaussian_window(size: int, sigma: float) -> torch.Tensor:
    """Normalised 1-D Gaussian of odd length ``size`` (float64)."""
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    weights = torch.exp(-(coords**2) / (2 * sigma**2))
    return weights / weights.sum()


def ssim_window_for(height: int, width: int) -> int:
    """The standard 11-pixel window, shrunk to the largest odd size that fits smaller images."""
    side = min(SSIM_WINDOW, height, width)
    return side if side % 2 else side - 1


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0, window: int | None = None) -> torch.Tensor:
    """Per-image SSIM (Wang et al. 2004) of float images (N, C, H, W): Gaussian window (sigma 1.5),
    K1 = 0.01, K2 = 0.03, population (co)variances, valid positions only, mean over channels and positions.
    """
    channels = a.shape[1]
    window = window or ssim_window_for(*a.shape[-2:])
    line = gaussian_window(window, SSIM_SIGMA).to(a)
    kernel = (line[:, None] * line[None, :]).expand(channels, 1, window, window)  # depthwise (C, 1, w, w)

    def local_mean(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, kernel, groups=channels)  # (N, C, H-w+1, W-w+1)

    mean_a, mean_b = local_mean(a), local_mean(b)
    var_a = local_mean(a * a) - mean_a**2
    var_b = local_mean(b * b) - mean_b**2
    cov = local_mean(a * b) - mean_a * mean_b
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    similarity = ((2 * mean_a * mean_b + c1) * (2 * cov + c2)) / ((mean_a**2 + mean_b**2 + c1) * (var_a + var_b + c2))
    return similarity.flatten(1).mean(dim=1)


def lpips_distance(
    a: torch.Tensor, b: torch.Tensor, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor | None, str]:
    """Per-image LPIPS (AlexNet) of [0, 1] images, or (None, why it was skipped).

    Needs the ``lpips`` package and torchvision's ImageNet AlexNet in ``$TORCH_HOME/hub/checkpoints/``
    (neither ships with this toolkit; offline they would have to be put there by hand).
    """
    backbone = Path(torch.hub.get_dir()) / "checkpoints" / LPIPS_BACKBONE_FILE
    if min(a.shape[-2:]) < LPIPS_MIN_SIDE:
        return None, f"LPIPS skipped: images are smaller than {LPIPS_MIN_SIDE} px"
    try:
        import lpips
    except ImportError:
        return None, f"LPIPS skipped: the lpips package is not installed (pip install lpips; it also needs {backbone})"
    if not backbone.is_file():
        return None, (f"LPIPS skipped: its AlexNet backbone {backbone} is absent "
                      f"(https://download.pytorch.org/models/{LPIPS_BACKBONE_FILE})")
    network = lpips.LPIPS(net="alex", verbose=False).to(device).eval()
    distances = []
    with torch.no_grad():
        for chunk_a, chunk_b in zip(a.split(64), b.split(64), strict=True):
            pair = [x.float().to(device).mul(2).sub(1) for x in (chunk_a, chunk_b)]  # LPIPS takes [-1, 1]
            distances.append(network(*pair).flatten().cpu())
    return torch.cat(distances), "LPIPS: AlexNet backbone, lpips v0.1 linear heads"


def compare_images(a: torch.Tensor, b: torch.Tensor, with_lpips: bool = True) -> dict:
    """Mean (and worst) per-image PSNR / SSIM (/ LPIPS) between two uint8 (N, 3, H, W) sets of the same shape,
    and the set's pooled PSNR (``psnr_db_pooled``, see :func:`pooled_psnr`)."""
    if a.shape != b.shape:
        raise ValueError(f"sample sets differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}; compare same-seed runs")
    unit_a, unit_b = to_unit(a), to_unit(b)
    window = ssim_window_for(*a.shape[-2:])
    psnr_values, ssim_values = psnr(unit_a, unit_b), ssim(unit_a, unit_b, window=window)
    results = {
        "num_pairs": len(a),
        "psnr_db": psnr_values.mean().item(),
        "psnr_db_min": psnr_values.min().item(),
        "psnr_db_pooled": pooled_psnr(unit_a, unit_b),
        "ssim": ssim_values.mean().item(),
        "ssim_min": ssim_values.min().item(),
        "ssim_window": window,
        "notes": [],
    }
    if window != SSIM_WINDOW:
        results["notes"].append(f"SSIM window shrunk to {window} px for {a.shape[-1]} px images")
    if with_lpips:
        distances, note = lpips_distance(unit_a, unit_b)
        if distances is not None:
            results["lpips"] = distances.mean().item()
        results["notes"].append(note)
    return results
