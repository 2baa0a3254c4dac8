import math

import pytest
import torch
import torch.nn.functional as F
from infinity_tiny import TINY_SCHEDULE, tiny_bsq

from var.tokenizers.bsq import BSQConfig, norm_groups

GRIDS = [(1, 1), (2, 2), (4, 4)]


def test_group_norm_rule():
    assert norm_groups(128) == 32 and norm_groups(96) == 32
    assert norm_groups(72) == 24 and norm_groups(24) == 24
    with pytest.raises(ValueError, match="neither 32 nor 24"):
        norm_groups(40)
    with pytest.raises(ValueError, match="neither 32 nor 24"):
        BSQConfig(base_ch=20)
    with pytest.raises(ValueError, match="levels"):
        BSQConfig(patch_size=16, encoder_ch_mult=(1, 2, 4))


def test_quantize_is_the_sign_on_the_sphere():
    bsq = tiny_bsq()
    x = torch.randn(2, 4, 1, 3, 3)
    x[0, :, 0, 0, 0] = 0.0  # an all-zero vector gives all-zero bits
    codes, bits = bsq.quantize(x)
    assert bits.shape == (2, 1, 3, 3, 4) and bits.dtype == torch.uint8
    assert torch.equal(bits, (x > 0).permute(0, 2, 3, 4, 1).to(torch.uint8))
    assert torch.allclose(codes.abs(), torch.full_like(codes, 1 / math.sqrt(4)))
    assert torch.equal(bits[0, 0, 0, 0], torch.zeros(4, dtype=torch.uint8))
    torch.testing.assert_close(bsq.bits_to_codes(bits), codes, atol=1e-7, rtol=0)  # the codes are the bits


def test_bits_to_codes_is_unit_norm():
    bsq = tiny_bsq()
    bits = torch.randint(0, 2, (2, 3, 5, 4))
    codes = bsq.bits_to_codes(bits)  # (B, d, 1, h, w)
    assert codes.shape == (2, 4, 1, 3, 5)
    torch.testing.assert_close(codes.norm(dim=1), torch.ones(2, 1, 3, 5))
    assert torch.equal(codes > 0, bits.permute(0, 3, 1, 2).unsqueeze(2).bool())


def test_encode_teacher_forcing_and_inference_inputs_agree():
    bsq = tiny_bsq()
    images = torch.rand(2, 3, 8, 8) * 2 - 1
    with torch.no_grad():
        encoding = bsq.encode(images, TINY_SCHEDULE)
        assert encoding.raw_features.shape == (2, 4, 4, 4)
        assert [tuple(b.shape) for b in encoding.bits] == [(2, 1, h, w, 4) for h, w in GRIDS]
        inputs, bits = bsq.teacher_forcing_input(encoding.raw_features, GRIDS)
        assert inputs.shape == (2, 4 + 16, 4)
        for ours, tokenizer_bits in zip(bits, encoding.bits, strict=True):
            assert torch.equal(ours, tokenizer_bits.reshape(2, -1, 4))
        # the inference rule (bits -> codes -> running sum -> trilinear to the next grid) gives the same inputs
        summed, chained = None, []
        for si, scale_bits in enumerate(encoding.bits):
            summed, next_input = bsq.next_input(si, summed, bsq.bits_to_codes(scale_bits), GRIDS)
            if next_input is not None:
                chained.append(next_input)
        torch.testing.assert_close(torch.cat(chained, 1), inputs, atol=1e-6, rtol=0)
        torch.testing.assert_close(summed.squeeze(2), encoding.summed_codes, atol=1e-6, rtol=0)
        summed_again, images_out = bsq.decode_from_bits(encoding.bits, GRIDS)
        torch.testing.assert_close(summed_again, summed)
        assert images_out.shape == images.shape and images_out.abs().max() <= 1


def test_next_scale_input_is_trilinear_not_area():
    bsq = tiny_bsq()
    summed = torch.randn(1, 4, 1, 4, 4)
    codes = torch.zeros(1, 4, 1, 4, 4)
    _, next_input = bsq.next_input(1, summed.clone(), codes[..., :2, :2], [(1, 1), (2, 2), (3, 3), (4, 4)])
    expected = F.interpolate(summed, size=(1, 3, 3), mode="trilinear").flatten(2).transpose(1, 2)
    torch.testing.assert_close(next_input, expected)
    area = F.interpolate(summed, size=(1, 3, 3), mode="area").flatten(2).transpose(1, 2)
    assert not torch.allclose(next_input, area)


def test_spatial_patchify_groups_two_by_two_codes_into_one_token():
    plain, patchified = tiny_bsq(), tiny_bsq(spatial_patchify=True)
    assert patchified.bits_per_token == 16 and plain.bits_per_token == 4
    images = torch.rand(1, 3, 16, 16) * 2 - 1
    half_grids = [(1, 1), (2, 2), (4, 4)]  # the transformer's grids; the tokenizer works on (2, 2) .. (8, 8)
    with torch.no_grad():
        raw = plain.encode_features(images)
        inputs, bits = patchified.teacher_forcing_input(raw, half_grids)
        plain_inputs, plain_bits = plain.teacher_forcing_input(raw, [(2, 2), (4, 4), (8, 8)])
    assert inputs.shape == (1, 4 + 16, 16) and bits[-1].shape == (1, 16, 16)
    expected = F.pixel_unshuffle(plain_inputs[:, 16:].transpose(1, 2).reshape(1, 4, 8, 8), 2)
    torch.testing.assert_close(inputs[:, 4:], expected.flatten(2).transpose(1, 2))
    tokens = bits[-1].view(1, 4, 4, 16)
    torch.testing.assert_close(patchified.bits_to_codes(tokens), plain.bits_to_codes(plain_bits[-1].view(1, 8, 8, 4)))


def test_wrong_image_size_is_named():
    bsq = tiny_bsq()
    with pytest.raises(ValueError, match="schedule ends at"):
        bsq.encode(torch.zeros(1, 3, 16, 16), GRIDS)
    with pytest.raises(ValueError, match="multiple of the tokenizer stride"):
        bsq.encode(torch.zeros(1, 3, 9, 9), GRIDS)
