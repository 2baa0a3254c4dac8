"""Multi-scale residual vector quantiser (the "VectorQuantizer2" of VAR).

A latent map f (B, Cvae, h, w) is explained coarse-to-fine: at scale si the residual that is still
unexplained is area-downsampled to pn x pn, snapped to the nearest codebook entries, bicubic-upsampled back
to h x w, refined by a small convolution phi, and subtracted.  The sum of the refined maps is f_hat, the
quantised latent.  The token maps of all scales are what the VAR transformer predicts, one scale at a time.

Everything here follows the official numerics exactly (spec_var.md section 1.4/1.5): "area" resampling is
adaptive average pooling, "bicubic" is torch's (A=-0.75, align_corners=False), phi is (1-r)*h + r*conv(h),
and the phi used at a scale comes from float64 numpy tick arithmetic (ties resolve as the reference does).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def phi_index_per_scale(num_scales: int, num_phi: int, share_quant_resi: int) -> list[int]:
    """Which phi convolution each scale uses.

    With one shared phi (``share_quant_resi == 1``) every scale uses it.  Otherwise each of the ``num_phi``
    convolutions owns a tick in [0, 1] and scale ``si`` takes the one nearest to ``si / (num_scales - 1)``.
    The official code computes this in float64 numpy, and real-number ties (10 scales: si=2 and si=7) are
    decided by rounding; reproducing the arithmetic literally reproduces those decisions.
    """
    if num_phi == 0:
        return [-1] * num_scales
    if share_quant_resi == 1:
        return [0] * num_scales
    margin = 1 / 3 / num_phi if num_phi == 4 else 1 / 2 / num_phi
    ticks = np.linspace(margin, 1 - margin, num_phi)
    indices = []
    for si in range(num_scales):
        position = si / (num_scales - 1) if num_scales > 1 else 0.0
        indices.append(int(np.argmin(np.abs(ticks - position))))
    return indices


class Phi(nn.Conv2d):
    """Residual refinement phi(h) = (1 - r) * h + r * conv3x3(h)."""

    def __init__(self, channels: int, ratio: float):
        super().__init__(channels, channels, kernel_size=3, stride=1, padding=1)
        self.ratio = abs(ratio)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h.mul(1 - self.ratio) + super().forward(h).mul_(self.ratio)


def area_down(x: torch.Tensor, size: int) -> torch.Tensor:
    """Adaptive-average-pool resize (torch "area"): overlapping windows when sizes do not divide."""
    return F.interpolate(x, size=(size, size), mode="area")


def bicubic_up(x: torch.Tensor, size: int) -> torch.Tensor:
    """Torch bicubic resize (A=-0.75, align_corners=False, no clamp)."""
    return F.interpolate(x, size=(size, size), mode="bicubic")


class MultiScaleQuantizer(nn.Module):
    """Codebook, phi convolutions and the four multi-scale algorithms of VAR.

    Args:
        vocab_size: number of codebook entries V.
        z_channels: latent / code dimension Cvae.
        patch_nums: side length of every scale, increasing, the last equal to the latent side.
        beta: commitment weight of the training loss.
        using_znorm: pick codes by cosine similarity instead of L2 distance.
        quant_resi: phi mixing ratio r; |r| <= 1e-6 disables phi.
        share_quant_resi: 0 = one phi per scale, 1 = one phi for all, k >= 2 = k phis shared by tick.
        default_qresi_counts: number of phis in mode 0 (0 means one per scale).
    """

    def __init__(
        self,
        vocab_size: int,
        z_channels: int,
        patch_nums: Sequence[int],
        beta: float = 0.25,
        using_znorm: bool = False,
        quant_resi: float = 0.5,
        share_quant_resi: int = 4,
        default_qresi_counts: int = 0,
    ):
        super().__init__()
        self.vocab_size = vocab_size
        self.z_channels = z_channels
        self.patch_nums = tuple(int(p) for p in patch_nums)
        self.beta = beta
        self.using_znorm = using_znorm
        self.share_quant_resi = share_quant_resi
        if abs(quant_resi) <= 1e-6:
            num_phi = 0
        elif share_quant_resi == 0:
            num_phi = default_qresi_counts or len(self.patch_nums)
        elif share_quant_resi == 1:
            num_phi = 1
        else:
            num_phi = share_quant_resi
        self.phi = nn.ModuleList([Phi(z_channels, quant_resi) for _ in range(num_phi)])
        self.embedding = nn.Embedding(vocab_size, z_channels)

    @property
    def latent_size(self) -> int:
        return self.patch_nums[-1]

    def phi_at(self, scale_index: int, num_scales: int) -> nn.Module:
        """The phi refinement used at ``scale_index`` of a ``num_scales`` schedule (identity if disabled)."""
        if len(self.phi) == 0:
            return nn.Identity()
        index = phi_index_per_scale(num_scales, len(self.phi), self.share_quant_resi)[scale_index]
        return self.phi[index]

    def lookup(self, indices: torch.Tensor, side: int) -> torch.Tensor:
        """Codebook features of a flattened index map (B, side*side) as (B, Cvae, side, side)."""
        batch = indices.shape[0]
        return self.embedding(indices).transpose(1, 2).reshape(batch, self.z_channels, side, side)

    def nearest_codes(self, z: torch.Tensor) -> torch.Tensor:
        """Nearest-code indices for latent vectors z (N, Cvae), with the official distance expansion."""
        codebook = self.embedding.weight.detach()
        z = z.detach()
        if self.using_znorm:
            similarity = F.normalize(z, dim=-1) @ F.normalize(codebook, dim=-1).T
            return similarity.argmax(dim=1)
        distance = z.square().sum(dim=1, keepdim=True) + codebook.square().sum(dim=1)
        distance.addmm_(z, codebook.T, alpha=-2, beta=1)
        return distance.argmin(dim=1)

    def _check_latent(self, f: torch.Tensor, patch_nums: Sequence[int]) -> None:
        if f.shape[-1] != patch_nums[-1] or f.shape[-2] != patch_nums[-1]:
            raise ValueError(
                f"latent of size {tuple(f.shape[-2:])} does not match the last scale {patch_nums[-1]} of "
                f"patch_nums {tuple(patch_nums)}: use images of side {patch_nums[-1]} x the downsample factor"
            )

    @torch.no_grad()
    def quantize(
        self, f: torch.Tensor, patch_nums: Sequence[int] | None = None
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Algorithm (A): latent f (B, Cvae, h, w) -> per-scale index maps and cumulative f_hat.

        Returns ``(indices, fhat_per_scale)``: ``indices[si]`` is (B, pn*pn) in row-major order and
        ``fhat_per_scale[si]`` the cumulative f_hat (B, Cvae, h, w) after scale si.
        """
        patch_nums = tuple(patch_nums or self.patch_nums)
        self._check_latent(f, patch_nums)
        batch, channels, height, _ = f.shape
        num_scales = len(patch_nums)
        f_rest = f.detach().float().clone()
        f_hat = torch.zeros_like(f_rest)
        indices, fhat_per_scale = [], []
        for si, pn in enumerate(patch_nums):
            last = si == num_scales - 1
            z = f_rest if last else area_down(f_rest, pn)
            idx = self.nearest_codes(z.permute(0, 2, 3, 1).reshape(-1, channels))  # (B*pn*pn,)
            h = self.lookup(idx.view(batch, pn * pn), pn)
            if not last:
                h = bicubic_up(h, height)
            h = self.phi_at(si, num_scales)(h)
            f_hat.add_(h)
            f_rest.sub_(h)
            indices.append(idx.view(batch, pn * pn))
            fhat_per_scale.append(f_hat.clone())
        return indices, fhat_per_scale

    def indices_to_fhat(
        self, indices: Sequence[torch.Tensor], patch_nums: Sequence[int] | None = None
    ) -> torch.Tensor:
        """Algorithm (B): per-scale index maps -> f_hat (B, Cvae, h, w), bit-identical to ``quantize``.

        ``patch_nums`` overrides the schedule the maps were quantised with (e.g. ``(side,)`` for the single
        token map a raster LlamaGen trained on this tokenizer decodes, as ``quantize(f, (side,))`` produces it).
        """
        schedule = tuple(patch_nums or self.patch_nums)
        patch_nums = schedule[: len(indices)]  # a prefix of the scales gives a partial f_hat
        num_scales, latent_size = len(schedule), schedule[-1]
        batch = indices[0].shape[0]
        f_hat = torch.zeros(
            batch, self.z_channels, latent_size, latent_size, device=indices[0].device, dtype=torch.float32
        )
        for si, pn in enumerate(patch_nums):
            h = self.lookup(indices[si], pn)
            if si < num_scales - 1:
                h = bicubic_up(h, latent_size)
            f_hat.add_(self.phi_at(si, num_scales)(h))
        return f_hat

    def teacher_forcing_input(self, indices: Sequence[torch.Tensor]) -> torch.Tensor:
        """Algorithm (D): the transformer inputs of scales 1..SN-1 from ground-truth index maps.

        The input block of scale si+1 is the area-downsampled cumulative f_hat of scales 0..si (not the
        embedding of scale si).  Returns (B, L - first_l, Cvae), blocks concatenated in scale order.
        """
        num_scales = len(self.patch_nums)
        batch = indices[0].shape[0]
        f_hat = torch.zeros(
            batch, self.z_channels, self.latent_size, self.latent_size,
            device=indices[0].device, dtype=torch.float32,
        )
        blocks = []
        for si in range(num_scales - 1):
            h = bicubic_up(self.lookup(indices[si], self.patch_nums[si]), self.latent_size)
            f_hat.add_(self.phi_at(si, num_scales)(h))
            next_side = self.patch_nums[si + 1]
            blocks.append(area_down(f_hat, next_side).flatten(2).transpose(1, 2))  # (B, next^2, Cvae)
        if not blocks:
            return torch.zeros(batch, 0, self.z_channels, device=indices[0].device)
        return torch.cat(blocks, dim=1)

    def next_input(
        self, scale_index: int, f_hat: torch.Tensor, h: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Algorithm (E): add scale ``scale_index``'s features h (B, Cvae, pn, pn) to f_hat in place.

        Returns ``(f_hat, next_features)`` with next_features (B, next_pn^2, Cvae) the continuous input of
        the next scale, or None after the last scale.
        """
        num_scales = len(self.patch_nums)
        phi = self.phi_at(scale_index, num_scales)
        if scale_index == num_scales - 1:
            f_hat.add_(phi(h))
            return f_hat, None
        f_hat.add_(phi(bicubic_up(h, self.latent_size)))
        next_side = self.patch_nums[scale_index + 1]
        return f_hat, area_down(f_hat, next_side).flatten(2).transpose(1, 2)

    def forward(self, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """Algorithm (F), for tokenizer training: returns (f_hat_st, vq_loss, indices).

        f_hat_st carries the straight-through gradient to the encoder; vq_loss is the mean over scales of
        beta * |sg(f_hat) - f|^2 + |f_hat - sg(f)|^2, which trains the codebook and phi.  Runs in float32.
        """
        with torch.autocast(device_type=f.device.type, enabled=False):
            f = f.float()
            batch, channels, height, _ = f.shape
            self._check_latent(f, self.patch_nums)
            num_scales = len(self.patch_nums)
            f_detached = f.detach()
            f_rest = f_detached.clone()
            f_hat = torch.zeros_like(f_rest)
            vq_loss = f.new_zeros(())
            indices = []
            for si, pn in enumerate(self.patch_nums):
                last = si == num_scales - 1
                z = f_rest if last else area_down(f_rest, pn)
                idx = self.nearest_codes(z.permute(0, 2, 3, 1).reshape(-1, channels))
                h = self.lookup(idx.view(batch, pn * pn), pn)
                if not last:
                    h = bicubic_up(h, height)
                h = self.phi_at(si, num_scales)(h)
                f_hat = f_hat + h
                f_rest = f_rest - h.detach()
                vq_loss = vq_loss + self.beta * F.mse_loss(f_hat.detach(), f) + F.mse_loss(f_hat, f_detached)
                indices.append(idx.view(batch, pn * pn))
            vq_loss = vq_loss / num_scales
            f_hat_st = f_hat.detach() - f_detached + f
        return f_hat_st, vq_loss, indices
