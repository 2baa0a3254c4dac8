"""YAML configs backed by dataclasses: typed, validated, overridable from the command line; and the schema of
an experiment config (``configs/*.yaml``).

``load_config(SomeConfig, "configs/digits.yaml", ["train.lr=1e-3", "model.depth=4"])`` reads the YAML file,
applies ``key=value`` overrides (dotted keys reach nested dataclasses; values are parsed as YAML), and builds
the dataclass.  Unknown keys are rejected with the closest valid key suggested, so a typo never silently
falls back to a default.

One experiment file (:class:`ExperimentConfig`, :func:`load_experiment`) describes a whole experiment: the
data, the tokenizer stage (``var train-tokenizer``), the transformer stage (``var train``, also used by
``--model ar``), and the sampler settings used for sample grids and by ``var demo``.  It lives here, not with
training, because evaluation reads it too (``var eval --ref CONFIG.yaml``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from var.data.registry import DataConfig
from var.models.var import TransformerConfig
from var.sample.logits import SamplingSettings
from var.tokenizers.vqvae import VQVAEConfig
from var.utils import atomic_write_text

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override does not fit the schema."""


def _suggest(key: str, valid: Sequence[str], prefix: str = "") -> str:
    """Closest valid key (compared without the dotted ``prefix``, shown with it)."""
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    if close:
        return f"; did you mean '{prefix}{close[0]}'?"
    return f"; valid keys: {', '.join(prefix + k for k in sorted(valid))}"


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _nested_dataclass(annotation: Any) -> type | None:
    if dataclasses.is_dataclass(annotation):
        return annotation
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        for arg in typing.get_args(annotation):
            if dataclasses.is_dataclass(arg):
                return arg
    return None


def _describe(annotation: Any) -> str:
    """What a field annotation accepts, in words: ``int | None`` -> 'an integer or null'."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return " or ".join(_describe(arg) for arg in typing.get_args(annotation))
    if dataclasses.is_dataclass(annotation):
        return f"a section ({annotation.__name__})"
    origin = typing.get_origin(annotation)
    if origin in (tuple, list, Sequence):
        items = [arg for arg in typing.get_args(annotation) if arg is not Ellipsis]
        return f"a list of {_describe(items[0]).removeprefix('an ').removeprefix('a ')}s" if items else "a list"
    return {int: "an integer", float: "a number", str: "text", bool: "true or false", type(None): "null"}.get(
        annotation, getattr(annotation, "__name__", str(annotation)))


def _conform(value: Any, annotation: Any, key: str) -> Any:
    """``value`` as field type ``annotation``, or a ConfigError naming ``key``, what it expects and what it got.

    Integers must be integers (``steps: 2.5`` is an error, not an empty run); numbers accept integers and the
    strings YAML leaves unparsed (``1e-4``); text accepts numbers (``root: 2024``) but not YAML's switches
    (``yes``/``no``/``on``/``off`` read as true/false: quote them).
    """
    def wrong() -> ConfigError:
        hint = " (YAML reads yes/no/on/off as true/false: quote the text)" if isinstance(value, bool) else ""
        return ConfigError(f"config key '{key}' expects {_describe(annotation)}, got {value!r}{hint}")

    if annotation is Any:
        return value
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        for arg in typing.get_args(annotation):
            try:
                return _conform(value, arg, key)
            except ConfigError:
                continue
        raise wrong()
    if annotation is type(None):
        if value is None:
            return None
        raise wrong()
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise wrong()
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                return int(value)
        raise wrong()
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                return float(value)
        raise wrong()
    if annotation is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise wrong()
    if dataclasses.is_dataclass(annotation):
        raise wrong()  # a section given as a scalar (dicts are built by from_dict)
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (tuple, list, Sequence):
        if not isinstance(value, (list, tuple)):
            raise wrong()
        if origin is tuple and args and Ellipsis not in args:
            if len(value) != len(args):
                raise ConfigError(f"config key '{key}' expects {len(args)} values, got {len(value)}: {value!r}")
            items = [_conform(item, arg, f"{key}[{i}]") for i, (item, arg) in enumerate(zip(value, args, strict=True))]
        else:
            item_type = args[0] if args else Any
            items = [_conform(item, item_type, f"{key}[{i}]") for i, item in enumerate(value)]
        return tuple(items) if origin is tuple else items
    return value


def from_dict(cls: type[T], data: dict | None, where: str = "") -> T:
    """Build dataclass ``cls`` from a (nested) dict, rejecting unknown keys with a suggestion."""
    data = dict(data or {})
    types_by_name = _field_types(cls)
    kwargs = {}
    for key, value in data.items():
        if key not in types_by_name:
            raise ConfigError(f"unknown config key '{where}{key}'{_suggest(key, list(types_by_name), where)}")
        nested = _nested_dataclass(types_by_name[key])
        if nested is not None and isinstance(value, dict):
            value = from_dict(nested, value, where=f"{where}{key}.")
        else:
            value = _conform(value, types_by_name[key], f"{where}{key}")
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except TypeError as error:
        raise ConfigError(f"invalid config for {where or cls.__name__}: {error}") from None


def to_dict(config: Any) -> dict:
    """A dataclass config as plain (YAML/JSON-serialisable) data."""
    def convert(value):
        if dataclasses.is_dataclass(value):
            return {f.name: convert(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (list, tuple)):
            return [convert(v) for v in value]
        return value

    return convert(config)


def apply_overrides(data: dict, overrides: Sequence[str], cls: type | None = None) -> dict:
    """Apply ``a.b=value`` overrides (values parsed as YAML) to a nested dict, in place."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as error:
            problem = " ".join(str(getattr(error, "problem", None) or error).split())
            raise ConfigError(f"override {key}={raw}: the value is not valid YAML ({problem}); quote text, write "
                              "lists as [1, 2]") from None
        parts = key.split(".")
        node, node_cls = data, cls
        for depth, part in enumerate(parts):
            if node_cls is not None:
                valid = _field_types(node_cls)
                if part not in valid:
                    prefix = "".join(f"{p}." for p in parts[:depth])
                    raise ConfigError(f"unknown config key '{key}'{_suggest(part, list(valid), prefix)}")
                next_cls = _nested_dataclass(valid[part])
                if isinstance(value, bool) and _describe(valid[part]).startswith("text"):
                    value = raw  # mixed_precision=no means the text 'no', not YAML's false
            else:
                next_cls = None
            if depth == len(parts) - 1:
                node[part] = value
            else:
                node = node.setdefault(part, {})
                node_cls = next_cls
    return data


def load_config(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Read a YAML config (or start from defaults), apply overrides, and build ``cls``."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} not found")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as error:
            problem = " ".join(str(getattr(error, "problem", None) or error).split())
            raise ConfigError(f"{path} is not a YAML config ({problem})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level of a config must be a mapping")
    apply_overrides(data, overrides, cls)
    return from_dict(cls, data)


def save_config(config: Any, path: str | Path) -> None:
    """Write a config as YAML (atomically)."""
    atomic_write_text(path, yaml.safe_dump(to_dict(config), sort_keys=False))


# ---------------------------------------------------------------------------------------------------
# the experiment schema
@dataclass
class OptimConfig:
    """AdamW and its schedules (spec_var 4.2).

    The peak learning rate is ``base_lr * effective_batch / 256`` (effective batch = batch_size x processes x
    grad_accum) unless ``lr`` is given.  The multiplier warms up linearly from ``warmup_start`` over
    ``warmup_steps`` (default: 2 % of the run, the official ep/50) and then follows ``schedule``, as the
    official trainer names them: "lin0" (flat for 5 %, then linear down to ``end_ratio``), "lin" (flat for
    15 %), "lin00" (linear from the peak), "lin<T>" (two linear pieces meeting at T; progressive VAR training
    switches the default lin0 to lin<progressive>), "cos", "exp" (flat for 15 %, then exponential), "const".
    Weight decay follows a cosine from ``weight_decay`` to ``weight_decay_end`` (default: constant).
    """

    base_lr: float = 1e-4
    lr: float | None = None
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.05
    weight_decay_end: float | None = None
    warmup_steps: int | None = None
    warmup_start: float = 0.005
    schedule: str = "lin0"
    end_ratio: float = 0.01
    grad_clip: float = 2.0


@dataclass
class TrainConfig:
    """Length, batch, precision and bookkeeping of one training stage.

    Length is ``steps`` optimizer steps, or ``epochs`` passes over the data when ``steps`` is 0.
    ``batch_size`` is per process; ``mixed_precision`` is "no", "bf16" or "fp16" (accelerate autocast), or unset
    to take ``accelerate launch --mixed_precision``.
    ``ema_decay`` > 0 keeps an exponential moving average of the weights and saves it as the model to sample
    with.  Checkpoints are written every ``checkpoint_every`` steps and at the end; the newest
    ``keep_checkpoints`` are kept.
    """

    steps: int = 0
    epochs: float = 0.0
    batch_size: int = 64
    grad_accum: int = 1
    seed: int = 0
    mixed_precision: str | None = None
    compile: bool = False
    ema_decay: float = 0.0
    log_every: int = 50
    sample_every: int = 0
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    optim: OptimConfig = field(default_factory=OptimConfig)


@dataclass
class TokenizerLossConfig:
    """Tokenizer objective: reconstruction + vq (codebook/commitment) + optional perceptual and patch-GAN.

    ``perceptual_weight`` weighs LPIPS (VGG16; its learned heads come from the ``lpips`` package when it is
    installed, else every channel weighs 1); it switches itself off with a warning when the torchvision VGG16
    weights are not in the local hub cache.  The patch-GAN
    discriminator is trained from scratch (hinge loss) from step ``gan_start``.  Codes unused for
    ``restart_every`` steps are re-initialised from latent vectors of the current batch (0 = never);
    ``data_init`` sets the whole codebook from the first batch's latents, which keeps small datasets from
    collapsing onto a handful of codes.
    """

    reconstruction: str = "l1"
    reconstruction_weight: float = 1.0
    vq_weight: float = 1.0
    perceptual_weight: float = 0.0
    gan_weight: float = 0.0
    gan_start: int = 0
    discriminator_lr: float | None = None
    data_init: bool = True
    restart_every: int = 100


@dataclass
class TokenizerStage:
    model: VQVAEConfig = field(default_factory=VQVAEConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    loss: TokenizerLossConfig = field(default_factory=TokenizerLossConfig)


@dataclass
class TransformerModelConfig(TransformerConfig):
    """The transformer stage's model: the block architecture shared with :class:`~var.models.var.VARConfig`
    plus the official initialisation (``VAR.init_weights``); ``var train --model ar`` maps depth / width /
    heads / dropouts onto LlamaGen's config (var/train/ar_trainer.py).

    Vocabulary, latent channels, scale schedule and class count are not set here: they come from the
    tokenizer and the dataset, so a config cannot contradict them.  Defaults are the official d16 rule.
    """

    init_adaln: float = 0.5
    init_adaln_gamma: float = 1e-3
    init_head: float = 0.02
    init_std: float = -1.0


@dataclass
class TransformerLossConfig:
    """Cross-entropy options (the official recipe is all defaults).

    ``scale_weights`` (one per scale) reweights the token-averaged loss; ``progressive`` > 0 turns on
    coarse-to-fine training (spec_var 4.4): the number of trained scales grows from
    ``progressive_start_scale + 1`` to all by ``progressive`` x the run, and the newest scale's loss ramps in
    over ``progressive_ramp_steps`` (default: 1/300 of the run).
    """

    label_smoothing: float = 0.0
    scale_weights: tuple[float, ...] | None = None
    progressive: float = 0.0
    progressive_start_scale: int = 4
    progressive_ramp_steps: int | None = None


@dataclass
class RecipeConfig:
    """Fine-tuning recipes (spec_accel 1.6, CoDe).

    * ``standard``: train from scratch (or from ``base``) on all scales.
    * ``code-drafter``: fine-tune ``base`` with cross-entropy on its own scales < ``draft_steps`` only.
    * ``code-refiner``: distil the frozen ``teacher``'s logits, per-token KL(teacher/T || student/T) * T^2;
      stage 1 (the first ``stage1_fraction`` of the run) on all scales, stage 2 with a weight decaying
      linearly 1 -> 0 on the drafter's scales < ``draft_steps``.  ``kd_alpha`` < 1 mixes in
      (1 - kd_alpha) x cross-entropy.  The student is ``base`` if given, else a new model from ``model``
      (it may be smaller than the teacher).
    """

    name: str = "standard"
    base: str | None = None
    teacher: str | None = None
    draft_steps: int = 0
    kd_temperature: float = 1.0
    kd_alpha: float = 1.0
    stage1_fraction: float = 0.5


@dataclass
class TransformerStage:
    model: TransformerModelConfig = field(default_factory=TransformerModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    loss: TransformerLossConfig = field(default_factory=TransformerLossConfig)
    recipe: RecipeConfig = field(default_factory=RecipeConfig)
    tokenizer: str | None = None  # tokenizer run or bundle dir (default: the tokenizer run beside this one)
    cache_tokens: bool = True  # tokenize a dataset without random augmentation once, not at every step


@dataclass
class DemoConfig:
    """What ``var demo`` samples, how it judges the samples, and how many CPU threads it uses."""

    per_class: int = 50
    grid_per_class: int = 10
    seed: int = 0
    classifier_epochs: int = 15
    threads: int = 1  # torch CPU threads (0 = torch's default); see var/train/demo.py
    # overrides of the var stage for a second VAR on the same tokenizer (OUT/refiner_run), e.g. a smaller
    # model as CoDe's refiner: ["var.model.depth=2", "var.model.width=64"]; empty: none
    refiner: list[str] = field(default_factory=list)


@dataclass
class ExperimentConfig:
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerStage = field(default_factory=TokenizerStage)
    var: TransformerStage = field(default_factory=TransformerStage)
    sample: SamplingSettings = field(default_factory=SamplingSettings)
    demo: DemoConfig = field(default_factory=DemoConfig)


def load_experiment(path: str | Path | None, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Read an experiment config (or the defaults) with ``section.key=value`` overrides."""
    return load_config(ExperimentConfig, path, overrides)
