"""Loading the released LlamaGen files: ``c2i_{B,L}_{256,384}.pt``, ``c2i_{XL,XXL,3B}_384.pt``,
``t2i_XL_stage1_256.pt`` (GPTs) and ``vq_ds16_c2i.pt`` / ``vq_ds16_t2i.pt`` (VQ-16 tokenizers).

Layouts.  The files are ``torch.save`` dicts: DDP-trained GPTs and the VQs keep the weights under ``"model"``
beside the training state (``"optimizer"``, ``"steps"``, ``"args"`` = an ``argparse.Namespace``, maybe
``"ema"``); deepspeed files use ``"module"``, others ``"state_dict"``; the FSDP-trained GPT-XXL / GPT-3B files are
a bare state dict.  The first of "model", "module", "state_dict" that is present is used (never "ema", as the
official sampling scripts), else the file itself if it is a state dict.

Safety.  Every file is read with ``torch.load(weights_only=True)``; ``argparse.Namespace`` is the one class
allowed beyond tensors and containers.  A file that pickles anything else (or is damaged) fails with one
line and nothing in it is executed.  Zip-format files are memory-mapped, so the optimizer state beside the
weights is never read from disk.

Architecture.  Sizes are inferred from the tensors: family (c2i / t2i), vocabulary, width, depth, FFN width,
classes, caption width and caption length; heads come from the named size with that depth and width
(GPT-B ... GPT-7B), else from ``args.gpt_model``, else pass ``n_head=``.  The weights do not depend on the image
size, but the 2-D RoPE grid does: the image size is taken from the ``image_size`` argument, else from the file's
``args.image_size``, else from the released file name (``c2i_L_384.pt`` -> 384), and the grid is
image size / ``downsample`` (16: VQ-16).  KV-cache buffers of a model saved after sampling
(``layers.N.attention.kv_cache.k_cache``) are dropped; any other missing, unexpected or wrongly shaped key
fails naming the keys (:func:`var.checkpoints.strict_load`).
"""

from __future__ import annotations

import argparse
import os
import re
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from var.checkpoints import strict_load
from var.models.llamagen import LLAMAGEN_SIZES, LlamaGen, LlamaGenConfig
from var.tokenizers.llamagen_vq import LlamaGenVQ, LlamaGenVQConfig

WEIGHT_ENTRIES = ("model", "module", "state_dict")
_KV_CACHE_KEY = re.compile(r"^layers\.\d+\.attention\.kv_cache\.[kv]_cache$")
_GPT_FILE_NAME = re.compile(r"^(?:c2i|t2i)_\w+?_(\d+)\.pt$")  # c2i_B_256.pt, t2i_XL_stage1_256.pt


@dataclass
class ReleaseFile:
    """The model weights of a LlamaGen file and what came with them."""

    weights: dict[str, torch.Tensor]
    args: argparse.Namespace | None  # the training arguments, when the file has them
    source: str  # the path (or "<state dict>") for messages
    entry: str | None  # which entry held the weights ("model", "module", "state_dict"), None for a bare one


def _load_safely(path: Path) -> object:
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as error:  # pickle, zip and storage errors: either way nothing was executed
        text = str(error).strip() or type(error).__name__
        blocked = re.search(r"GLOBAL ([\w.]+)", text)
        if blocked:
            raise ValueError(
                f"refusing to load {path}: it pickles {blocked.group(1)}, which a safe (weights_only) load does not "
                "run; released LlamaGen files hold only tensors and an argparse.Namespace, so do not use this file"
            ) from None
        raise ValueError(
            f"cannot read {path} as a checkpoint ({text.splitlines()[0].split('. ')[0][:160]}); the file is damaged "
            "or not a PyTorch checkpoint: download or copy it again"
        ) from None


def read_release_file(source: str | os.PathLike | Mapping) -> ReleaseFile:
    """Read a LlamaGen file (or an already loaded checkpoint dict / state dict) without unpickling code."""
    if isinstance(source, Mapping):
        checkpoint, name = source, "<state dict>"
    else:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(
                f"LlamaGen checkpoint {path} not found; download it from huggingface.co/FoundationVision/LlamaGen "
                "(c2i_B_256.pt, vq_ds16_c2i.pt, ...) and pass its local path"
            )
        checkpoint, name = _load_safely(path), str(path)
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"{name} is not a checkpoint dict (got a {type(checkpoint).__name__})")
    entry = next((key for key in WEIGHT_ENTRIES if isinstance(checkpoint.get(key), Mapping)), None)
    weights = checkpoint[entry] if entry else checkpoint
    if not weights or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in weights.items()):
        raise ValueError(
            f"{name} holds no model weights: expected a {', '.join(map(repr, WEIGHT_ENTRIES))} entry or a bare state "
            f"dict of tensors, found entries {sorted(map(str, checkpoint))[:8]}"
        )
    args = checkpoint.get("args") if entry else None
    return ReleaseFile(
        weights={k: v for k, v in weights.items() if not _KV_CACHE_KEY.match(k)},
        args=args if isinstance(args, argparse.Namespace) else None,
        source=name,
        entry=entry,
    )


def _load_on_meta(model_cls: type[nn.Module], config, weights: Mapping[str, torch.Tensor], source: str) -> nn.Module:
    """Build without initialising (meta device, then uninitialised CPU memory) and strictly load: a 3B model
    costs one copy of its weights and no random init."""
    with torch.device("meta"):
        model = model_cls(config)
    model.to_empty(device="cpu")
    strict_load(model, weights, source)
    return model.eval()


# --------------------------------------------------------------------------------------------------
# GPT
RELEASE_MARKERS = ("tok_embeddings.weight", "layers.0.attention.wqkv.weight",  # GPT
                   "encoder.conv_blocks.0.res.0.conv1.weight")  # VQ (VAR's VQ-VAE names it encoder.down...)


def is_llamagen_release(source: str | os.PathLike | Mapping) -> bool:
    """Whether an official file (or state dict) is a LlamaGen GPT or VQ, told from its keys (safe read; zip
    files are memory-mapped, so this costs no copy of the weights).  A missing path is not one (its loader says
    it is missing)."""
    if not isinstance(source, Mapping) and not Path(source).is_file():
        return False
    weights = read_release_file(source).weights
    return any(key in weights for key in RELEASE_MARKERS)


def _layer_count(state_dict: Mapping[str, torch.Tensor], pattern: str) -> int:
    indices = [int(m.group(1)) for key in state_dict if (m := re.match(pattern, key))]
    return 1 + max(indices) if indices else 0


def _named_size(n_layer: int, dim: int, args: argparse.Namespace | None) -> str | None:
    """The named size with this depth and width, else the file's ``args.gpt_model`` if it is one."""
    for name, size in LLAMAGEN_SIZES.items():
        if (size["n_layer"], size["dim"]) == (n_layer, dim):
            return name
    return args.gpt_model if getattr(args, "gpt_model", None) in LLAMAGEN_SIZES else None


def gpt_model_type(state_dict: Mapping[str, torch.Tensor]) -> str:
    """"c2i" or "t2i" from the condition embedding's keys; a ValueError naming them for any other file."""
    if "cls_embedding.embedding_table.weight" in state_dict:
        return "c2i"
    if "cls_embedding.cap_proj.fc1.weight" in state_dict:
        return "t2i"
    raise ValueError(
        "not a LlamaGen GPT state dict (no cls_embedding.embedding_table / cls_embedding.cap_proj weights); "
        "is this a VQ tokenizer file? load it with load_llamagen_vq (--vae)"
    )


def llamagen_config_from_state_dict(
    state_dict: Mapping[str, torch.Tensor], block_size: int, args: argparse.Namespace | None = None, **overrides
) -> LlamaGenConfig:
    """Infer the :class:`LlamaGenConfig` of an official GPT state dict; ``block_size`` = image tokens (e.g. 576)."""
    model_type = gpt_model_type(state_dict)
    try:
        vocab_size, dim = state_dict["tok_embeddings.weight"].shape
        wqkv_rows = state_dict["layers.0.attention.wqkv.weight"].shape[0]
    except KeyError as error:
        raise ValueError(f"not a LlamaGen GPT state dict (missing {error})") from None
    n_layer = _layer_count(state_dict, r"^layers\.(\d+)\.")
    named = _named_size(n_layer, dim, args)
    if "n_head" in overrides:
        n_head = overrides.pop("n_head")
    elif named:
        n_head = LLAMAGEN_SIZES[named]["n_head"]
    else:
        raise ValueError(
            f"a LlamaGen GPT of depth {n_layer} and width {dim} is none of the named sizes "
            f"({', '.join(LLAMAGEN_SIZES)}), and its head count is not in the weights: pass n_head=..."
        )
    cfg = dict(
        dim=dim, n_layer=n_layer, n_head=n_head, n_kv_head=(wqkv_rows * n_head // dim - n_head) // 2,
        vocab_size=vocab_size, model_type=model_type, block_size=block_size,
    )
    if model_type == "c2i":
        cfg["num_classes"] = state_dict["cls_embedding.embedding_table.weight"].shape[0] - 1
    else:
        cls_token_num, cfg["caption_dim"] = state_dict["cls_embedding.uncond_embedding"].shape
        cfg["cls_token_num"] = cls_token_num
    cfg.update(overrides)
    return LlamaGenConfig(**cfg)


def _gpt_image_size(image_size: int | None, args: argparse.Namespace | None, source: str) -> int:
    """Explicit argument > the file's training args > the released file name."""
    if image_size:
        return int(image_size)
    if getattr(args, "image_size", None):
        return int(args.image_size)
    match = _GPT_FILE_NAME.match(Path(source).name)
    if match:
        return int(match.group(1))
    raise ValueError(
        f"cannot tell the image size of {source} (the weights do not depend on it; the RoPE grid does): pass "
        "image_size=256 or 384 (the released c2i_*_384.pt models generate 24x24 tokens at 384 px)"
    )


def load_llamagen(
    source: str | os.PathLike | Mapping,
    image_size: int | None = None,
    downsample: int | None = None,
    **overrides,
) -> LlamaGen:
    """Load a LlamaGen GPT (c2i or t2i) from a released file or checkpoint dict, in eval mode, float32 on CPU.

    ``image_size`` / ``downsample`` set the token grid (default: the file's args or name, and 16);
    ``block_size`` or any other :class:`LlamaGenConfig` field may be overridden.
    """
    release = read_release_file(source)
    gpt_model_type(release.weights)  # a wrong file fails naming the keys, before its size is asked for
    if "block_size" not in overrides:
        size = _gpt_image_size(image_size, release.args, release.source)
        downsample = downsample or int(getattr(release.args, "downsample_size", None) or 16)
        if size % downsample:
            raise ValueError(f"image size {size} is not a multiple of the tokenizer's downsampling {downsample}")
        overrides["block_size"] = (size // downsample) ** 2
    config = llamagen_config_from_state_dict(release.weights, args=release.args, **overrides)
    return _load_on_meta(LlamaGen, config, release.weights, release.source)


# --------------------------------------------------------------------------------------------------
# VQ tokenizer
def llamagen_vq_config_from_state_dict(state_dict: Mapping[str, torch.Tensor], **overrides) -> LlamaGenVQConfig:
    """Infer the :class:`LlamaGenVQConfig` of an official VQ state dict (codebook, widths, levels, blocks)."""
    try:
        codebook_size, embed_dim = state_dict["quantize.embedding.weight"].shape
        z_channels = state_dict["quant_conv.weight"].shape[1]
        ch = state_dict["encoder.conv_in.weight"].shape[0]
        state_dict["encoder.conv_blocks.0.res.0.conv1.weight"]
    except KeyError as error:
        raise ValueError(
            f"not a LlamaGen VQ state dict (missing {error}); is this a GPT file (load_llamagen) or a VAR "
            "tokenizer (load_official_vqvae)?"
        ) from None

    def level_widths(part: str) -> list[int]:
        levels = _layer_count(state_dict, rf"^{part}\.conv_blocks\.(\d+)\.")
        return [state_dict[f"{part}.conv_blocks.{i}.res.0.conv1.weight"].shape[0] // ch for i in range(levels)]

    cfg = dict(
        codebook_size=codebook_size, codebook_embed_dim=embed_dim, z_channels=z_channels, ch=ch,
        encoder_ch_mult=level_widths("encoder"),
        decoder_ch_mult=level_widths("decoder")[::-1],  # decoder blocks run coarsest first
        num_res_blocks=_layer_count(state_dict, r"^encoder\.conv_blocks\.0\.res\.(\d+)\."),
        norm_groups=min(32, ch),  # official GroupNorms have 32 groups; not visible in the weights
    )
    cfg.update(overrides)
    return LlamaGenVQConfig(**cfg)


def load_llamagen_vq(source: str | os.PathLike | Mapping, **overrides) -> LlamaGenVQ:
    """Load a LlamaGen VQ tokenizer (``vq_ds16_c2i.pt``, ``vq_ds16_t2i.pt``, VQ-8) in eval mode, float32 on CPU."""
    release = read_release_file(source)
    config = llamagen_vq_config_from_state_dict(release.weights, **overrides)
    return _load_on_meta(LlamaGenVQ, config, release.weights, release.source)


def check_llamagen_pair(vq: LlamaGenVQ, gpt: LlamaGen) -> None:
    """Raise a ValueError when a tokenizer and a GPT cannot work together (vocabulary size)."""
    if vq.config.codebook_size != gpt.config.vocab_size:
        raise ValueError(
            f"tokenizer codebook_size {vq.config.codebook_size} differs from the GPT's vocab_size "
            f"{gpt.config.vocab_size}: they do not belong together"
        )
