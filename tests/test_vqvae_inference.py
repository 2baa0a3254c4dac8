"""The VQ-VAE's inference path (autograd off: in place, fused, channels-last, folded upsampling, one image at a
time on CPU) gives the training path's images, and leaves training and its inputs alone."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from conftest import tiny_vqvae_config

from var.tokenizers.vqvae import VQVAE, AttnBlock, ResnetBlock, Upsample, conv_accumulate_


def test_inference_decode_matches_the_autograd_path_and_leaves_its_input_alone():
    torch.manual_seed(0)
    vqvae = VQVAE(tiny_vqvae_config(ch=32, norm_groups=8, ch_mult=(1, 2, 2))).eval()
    f_hat = torch.randn(3, 4, 4, 4)
    kept = f_hat.clone()
    reference = vqvae.fhat_to_image(f_hat)  # autograd on: the plain out-of-place path
    assert reference.requires_grad
    with torch.no_grad():
        images = vqvae.fhat_to_image(f_hat)
    assert torch.equal(f_hat, kept)
    assert images.shape == reference.shape and images.is_contiguous()
    assert torch.allclose(images, reference, atol=1e-5)
    with torch.no_grad():  # small images decode as one batch: each as if decoded alone, up to float rounding
        torch.testing.assert_close(images[1:2], vqvae.fhat_to_image(f_hat[1:2]), rtol=0, atol=1e-5)


def test_training_still_backpropagates_through_every_block():
    torch.manual_seed(0)
    vqvae = VQVAE(tiny_vqvae_config(ch=32, norm_groups=8))
    images = torch.rand(2, 3, 8, 8) * 2 - 1
    reconstruction, vq_loss, _ = vqvae(images)
    (reconstruction.square().mean() + vq_loss).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in vqvae.decoder.parameters())


def test_blocks_in_place_only_when_allowed():
    torch.manual_seed(0)
    block, attention = ResnetBlock(16, 16, 0.0, 4).eval(), AttnBlock(16, 4).eval()
    x = torch.randn(2, 16, 8, 8)
    for module in (block, attention):
        trained = module(x, consume=True)  # autograd on: consume is ignored, x is kept
        assert trained.requires_grad
        with torch.no_grad():
            kept = x.clone()
            assert torch.allclose(module(x), trained, atol=1e-6) and torch.equal(x, kept)
            consumed = module(x, consume=True)
            assert torch.allclose(consumed, trained, atol=1e-6) and consumed.data_ptr() == x.data_ptr()


def test_fused_convolution_sum_and_folded_upsampling_match_the_plain_ops():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(16, 16, 3, padding=1)
    upsample = Upsample(16)
    upsample.PHASE_MIN_PIXELS = 0  # fold even this small input
    for memory_format in (torch.contiguous_format, torch.channels_last):
        x = torch.randn(2, 16, 7, 9).contiguous(memory_format=memory_format)
        with torch.no_grad():
            out = x.clone()
            assert torch.allclose(conv_accumulate_(conv, x, out), conv(x) + x, atol=1e-6)
            folded = upsample(x)
            plain = upsample.conv(F.interpolate(x, scale_factor=2, mode="nearest"))
        assert folded.shape == (2, 16, 14, 18) and folded.is_contiguous(memory_format=memory_format)
        assert torch.allclose(folded, plain, atol=1e-5)
