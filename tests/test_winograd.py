"""Winograd F(4x4, 3x3) convolutions (var/tokenizers/winograd.py) give the direct convolution's result, band by
band, adding into a tensor or not, and run only where they apply."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_vqvae_config

from var.tokenizers import winograd
from var.tokenizers.vqvae import VQVAE


@pytest.mark.parametrize("band_rows", [1, 7, 10_000])  # one tile row per band, a ragged last band, one band
@pytest.mark.parametrize("batch, in_channels, out_channels, height, width, bias", [
    (1, 8, 5, 8, 12, True), (3, 7, 6, 12, 16, True), (2, 5, 5, 4, 4, False)])
def test_matches_the_direct_convolution(monkeypatch, band_rows, batch, in_channels, out_channels, height, width,
                                        bias):
    monkeypatch.setattr(winograd, "BAND_ROWS", band_rows)
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=bias)
    for memory_format in (torch.contiguous_format, torch.channels_last):
        x = torch.randn(batch, in_channels, height, width).contiguous(memory_format=memory_format)
        with torch.no_grad():
            direct = conv(x)
            out = winograd.conv3x3(conv, x)
            residual = torch.randn_like(direct).contiguous(memory_format=torch.channels_last)
            summed = winograd.conv3x3(conv, x, accumulate=residual.clone())
        assert out.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(out, direct, rtol=0, atol=2e-5)
        torch.testing.assert_close(summed, residual + direct, rtol=0, atol=2e-5)


def test_applies_only_to_cpu_float32_inference_of_same_3x3_convolutions(monkeypatch):
    monkeypatch.setattr(winograd, "MIN_PIXELS", 64)
    monkeypatch.setattr(winograd, "MIN_CHANNELS", 4)
    monkeypatch.setattr(winograd, "MAX_THREADS", torch.get_num_threads())
    conv = torch.nn.Conv2d(4, 4, 3, padding=1)
    x = torch.randn(1, 4, 8, 8)
    assert not winograd.applies(conv, x)  # autograd on: the training path keeps the library convolution
    with torch.no_grad():
        assert winograd.applies(conv, x)
        assert not winograd.applies(conv, torch.randn(1, 4, 4, 4))  # fewer than MIN_PIXELS
        assert winograd.applies(conv, torch.randn(4, 4, 4, 4))  # ... counted over the batch
        assert not winograd.applies(torch.nn.Conv2d(4, 3, 3, padding=1), x)  # fewer than MIN_CHANNELS
        assert not winograd.applies(conv, torch.randn(1, 4, 8, 10))  # not a multiple of the tile
        assert not winograd.applies(conv, x.double())
        for other in (torch.nn.Conv2d(4, 4, 3, padding=1, stride=2), torch.nn.Conv2d(4, 4, 1),
                      torch.nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"), torch.nn.Conv2d(4, 4, 3)):
            assert not winograd.applies(other, x)
        monkeypatch.setattr(winograd, "MAX_THREADS", torch.get_num_threads() - 1)
        assert not winograd.applies(conv, x)  # more threads than MAX_THREADS: oneDNN parallelises better


def test_tokenizer_with_winograd_gives_the_training_path_latents_and_images(monkeypatch):
    monkeypatch.setattr(winograd, "MIN_PIXELS", 16)  # every 3x3 convolution from 4x4 up
    monkeypatch.setattr(winograd, "MIN_CHANNELS", 1)
    monkeypatch.setattr(winograd, "MAX_THREADS", torch.get_num_threads())
    used = []
    conv3x3 = winograd.conv3x3
    monkeypatch.setattr(winograd, "conv3x3", lambda *args, **kwargs: used.append(1) or conv3x3(*args, **kwargs))
    torch.manual_seed(0)
    vqvae = VQVAE(tiny_vqvae_config(ch=32, norm_groups=8, ch_mult=(1, 2, 2))).eval()
    f_hat, images = torch.randn(2, 4, 4, 4), torch.rand(2, 3, 16, 16) * 2 - 1
    reference_images = vqvae.fhat_to_image(f_hat)  # autograd on: plain convolutions
    reference_latent = vqvae.encode_latent(images)
    with torch.no_grad():
        decoded = vqvae.fhat_to_image(f_hat)
        # one batch (small images): (conv1 + conv2) x 2 res blocks x (the middle + 3 levels, all at least 4x4)
        assert len(used) == 2 * 2 * 4
        latent = vqvae.encode_latent(images)
    assert len(used) > 16  # the encoder's res blocks too
    torch.testing.assert_close(decoded, reference_images.detach(), rtol=0, atol=1e-4)
    torch.testing.assert_close(latent, reference_latent.detach(), rtol=0, atol=1e-4)
