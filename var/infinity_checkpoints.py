"""Official Infinity files: the transformer (``infinity_2b_reg.pth``, the 8B layout) and its BSQ tokenizer
(``infinity_vae_d32reg.pth``), loaded with ``weights_only=True`` into this project's modules.

Sizes come from the tensors (depth, width, heads from the per-head temperature, bits from ``word_embed``,
text width and empty-text length; tokenizer channels, levels, residual blocks and stride from the convolution
shapes), every key is mapped explicitly and every shape checked: a wrong file raises one ValueError naming
the missing, unexpected and wrongly shaped keys (var/checkpoints.py's ``strict_load``), never a partial load.

File-format details that stay here, not in the models:

* the official transformer stores its blocks in chunks (``block_chunks.{k}.module.{j}.``); ours is a plain
  ``blocks`` list (block k * per_chunk + j);
* ``zero_k_bias`` buffers and the tokenizer's ``lfq.mask`` are derived, so dropped;
* ``cfg_uncond`` (our ``null_text``) is truncated, or extended with the official fixed draw, to the model's
  ``text_maxlen`` as the official ``load_state_dict`` does;
* the tokenizer file is ``{'vae': state_dict}``, and its keys may read ``x.conv.weight`` / ``x.norm.weight``
  (the official wrapper modules) or ``x.weight``: both are accepted;
* the 8B weights come as a folder of shards with an ``*.index.json`` (``weight_map``).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from var.checkpoints import read_checkpoint_file, strict_load
from var.models.infinity import Infinity, InfinityConfig
from var.tokenizers.bsq import BSQConfig, BSQTokenizer

Source = str | os.PathLike | Mapping[str, torch.Tensor]

_DERIVED_BUFFERS = re.compile(r"(^|\.)zero_k_bias$|^quantizer?\.lfq\.mask$")
# (official, ours) name prefixes; the first matching pair renames a key (either direction).
_TOP_NAMES = [
    ("cfg_uncond", "null_text"),
    ("text_proj_for_sos.ca.mat_q", "text_pool.query"),
    ("text_proj_for_sos.ca.mat_kv.", "text_pool.kv."),
    ("text_proj_for_sos.ca.", "text_pool."),
    ("text_proj_for_ca.", "text_proj."),
    ("lvl_embed.", "level_embed."),
    ("shared_ada_lin.1.", "shared_modulation."),
    ("head_nm.ada_lin.1.", "head_norm.modulation."),
]
_BLOCK_NAMES = [  # after "blocks.{i}."
    ("ada_gss", "modulation_offset"),
    ("sa.scale_mul_1H11", "attn.log_temperature"),
    ("sa.mat_qkv.", "attn.qkv."),
    ("sa.", "attn."),
    ("ca_norm.", "cross_norm."),
    ("ca.mat_q.", "cross_attn.q."),
    ("ca.mat_kv.", "cross_attn.kv."),
    ("ca.", "cross_attn."),
]
_CHUNKED_BLOCK = re.compile(r"^block_chunks\.(\d+)\.module\.(\d+)\.(.*)$")
_PLAIN_BLOCK = re.compile(r"^blocks\.(\d+)\.(.*)$")
_INFINITY_DOWNLOAD = "huggingface.co/FoundationVision/Infinity"


def _swap_prefix(name: str, pairs: list[tuple[str, str]], to_ours: bool) -> str:
    for official, ours in pairs:
        old, new = (official, ours) if to_ours else (ours, official)
        if name.startswith(old):
            return new + name[len(old):]
    return name


# --------------------------------------------------------------------------------------------------
# reading files
def read_infinity_file(source: Source) -> tuple[dict[str, torch.Tensor], str]:
    """A flat state dict from a state dict, a ``.pth``/``.safetensors`` file, or a folder of shards.

    Unwraps the tokenizer's ``{'vae': ...}`` and an official training checkpoint's
    ``['trainer']['gpt_fsdp']`` (what the official ``save_slim_model`` keeps).
    """
    if isinstance(source, Mapping):
        return dict(source), "<state dict>"
    path = Path(source)
    if path.is_dir():
        state = _read_shards(path)
    elif path.is_file():
        state = read_checkpoint_file(path)
    else:
        raise FileNotFoundError(
            f"{path} not found; download the official Infinity weights ({_INFINITY_DOWNLOAD}) and pass their "
            "local path"
        )
    if isinstance(state, Mapping) and isinstance(state.get("vae"), Mapping):
        state = state["vae"]
    elif isinstance(state, Mapping) and isinstance(state.get("trainer"), Mapping) and "gpt_fsdp" in state["trainer"]:
        state = state["trainer"]["gpt_fsdp"]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} is not a state dict of tensors (nor {{'vae': state_dict}})")
    return dict(state), str(path)


def _read_shards(folder: Path) -> dict[str, torch.Tensor]:
    indexes = sorted(folder.glob("*.index.json"))
    if len(indexes) != 1:
        raise ValueError(
            f"{folder} is a folder but holds {len(indexes)} '*.index.json' shard indexes; pass the folder of a "
            "sharded checkpoint (one index) or the .pth file itself"
        )
    try:
        weight_map = json.loads(indexes[0].read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise ValueError(f"{indexes[0]} is not a shard index (no 'weight_map'); the download is damaged") from None
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        if not (folder / shard).is_file():
            raise FileNotFoundError(f"shard {shard} listed in {indexes[0].name} is missing from {folder}")
        part = read_checkpoint_file(folder / shard)
        state.update(part)
    return state


# --------------------------------------------------------------------------------------------------
# the transformer
def official_infinity_to_ours(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename official transformer keys to ours: chunks flattened to ``blocks.{i}``, derived buffers dropped."""
    chunked = [m for k in state_dict if (m := _CHUNKED_BLOCK.match(k))]
    per_chunk = 1 + max((int(m.group(2)) for m in chunked), default=0)
    out = {}
    for key, value in state_dict.items():
        if _DERIVED_BUFFERS.search(key):
            continue
        if m := _CHUNKED_BLOCK.match(key):
            key = f"blocks.{int(m.group(1)) * per_chunk + int(m.group(2))}.{m.group(3)}"
        if m := _PLAIN_BLOCK.match(key):
            key = f"blocks.{m.group(1)}.{_swap_prefix(m.group(2), _BLOCK_NAMES, to_ours=True)}"
        else:
            key = _swap_prefix(key, _TOP_NAMES, to_ours=True)
        out[key] = value
    return out


def infinity_to_official(model: Infinity, block_chunks: int = 8) -> dict[str, torch.Tensor]:
    """Our Infinity as an official-layout state dict (chunked blocks, zero_k_bias buffers included)."""
    depth = model.config.depth
    if depth % block_chunks:
        raise ValueError(f"depth {depth} is not divisible into {block_chunks} block chunks")
    per_chunk = depth // block_chunks
    out = {}
    for key, value in model.state_dict().items():
        if m := _PLAIN_BLOCK.match(key):
            index = int(m.group(1))
            rest = _swap_prefix(m.group(2), _BLOCK_NAMES, to_ours=False)
            key = f"block_chunks.{index // per_chunk}.module.{index % per_chunk}.{rest}"
        else:
            key = _swap_prefix(key, _TOP_NAMES, to_ours=False)
        out[key] = value.detach().clone()
    zeros = torch.zeros(model.config.width)
    out["text_proj_for_sos.ca.zero_k_bias"] = zeros.clone()
    for index in range(depth):
        prefix = f"block_chunks.{index // per_chunk}.module.{index % per_chunk}"
        out[f"{prefix}.sa.zero_k_bias"] = zeros.clone()
        out[f"{prefix}.ca.zero_k_bias"] = zeros.clone()
    return out


def infinity_config_from_official(state_dict: Mapping[str, torch.Tensor], **overrides) -> InfinityConfig:
    """Infer the :class:`InfinityConfig` of an official (or already renamed) transformer state dict.

    ``text_maxlen`` defaults to the file's empty-text rows (512 for the released models); pass
    ``text_maxlen=`` to truncate or extend it.  ``norm_eps``, ``drop_path_rate`` and ``cond_drop_rate`` are
    not in the weights: the official values are the defaults.
    """
    ours = official_infinity_to_ours(state_dict)
    try:
        width = ours["pos_start"].shape[-1]
        depth = 1 + max(int(m.group(1)) for k in ours if (m := _PLAIN_BLOCK.match(k)))
        num_heads = ours["blocks.0.attn.log_temperature"].shape[1]
        bits_per_token = ours["word_embed.weight"].shape[1]
        text_maxlen, text_channels = ours["null_text"].shape
        pool_heads = ours["text_pool.query"].shape[1]
        num_levels = ours["level_embed.weight"].shape[0]
        ffn_hidden = ours["blocks.0.ffn.fc1.weight"].shape[0]
    except (KeyError, ValueError) as error:
        raise ValueError(
            f"not an official Infinity transformer state dict (missing {error}); is this the tokenizer file?"
        ) from None
    mlp_ratio = 4.0 if round(width * 4.0 / 256) * 256 == ffn_hidden else ffn_hidden / width
    cfg = dict(
        depth=depth, width=width, num_heads=num_heads, mlp_ratio=mlp_ratio, bits_per_token=bits_per_token,
        text_channels=text_channels, text_maxlen=text_maxlen, text_pool_heads=pool_heads, num_levels=num_levels,
    )
    cfg.update(overrides)
    config = InfinityConfig(**cfg)
    if config.ffn_hidden != ffn_hidden:
        raise ValueError(f"mlp_ratio {config.mlp_ratio} gives an FFN of {config.ffn_hidden}, the file has {ffn_hidden}")
    return config


def _fit_null_text(state: dict[str, torch.Tensor], model: Infinity) -> None:
    """Truncate the file's empty text to the model's rows, or extend it with the model's own (official) rows."""
    rows = model.config.text_maxlen
    null_text = state.get("null_text")
    if null_text is None or null_text.ndim != 2 or null_text.shape[1] != model.null_text.shape[1]:
        return  # strict_load reports it
    if null_text.shape[0] >= rows:
        state["null_text"] = null_text[:rows]
    else:
        extra = model.null_text.detach()[null_text.shape[0]:].to(null_text.dtype)
        state["null_text"] = torch.cat((null_text, extra))


def load_official_infinity(source: Source, **overrides) -> Infinity:
    """Build an :class:`Infinity` from an official transformer file, folder of shards or state dict."""
    state_dict, name = read_infinity_file(source)
    model = Infinity(infinity_config_from_official(state_dict, **overrides))
    state = official_infinity_to_ours(state_dict)
    _fit_null_text(state, model)
    strict_load(model, state, name)
    return model.eval()


# --------------------------------------------------------------------------------------------------
# the BSQ tokenizer
def _conv_weight(state_dict: Mapping[str, torch.Tensor], name: str) -> torch.Tensor:
    """``name.weight`` in either spelling (plain, or the official ``name.conv.weight`` wrapper)."""
    for key in (f"{name}.weight", f"{name}.conv.weight"):
        if key in state_dict:
            return state_dict[key]
    raise KeyError(f"{name}.weight")


def _levels(state_dict: Mapping[str, torch.Tensor], pattern: str) -> list[int]:
    return sorted({int(m.group(1)) for k in state_dict if (m := re.match(pattern, k))})


def bsq_config_from_official(state_dict: Mapping[str, torch.Tensor], **overrides) -> BSQConfig:
    """Infer the :class:`BSQConfig` (bits, base channels, channel multipliers, blocks, stride) of a tokenizer."""
    try:
        base_ch, in_channels = _conv_weight(state_dict, "encoder.conv_in").shape[:2]
        codebook_dim = _conv_weight(state_dict, "encoder.conv_out").shape[0]
        encoder_levels = _levels(state_dict, r"^encoder\.down\.(\d+)\.")
        decoder_levels = _levels(state_dict, r"^decoder\.up\.(\d+)\.")
        encoder_ch_mult = [
            _conv_weight(state_dict, f"encoder.down.{i}.block.0.conv1").shape[0] // base_ch for i in encoder_levels
        ]
        decoder_ch_mult = [
            _conv_weight(state_dict, f"decoder.up.{i}.block.0.conv1").shape[0] // base_ch for i in decoder_levels
        ]
    except KeyError as error:
        raise ValueError(
            f"not an official Infinity BSQ tokenizer state dict (missing {error}); is this the transformer file?"
        ) from None
    num_res_blocks = len(_levels(state_dict, r"^encoder\.down\.0\.block\.(\d+)\."))
    downsamples = len(_levels(state_dict, r"^encoder\.down\.(\d+)\.downsample\."))
    upsamples = len(_levels(state_dict, r"^decoder\.up\.(\d+)\.upsample\."))
    if downsamples != upsamples:
        raise ValueError(f"the tokenizer's encoder downsamples {downsamples} times but its decoder upsamples "
                         f"{upsamples} times; the file is not a BSQ autoencoder")
    cfg = dict(
        codebook_dim=codebook_dim, base_ch=base_ch, encoder_ch_mult=encoder_ch_mult,
        decoder_ch_mult=decoder_ch_mult, num_res_blocks=num_res_blocks, patch_size=2**downsamples,
        in_channels=in_channels,
    )
    cfg.update(overrides)
    return BSQConfig(**cfg)


def official_bsq_to_ours(state_dict: Mapping[str, torch.Tensor], model: BSQTokenizer) -> dict[str, torch.Tensor]:
    """Map either key spelling onto the model's plain names; derived buffers dropped, unknown keys kept."""
    ours = set(model.state_dict())
    out = {}
    for key, value in state_dict.items():
        if _DERIVED_BUFFERS.search(key):
            continue
        plain = re.sub(r"\.(conv|norm)\.(weight|bias)$", r".\2", key)
        out[key if key in ours or plain not in ours else plain] = value
    return out


def load_official_bsq(source: Source, **overrides) -> BSQTokenizer:
    """Build a :class:`BSQTokenizer` from an official tokenizer file (``{'vae': ...}``) or state dict."""
    state_dict, name = read_infinity_file(source)
    model = BSQTokenizer(bsq_config_from_official(state_dict, **overrides))
    strict_load(model, official_bsq_to_ours(state_dict, model), name)
    return model.eval()


def check_infinity_pair(tokenizer: BSQTokenizer, model: Infinity) -> None:
    """Raise a ValueError when a tokenizer and a transformer cannot work together."""
    if tokenizer.bits_per_token != model.config.bits_per_token:
        raise ValueError(
            f"tokenizer and transformer do not match: the tokenizer gives {tokenizer.bits_per_token} bits per "
            f"token, the transformer reads {model.config.bits_per_token}"
        )


def load_official_infinity_pair(
    tokenizer: Source, transformer: Source, **transformer_overrides
) -> tuple[BSQTokenizer, Infinity]:
    """Load an official (tokenizer, transformer) pair.

    A transformer reading 4x the tokenizer's bits per token was trained with spatial patchify (the 8B with
    the stride-8 tokenizer): the tokenizer is switched to that token layout.
    """
    model = load_official_infinity(transformer, **transformer_overrides)
    bsq = load_official_bsq(tokenizer)
    if model.config.bits_per_token == 4 * bsq.codebook_dim:
        bsq.config.spatial_patchify = True
    check_infinity_pair(bsq, model)
    return bsq, model
