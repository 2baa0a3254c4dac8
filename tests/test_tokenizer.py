import pytest
import torch
from conftest import tiny_vqvae_config

from var.tokenizers.quantizer import phi_index_per_scale
from var.tokenizers.vqvae import VQVAE


@pytest.mark.parametrize("patch_nums", [(1, 2, 3, 4), (1, 4), (2, 3, 5, 8), (8,)])
def test_any_increasing_schedule_round_trips(patch_nums):
    torch.manual_seed(0)
    vqvae = VQVAE(tiny_vqvae_config(patch_nums=patch_nums)).eval()
    images = torch.rand(2, 3, 2 * patch_nums[-1], 2 * patch_nums[-1]) * 2 - 1
    with torch.no_grad():
        f = vqvae.encode_latent(images)
        indices, fhat_per_scale = vqvae.quantize.quantize(f)
        assert [t.shape for t in indices] == [(2, p * p) for p in patch_nums]
        assert all(int(t.max()) < vqvae.config.vocab_size for t in indices)
        # indices -> f_hat is bit-identical to the quantisation loop
        assert torch.equal(vqvae.quantize.indices_to_fhat(indices), fhat_per_scale[-1])
        assert all(fh.shape == f.shape for fh in fhat_per_scale)
        recon = vqvae.decode(indices)
        assert recon.shape == images.shape and recon.abs().max() <= 1


def test_teacher_forcing_input_matches_autoregressive_inputs():
    torch.manual_seed(1)
    vqvae = VQVAE(tiny_vqvae_config()).eval()
    with torch.no_grad():
        indices = vqvae.encode(torch.rand(3, 3, 8, 8) * 2 - 1)
        teacher = vqvae.quantize.teacher_forcing_input(indices)
        f_hat = torch.zeros(3, 4, 4, 4)
        blocks = []
        for si, pn in enumerate(vqvae.patch_nums):
            f_hat, nxt = vqvae.quantize.next_input(si, f_hat, vqvae.quantize.lookup(indices[si], pn))
            if nxt is not None:
                blocks.append(nxt)
        assert torch.equal(torch.cat(blocks, 1), teacher)
        assert torch.equal(f_hat, vqvae.quantize.indices_to_fhat(indices))


def test_training_forward_trains_encoder_codebook_and_phi():
    torch.manual_seed(2)
    vqvae = VQVAE(tiny_vqvae_config()).train()
    images = torch.rand(2, 3, 8, 8) * 2 - 1
    recon, vq_loss, indices = vqvae(images)
    (recon - images).abs().mean().add(vq_loss).backward()
    assert vqvae.encoder.conv_in.weight.grad.abs().sum() > 0  # straight-through estimator
    assert vqvae.quantize.embedding.weight.grad.abs().sum() > 0
    assert all(p.grad is not None for p in vqvae.quantize.phi.parameters())


def test_phi_sharing_modes():
    assert phi_index_per_scale(3, 1, 1) == [0, 0, 0]
    assert phi_index_per_scale(3, 3, 0) == [0, 1, 2]
    assert len(VQVAE(tiny_vqvae_config(share_quant_resi=0)).quantize.phi) == 4
    assert len(VQVAE(tiny_vqvae_config(quant_resi=0.0)).quantize.phi) == 0


def test_bad_image_size_is_a_clear_error():
    vqvae = VQVAE(tiny_vqvae_config()).eval()
    with pytest.raises(ValueError, match="not divisible by the downsample factor 2"):
        vqvae.encode(torch.zeros(1, 3, 9, 9))
    with pytest.raises(ValueError, match="patch_nums"):
        vqvae.encode(torch.zeros(1, 3, 12, 12))  # divisible, but the schedule ends at 4 (8 px)


def test_norm_groups_validation():
    with pytest.raises(ValueError, match="norm_groups"):
        tiny_vqvae_config(ch=6)


def test_single_scale_token_map_decodes_with_a_schedule_override():
    """The raster AR baseline's tokens: the latent quantised as one scale (side,) of a multi-scale tokenizer."""
    torch.manual_seed(3)
    vqvae = VQVAE(tiny_vqvae_config()).eval()  # schedule (1, 2, 3, 4)
    with torch.no_grad():
        f = vqvae.encode_latent(torch.rand(2, 3, 8, 8) * 2 - 1)
        default = vqvae.quantize.indices_to_fhat(vqvae.quantize.quantize(f)[0])
        tokens, fhat_per_scale = vqvae.quantize.quantize(f, patch_nums=(4,))
        assert torch.equal(vqvae.quantize.indices_to_fhat(tokens, patch_nums=(4,)), fhat_per_scale[-1])
        assert torch.equal(vqvae.decode(tokens, patch_nums=(4,)), vqvae.fhat_to_image(fhat_per_scale[-1]))
        assert torch.equal(vqvae.quantize.indices_to_fhat(vqvae.encode(torch.zeros(1, 3, 8, 8))),
                           vqvae.quantize.indices_to_fhat(vqvae.encode(torch.zeros(1, 3, 8, 8)), (1, 2, 3, 4)))
    assert vqvae.patch_nums == (1, 2, 3, 4) and default.shape == f.shape
