"""The one model loader: a (tokenizer, transformer) pair, or one model, from whatever a user points at.

Accepted sources:

* a model bundle directory holding ``vqvae.json/.safetensors`` and ``var.json/.safetensors`` (or
  ``ar.json/.safetensors`` for the raster model, LlamaGen's architecture; pick it with ``var_name="ar"``), what training
  writes into every checkpoint directory;
* a training run directory, whose ``checkpoints/latest`` names the newest checkpoint directory;
* the official ``.pth`` files (or state dicts), given as ``vae=`` and ``var=`` (:func:`load_official`): VAR's
  VQ-VAE + VAR, Infinity's BSQ tokenizer + Infinity transformer (a ``.pth``/``.safetensors`` file or a
  folder of shards), or LlamaGen's released files (``vq_ds16_c2i.pt`` + ``c2i_B_256.pt``,
  ``t2i_XL_stage1_256.pt`` ...), the family told by the transformer's keys.

One model alone (CoDe's refiner, a training run's tokenizer, base or teacher) comes from
:func:`load_one`, from either kind of source; an official transformer file given to it is VAR's or Infinity's,
told by its keys as for a pair.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch

from var.checkpoints import check_pair, load_model, load_official_var, load_official_vqvae
from var.checkpoints_llamagen import check_llamagen_pair, is_llamagen_release, load_llamagen, load_llamagen_vq
from var.infinity_checkpoints import load_official_infinity, load_official_infinity_pair, read_infinity_file
from var.models.infinity import Infinity
from var.models.llamagen import LlamaGen
from var.models.var import VAR
from var.tokenizers.llamagen_vq import LlamaGenVQ
from var.tokenizers.vqvae import VQVAE

LATEST_POINTER = "latest"


def resolve_bundle(path: str | os.PathLike, name: str = "var") -> Path:
    """The directory that holds checkpoint ``name`` for a bundle or run directory ``path``."""
    path = Path(path)
    if (path / f"{name}.json").is_file():
        return path
    pointer = path / "checkpoints" / LATEST_POINTER
    if pointer.is_file():
        bundle = path / "checkpoints" / pointer.read_text().strip()
        if not bundle.is_dir():
            kept = sorted(p for p in bundle.parent.glob("step_*") if (p / f"{name}.json").is_file())
            instead = (f"pass a checkpoint directory instead, e.g. {kept[-1]}" if kept
                       else "the run holds no complete checkpoint: continue training it with --resume")
            raise FileNotFoundError(f"{pointer} names {bundle.name}, which does not exist (moved or deleted?); "
                                    f"{instead}")
        if (bundle / f"{name}.json").is_file():
            return bundle
        hint = {"ar": "; samplers 'ar' and 'sjd' decode a raster model: train one with 'var train --model ar' "
                      "or pass released LlamaGen files (--vae vq_ds16_c2i.pt --var c2i_B_256.pt)",
                "var": "; it is a tokenizer run: train a transformer on it with 'var train'"}.get(name, "")
        raise FileNotFoundError(f"{pointer} points to {bundle}, which holds no '{name}' checkpoint{hint}")
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    raise FileNotFoundError(
        f"{path} is neither a checkpoint directory (with {name}.json + {name}.safetensors) nor a run directory "
        f"(with checkpoints/{LATEST_POINTER}); train one with 'var train' or pass official weights with --vae/--var"
    )


def load_pair(
    ckpt: str | os.PathLike | None = None,
    vae: str | os.PathLike | None = None,
    var: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    var_name: str = "var",
    force_tokenizer: bool = False,
) -> tuple[VQVAE | LlamaGenVQ, VAR | LlamaGen]:
    """Load (tokenizer, transformer) from a bundle/run directory or from official ``.pth`` / ``.pt`` files.

    ``var_name`` names the transformer checkpoint in a bundle: ``var``, or ``ar`` for the raster baseline.
    ``force_tokenizer`` pairs a tokenizer other than the one the transformer recorded (see ``check_pair``).
    """
    if ckpt is not None:
        bundle = resolve_bundle(ckpt, var_name)
        vqvae = load_model(bundle, "vqvae")
        model = load_model(bundle, var_name)
        check_pair(vqvae, model, force_tokenizer)
    elif vae is not None and var is not None:
        state = var
        if not is_llamagen_release(var) and (isinstance(var, Mapping) or Path(var).exists()):
            # read once, VAR or Infinity (.pth, .safetensors or a folder of shards); a missing path is reported by
            # the VAR loader, LlamaGen's files (with their 'args' entry) by LlamaGen's
            state = read_infinity_file(var)[0]
        if isinstance(state, Mapping) and is_infinity_state(state):
            vqvae, model = load_official_infinity_pair(vae, state)
        else:
            vqvae, model = load_official(vae, state)
    else:
        raise ValueError("pass a checkpoint directory (--ckpt) or both official files (--vae and --var)")
    return vqvae.to(device).eval(), model.to(device).eval()


def load_official_transformer(source: str | os.PathLike | Mapping[str, torch.Tensor]) -> VAR | Infinity:
    """An official VAR or Infinity transformer alone (a CoDe refiner), its family told by its keys; read once
    (.pth, .safetensors or a folder of shards)."""
    state = read_infinity_file(source)[0]
    return load_official_infinity(state) if is_infinity_state(state) else load_official_var(state)


def is_infinity_state(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """Whether a transformer state dict is Infinity's (its learned empty text and text norm), not VAR's."""
    return any(name in state_dict for name in ("cfg_uncond", "null_text")) and any(
        name.startswith(("text_norm.", "text_proj")) for name in state_dict)


def load_official(
    vqvae: str | os.PathLike | Mapping[str, torch.Tensor],
    var: str | os.PathLike | Mapping[str, torch.Tensor],
    vqvae_overrides: Mapping | None = None,
    **var_overrides,
) -> tuple[VQVAE | LlamaGenVQ, VAR | LlamaGen]:
    """Load an official (tokenizer, transformer) pair: VAR's (the tokenizer set to the transformer's scale
    schedule) or LlamaGen's (VQ + GPT; told from the GPT's keys, var/checkpoints_llamagen.py).

    ``vqvae_overrides`` / ``var_overrides`` set what the weights cannot tell (VAR: ``norm_groups``,
    ``using_znorm``; LlamaGen: ``image_size`` of a renamed file, ``n_head`` of an unnamed size).
    """
    if is_llamagen_release(var):  # a LlamaGen VQ given as the transformer fails naming the GPT keys it lacks
        gpt = load_llamagen(var, **var_overrides)
        vq = load_llamagen_vq(vqvae, **(vqvae_overrides or {}))
        check_llamagen_pair(vq, gpt)
        return vq, gpt
    var_model = load_official_var(var, **var_overrides)
    vqvae_model = load_official_vqvae(vqvae, **{"patch_nums": var_model.config.patch_nums, **(vqvae_overrides or {})})
    check_pair(vqvae_model, var_model)
    return vqvae_model, var_model


OFFICIAL_LOADERS = {"var": load_official_transformer, "vqvae": load_official_vqvae}


def is_shard_folder(path: Path) -> bool:
    """Whether ``path`` is a folder of weight shards (Infinity-8B's), not a bundle or run directory."""
    return path.is_dir() and any(path.glob("*.index.json"))


def load_one(path: str | os.PathLike, name: str = "var", device: str | torch.device = "cpu"
             ) -> VAR | Infinity | LlamaGen | VQVAE:
    """Model ``name`` (var, ar, vqvae) from a bundle/run directory or an official file: for ``var`` a VAR or
    Infinity transformer (``.pth``, ``.safetensors`` or a folder of shards, told by its keys), for ``vqvae``
    VAR's VQ-VAE; in eval mode on ``device``."""
    path = Path(path)
    if path.is_file() or is_shard_folder(path):
        if name not in OFFICIAL_LOADERS:
            raise ValueError(f"{path}: official checkpoint files hold VAR/Infinity transformers or VAR's VQ-VAE, "
                             f"not '{name}'")
        model = OFFICIAL_LOADERS[name](path)
    else:
        model = load_model(resolve_bundle(path, name), name)
    return model.to(device).eval()
