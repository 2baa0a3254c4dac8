"""3x3 convolutions by Winograd's minimal filtering F(4x4, 3x3), for VQ-VAE inference on CPU.

In float32 on one CPU thread oneDNN's direct 3x3 convolution already runs near the core's peak FLOP rate, so
the decoder (and encoder) only get faster by doing fewer multiplications.  F(4x4, 3x3) (Lavin & Gray, "Fast
Algorithms for Convolutional Neural Networks", 2016) computes each 4x4 output tile from a 6x6 input tile with
36 products per channel pair instead of 144:

    Y = A^T [ (G g G^T) * (B^T d B) ] A        (* elementwise over the 6x6 transformed tile)

The 36 elementwise products, summed over input channels, are 36 independent GEMMs (one batched matmul).  The
input and output transforms are a dozen scaled additions each; the image is processed in bands of tile rows
through buffers allocated once per call, so the transformed band stays small and no freshly mapped memory is
touched per band (page faults cost as much as the additions on a VM).  The transforms' coefficients (4, 5, 8,
1/6, 1/24) cost some float rounding: about 1e-5 of the output's scale against 1e-6 for the direct
convolution, far below an 8-bit pixel step.
"""

from __future__ import annotations

import torch
from torch import nn

TILE = 4  # output tile side; the input tile is TILE + 2
# Where the saving outweighs the transforms, on one CPU thread (direct / Winograd): below MIN_PIXELS output
# pixels per call the kernel transform (4x the kernel, freshly allocated) dominates (640 channels at 32x32:
# 95 / 119 ms; 320 at 64x64: 92 / 45 ms), below MIN_CHANNELS the additions do (64 channels at 256x256:
# 54 / 56 ms; 96 at 256x256: 120 / 88 ms; 160: 427 / 230 ms)
MIN_PIXELS = 64 * 64
MIN_CHANNELS = 96
# The band loop parallelises worse than oneDNN's direct convolution: on two threads (wall, direct / Winograd)
# 160 channels at 256x256 take 203 / 152 ms, 320 at 64x64 53 / 54 ms; with more threads the direct one runs
MAX_THREADS = 2
BAND_ROWS = 256  # GEMM rows (tiles) per band: the band's buffers stay a few MB at the decoder's widths

# G (6 x 3) transforms the kernel; G g G^T for every channel pair is one product with the Kronecker matrix
_G = torch.tensor([[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
                   [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]], dtype=torch.float64)
_G_KRON_G = torch.kron(_G, _G)  # (36, 9): row 6a + b, column 3k + l holds G[a, k] * G[b, l]


def applies(conv: nn.Conv2d, x: torch.Tensor) -> bool:
    """Whether ``conv(x)`` may run as F(4x4, 3x3): CPU float32 inference on at most MAX_THREADS threads of a
    plain 3x3 'same' convolution of at least MIN_CHANNELS channels on a batch of at least MIN_PIXELS pixels whose
    sides are multiples of TILE (elsewhere the library's convolution runs)."""
    return (x.device.type == "cpu" and not torch.is_grad_enabled() and not torch.compiler.is_compiling()
            and torch.get_num_threads() <= MAX_THREADS
            and x.dtype == conv.weight.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")
            and conv.kernel_size == (3, 3) and conv.stride == (1, 1) and conv.padding == (1, 1)
            and conv.dilation == (1, 1) and conv.groups == 1 and conv.padding_mode == "zeros"
            and min(conv.in_channels, conv.out_channels) >= MIN_CHANNELS
            and x.shape[-2] % TILE == 0 and x.shape[-1] % TILE == 0 and x[:, 0].numel() >= MIN_PIXELS)


def transform_weight(weight: torch.Tensor) -> torch.Tensor:
    """(out, in, 3, 3) -> (36, in, out): G g G^T for every channel pair, one (in, out) matrix per tile position
    (a transposed view, which the batched matmul reads as is)."""
    out_channels, in_channels = weight.shape[:2]
    taps = weight.reshape(out_channels * in_channels, 9).T  # (9, out * in)
    transformed = _G_KRON_G.to(weight.dtype) @ taps  # (36, out * in)
    return transformed.view(36, out_channels, in_channels).transpose(1, 2)


def _input_transform(d: torch.Tensor, out: torch.Tensor, dim: int) -> None:
    """B^T along ``dim`` of ``d`` into ``out`` (6 on dim 0), tile t reading taps 4t .. 4t+5 of ``d``:

        B^T = [[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
               [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]]
    """
    size = out.shape[dim + 1]
    step = (slice(None),) * dim + (slice(None, None, TILE),)
    d0, d1, d2, d3, d4, d5 = (d.narrow(dim, k, TILE * (size - 1) + 1)[step] for k in range(TILE + 2))
    torch.add(d4, d0, alpha=4, out=out[0]).sub_(d2, alpha=5)
    torch.sub(d4, d2, alpha=4, out=out[1])  # a = d4 - 4 d2
    torch.sub(d3, d1, alpha=4, out=out[2])  # b = d3 - 4 d1
    out[1].add_(out[2])  # a + b
    torch.sub(out[1], out[2], alpha=2, out=out[2])  # a - b
    torch.sub(d4, d2, out=out[3])  # c = d4 - d2
    torch.sub(d3, d1, out=out[4])  # e = d3 - d1
    out[3].add_(out[4], alpha=2)  # c + 2 e
    torch.sub(out[3], out[4], alpha=4, out=out[4])  # c - 2 e
    torch.add(d5, d1, alpha=4, out=out[5]).sub_(d3, alpha=5)


def _output_transform(m: torch.Tensor, out: torch.Tensor) -> None:
    """A^T along dim 0 of ``m`` (6) into ``out`` (4):

        A^T = [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]]
    """
    torch.add(m[1], m[2], out=out[0])  # p
    torch.add(m[3], m[4], out=out[2])  # r
    torch.sub(m[1], m[2], out=out[1])  # q
    torch.sub(m[3], m[4], out=out[3])  # s
    out[0].add_(out[2])  # p + r
    torch.add(out[0], out[2], alpha=3, out=out[2])  # p + 4 r
    out[0].add_(m[0])  # m0 + p + r
    out[1].add_(out[3], alpha=2)  # q + 2 s
    torch.add(out[1], out[3], alpha=6, out=out[3]).add_(m[5])  # q + 8 s + m5


def conv3x3(conv: nn.Conv2d, x: torch.Tensor, accumulate: torch.Tensor | None = None) -> torch.Tensor:
    """``conv(x)``, or ``accumulate += conv(x)`` in place when given, by F(4x4, 3x3); see ``applies``.

    x is (B, C, H, W) in any memory format; the result is channels-last (oneDNN's native layout), as is
    ``accumulate`` when given.
    """
    weight, bias = conv.weight, conv.bias
    batch, in_channels, height, width = x.shape
    out_channels = weight.shape[0]
    out = accumulate if accumulate is not None else torch.empty(
        (batch, out_channels, height, width), dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
    transformed_weight = transform_weight(weight)  # (36, in, out)
    pixels = x.permute(0, 2, 3, 1)  # (B, H, W, C): a view when x is channels-last
    result = out.permute(0, 2, 3, 1)  # (B, H, W, out), a view of out
    taps, tile_rows, tile_cols = TILE + 2, height // TILE, width // TILE
    band = max(1, BAND_ROWS // (batch * tile_cols))  # tile rows per band
    # band buffers, tile rows ahead of the batch so that a shorter last band is a contiguous prefix
    padded = x.new_zeros((TILE * band + 2, batch, width + 2, in_channels))  # band input rows, zero border
    rows_done = x.new_empty((taps, band, batch, width + 2, in_channels))  # B^T along rows
    tiles = x.new_empty((taps, taps, band, batch, tile_cols, in_channels))  # B^T d B
    products = x.new_empty((taps, taps, band, batch, tile_cols, out_channels))
    cols_done = x.new_empty((TILE, taps, band, batch, tile_cols, out_channels))  # A^T along rows
    if accumulate is not None:  # (row phase, column phase, ...)
        outputs = x.new_empty((TILE, TILE, band, batch, tile_cols, out_channels))
    for first in range(0, tile_rows, band):
        count = min(band, tile_rows - first)
        # padded rows 0 .. TILE*count+1 are input rows TILE*first-1 .. TILE*(first+count); those outside the
        # image are zero: row -1 in the first band (zeros since allocation), the row past the end in the last
        top, bottom = TILE * first - 1, min(TILE * (first + count) + 1, height)
        padded[max(0, -top):bottom - top, :, 1:width + 1] = pixels[:, max(top, 0):bottom].transpose(0, 1)
        padded[bottom - top:TILE * count + 2].zero_()
        band_rows, band_tiles = rows_done[:, :count], tiles[:, :, :count]
        _input_transform(padded[:TILE * count + 2], band_rows, 0)  # (6, count, B, W + 2, C)
        _input_transform(band_rows, band_tiles.transpose(0, 1), 3)  # (6, 6, count, B, W/4, C)
        band_products = products[:, :, :count]
        torch.bmm(band_tiles.reshape(taps * taps, -1, in_channels), transformed_weight,
                  out=band_products.view(taps * taps, -1, out_channels))
        if bias is not None:  # A^T's column 1 is all ones: position (1, 1) reaches every output once
            band_products[1, 1].add_(bias)
        band_cols = cols_done[:, :, :count]
        _output_transform(band_products, band_cols)  # (4, 6, count, B, W/4, out)
        # (B, 4*count, W, out) -> (row phase, column phase, count, B, W/4, out): the output transform's last
        # stage writes into the result directly, or into a buffer that is then added to it
        band_result = result[:, TILE * first:TILE * (first + count)].unflatten(1, (count, TILE))
        band_result = band_result.unflatten(3, (tile_cols, TILE)).permute(2, 4, 1, 0, 3, 5)
        band_outputs = band_result if accumulate is None else outputs[:, :, :count]
        _output_transform(band_cols.transpose(0, 1), band_outputs.transpose(0, 1))  # (4, 4, count, B, W/4, out)
        if accumulate is not None:
            band_result.add_(band_outputs)
    return out
