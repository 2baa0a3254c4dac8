"""LlamaGen's single-scale VQ tokenizer (VQ-16 / VQ-8): conv encoder, l2-normalised codebook, conv decoder.

Written from ``shared/reference/spec_llamagen.md`` section 5; parameter names follow the official checkpoints
(``encoder.conv_blocks.0.res.1.conv2.weight`` ...), so ``vq_ds16_c2i.pt`` / ``vq_ds16_t2i.pt`` load key for key
(var/checkpoints_llamagen.py).  The res blocks and resamplers are the same as in our VAR tokenizer
(var/tokenizers/vqvae.py: GroupNorm eps 1e-6, swish, right/bottom-padded stride-2 downsampling, nearest x2
upsampling); only the layout around them, the q/k/v attention convs and the quantiser differ.

Images are (B, 3, H, W) in [-1, 1]; a token map is (B, h * w) int64 in raster order (row-major), h = H / 16
(VQ-16).  Latents, codebook rows and the quantiser work in the ``codebook_embed_dim``-channel space after
``quant_conv``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from var.tokenizers.vqvae import Downsample, ResnetBlock, Upsample


@dataclass
class LlamaGenVQConfig:
    """Every constructor argument of :class:`LlamaGenVQ` (the official ``ModelArgs`` less the training losses)."""

    codebook_size: int = 16384
    codebook_embed_dim: int = 8
    codebook_l2_norm: bool = True
    encoder_ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)  # VQ-16; VQ-8 is (1, 2, 2, 4)
    decoder_ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    z_channels: int = 256
    ch: int = 128  # the official VQModel always builds 128 / 2 res blocks; smaller only for tests
    num_res_blocks: int = 2
    dropout_p: float = 0.0
    norm_groups: int = 32

    def __post_init__(self) -> None:
        self.encoder_ch_mult = tuple(int(m) for m in self.encoder_ch_mult)
        self.decoder_ch_mult = tuple(int(m) for m in self.decoder_ch_mult)
        if len(self.encoder_ch_mult) != len(self.decoder_ch_mult):
            raise ValueError(
                f"encoder_ch_mult {self.encoder_ch_mult} and decoder_ch_mult {self.decoder_ch_mult} give different "
                "downsampling factors"
            )
        for channels in {self.ch * m for m in self.encoder_ch_mult + self.decoder_ch_mult}:
            if channels % self.norm_groups:
                raise ValueError(f"channel count {channels} is not divisible by norm_groups={self.norm_groups}")

    @property
    def downsample(self) -> int:
        """Image side / token grid side (16 for VQ-16)."""
        return 2 ** (len(self.encoder_ch_mult) - 1)

    def to_dict(self) -> dict:
        return asdict(self)


LLAMAGEN_VQ_SIZES: dict[str, dict[str, tuple[int, ...]]] = {
    "VQ-16": dict(encoder_ch_mult=(1, 1, 2, 2, 4), decoder_ch_mult=(1, 1, 2, 2, 4)),  # 72M
    "VQ-8": dict(encoder_ch_mult=(1, 2, 2, 4), decoder_ch_mult=(1, 2, 2, 4)),  # 70M
}


class AttnBlock(nn.Module):
    """Single-head spatial self-attention over the h*w positions (separate 1x1 q, k, v convs), residual."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6, affine=True)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        h = self.norm(x)
        # (B, C, H, W) -> (B, 1, HW, C): one head, scale C^-0.5
        q, k, v = (conv(h).flatten(2).transpose(1, 2).unsqueeze(1) for conv in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj_out(out.squeeze(1).transpose(1, 2).reshape(batch, channels, height, width))


class ConvLevel(nn.Module):
    """One resolution level: res blocks, each followed by attention at the coarsest level only."""

    def __init__(self, in_channels: int, out_channels: int, blocks: int, attention: bool, cfg: LlamaGenVQConfig):
        super().__init__()
        self.res = nn.ModuleList()
        self.attn = nn.ModuleList()
        for _ in range(blocks):
            self.res.append(ResnetBlock(in_channels, out_channels, cfg.dropout_p, cfg.norm_groups))
            in_channels = out_channels
            if attention:
                self.attn.append(AttnBlock(out_channels, cfg.norm_groups))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.res):
            h = block(h)
            if len(self.attn):
                h = self.attn[i](h)
        return h


def _mid(channels: int, cfg: LlamaGenVQConfig) -> nn.Sequential:
    """Res, Attn, Res at the coarsest resolution (official keys ``mid.0``, ``mid.1``, ``mid.2``)."""
    return nn.Sequential(
        ResnetBlock(channels, channels, cfg.dropout_p, cfg.norm_groups),
        AttnBlock(channels, cfg.norm_groups),
        ResnetBlock(channels, channels, cfg.dropout_p, cfg.norm_groups),
    )


def _head(channels: int, out_channels: int, groups: int) -> tuple[nn.GroupNorm, nn.Conv2d]:
    return nn.GroupNorm(groups, channels, eps=1e-6, affine=True), nn.Conv2d(channels, out_channels, 3, padding=1)


class Encoder(nn.Module):
    """Image (B, 3, H, W) -> latent (B, z_channels, H / f, W / f), f = 2^(levels - 1)."""

    def __init__(self, cfg: LlamaGenVQConfig):
        super().__init__()
        mult, ch = cfg.encoder_ch_mult, cfg.ch
        self.conv_in = nn.Conv2d(3, ch, 3, padding=1)
        self.conv_blocks = nn.ModuleList()
        channels = ch
        for level, level_mult in enumerate(mult):
            coarsest = level == len(mult) - 1
            block = ConvLevel(channels, ch * level_mult, cfg.num_res_blocks, coarsest, cfg)
            channels = ch * level_mult
            if not coarsest:
                block.downsample = Downsample(channels)
            self.conv_blocks.append(block)
        self.mid = _mid(channels, cfg)
        self.norm_out, self.conv_out = _head(channels, cfg.z_channels, cfg.norm_groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for block in self.conv_blocks:
            h = block(h)
            if hasattr(block, "downsample"):
                h = block.downsample(h)
        return self.conv_out(F.silu(self.norm_out(self.mid(h))))


class Decoder(nn.Module):
    """Latent (B, z_channels, h, w) -> image (B, 3, h * f, w * f), unclamped.

    ``conv_blocks[k]`` is resolution level ``levels - 1 - k`` (coarsest first), each with num_res_blocks + 1
    res blocks; attention only at the coarsest level.
    """

    def __init__(self, cfg: LlamaGenVQConfig):
        super().__init__()
        mult, ch = cfg.decoder_ch_mult, cfg.ch
        channels = ch * mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, channels, 3, padding=1)
        self.mid = _mid(channels, cfg)
        self.conv_blocks = nn.ModuleList()
        for k, level_mult in enumerate(reversed(mult)):
            block = ConvLevel(channels, ch * level_mult, cfg.num_res_blocks + 1, k == 0, cfg)
            channels = ch * level_mult
            if k != len(mult) - 1:
                block.upsample = Upsample(channels)
            self.conv_blocks.append(block)
        self.norm_out, self.conv_out = _head(channels, 3, cfg.norm_groups)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for block in self.conv_blocks:
            h = block(h)
            if hasattr(block, "upsample"):
                h = block.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class VectorQuantizer(nn.Module):
    """Nearest-code quantiser over ``embedding`` (codebook_size, dim), comparing l2-normalised latents with
    l2-normalised codebook rows (when ``l2_norm``)."""

    def __init__(self, codebook_size: int, dim: int, l2_norm: bool):
        super().__init__()
        self.l2_norm = l2_norm
        self.embedding = nn.Embedding(codebook_size, dim)
        # the official usage statistic of the last training steps' indices: kept only so that state dicts
        # have the official layout (the official loader is strict); nothing here reads or writes it
        self.register_buffer("codebook_used", torch.zeros(65536))
        with torch.no_grad():
            self.embedding.weight.uniform_(-1.0 / codebook_size, 1.0 / codebook_size)
            if l2_norm:
                self.embedding.weight.copy_(F.normalize(self.embedding.weight, dim=-1))

    def codebook(self) -> torch.Tensor:
        """The code vectors latents are compared with and replaced by (normalised rows when l2_norm)."""
        weight = self.embedding.weight
        return F.normalize(weight, dim=-1) if self.l2_norm else weight

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Latent (B, C, h, w) -> (z_q (B, C, h, w) in straight-through form z + (e - z), indices (B, h*w))."""
        batch = z.shape[0]
        z = z.permute(0, 2, 3, 1)  # (B, h, w, C)
        if self.l2_norm:
            z = F.normalize(z, dim=-1)
        flat = z.reshape(-1, z.shape[-1])
        codebook = self.codebook()
        # squared distances |z|^2 + |e|^2 - 2 z.e, (B*h*w, codebook_size)
        distances = flat.pow(2).sum(1, keepdim=True) + codebook.pow(2).sum(1) - 2 * flat @ codebook.t()
        indices = distances.argmin(dim=1)
        z_q = z + (codebook[indices].view(z.shape) - z).detach()
        return z_q.permute(0, 3, 1, 2), indices.view(batch, -1)

    def lookup(self, indices: torch.Tensor, shape: tuple[int, int, int, int]) -> torch.Tensor:
        """Code vectors of ``indices`` (any shape, raster order) as a latent of ``shape`` (B, C, h, w)."""
        batch, channels, height, width = shape
        return self.codebook()[indices.reshape(-1)].view(batch, height, width, channels).permute(0, 3, 1, 2)


class LlamaGenVQ(nn.Module):
    """The LlamaGen VQ tokenizer: images in [-1, 1] <-> raster token maps (B, h*w)."""

    def __init__(self, cfg: LlamaGenVQConfig | None = None, **overrides):
        super().__init__()
        cfg = cfg or LlamaGenVQConfig(**overrides)
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quantize = VectorQuantizer(cfg.codebook_size, cfg.codebook_embed_dim, cfg.codebook_l2_norm)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.codebook_embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.codebook_embed_dim, cfg.z_channels, 1)

    @property
    def downsample(self) -> int:
        return self.config.downsample

    def check_images(self, images: torch.Tensor) -> None:
        """Raise a ValueError when ``images`` cannot be tokenized."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape (B, 3, H, W) in [-1, 1], got {tuple(images.shape)}")
        if images.shape[-2] % self.downsample or images.shape[-1] % self.downsample:
            raise ValueError(
                f"image size {images.shape[-2]}x{images.shape[-1]} is not a multiple of the downsampling factor "
                f"{self.downsample}; resize or crop (LlamaGen c2i uses 256 or 384 px)"
            )

    # -- encoding --------------------------------------------------------------------------------------
    def encode_latent(self, images: torch.Tensor) -> torch.Tensor:
        """quant_conv(encoder(images)): the latent (B, codebook_embed_dim, h, w) before quantisation."""
        self.check_images(images)
        return self.quant_conv(self.encoder(images))

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (B, 3, H, W) in [-1, 1] -> (quantised latent (B, C, h, w), token map (B, h*w) int64)."""
        return self.quantize(self.encode_latent(images))

    @torch.no_grad()
    def tokenize(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> token map (B, h*w) int64, raster order."""
        return self.encode(images)[1]

    # -- decoding --------------------------------------------------------------------------------------
    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Quantised latent (B, C, h, w) -> images (B, 3, H, W), nominally [-1, 1], NOT clamped (official)."""
        return self.decoder(self.post_quant_conv(latent))

    def decode_code(self, indices: torch.Tensor, shape: tuple[int, int, int, int] | list[int]) -> torch.Tensor:
        """The official ``decode_code``: indices (B*h*w or (B, h*w)) and ``shape`` [B, C, h, w] -> unclamped images."""
        return self.decode(self.quantize.lookup(indices, tuple(shape)))

    def tokens_to_latent(self, tokens: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """Raster token maps (B, h*w) -> codebook latent (B, C, h, w); ``grid`` (h, w), default square."""
        if grid is None:
            side = math.isqrt(tokens.shape[-1])
            grid = (side, side)
        if tokens.ndim != 2 or grid[0] * grid[1] != tokens.shape[1]:
            raise ValueError(f"expected raster token maps (B, {grid[0]}*{grid[1]}), got {tuple(tokens.shape)}")
        return self.quantize.lookup(tokens, (tokens.shape[0], self.config.codebook_embed_dim, *grid))

    def fhat_to_image(self, latent: torch.Tensor) -> torch.Tensor:
        """Codebook latent (B, C, h, w) -> images (B, 3, H, W) clamped to [-1, 1]
        (:class:`~var.models.family.RasterTokenizer`)."""
        return self.decode(latent).clamp_(-1, 1)

    @torch.no_grad()
    def decode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Square raster token maps (B, L) -> images (B, 3, H, W) clamped to [-1, 1]
        (``.add(1).div(2)`` for [0, 1], as the official scripts save them)."""
        return self.fhat_to_image(self.tokens_to_latent(tokens))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Reconstruction: images (B, 3, H, W) in [-1, 1] -> encode -> decode, unclamped (official ``forward``)."""
        return self.decode(self.encode(images)[0])

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
