"""``save_pretrained`` / ``from_pretrained`` for the toolkit's models, and the same for a sampler pipeline.

Diffusers-style directories, written and read by :func:`var.checkpoints.save_model` and
:func:`~var.checkpoints.load_model` (atomic writes, strict loading):

* a model directory holds ``model.json`` (model kind + config) and ``model.safetensors``;
* a pipeline directory holds the model directories ``tokenizer/`` and ``transformer/`` and ``sampling.json`` (the
  :class:`~var.sample.logits.SamplingSettings` to draw with).

``from_pretrained`` also takes the name of a released model (``VAR.from_pretrained("var-d16")``,
``load_pipeline("var-d16")``), resolved through :mod:`var.hub`.  Model modules inherit :class:`PretrainedMixin`, so
everything above the models (checkpoints, hub, sampling settings) is imported inside the functions.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import ClassVar

MODEL_FILE = "model"  # model.json + model.safetensors
TOKENIZER_DIR, TRANSFORMER_DIR, SETTINGS_FILE = "tokenizer", "transformer", "sampling.json"


def _is_model_dir(path: Path) -> bool:
    return (path / f"{MODEL_FILE}.json").is_file()


def _not_found(source: str | os.PathLike, what: str) -> FileNotFoundError:
    from var.hub import RELEASES

    return FileNotFoundError(
        f"{source} is neither {what} nor the name of a released model ({', '.join(RELEASES)})"
    )


class PretrainedMixin:
    """``save_pretrained(directory)`` and ``Class.from_pretrained(directory_or_name)`` on a model with a ``config``."""

    hub_role: ClassVar[str]  # which model of a release this class is: "tokenizer" or "transformer"

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write ``directory/model.json`` + ``directory/model.safetensors``; returns the directory."""
        from var.checkpoints import save_model

        save_model(self, directory, MODEL_FILE)
        return Path(directory)

    @classmethod
    def from_pretrained(cls, source: str | os.PathLike, device: str = "cpu"):
        """The model saved in directory ``source`` by :meth:`save_pretrained`, or the ``hub_role`` model of the
        released model named ``source``; strictly loaded, in eval mode on ``device``."""
        from var.checkpoints import load_model
        from var.hub import RELEASES, load_component

        path = Path(source)
        if _is_model_dir(path):
            model = load_model(path, MODEL_FILE, device)
        elif not path.exists() and str(source) in RELEASES:
            model = load_component(str(source), cls.hub_role, device)
        else:
            raise _not_found(source, f"a directory written by {cls.__name__}.save_pretrained (no {MODEL_FILE}.json)")
        if not isinstance(model, cls):
            raise ValueError(f"{source} holds a {type(model).__name__}, not a {cls.__name__}: load it with "
                             f"{type(model).__name__}.from_pretrained")
        return model


def save_pipeline(directory: str | os.PathLike, tokenizer, transformer, settings=None) -> Path:
    """Write a sampler pipeline: ``tokenizer/``, ``transformer/`` and ``sampling.json`` (a SamplingSettings or a
    mapping of its fields; default settings when None).  The pair is checked to fit together first."""
    from var.checkpoints import check_pair
    from var.sample.logits import SamplingSettings
    from var.utils import atomic_write_text

    check_pair(tokenizer, transformer)
    if settings is None:
        settings = SamplingSettings()
    elif isinstance(settings, Mapping):
        settings = SamplingSettings(**settings)  # unknown fields fail here, not when the pipeline is loaded
    settings.check(getattr(transformer.config, "num_scales", 1))
    directory = Path(directory)
    tokenizer.save_pretrained(directory / TOKENIZER_DIR)
    transformer.save_pretrained(directory / TRANSFORMER_DIR)
    text = json.dumps(dataclasses.asdict(settings), indent=2)
    atomic_write_text(directory / SETTINGS_FILE, text + "\n")
    return directory


def load_pipeline(source: str | os.PathLike, device: str = "cpu") -> tuple:
    """(tokenizer, transformer, SamplingSettings) from a directory written by :func:`save_pipeline`, or from a
    released model's name (its publishers' sampling settings)."""
    from var.checkpoints import check_pair, load_model
    from var.hub import RELEASES, load_pair, release
    from var.sample.logits import SamplingSettings

    path = Path(source)
    if _is_model_dir(path / TRANSFORMER_DIR) and (path / SETTINGS_FILE).is_file():
        tokenizer = load_model(path / TOKENIZER_DIR, MODEL_FILE, device)
        transformer = load_model(path / TRANSFORMER_DIR, MODEL_FILE, device)
        check_pair(tokenizer, transformer)
        try:
            settings = SamplingSettings(**json.loads((path / SETTINGS_FILE).read_text()))
        except (ValueError, TypeError) as error:
            raise ValueError(f"{path / SETTINGS_FILE} is not a valid sampling settings file ({error})") from None
        return tokenizer, transformer, settings
    if not path.exists() and str(source) in RELEASES:
        tokenizer, transformer = load_pair(str(source), device)
        return tokenizer, transformer, SamplingSettings(**release(str(source)).sampling)
    raise _not_found(source, f"a pipeline directory ({TOKENIZER_DIR}/, {TRANSFORMER_DIR}/, {SETTINGS_FILE})")
