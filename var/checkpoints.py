"""Checkpoint I/O: the official VAR key layout, ``.pth`` import, and our safetensors + JSON format.

Official files (``vae_ch160v4096z32.pth``, ``var_d16.pth`` .. ``var_d36.pth``, CoDe's ``drafter_N.pth`` /
``refiner_N.pth``) are plain state dicts.  :func:`load_official_var` / :func:`load_official_vqvae` infer the
architecture from the tensors, map every key explicitly, check every shape, and refuse a partial load: a
missing, unexpected or wrongly shaped key raises one ValueError that lists all of them.

Our own checkpoints are ``NAME.safetensors`` (weights) beside ``NAME.json`` (``{"kind", "config"}``), written
atomically (temporary file + rename) so an interrupted save never leaves a corrupt file behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from var.models.llamagen import LlamaGen, LlamaGenConfig
from var.models.var import VAR, VARConfig, block_causal_mask, patch_nums_from_tokens
from var.tokenizers.vqvae import VQVAE, VQVAEConfig
from var.utils import atomic_write, atomic_write_text

# Buffers that official checkpoints carry but that this implementation derives instead.
_OFFICIAL_VAR_BUFFERS = re.compile(r"^(lvl_1L|attn_bias_for_masking|blocks\.\d+\.attn\.zero_k_bias)$")
_OFFICIAL_VAE_BUFFERS = re.compile(r"^quantize\.ema_vocab_hit_SV$")

# (official pattern, ours) for VAR keys; applied in order with re.sub on the whole key.
_VAR_KEY_RULES = [
    (r"^pos_1LC$", "pos_embed"),
    (r"^class_emb\.", "class_embed."),
    (r"^lvl_embed\.", "level_embed."),
    (r"^shared_ada_lin\.1\.", "shared_modulation."),
    (r"^head_nm\.ada_lin\.1\.", "head_norm.modulation."),
    (r"^blocks\.(\d+)\.ada_lin\.1\.", r"blocks.\1.modulation."),
    (r"^blocks\.(\d+)\.ada_gss$", r"blocks.\1.modulation_offset"),
    (r"^blocks\.(\d+)\.attn\.scale_mul_1H11$", r"blocks.\1.attn.log_temperature"),
    (r"^blocks\.(\d+)\.attn\.mat_qkv\.", r"blocks.\1.attn.qkv."),
]
_VAR_KEY_RULES_BACK = [
    (r"^pos_embed$", "pos_1LC"),
    (r"^class_embed\.", "class_emb."),
    (r"^level_embed\.", "lvl_embed."),
    (r"^shared_modulation\.", "shared_ada_lin.1."),
    (r"^head_norm\.modulation\.", "head_nm.ada_lin.1."),
    (r"^blocks\.(\d+)\.modulation\.", r"blocks.\1.ada_lin.1."),
    (r"^blocks\.(\d+)\.modulation_offset$", r"blocks.\1.ada_gss"),
    (r"^blocks\.(\d+)\.attn\.log_temperature$", r"blocks.\1.attn.scale_mul_1H11"),
    (r"^blocks\.(\d+)\.attn\.qkv\.", r"blocks.\1.attn.mat_qkv."),
]


def _rename(key: str, rules: list[tuple[str, str]]) -> str:
    for pattern, replacement in rules:
        key, count = re.subn(pattern, replacement, key)
        if count:
            break
    return key


def _phi_key_to_ours(key: str) -> str:
    # quantize.quant_resi.qresi_ls.{k} (partially shared) | .qresi (shared) | .{k} (per scale) -> quantize.phi.{k}
    key = re.sub(r"^quantize\.quant_resi\.qresi_ls\.(\d+)\.", r"quantize.phi.\1.", key)
    key = re.sub(r"^quantize\.quant_resi\.qresi\.", "quantize.phi.0.", key)
    return re.sub(r"^quantize\.quant_resi\.(\d+)\.", r"quantize.phi.\1.", key)


def _phi_key_to_official(key: str, share_quant_resi: int) -> str:
    match = re.match(r"^quantize\.phi\.(\d+)\.(.*)$", key)
    if not match:
        return key
    index, rest = match.groups()
    if share_quant_resi == 1:
        return f"quantize.quant_resi.qresi.{rest}"
    if share_quant_resi == 0:
        return f"quantize.quant_resi.{index}.{rest}"
    return f"quantize.quant_resi.qresi_ls.{index}.{rest}"


def strict_load(module: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """Load ``state_dict`` into ``module`` or raise one ValueError naming every offending key.

    Unlike ``load_state_dict(strict=True)`` this also checks shapes before copying anything, so a wrong
    checkpoint never leaves the module half loaded.
    """
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mismatched = sorted(
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(expected) & set(state_dict)
        if tuple(state_dict[k].shape) != tuple(expected[k].shape)
    )
    if missing or unexpected or mismatched:
        problems = []
        for title, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mismatched)):
            if items:
                shown = ", ".join(items[:12]) + (f", ... ({len(items) - 12} more)" if len(items) > 12 else "")
                problems.append(f"{len(items)} {title}: {shown}")
        raise ValueError(
            f"checkpoint {source} does not fit the model ({'; '.join(problems)}); check that the file and "
            "the config (depth, vocab_size, patch_nums, num_classes, ...) belong together"
        )
    with torch.no_grad():
        module.load_state_dict({k: v.to(expected[k].dtype) for k, v in state_dict.items()}, strict=True)


def read_checkpoint_file(path: Path) -> object:
    """``torch.load(weights_only=True)`` (or safetensors) of an existing file; one clear error if unreadable."""
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle, zip and safetensors errors all mean the same to the user
        reason = (str(error).strip() or type(error).__name__).splitlines()[0].split(". ")[0][:160]
        raise ValueError(
            f"cannot read {path} as a checkpoint ({reason}); the file is damaged or not a PyTorch/safetensors "
            "state dict: download or copy it again"
        ) from None


def _read_state_dict(source: str | os.PathLike | Mapping[str, torch.Tensor]) -> tuple[dict, str]:
    if isinstance(source, Mapping):
        return dict(source), "<state dict>"
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(
            f"checkpoint {path} not found; download the official weights (huggingface.co/FoundationVision/var) "
            "and pass their local path"
        )
    state = read_checkpoint_file(path)
    if isinstance(state, Mapping) and "trainer" in state and isinstance(state["trainer"], Mapping):
        # an official *training* checkpoint (ar-ckpt-last.pth): the model is inside
        raise ValueError(
            f"{path} is an official training checkpoint, not a model state dict; its weights are in "
            "ckpt['trainer']['var_wo_ddp'] (VAR) and ckpt['trainer']['vae_local'] (VQ-VAE): pass "
            "load_official_var(ckpt['trainer']['var_wo_ddp'])"
        )
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} is not a state dict of tensors")
    return dict(state), str(path)


# --------------------------------------------------------------------------------------------------
# official VAR
def var_config_from_official(state_dict: Mapping[str, torch.Tensor], **overrides) -> VARConfig:
    """Infer the :class:`VARConfig` of an official VAR state dict (depth, width, heads, vocab, classes, ...).

    The MLP ratio comes from the ``fc1`` shape.  Without l2-normalised attention the weights carry no per-head
    tensor: ``num_heads`` then follows the official rule (64-dim heads) unless passed as ``num_heads=``, and a
    width that is not a multiple of 64 must pass it.
    """
    try:
        width = state_dict["pos_start"].shape[-1]
        depth = 1 + max(int(m.group(1)) for k in state_dict if (m := re.match(r"^blocks\.(\d+)\.", k)))
        vocab_size, _ = state_dict["head.weight"].shape
        z_channels = state_dict["word_embed.weight"].shape[1]
        num_classes = state_dict["class_emb.weight"].shape[0] - 1
        num_scales = state_dict["lvl_embed.weight"].shape[0]
        seq_len = state_dict["pos_1LC"].shape[1]
        mlp_hidden = state_dict["blocks.0.ffn.fc1.weight"].shape[0]
    except (KeyError, ValueError) as error:
        raise ValueError(f"not an official VAR state dict (missing {error}); is this a VQ-VAE file?") from None
    attn_l2_norm = "blocks.0.attn.scale_mul_1H11" in state_dict
    if attn_l2_norm:
        num_heads = state_dict["blocks.0.attn.scale_mul_1H11"].shape[1]
    elif "num_heads" in overrides or width % 64 == 0:
        num_heads = overrides.get("num_heads", width // 64)  # the official rule: 64-dim heads
    else:
        raise ValueError(
            f"cannot infer num_heads of this width-{width} VAR (no l2-normalised attention, so no per-head "
            "tensor): pass num_heads=..."
        )
    if "patch_nums" in overrides:
        patch_nums = tuple(overrides.pop("patch_nums"))
    elif "lvl_1L" in state_dict:
        levels = state_dict["lvl_1L"].flatten()
        patch_nums = patch_nums_from_tokens(torch.bincount(levels, minlength=num_scales).tolist())
    else:
        patch_nums = _known_schedule(num_scales, seq_len)
    cfg = dict(
        depth=depth, width=width, num_heads=num_heads, vocab_size=vocab_size, z_channels=z_channels,
        num_classes=num_classes, patch_nums=patch_nums, mlp_ratio=mlp_hidden / width,
        shared_aln="shared_ada_lin.1.weight" in state_dict, attn_l2_norm=attn_l2_norm,
    )
    cfg.update(overrides)
    config = VARConfig(**cfg)
    if config.seq_len != seq_len or config.num_scales != num_scales:
        raise ValueError(
            f"patch_nums {config.patch_nums} give {config.num_scales} scales / {config.seq_len} tokens but the "
            f"checkpoint has {num_scales} scales / {seq_len} tokens"
        )
    return config


def _known_schedule(num_scales: int, seq_len: int) -> tuple[int, ...]:
    from var.tokenizers.vqvae import OFFICIAL_PATCH_NUMS_256, OFFICIAL_PATCH_NUMS_512

    for schedule in (OFFICIAL_PATCH_NUMS_256, OFFICIAL_PATCH_NUMS_512):
        if len(schedule) == num_scales and sum(p * p for p in schedule) == seq_len:
            return schedule
    raise ValueError(
        f"cannot infer patch_nums for {num_scales} scales / {seq_len} tokens; pass patch_nums=..."
    )


def official_var_to_ours(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename official VAR keys to this implementation's, dropping the derived buffers."""
    return {
        _rename(k, _VAR_KEY_RULES): v for k, v in state_dict.items() if not _OFFICIAL_VAR_BUFFERS.match(k)
    }


def var_to_official(model: VAR) -> dict[str, torch.Tensor]:
    """Our VAR as an official-layout state dict (buffers included), loadable by the official code."""
    cfg = model.config
    out = {_rename(k, _VAR_KEY_RULES_BACK): v.detach().clone() for k, v in model.state_dict().items()}
    out["lvl_1L"] = model.scale_of_token.view(1, -1).clone()
    visible = block_causal_mask(model.scale_of_token, model.scale_of_token)
    out["attn_bias_for_masking"] = torch.zeros(1, 1, cfg.seq_len, cfg.seq_len).masked_fill(~visible, float("-inf"))
    for i in range(cfg.depth):
        out[f"blocks.{i}.attn.zero_k_bias"] = torch.zeros(cfg.width)
    return out


def load_official_var(source: str | os.PathLike | Mapping[str, torch.Tensor], **overrides) -> VAR:
    """Build a :class:`VAR` from an official state dict or ``.pth`` file (loaded with weights_only=True)."""
    state_dict, name = _read_state_dict(source)
    model = VAR(var_config_from_official(state_dict, **overrides))
    strict_load(model, official_var_to_ours(state_dict), name)
    return model.eval()


# --------------------------------------------------------------------------------------------------
# official VQ-VAE
def vqvae_config_from_official(state_dict: Mapping[str, torch.Tensor], **overrides) -> VQVAEConfig:
    """Infer the :class:`VQVAEConfig` of an official VQ-VAE state dict."""
    try:
        vocab_size, z_channels = state_dict["quantize.embedding.weight"].shape
        ch = state_dict["encoder.conv_in.weight"].shape[0]
        in_channels = state_dict["encoder.conv_in.weight"].shape[1]
    except KeyError as error:
        raise ValueError(f"not an official VQ-VAE state dict (missing {error}); is this a VAR file?") from None
    levels = 1 + max(int(m.group(1)) for k in state_dict if (m := re.match(r"^encoder\.down\.(\d+)\.", k)))
    ch_mult = tuple(
        state_dict[f"encoder.down.{level}.block.0.conv1.weight"].shape[0] // ch for level in range(levels)
    )
    num_res_blocks = 1 + max(
        int(m.group(1)) for k in state_dict if (m := re.match(r"^encoder\.down\.0\.block\.(\d+)\.", k))
    )
    phi_keys = {m.group(1) for k in state_dict if (m := re.match(r"^quantize\.quant_resi\.(.+)\.weight$", k))}
    if not phi_keys:
        share, quant_resi, counts = 4, 0.0, 0
    elif phi_keys == {"qresi"}:
        share, quant_resi, counts = 1, 0.5, 0
    elif all(k.startswith("qresi_ls.") for k in phi_keys):
        share, quant_resi, counts = len(phi_keys), 0.5, 0
    else:
        share, quant_resi, counts = 0, 0.5, len(phi_keys)
    cfg = dict(
        vocab_size=vocab_size, z_channels=z_channels, ch=ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks,
        in_channels=in_channels, use_attn=f"encoder.down.{levels - 1}.attn.0.qkv.weight" in state_dict,
        use_mid_attn="encoder.mid.attn_1.qkv.weight" in state_dict,
        quant_conv_ks=state_dict["quant_conv.weight"].shape[-1], quant_resi=quant_resi,
        share_quant_resi=share, default_qresi_counts=counts,
        norm_groups=min(32, ch),  # official GroupNorms have 32 groups; not visible in the weights
    )
    cfg.update(overrides)
    return VQVAEConfig(**cfg)


def official_vqvae_to_ours(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {_phi_key_to_ours(k): v for k, v in state_dict.items() if not _OFFICIAL_VAE_BUFFERS.match(k)}


def vqvae_to_official(model: VQVAE) -> dict[str, torch.Tensor]:
    """Our VQ-VAE as an official-layout state dict (with a zero ``ema_vocab_hit_SV`` buffer)."""
    share = model.config.share_quant_resi
    out = {_phi_key_to_official(k, share): v.detach().clone() for k, v in model.state_dict().items()}
    out["quantize.ema_vocab_hit_SV"] = torch.zeros(len(model.patch_nums), model.config.vocab_size)
    return out


def load_official_vqvae(source: str | os.PathLike | Mapping[str, torch.Tensor], **overrides) -> VQVAE:
    """Build a :class:`VQVAE` from an official state dict or ``.pth`` file (weights_only=True)."""
    state_dict, name = _read_state_dict(source)
    model = VQVAE(vqvae_config_from_official(state_dict, **overrides))
    strict_load(model, official_vqvae_to_ours(state_dict), name)
    return model.eval()


def tokenizer_fingerprint(tokenizer: nn.Module) -> str:
    """sha256 of a tokenizer's weights (names, dtypes, shapes and values).

    A transformer bundle records the fingerprint of the tokenizer it was trained on: two tokenizers of the same
    shapes but different weights give its tokens different meanings, which no shape check can see.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(tokenizer.state_dict().items()):
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{flat.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def check_pair(vqvae: VQVAE, var: VAR | LlamaGen, force_tokenizer: bool = False) -> None:
    """Raise a ValueError when a tokenizer and a transformer (VAR, or the raster LlamaGen) cannot work together:
    shapes that do not fit, or (unless ``force_tokenizer``) a tokenizer other than the one it was trained on."""
    var.check_tokenizer(vqvae)
    recorded = getattr(var, "tokenizer_fingerprint", None)
    if recorded and not force_tokenizer:
        actual = tokenizer_fingerprint(vqvae)
        if actual != recorded:
            raise ValueError(
                f"the transformer was trained on another tokenizer (fingerprint {recorded[:12]}, this one is "
                f"{actual[:12]}): same shapes, different codes, so its images would be wrong; use the tokenizer "
                "saved beside it, or pass --force-tokenizer if the two are known to be equivalent"
            )


# --------------------------------------------------------------------------------------------------
# our format: NAME.safetensors + NAME.json
MODEL_KINDS: dict[str, tuple[type, type]] = {
    "var": (VAR, VARConfig),
    "vqvae": (VQVAE, VQVAEConfig),
    "llamagen": (LlamaGen, LlamaGenConfig),  # the raster model: 'var train --model ar' writes it as ar.*
}


def _kind_of(model: nn.Module) -> str:
    for kind, (model_cls, _) in MODEL_KINDS.items():
        if type(model) is model_cls:
            return kind
    raise ValueError(f"no registered checkpoint kind for {type(model).__name__}")


def save_model(model: nn.Module, directory: str | os.PathLike, name: str | None = None,
               tokenizer: nn.Module | None = None) -> Path:
    """Save ``model`` as ``directory/NAME.safetensors`` + ``directory/NAME.json``; returns the weights path.

    A transformer saved with the ``tokenizer`` it was trained on records that tokenizer's fingerprint (one
    loaded with a fingerprint keeps it), which :func:`check_pair` compares when the two are paired again.
    """
    kind = _kind_of(model)
    name = name or kind
    directory = Path(directory)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    weights = directory / f"{name}.safetensors"
    atomic_write(weights, lambda tmp: save_file(tensors, tmp))
    meta = {"kind": kind, "config": model.config.to_dict()}
    fingerprint = tokenizer_fingerprint(tokenizer) if tokenizer is not None else getattr(
        model, "tokenizer_fingerprint", None)
    if fingerprint:
        meta["tokenizer_fingerprint"] = fingerprint
    meta = json.dumps(meta, indent=2)
    atomic_write_text(directory / f"{name}.json", meta)
    return weights


def load_model(directory: str | os.PathLike, name: str, map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild and strictly load a model saved by :func:`save_model`."""
    directory = Path(directory)
    meta_path, weights = directory / f"{name}.json", directory / f"{name}.safetensors"
    if not meta_path.is_file() or not weights.is_file():
        raise FileNotFoundError(f"no checkpoint '{name}' in {directory} (expected {name}.json + {name}.safetensors)")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{meta_path} is not valid JSON ({error}); the checkpoint is damaged") from None
    if not isinstance(meta, dict) or meta.get("kind") not in MODEL_KINDS:
        kind = meta.get("kind") if isinstance(meta, dict) else None
        hint = ("; kind 'ar' was the old raster baseline, replaced by the LlamaGen architecture: retrain it with "
                "'var train --model ar'") if kind == "ar" else ""
        raise ValueError(f"{meta_path}: unknown model kind {kind!r} (expected one of {', '.join(MODEL_KINDS)}){hint}")
    model_cls, config_cls = MODEL_KINDS[meta["kind"]]
    try:
        config = config_cls(**meta.get("config", {}))
    except TypeError as error:
        raise ValueError(f"{meta_path}: config does not fit {config_cls.__name__} ({error})") from None
    model = model_cls(config)
    state, source = _read_state_dict(weights)
    strict_load(model, state, source)
    model.tokenizer_fingerprint = meta.get("tokenizer_fingerprint")  # of the tokenizer it was trained on, if known
    return model.to(map_location).eval()
