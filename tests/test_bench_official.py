"""``var bench --official-var/--official-code`` against a stand-in for the official code.

The stand-in is a package written into tmp_path with the official layout (``models/`` with ``build_vae_var``,
``build_vae_var_ctf``, ``VQVAE``, ``VAR`` and a top-level ``dist`` module), the official constructor and
sampling signatures, the official state-dict key layout, the codebook lookups and ``cached_k``/``cached_v``
attributes the harness reads, and the official builders' global ``reset_parameters`` patch.  Inside, it
samples with our own code, so its tokens equal ours unless it is told to shift the seed.
"""

from __future__ import annotations

import json
import runpy
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from var.bench_official import RSSMeter, compare_tokens
from var.cli import main

FAKE_MODELS = '''
import torch
from torch import nn

import dist
from var.checkpoints import var_to_official, vqvae_to_official
from var.models.var import VAR as OurVAR, VARConfig
from var.sample.logits import SamplingSettings
from var.sample.scale import VARSampler
from var.tokenizers.vqvae import VQVAE as OurVQVAE

SEED_OFFSET = {seed_offset}


class VQVAE(nn.Module):
    def __init__(self, vocab_size=4096, z_channels=32, ch=128, dropout=0.0, beta=0.25, using_znorm=False,
                 quant_conv_ks=3, quant_resi=0.5, share_quant_resi=4, default_qresi_counts=0,
                 v_patch_nums=(1, 2, 3, 4, 5, 6, 8, 10, 13, 16), test_mode=True):
        super().__init__()
        self.impl = OurVQVAE(vocab_size=vocab_size, z_channels=z_channels, ch=ch, ch_mult=(1, 2),
                             num_res_blocks=1, share_quant_resi=share_quant_resi, patch_nums=v_patch_nums)
        self.post_quant_conv = self.impl.post_quant_conv
        # the official loop's own codebook lookups (see VAR._lookup): a module of its own sharing the weights
        self.quantize = nn.Module()
        self.quantize.embedding = nn.Embedding(vocab_size, z_channels)
        self.quantize.embedding.weight = self.impl.quantize.embedding.weight

    def state_dict(self, *args, **kwargs):
        return vqvae_to_official(self.impl)

    def fhat_to_img(self, f_hat):
        return self.impl.fhat_to_image(f_hat)


class VAR(nn.Module):
    def __init__(self, vae_local, num_classes=1000, depth=16, embed_dim=1024, num_heads=16, mlp_ratio=4.0,
                 drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=0.0, norm_eps=1e-6, shared_aln=False,
                 cond_drop_rate=0.1, attn_l2_norm=False, patch_nums=(1, 2, 3, 4, 5, 6, 8, 10, 13, 16),
                 flash_if_available=True, fused_if_available=True):
        super().__init__()
        self.vae_proxy = (vae_local,)
        config = vae_local.impl.config
        self.impl = OurVAR(VARConfig(depth=depth, width=embed_dim, num_heads=num_heads, num_classes=num_classes,
                                     vocab_size=config.vocab_size, z_channels=config.z_channels,
                                     patch_nums=patch_nums, attn_l2_norm=attn_l2_norm, norm_eps=norm_eps))
        self.blocks = self.impl.blocks
        self.rng = torch.Generator(device=dist.get_device())

    def init_weights(self, **kwargs):
        self.impl.init_weights(**kwargs)

    def state_dict(self, *args, **kwargs):
        return var_to_official(self.impl)

    def _sampler(self, cfg, top_k, top_p, temp=1.0):
        settings = SamplingSettings(cfg=cfg, top_k=top_k, top_p=top_p, temperature=temp)
        return VARSampler(self.impl, self.vae_proxy[0].impl, settings)

    def _caching(self, batch):
        """The official attention layers hold their growing cache in cached_k / cached_v."""
        for block in self.blocks:
            attn = block.attn
            shape = (2 * (batch or 0), attn.num_heads, self.impl.config.seq_len, attn.head_dim)
            attn.cached_k = attn.cached_v = None if batch is None else torch.empty(shape)

    def _lookup(self, indices):
        """The official loop embeds each scale's drawn indices with the quantiser's codebook."""
        for tokens in indices:
            self.vae_proxy[0].quantize.embedding(tokens)

    @torch.no_grad()
    def autoregressive_infer_cfg(self, B, label_B, g_seed=None, cfg=1.5, top_k=0, top_p=0.0, more_smooth=False):
        self._caching(B)
        output = self._sampler(cfg, top_k, top_p).sample(label_B, seed=g_seed + SEED_OFFSET, decode=False)
        self._caching(None)
        self._lookup(output.indices)
        return self.vae_proxy[0].fhat_to_img(output.f_hat).add_(1).mul_(0.5)

    @torch.no_grad()
    def autoregressive_infer_cfg_draft(self, B, label_B, g_seed=None, cfg=1.5, top_k=0, top_p=0.0,
                                       more_smooth=False, exit_num=7, temp=None):
        sampler = self._sampler(cfg, top_k, top_p, temp)
        state = sampler.begin(label_B, seed=g_seed + SEED_OFFSET)
        sampler.run_scales(sampler.new_runner(state, stop=exit_num), state, 0, exit_num)
        self._lookup(state.indices)
        return state.f_hat, state  # the official hub holds features; this one the whole decode state

    @torch.no_grad()
    def autoregressive_infer_cfg_refine(self, B, label_B, g_seed=None, cfg=1.5, top_k=0, top_p=0.0,
                                        more_smooth=False, draft=None, f_hat=None, entry_num=7, temp=1):
        sampler, state = self._sampler(cfg, top_k, top_p, temp), draft
        stop = self.impl.config.num_scales
        sampler.run_scales(sampler.new_runner(state, start=entry_num), state, entry_num, stop)
        self._lookup(state.indices[entry_num:])
        return self.vae_proxy[0].fhat_to_img(state.f_hat).add_(1).mul_(0.5)


def _no_default_init():
    for cls in (nn.Linear, nn.LayerNorm, nn.Conv2d):
        setattr(cls, "reset_parameters", lambda self: None)


def build_vae_var(device, patch_nums=(1, 2, 3, 4, 5, 6, 8, 10, 13, 16), V=4096, Cvae=32, ch=160,
                  share_quant_resi=4, num_classes=1000, depth=16, shared_aln=False, attn_l2_norm=True,
                  flash_if_available=True, fused_if_available=True, init_adaln=0.5, init_adaln_gamma=1e-5,
                  init_head=0.02, init_std=-1):
    _no_default_init()
    vae = VQVAE(vocab_size=V, z_channels=Cvae, ch=ch, share_quant_resi=share_quant_resi, v_patch_nums=patch_nums)
    var = VAR(vae, num_classes=num_classes, depth=depth, embed_dim=64 * depth, num_heads=depth,
              attn_l2_norm=attn_l2_norm, patch_nums=patch_nums)
    var.init_weights(init_adaln=init_adaln, init_adaln_gamma=init_adaln_gamma, init_head=init_head)
    return vae.to(device), var.to(device)


def build_vae_var_ctf(device, patch_nums=(1, 2, 3, 4, 5, 6, 8, 10, 13, 16), V=4096, Cvae=32, ch=160,
                      share_quant_resi=4, num_classes=1000, depth_draft=16, depth_refine=30, **kwargs):
    vae, drafter = build_vae_var(device, patch_nums, V, Cvae, ch, share_quant_resi, num_classes, depth_draft)
    refiner = VAR(vae, num_classes=num_classes, depth=depth_refine, embed_dim=64 * depth_refine,
                  num_heads=depth_refine, attn_l2_norm=True, patch_nums=patch_nums)
    refiner.init_weights(init_adaln=0.5, init_adaln_gamma=1e-5, init_head=0.02)
    return vae, drafter, refiner.to(device)
'''


def write_fake_official(root, seed_offset: int = 0):
    """A stand-in checkout: models/__init__.py (the code above) and dist.py."""
    (root / "models").mkdir(parents=True)
    (root / "models" / "var.py").write_text("# the official VAR lives here; this stand-in keeps all in __init__\n")
    (root / "models" / "__init__.py").write_text(FAKE_MODELS.format(seed_offset=seed_offset))
    (root / "dist.py").write_text(textwrap.dedent('''
        import torch

        def get_device():
            return "cuda" if torch.cuda.is_available() else "cpu"
    '''))
    return root


pytestmark = pytest.mark.usefixtures("one_thread")


def run_bench(tmp_path, official, *extra):
    """Depth 1 (and a depth-1 CoDe refiner), batch 1 and 2 (the --tiny default), one warm-up, two rounds."""
    main(["bench", "--official-var", str(official), "--official-code", str(official), "--tiny", "--device", "cpu",
          "--depths", "1", "--warmup", "1", "--runs", "2", "--out", str(tmp_path / "out"), *extra])
    return json.loads((tmp_path / "out" / "vs_official.json").read_text())


def test_bench_beside_official_code_checks_tokens_times_and_reports(tmp_path):
    official = write_fake_official(tmp_path / "official")
    path_before, linear_init = list(sys.path), nn.Linear.reset_parameters
    report = run_bench(tmp_path, official)
    rows = report["results"]
    assert [(r["sampler"], r["B"]) for r in rows] == [("var", 1), ("var", 2), ("code", 1), ("code", 2)]
    assert rows[2]["depth"] == 1 and rows[2]["refiner_depth"] == 1 and rows[2]["draft_steps"] == 8
    assert all(r["tokens_identical"] for r in rows)
    assert all(r["images_max_abs_diff"] < 1e-4 for r in rows)
    for row in rows:
        for side in ("official", "ours"):
            result = row[side]
            assert 0 < result["loop_wall_sec"] < result["wall_sec"] <= result["median_wall_sec"]
            assert result["decode_cpu_sec"] > 0 and result["img_per_s"] > 0 and result["weights_bytes"] > 0
            if RSSMeter().available:
                assert result["peak_bytes"] == max(result["loop_peak_bytes"], result["decode_peak_bytes"]) > 0
        ratios = row["ratios"]
        assert ratios["min_speed_cpu"] == round(row["official"]["cpu_sec"] / row["ours"]["cpu_sec"], 3)
        assert ratios["min_decode_speed_wall"] > 0 and ratios["latency"] > 0
    # official KV bytes: every layer's cached_k and cached_v (stand-in: 2B rows x 680 tokens x width, float32)
    var_b2 = rows[1]
    assert var_b2["official"]["kv_bytes"] == 1 * 2 * (2 * 2) * 680 * 64 * 4
    assert var_b2["ratios"]["kv_bytes"] == round(var_b2["ours"]["kv_bytes"] / var_b2["official"]["kv_bytes"], 3) < 1
    assert report["settings"]["official_var"]["models_sha256"]
    assert (tmp_path / "out" / "vs_official.png").stat().st_size > 10_000
    # the import was scoped and the official builders' global patch undone
    assert "models" not in sys.modules and "dist" not in sys.modules and sys.path == path_before
    assert nn.Linear.reset_parameters is linear_init


def test_bench_fails_loudly_when_tokens_differ(tmp_path):
    official = write_fake_official(tmp_path / "official", seed_offset=1)
    with pytest.raises(SystemExit, match="different tokens than the official code .*d1 B=1: scale"):
        run_bench(tmp_path, official, "--batch-sizes", "1")
    report = json.loads((tmp_path / "out" / "vs_official.json").read_text())  # written before failing
    assert report["results"][0]["tokens_identical"] is False


def test_bench_rejects_a_folder_without_the_official_code(tmp_path, capsys):
    with pytest.raises(SystemExit, match="has no models/var.py; pass the root folder"):
        main(["bench", "--official-var", str(tmp_path), "--tiny", "--device", "cpu"])


def test_compare_tokens_names_the_first_difference():
    ours = [torch.tensor([[3]]), torch.tensor([[1, 2, 3, 4]])]
    assert compare_tokens([t.clone() for t in ours], ours) is None
    theirs = [torch.tensor([[3]]), torch.tensor([[1, 2, 9, 4]])]
    assert compare_tokens(theirs, ours) == ("scale 1: 1 of 4 tokens differ, first at image 0 position 2 "
                                            "(official 9, ours 3)")


def test_gpu_acceptance_official_part_checks_every_threshold(tmp_path, monkeypatch):
    """The device session's one command for the side-by-side numbers, here on the stand-in at tiny sizes."""
    official = write_fake_official(tmp_path / "official")
    script = Path(__file__).resolve().parents[1] / "scripts" / "gpu_acceptance.py"
    monkeypatch.setattr(sys, "argv", [str(script), "--tiny", "--device", "cpu", "--runs", "1", "--parts", "official",
                                      "--official-var", str(official), "--official-code", str(official),
                                      "--out", str(tmp_path / "acc")])
    runpy.run_path(str(script), run_name="__main__")
    summary = json.loads((tmp_path / "acc" / "acceptance.json").read_text())
    checks = summary["official"]["checks"]
    assert [(r["sampler"], r["B"]) for r in summary["official"]["rows"]] == [
        ("var", 1), ("var", 2), ("code", 1), ("code", 2)]
    assert checks["d2 B=1 tokens identical"]["pass"] and "d2 B=1 latency vs official" in checks
    assert "CoDe d2->d1 B=2 peak memory vs official" in checks
