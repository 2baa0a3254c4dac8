"""Multi-scale VQ-VAE: convolutional encoder/decoder around the multi-scale residual quantiser.

Module and parameter names follow the official VAR checkpoint layout (``encoder.down.0.block.1.conv2`` ...),
so released ``vae_ch160v4096z32.pth`` weights map onto this module one to one (see var/checkpoints.py).
The defaults are the official configuration; every size is configurable for small models.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from var.pretrained import PretrainedMixin
from var.tokenizers import winograd
from var.tokenizers.quantizer import MultiScaleQuantizer

OFFICIAL_PATCH_NUMS_256 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
OFFICIAL_PATCH_NUMS_512 = (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)


@dataclass
class VQVAEConfig:
    """Every constructor argument of :class:`VQVAE`; saved beside each checkpoint as JSON."""

    vocab_size: int = 4096
    z_channels: int = 32
    ch: int = 160
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    in_channels: int = 3
    dropout: float = 0.0
    use_attn: bool = True  # self-attention after each res block of the lowest-resolution level
    use_mid_attn: bool = True
    norm_groups: int = 32
    beta: float = 0.25
    using_znorm: bool = False
    quant_conv_ks: int = 3
    quant_resi: float = 0.5
    share_quant_resi: int = 4
    default_qresi_counts: int = 0
    patch_nums: tuple[int, ...] = field(default=OFFICIAL_PATCH_NUMS_256)

    def __post_init__(self) -> None:
        self.ch_mult = tuple(int(m) for m in self.ch_mult)
        self.patch_nums = tuple(int(p) for p in self.patch_nums)
        if list(self.patch_nums) != sorted(set(self.patch_nums)):
            raise ValueError(f"patch_nums must be strictly increasing, got {self.patch_nums}")
        for channels in {self.ch * m for m in self.ch_mult}:
            if channels % self.norm_groups:
                raise ValueError(
                    f"channel count {channels} (ch={self.ch} x ch_mult) is not divisible by "
                    f"norm_groups={self.norm_groups}; pick ch as a multiple of {self.norm_groups}"
                )

    @property
    def downsample(self) -> int:
        """Image side / latent side."""
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def image_size(self) -> int:
        """The image side that the scale schedule was built for."""
        return self.patch_nums[-1] * self.downsample

    def to_dict(self) -> dict:
        return asdict(self)


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6, affine=True)


def _layout(x: torch.Tensor) -> torch.memory_format:
    """The memory format of a 4-d tensor: channels-last or contiguous."""
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return torch.channels_last if channels_last else torch.contiguous_format


DECODE_CHUNK_PIXELS = 256 * 256  # CPU inference decode: output pixels per decoder call


def _fused_conv_add_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise_")


_FUSED_CONV_ADD = _fused_conv_add_available()


def conv_inference(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``conv(x)`` for inference (autograd off): 3x3 convolutions of large CPU float32 inputs by Winograd's
    F(4x4, 3x3) (var/tokenizers/winograd.py: a quarter of the multiplications, the same up to float rounding)."""
    return winograd.conv3x3(conv, x) if winograd.applies(conv, x) else conv(x)


def conv_accumulate_(conv: nn.Conv2d, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out += conv(x)`` in place, for inference (autograd off); returns the sum.

    On CPU in float32 this is Winograd's F(4x4, 3x3) adding into ``out`` where it applies (see
    ``conv_inference``), else one oneDNN convolution with a fused sum into ``out``: the convolution's own
    output is never allocated and no separate addition pass runs (the same sum, bit for bit).  Elsewhere
    it is ``conv(x).add_(out)`` (also under torch.compile, which fuses the two itself).
    """
    if winograd.applies(conv, x) and out.is_contiguous(memory_format=torch.channels_last):
        return winograd.conv3x3(conv, x, accumulate=out)
    fused = (_FUSED_CONV_ADD and out.device.type == "cpu" and conv.padding_mode == "zeros"
             and x.dtype == out.dtype == conv.weight.dtype == torch.float32
             and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling())
    if not fused:
        return conv(x).add_(out)
    return torch.ops.mkldnn._convolution_pointwise_.binary(
        out, x, conv.weight, conv.bias, conv.padding, conv.stride, conv.dilation, conv.groups,
        "add", None, None, [], None)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, dropout: float, groups: int):
        super().__init__()
        self.norm1 = _norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels, groups)
        self.dropout = nn.Dropout(dropout) if dropout > 1e-6 else nn.Identity()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor, consume: bool = False) -> torch.Tensor:
        """``consume=True`` (autograd off only) lets the block add its residual branch into ``x`` in place."""
        if torch.is_grad_enabled():
            h = self.conv1(F.silu(self.norm1(x)))
            h = self.conv2(self.dropout(F.silu(self.norm2(h))))
            return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h
        # inference: activations in place, and conv1's output released before conv2 runs, so at most
        # three full-size tensors live at once (x, an activation, a convolution output)
        h = conv_inference(self.conv1, F.silu(self.norm1(x), inplace=True))
        h = self.dropout(F.silu(self.norm2(h), inplace=True))
        if self.nin_shortcut is not None:
            return conv_accumulate_(self.conv2, h, self.nin_shortcut(x))
        return conv_accumulate_(self.conv2, h, x) if consume else conv_inference(self.conv2, h).add_(x)


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with a residual connection."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = _norm(channels, groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor, consume: bool = False) -> torch.Tensor:
        batch, channels, height, width = x.shape
        # (B, 3C, H, W) -> (B, 1, HW, 3C): one head over the H*W positions (a view for channels-last x)
        qkv = self.qkv(self.norm(x)).permute(0, 2, 3, 1).reshape(batch, 1, height * width, 3 * channels)
        q, k, v = qkv.chunk(3, dim=-1)
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(C)) v, (B, 1, HW, C)
        # (B, 1, HW, C) -> (B, C, H, W) in x's memory layout
        out = out.view(batch, height, width, channels).permute(0, 3, 1, 2)
        out = out.contiguous(memory_format=_layout(x))
        if torch.is_grad_enabled():
            return x + self.proj_out(out)
        return conv_accumulate_(self.proj_out, out, x) if consume else self.proj_out(out).add_(x)


class Downsample(nn.Module):
    """Pad right/bottom by one, then a stride-2 3x3 convolution without padding (asymmetric, as official)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


# Nearest 2x upsampling followed by a 3x3 convolution, seen from the low-resolution input: output row 2i
# reads input rows (i-1, i, i) through kernel rows (0, 1, 2), output row 2i+1 reads (i, i, i+1).  So each
# output phase is a 2x2 convolution whose kernel rows are sums of the 3x3 kernel's rows (the same for columns).
def _fold_phases(kernel: torch.Tensor, dim: int) -> torch.Tensor:
    """The 3 taps of ``kernel`` along ``dim`` -> (phase, ..., 2 taps, ...): phase 0 reads (k0, k1 + k2), phase 1
    reads (k0 + k1, k2)."""
    first, middle, last = kernel.unbind(dim)
    return torch.stack((torch.stack((first, middle + last), dim), torch.stack((first + middle, last), dim)))


def phase_kernels(weight: torch.Tensor) -> torch.Tensor:
    """(out, in, 3, 3) -> (4 * out, in, 2, 2): the 2x2 kernels of the four output phases (row phase, column
    phase), as output channels."""
    rows = _fold_phases(weight, 2)  # (row phase, out, in, 2, 3)
    both = _fold_phases(rows, 4)  # (column phase, row phase, out, in, 2, 2)
    return both.transpose(0, 1).flatten(0, 2)


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling, then a 3x3 convolution.

    Without autograd the two run as one 2x2 convolution of the low-resolution input with the four output
    phases as output channels (4/9 of the multiplications, and the 4x larger upsampled input is never
    built), interleaved into the output; the result is the same up to float rounding.  Folding the kernels
    is a pass over 16/9 of the weights, so inputs smaller than ``PHASE_MIN_PIXELS`` keep the direct path
    (on one CPU thread: 640 channels at 16x16, 102 ms direct vs 139 ms phased; 320 at 32x32, 102 vs 60 ms).
    """

    PHASE_MIN_PIXELS = 32 * 32

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = x.shape
        if torch.is_grad_enabled() or height * width < self.PHASE_MIN_PIXELS:
            return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))
        weight, bias = self.conv.weight, self.conv.bias
        phases = phase_kernels(weight)  # (4 * out, in, 2, 2)
        # window (r, c) of the padded input covers input rows r-1, r and columns c-1, c
        windows = F.conv2d(F.pad(x, (1, 1, 1, 1)), phases, bias.repeat(4) if bias is not None else None)
        windows = windows.unflatten(1, (2, 2, -1))  # (B, row phase, column phase, out, H + 1, W + 1)
        out = torch.empty((batch, weight.shape[0], 2 * height, 2 * width), dtype=windows.dtype, device=x.device,
                          memory_format=_layout(x))
        for p in (0, 1):  # phase p of output row 2i (+p) is window row i + p
            for q in (0, 1):
                out[:, :, p::2, q::2] = windows[:, p, q, :, p:p + height, q:q + width]
        return out


class _Level(nn.Module):
    """One resolution level: res blocks (each optionally followed by attention) and a resampler."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.ModuleList()
        self.attn = nn.ModuleList()

    def run_blocks(self, h: torch.Tensor, consume: bool = False) -> torch.Tensor:
        for i, block in enumerate(self.block):
            h = block(h, consume)
            if len(self.attn):
                h = self.attn[i](h, consume)
        return h


class _Mid(nn.Module):
    def __init__(self, channels: int, dropout: float, groups: int, use_attn: bool):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout, groups)
        self.attn_1 = AttnBlock(channels, groups) if use_attn else None
        self.block_2 = ResnetBlock(channels, channels, dropout, groups)

    def forward(self, h: torch.Tensor, consume: bool = False) -> torch.Tensor:
        h = self.block_1(h, consume)
        if self.attn_1 is not None:
            h = self.attn_1(h, consume)
        return self.block_2(h, consume)


class Encoder(nn.Module):
    """Image (B, 3, H, W) -> latent (B, z_channels, H / 2^(levels-1), W / 2^(levels-1))."""

    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        groups, levels = cfg.norm_groups, len(cfg.ch_mult)
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList()
        channels = cfg.ch
        for level, mult in enumerate(cfg.ch_mult):
            stage = _Level()
            for _ in range(cfg.num_res_blocks):
                stage.block.append(ResnetBlock(channels, cfg.ch * mult, cfg.dropout, groups))
                channels = cfg.ch * mult
                if level == levels - 1 and cfg.use_attn:
                    stage.attn.append(AttnBlock(channels, groups))
            if level != levels - 1:
                stage.downsample = Downsample(channels)
            self.down.append(stage)
        self.mid = _Mid(channels, cfg.dropout, groups, cfg.use_mid_attn)
        self.norm_out = _norm(channels, groups)
        self.conv_out = nn.Conv2d(channels, cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inference = not torch.is_grad_enabled()  # blocks may then work in place on internal tensors
        h = self.conv_in(x)
        for stage in self.down:
            h = stage.run_blocks(h, consume=inference)
            if hasattr(stage, "downsample"):
                h = stage.downsample(h)
        h = self.mid(h, consume=inference)
        return self.conv_out(F.silu(self.norm_out(h), inplace=inference))


class Decoder(nn.Module):
    """Latent (B, z_channels, h, w) -> image (B, 3, h * 2^(levels-1), ...), unclamped.

    ``up[i]`` is resolution level i (0 = full resolution); levels run from the lowest resolution up,
    each with ``num_res_blocks + 1`` res blocks, as in the official decoder.
    """

    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        groups, levels = cfg.norm_groups, len(cfg.ch_mult)
        channels = cfg.ch * cfg.ch_mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, channels, 3, padding=1)
        self.mid = _Mid(channels, cfg.dropout, groups, cfg.use_mid_attn)
        stages: list[_Level] = []
        for level in reversed(range(levels)):
            stage = _Level()
            for _ in range(cfg.num_res_blocks + 1):
                stage.block.append(ResnetBlock(channels, cfg.ch * cfg.ch_mult[level], cfg.dropout, groups))
                channels = cfg.ch * cfg.ch_mult[level]
                if level == levels - 1 and cfg.use_attn:
                    stage.attn.append(AttnBlock(channels, groups))
            if level != 0:
                stage.upsample = Upsample(channels)
            stages.insert(0, stage)
        self.up = nn.ModuleList(stages)
        self.norm_out = _norm(channels, groups)
        self.conv_out = nn.Conv2d(channels, cfg.in_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        inference = not torch.is_grad_enabled()  # blocks may then work in place on internal tensors
        h = self.mid(self.conv_in(z), consume=inference)
        for stage in reversed(self.up):
            h = stage.run_blocks(h, consume=inference)
            if hasattr(stage, "upsample"):
                h = stage.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h), inplace=inference))


class VQVAE(PretrainedMixin, nn.Module):
    """The multi-scale VQ-VAE tokenizer.

    Images are (B, 3, H, W) in [-1, 1] with H = W = ``patch_nums[-1] * downsample``.  Token maps are lists of
    (B, pn*pn) int64 tensors, one per scale.
    """

    hub_role = "tokenizer"

    def __init__(self, cfg: VQVAEConfig | None = None, **overrides):
        super().__init__()
        cfg = cfg or VQVAEConfig(**overrides)
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        padding = cfg.quant_conv_ks // 2
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, cfg.quant_conv_ks, padding=padding)
        self.post_quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, cfg.quant_conv_ks, padding=padding)
        self.quantize = MultiScaleQuantizer(
            vocab_size=cfg.vocab_size,
            z_channels=cfg.z_channels,
            patch_nums=cfg.patch_nums,
            beta=cfg.beta,
            using_znorm=cfg.using_znorm,
            quant_resi=cfg.quant_resi,
            share_quant_resi=cfg.share_quant_resi,
            default_qresi_counts=cfg.default_qresi_counts,
        )

    @property
    def patch_nums(self) -> tuple[int, ...]:
        return self.quantize.patch_nums

    def set_patch_nums(self, patch_nums: Sequence[int]) -> None:
        """Use another scale schedule with the same weights (the VQ-VAE is fully convolutional).

        One checkpoint serves the 256 px and 512 px schedules; phi weights are shared by tick, so only the
        non-shared mode (``share_quant_resi=0``) ties the weights to one scale count.
        """
        patch_nums = tuple(int(p) for p in patch_nums)
        if self.config.share_quant_resi == 0 and len(patch_nums) != len(self.quantize.phi):
            raise ValueError(
                f"this tokenizer has one phi per scale ({len(self.quantize.phi)} scales); it cannot be used "
                f"with the {len(patch_nums)}-scale schedule {patch_nums}"
            )
        self.config.patch_nums = patch_nums
        self.quantize.patch_nums = patch_nums

    def check_images(self, images: torch.Tensor) -> None:
        """Raise a clear ValueError when ``images`` cannot be tokenized by this model."""
        if images.ndim != 4 or images.shape[1] != self.config.in_channels:
            raise ValueError(
                f"expected images of shape (B, {self.config.in_channels}, H, W), got {tuple(images.shape)}"
            )
        side = self.config.downsample
        height, width = images.shape[-2:]
        if height % side or width % side:
            raise ValueError(
                f"image size {height}x{width} is not divisible by the downsample factor {side}; "
                f"resize or crop to a multiple of {side} (this schedule expects {self.config.image_size})"
            )

    def encode_latent(self, images: torch.Tensor) -> torch.Tensor:
        """quant_conv(encoder(images)): the continuous latent f (B, Cvae, h, w)."""
        self.check_images(images)
        return self.quant_conv(self.encoder(images))

    @torch.no_grad()
    def encode(self, images: torch.Tensor, patch_nums: Sequence[int] | None = None) -> list[torch.Tensor]:
        """Images -> list of per-scale index maps (B, pn*pn)."""
        f = self.encode_latent(images).float()
        patch_nums = patch_nums or self._patch_nums_for(f)
        return self.quantize.quantize(f, patch_nums)[0]

    def _patch_nums_for(self, f: torch.Tensor) -> tuple[int, ...]:
        if f.shape[-1] != self.patch_nums[-1]:
            raise ValueError(
                f"images of side {f.shape[-1] * self.config.downsample} give a {f.shape[-1]}x{f.shape[-1]} "
                f"latent but patch_nums {self.patch_nums} end at {self.patch_nums[-1]}: pass patch_nums "
                f"ending at {f.shape[-1]} or use {self.config.image_size} px images"
            )
        return self.patch_nums

    def fhat_to_image(self, f_hat: torch.Tensor) -> torch.Tensor:
        """Decode a quantised latent (B, Cvae, h, w) to images (B, 3, H, W) in [-1, 1].

        Without autograd on CPU the decoder runs channels-last (oneDNN's native layout: no reordering copy
        around each convolution) on chunks of at most DECODE_CHUNK_PIXELS output pixels: one image at a time
        from 256 px up (CPU convolutions are no faster on a batch, and the full-resolution activations of each
        image would add up to the peak memory), many at a time for small images (where the per-call overhead
        would dominate).  The images are the same up to float rounding (the parity tolerance).
        """
        if torch.is_grad_enabled() or f_hat.device.type != "cpu":
            return self.decoder(self.post_quant_conv(f_hat)).clamp_(-1, 1)
        pixels = f_hat.shape[-2] * f_hat.shape[-1] * self.config.downsample ** 2  # output pixels per image
        chunk = max(1, DECODE_CHUNK_PIXELS // pixels)
        images = None
        for start, latent in zip(range(0, f_hat.shape[0], chunk), f_hat.split(chunk), strict=True):
            decoded = self.decoder(self.post_quant_conv(latent.contiguous(memory_format=torch.channels_last)))
            if images is None:
                images = decoded.new_empty((f_hat.shape[0], *decoded.shape[1:]))  # (B, 3, H, W), contiguous
            images[start:start + len(decoded)] = decoded.clamp_(-1, 1)
        return images

    def decode(self, indices: Sequence[torch.Tensor], patch_nums: Sequence[int] | None = None) -> torch.Tensor:
        """Per-scale index maps (quantised with ``patch_nums``, default this schedule) -> image in [-1, 1]."""
        return self.fhat_to_image(self.quantize.indices_to_fhat(indices, patch_nums))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """Training pass: (reconstruction (unclamped), vq_loss, per-scale indices)."""
        f_hat, vq_loss, indices = self.quantize(self.encode_latent(images))
        return self.decoder(self.post_quant_conv(f_hat)), vq_loss, indices

    # -- what samplers ask of a tokenizer (var/models/family.py: ScaleTokenizer, RasterTokenizer) ----------
    # ``schedule`` (the protocol's) is ignored: a VQ-VAE has its own ``patch_nums``
    def empty_latent(self, batch: int, device: torch.device | str, schedule=None) -> torch.Tensor:
        """f_hat before any scale: zeros (B, Cvae, h, w) in float32."""
        side = self.patch_nums[-1]
        return torch.zeros(batch, self.config.z_channels, side, side, device=device)

    def scale_features(self, tokens: torch.Tensor, scale: int, schedule=None) -> torch.Tensor:
        """Codebook features (B, Cvae, pn, pn) of a scale's index map (B, pn*pn)."""
        return self.quantize.lookup(tokens, self.patch_nums[scale])

    def soft_scale_features(self, weights: torch.Tensor, scale: int) -> torch.Tensor:
        """Features (B, Cvae, pn, pn) of soft code weights (B, pn*pn, V): the official ``more_smooth`` mixture."""
        side = self.patch_nums[scale]
        mixture = weights @ self.quantize.embedding.weight  # (B, pn*pn, Cvae)
        return mixture.transpose(1, 2).reshape(weights.shape[0], -1, side, side)

    def next_scale_input(self, scale: int, f_hat: torch.Tensor, features: torch.Tensor,
                         schedule=None) -> torch.Tensor | None:
        """Add a scale's features to f_hat in place; the next scale's input (area-downsampled f_hat) or None."""
        return self.quantize.next_input(scale, f_hat, features)[1]

    def tokens_to_latent(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """f_hat of one raster token map (B, h*w) quantised as a single scale (a raster LlamaGen on this tokenizer)."""
        height, width = grid
        if height != width:
            raise ValueError(f"the VQ-VAE decodes square token maps; got {height}x{width}")
        return self.quantize.indices_to_fhat([tokens], patch_nums=(height,))
