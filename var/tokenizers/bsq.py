"""Infinity's tokenizer: a convolutional autoencoder with multi-scale binary spherical quantisation (BSQ).

The encoder maps an image to a d-channel feature map (d = bits per code, 32 for the released d32 model).
BSQ explains it coarse to fine over a scale schedule: at each scale the unexplained residual is
area-downsampled to the scale's grid, every d-vector is l2-normalised and snapped to the nearest corner of
the hypercube {-1/sqrt(d), +1/sqrt(d)}^d (so its bits are the signs), and the code is trilinearly upsampled
back and subtracted.  The transformer predicts those bits scale by scale; its input at scale s+1 is the
*trilinear* resize of the summed codes of scales < s+1 (``next_scale_input``), not the area resize the
tokenizer itself uses for the residual.

Numerics follow the official code (spec_infinity.md section 2): quantisation in float32, the
straight-through expression ``z + (zhat - z)``, bits -> codes with the final l2 normalisation, swish as
``x * sigmoid(x)``, GroupNorm with 32 groups (or 24 when 32 does not divide the channels), decode clamped to
[-1, 1].  Module names are the plain spelling (``conv_in.weight``); var/infinity_checkpoints.py also reads
the official wrapper spelling (``conv_in.conv.weight``, ``norm1.norm.weight``).

Spatial patchify (the Infinity-8B pairing with the stride-8 tokenizer): the transformer sees each 2 x 2
patch of codes as one token of 4d bits, on grids half the tokenizer's size.  ``spatial_patchify`` switches
the bits <-> codes and next-input rules to that view; everything else is unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from var.models.family import ScaleSchedule
from var.tokenizers.vqvae import Downsample, Upsample

Grids = ScaleSchedule | Sequence[Sequence[int]]


@dataclass
class BSQConfig:
    """Every constructor argument of :class:`BSQTokenizer`; the defaults are the released d32 tokenizer."""

    codebook_dim: int = 32  # d: bits per code, also the latent channels
    base_ch: int = 128
    encoder_ch_mult: tuple[int, ...] = (1, 2, 4, 4, 4)
    decoder_ch_mult: tuple[int, ...] = (1, 2, 4, 4, 4)
    num_res_blocks: int = 2
    patch_size: int = 16  # image pixels per latent pixel
    in_channels: int = 3
    spatial_patchify: bool = False  # transformer tokens are 2 x 2 patches of codes (Infinity-8B)

    def __post_init__(self) -> None:
        self.encoder_ch_mult = tuple(int(m) for m in self.encoder_ch_mult)
        self.decoder_ch_mult = tuple(int(m) for m in self.decoder_ch_mult)
        steps = int(math.log2(self.patch_size)) if self.patch_size > 0 else -1
        if steps < 0 or 2**steps != self.patch_size:
            raise ValueError(f"patch_size must be a power of two, got {self.patch_size}")
        for name in ("encoder_ch_mult", "decoder_ch_mult"):
            if len(getattr(self, name)) < steps + 1:
                raise ValueError(
                    f"{name} {getattr(self, name)} has {len(getattr(self, name))} levels but patch_size "
                    f"{self.patch_size} needs at least {steps + 1} (log2(patch_size) + 1)"
                )
        for channels in {self.base_ch * m for m in self.encoder_ch_mult + self.decoder_ch_mult}:
            norm_groups(channels)

    @property
    def resampling_steps(self) -> int:
        """Number of stride-2 downsamplings (encoder) and upsamplings (decoder): log2(patch_size)."""
        return int(math.log2(self.patch_size))

    def to_dict(self) -> dict:
        return asdict(self)


def norm_groups(channels: int) -> int:
    """The official GroupNorm rule: 32 groups if they divide the channels, else 24."""
    for groups in (32, 24):
        if channels % groups == 0:
            return groups
    raise ValueError(f"{channels} channels are divisible by neither 32 nor 24 GroupNorm groups; change base_ch")


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(norm_groups(channels), channels, eps=1e-6, affine=True)


def swish(x: torch.Tensor) -> torch.Tensor:
    """x * sigmoid(x), written as the official code writes it (F.silu can differ in the last bit)."""
    return x * torch.sigmoid(x)


class ResBlock(nn.Module):
    """GN -> swish -> conv3x3, twice, plus the (1x1-projected when widths differ) input."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = _norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(swish(self.norm2(h)))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class _Middle(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.block_1 = ResBlock(channels, channels)
        self.block_2 = ResBlock(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.block_1(x))


class BSQEncoder(nn.Module):
    """Image (B, 3, H, W) -> raw features (B, d, H / patch, W / patch); no attention anywhere."""

    def __init__(self, cfg: BSQConfig):
        super().__init__()
        ch = cfg.base_ch
        self.conv_in = nn.Conv2d(cfg.in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList()
        channels = ch
        for level, mult in enumerate(cfg.encoder_ch_mult):
            stage = nn.Module()
            stage.block = nn.ModuleList()
            for _ in range(cfg.num_res_blocks):
                stage.block.append(ResBlock(channels, ch * mult))
                channels = ch * mult
            if level < cfg.resampling_steps:
                stage.downsample = Downsample(channels)
            self.down.append(stage)
        self.mid = _Middle(channels)
        self.norm_out = _norm(channels)
        self.conv_out = nn.Conv2d(channels, cfg.codebook_dim, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for stage in self.down:
            for block in stage.block:
                h = block(h)
            if hasattr(stage, "downsample"):
                h = stage.downsample(h)
        return self.conv_out(swish(self.norm_out(self.mid(h))))


class BSQDecoder(nn.Module):
    """Codes (B, d, h, w) -> image (B, 3, h * patch, w * patch), unclamped.

    ``up[i]`` is resolution level i; levels run from the last (lowest resolution) to 0, each with
    num_res_blocks + 1 blocks, levels 1..log2(patch) ending with a nearest x2 upsampling.
    """

    def __init__(self, cfg: BSQConfig):
        super().__init__()
        ch, mults = cfg.base_ch, cfg.decoder_ch_mult
        channels = ch * mults[-1]
        self.conv_in = nn.Conv2d(cfg.codebook_dim, channels, 3, padding=1)
        self.mid = _Middle(channels)
        stages: list[nn.Module] = []
        for level in reversed(range(len(mults))):
            stage = nn.Module()
            stage.block = nn.ModuleList()
            for _ in range(cfg.num_res_blocks + 1):
                stage.block.append(ResBlock(channels, ch * mults[level]))
                channels = ch * mults[level]
            if 1 <= level <= cfg.resampling_steps:
                stage.upsample = Upsample(channels)
            stages.insert(0, stage)
        self.up = nn.ModuleList(stages)
        self.norm_out = _norm(channels)
        self.conv_out = nn.Conv2d(channels, cfg.in_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for stage in reversed(self.up):
            for block in stage.block:
                h = block(h)
            if hasattr(stage, "upsample"):
                h = stage.upsample(h)
        return self.conv_out(swish(self.norm_out(h)))


@dataclass
class BSQEncoding:
    """What :meth:`BSQTokenizer.encode` returns."""

    raw_features: torch.Tensor  # (B, d, H, W) encoder output
    summed_codes: torch.Tensor  # (B, d, H, W) sum of the upsampled per-scale codes (the quantised latent)
    bits: list[torch.Tensor]  # per scale (B, 1, h, w, d), uint8


def _grid_list(schedule: Grids) -> list[tuple[int, int]]:
    grids = schedule.shapes if isinstance(schedule, ScaleSchedule) else schedule
    out = []
    for grid in grids:
        grid = tuple(int(v) for v in grid)
        out.append(grid[-2:])  # (1, h, w) or (h, w)
    return out


def area_resize(x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Area (adaptive average) resize of (B, d, 1, h, w) maps, as the quantiser shrinks residuals."""
    return F.interpolate(x, size=(1, *grid), mode="area")


def trilinear_resize(x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Trilinear (align_corners=False) resize of (B, d, 1, h, w) maps: code upsampling and next-scale inputs."""
    return F.interpolate(x, size=(1, *grid), mode="trilinear")


class BSQTokenizer(nn.Module):
    """The BSQ autoencoder with its multi-scale quantiser.

    Schedules are :class:`~var.models.family.ScaleSchedule` objects or lists of (h, w) /
    (1, h, w) grids.  With ``spatial_patchify`` they are the *transformer's* grids (half the tokenizer's).
    Images are (B, 3, H, W) in [-1, 1].
    """

    def __init__(self, cfg: BSQConfig | None = None, **overrides):
        super().__init__()
        cfg = cfg or BSQConfig(**overrides)
        self.config = cfg
        self.encoder = BSQEncoder(cfg)
        self.decoder = BSQDecoder(cfg)

    @property
    def codebook_dim(self) -> int:
        return self.config.codebook_dim

    @property
    def bits_per_token(self) -> int:
        """Bits of one transformer token: d, or 4d with spatial patchify."""
        return self.codebook_dim * (4 if self.config.spatial_patchify else 1)

    def latent_grids(self, schedule: Grids) -> list[tuple[int, int]]:
        """The tokenizer's grid of every scale (twice the transformer's with spatial patchify)."""
        factor = 2 if self.config.spatial_patchify else 1
        return [(h * factor, w * factor) for h, w in _grid_list(schedule)]

    # -- encoder side -----------------------------------------------------------------------------------
    def encode_features(self, images: torch.Tensor) -> torch.Tensor:
        """Raw encoder features (B, d, H / patch, W / patch) in float32."""
        if images.ndim != 4 or images.shape[1] != self.config.in_channels:
            raise ValueError(f"expected images (B, {self.config.in_channels}, H, W), got {tuple(images.shape)}")
        stride = self.config.patch_size
        if images.shape[-2] % stride or images.shape[-1] % stride:
            raise ValueError(
                f"image size {tuple(images.shape[-2:])} is not a multiple of the tokenizer stride {stride}"
            )
        return self.encoder(images).float()

    def quantize(self, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """BSQ of a map (B, d, 1, h, w): (codes (B, d, 1, h, w), bits (B, 1, h, w, d) uint8).

        Each d-vector is l2-normalised and replaced by sign(.)/sqrt(d), written ``z + (zhat - z)`` as the
        official straight-through code computes it; its bits are 1 where the code is positive.
        """
        with torch.autocast(device_type=residual.device.type, enabled=False):
            # channels-last storage as in the official code: the trilinear upsampling that follows rounds
            # differently on the other layout
            z = F.normalize(residual.float().permute(0, 2, 3, 4, 1).contiguous(), dim=-1)  # (B, 1, h, w, d)
            zhat = torch.where(z > 0, 1.0, -1.0).to(z.dtype) * (1.0 / math.sqrt(self.codebook_dim))
            quantized = z + (zhat - z)
            bits = (quantized > 0).to(torch.uint8)
        return quantized.permute(0, 4, 1, 2, 3), bits

    def _quantize_scales(self, raw: torch.Tensor, grids: list[tuple[int, int]], from_raw: bool):
        """Yield (scale index, bits, upsampled code, running sum of upsampled codes) scale by scale.

        ``from_raw=False`` is the tokenizer's own loop (residual -= code each scale); ``from_raw=True`` is
        the trainer's (residual = raw - sum of codes so far), which can differ in the last float bit.
        """
        full = tuple(raw.shape[-2:])
        residual, summed = raw, torch.zeros_like(raw)
        for si, grid in enumerate(grids):
            current = raw - summed if from_raw else residual
            if grid != full:
                current = area_resize(current, grid)
            code, bits = self.quantize(current)
            if grid != full:
                code = trilinear_resize(code, full).contiguous()
            residual = residual - code
            summed = summed + code
            yield si, bits, code, summed

    @torch.no_grad()
    def encode(self, images: torch.Tensor, schedule: Grids) -> BSQEncoding:
        """Images -> raw features, summed codes and the bits of every scale of ``schedule``."""
        raw = self.encode_features(images).unsqueeze(2)  # (B, d, 1, H, W)
        grids = self._check_grids(raw, schedule)
        bits, summed = [], None
        for _, scale_bits, _, running_sum in self._quantize_scales(raw, grids, from_raw=False):
            bits.append(scale_bits)
            summed = running_sum
        return BSQEncoding(raw.squeeze(2), summed.squeeze(2), bits)

    @torch.no_grad()
    def teacher_forcing_input(
        self, raw_features: torch.Tensor, schedule: Grids
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The transformer's training inputs (the official trainer's rule, without bit-flip noise).

        Returns ``(inputs, bits)``: inputs (B, L - 1, bits_per_token), the trilinear resize of the summed
        codes of scales <= s to the grid of scale s+1, for s = 0..n-2, concatenated; bits[s] the target bits
        (B, h_s * w_s, bits_per_token) of every scale.
        """
        raw = raw_features.float().unsqueeze(2) if raw_features.ndim == 4 else raw_features.float()
        grids = self._check_grids(raw, schedule)
        inputs, bits = [], []
        for si, scale_bits, _, summed in self._quantize_scales(raw, grids, from_raw=True):
            bits.append(self._bits_to_tokens(scale_bits))
            if si + 1 < len(grids):
                inputs.append(self._features_to_tokens(trilinear_resize(summed, grids[si + 1])))
        if not inputs:
            return raw.new_zeros(raw.shape[0], 0, self.bits_per_token), bits
        return torch.cat(inputs, dim=1), bits

    def _check_grids(self, raw: torch.Tensor, schedule: Grids) -> list[tuple[int, int]]:
        grids = self.latent_grids(schedule)
        if tuple(raw.shape[-2:]) != grids[-1]:
            raise ValueError(
                f"the tokenizer's latent is {tuple(raw.shape[-2:])} but the schedule ends at {grids[-1]}: use "
                f"images of {grids[-1][0] * self.config.patch_size} x {grids[-1][1] * self.config.patch_size} px"
            )
        return grids

    # -- transformer side (the scale-wise tokenizer protocol) --------------------------------------------
    def bits_to_codes(self, bits: torch.Tensor) -> torch.Tensor:
        """Transformer bits (B, h, w, bits_per_token) or tokenizer bits (B, 1, h, w, d) -> codes (B, d, 1, H, W).

        code = bit * 2s - s with s = 1/sqrt(d), then l2-normalised over d (a no-op up to one ulp, kept for
        exactness).  With spatial patchify each token's 4d bits become a 2 x 2 patch of d-bit codes.
        """
        if bits.ndim == 5:
            bits = bits[:, 0]
        elif self.config.spatial_patchify:
            bits = F.pixel_shuffle(bits.permute(0, 3, 1, 2), 2).permute(0, 2, 3, 1)  # (B, 2h, 2w, d)
        scale = 1 / math.sqrt(self.codebook_dim)
        codes = F.normalize(bits.float() * scale * 2 - scale, dim=-1)
        return codes.permute(0, 3, 1, 2).unsqueeze(2)

    def next_input(
        self, scale_index: int, summed: torch.Tensor | None, codes: torch.Tensor, schedule: Grids
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Add scale ``scale_index``'s codes (B, d, 1, h, w) to the running sum (B, d, 1, H, W; None = zeros).

        Returns ``(summed, next_input)``: next_input (B, h'w', bits_per_token) is the trilinear resize of the
        sum to the next scale's grid, the transformer's word input there; None after the last scale.
        """
        summed = self.empty_latent(codes.shape[0], codes.device, schedule) if summed is None else summed.clone()
        return summed, self.next_scale_input(scale_index, summed, codes, schedule)

    def codes_from_bits(self, bits: Sequence[torch.Tensor], schedule: Grids) -> torch.Tensor:
        """Summed codes (B, d, 1, H, W) of per-scale bits (any prefix of the schedule's scales)."""
        summed = None
        for si, scale_bits in enumerate(bits):
            summed, _ = self.next_input(si, summed, self.bits_to_codes(scale_bits), schedule)
        return summed

    def decode(self, summed_codes: torch.Tensor) -> torch.Tensor:
        """Summed codes (B, d, H, W) or (B, d, 1, H, W) -> images in [-1, 1]."""
        if summed_codes.ndim == 5:
            summed_codes = summed_codes.squeeze(2)
        return self.decoder(summed_codes).clamp(-1, 1)

    def decode_from_bits(self, bits: Sequence[torch.Tensor], schedule: Grids) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-scale bits -> (summed codes (B, d, 1, H, W), images in [-1, 1])."""
        summed = self.codes_from_bits(bits, schedule)
        return summed, self.decode(summed)

    # -- the scale-tokenizer protocol (var/models/family.py): what the samplers call ------------------------
    def empty_latent(self, batch: int, device: torch.device | str, schedule: Grids) -> torch.Tensor:
        """The summed codes before any scale: zeros (B, d, 1, H, W)."""
        height, width = self.latent_grids(schedule)[-1]
        return torch.zeros(batch, self.codebook_dim, 1, height, width, device=device)

    def scale_features(self, tokens: torch.Tensor, scale: int, schedule: Grids) -> torch.Tensor:
        """Codes (B, d, 1, h, w) of a scale's bits (B, h * w * bits_per_token), row-major (token, bit)."""
        height, width = _grid_list(schedule)[scale]
        return self.bits_to_codes(tokens.view(tokens.shape[0], height, width, self.bits_per_token))

    def next_scale_input(self, scale: int, f_hat: torch.Tensor, features: torch.Tensor,
                         schedule: Grids) -> torch.Tensor | None:
        """Add a scale's codes to the summed codes ``f_hat`` (B, d, 1, H, W) in place; the next scale's word
        input (B, h'w', bits_per_token), the trilinear resize of the sum, or None after the last scale."""
        grids = self.latent_grids(schedule)
        codes = features.float()
        f_hat.add_(trilinear_resize(codes, grids[-1]) if tuple(codes.shape[-2:]) != grids[-1] else codes)
        if scale + 1 >= len(grids):
            return None
        return self._features_to_tokens(trilinear_resize(f_hat, grids[scale + 1]))

    def fhat_to_image(self, f_hat: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] from the summed codes."""
        return self.decode(f_hat)

    # -- token layout ---------------------------------------------------------------------------------------
    def _features_to_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """(B, d, 1, h, w) -> (B, tokens, bits_per_token), row-major (2 x 2 patches with spatial patchify)."""
        x = x.squeeze(2)
        if self.config.spatial_patchify:
            x = F.pixel_unshuffle(x, 2)
        return x.flatten(2).transpose(1, 2)

    def _bits_to_tokens(self, bits: torch.Tensor) -> torch.Tensor:
        """(B, 1, h, w, d) -> (B, tokens, bits_per_token)."""
        bits = bits[:, 0]
        if self.config.spatial_patchify:
            bits = F.pixel_unshuffle(bits.permute(0, 3, 1, 2), 2).permute(0, 2, 3, 1)
        return bits.reshape(bits.shape[0], -1, bits.shape[-1])
