"""Options, declared once: each sampler's options (and the sampling settings) are a dataclass whose fields say
their help text, type, default and valid values.

Everything else is derived from these declarations: the constructor checks (:class:`SamplerOptions`), the
``var sample`` / ``var eval`` flags (:func:`add_option_arguments`, :func:`options_from_args`), the ``var bench``
flags and row labels, and the ``var eval --sweep`` keys (:func:`parse_value`).  A sampler declares::

    @dataclass
    class MyOptions(GumbelOption):               # shared options come from mixins, declared once there
        lookahead: int = option(4, "my sampler: tokens looked ahead per pass", minimum=1)

    class MySampler(RasterSampler):
        Options = MyOptions

and ``var sample --lookahead 8``, ``var bench --lookahead 8`` and ``var eval --sweep lookahead=2,4`` work.
One name has one meaning: two samplers may share an option only by sharing its declaration (a mixin).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from var.argtypes import checked


def parse_bool(text: str) -> bool:
    """'true'/'false' (also 1/0, yes/no) as a bool, for sweeps over switches."""
    lowered = str(text).strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {text!r}")


@dataclass(frozen=True)
class OptionSpec:
    """One declared option.

    ``type`` parses one command-line value; ``choices`` / ``minimum`` / ``maximum`` bound valid values
    (``exclusive_minimum``: the minimum itself is not valid); ``per_scale`` options take one value or one per
    scale; ``model`` names the checkpoint kind of a model-valued option (the command line gives a path);
    ``check`` replaces the generic checks for values of several kinds (e.g. a fraction or a budget file).
    """

    help: str
    type: Callable[[str], Any]
    default: Any = None
    choices: tuple | None = None
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: bool = False
    per_scale: bool = False
    model: str | None = None
    check: Callable[[str, Any], None] | None = None
    metavar: str | None = None
    name: str = ""

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def validate(self, value: Any) -> None:
        """Raise a ValueError naming this option when ``value`` is not valid."""
        if value is None and (self.default is None or self.model):
            return
        if self.check is not None:
            self.check(self.name, value)
            return
        if self.model:
            return
        values = list(value) if self.per_scale and isinstance(value, (list, tuple)) else [value]
        for item in values:
            self._validate_one(item)

    def _validate_one(self, value: Any) -> None:
        if self.type is bool:
            if not isinstance(value, bool):
                raise ValueError(f"{self.name} is a switch (True or False), got {value!r}")
            return
        if self.type in (int, float):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or (
                    self.type is int and not float(value).is_integer()):
                raise ValueError(f"{self.name} must be {'an integer' if self.type is int else 'a number'}, "
                                 f"got {value!r}")
            low_ok = self.minimum is None or (value > self.minimum if self.exclusive_minimum else value >= self.minimum)
            if not low_ok or (self.maximum is not None and value > self.maximum) or math.isnan(value):
                raise ValueError(f"{self.name} must be in {self.range_text()}, got {value!r}")
        if self.choices is not None and value not in self.choices:
            raise ValueError(f"unknown {self.name} {value!r}; choose one of {', '.join(map(str, self.choices))}")

    def range_text(self) -> str:
        low = "-inf" if self.minimum is None else f"{self.minimum:g}"
        high = "inf" if self.maximum is None else f"{self.maximum:g}"
        return f"{'(' if self.exclusive_minimum or self.minimum is None else '['}{low}, {high}]"

    def parse(self, text: str) -> Any:
        """One value from text (a flag's argument or a sweep value), checked."""
        value = parse_bool(text) if self.type is bool else self.type(text)
        self.validate(value)
        return value


def option(default: Any, help: str, *, type: Callable[[str], Any] | None = None, **spec) -> Any:
    """A dataclass field declaring one option (see :class:`OptionSpec` for the keywords)."""
    kind = type or (bool if isinstance(default, bool) else (default.__class__ if default is not None else str))
    return field(default=default, metadata={"option": OptionSpec(help=help, type=kind, default=default, **spec)})


def declared(cls: type) -> dict[str, OptionSpec]:
    """The options a dataclass declares, by name, in declaration order."""
    return {f.name: dataclasses.replace(f.metadata["option"], name=f.name)
            for f in dataclasses.fields(cls) if "option" in f.metadata}


@dataclass
class SamplerOptions:
    """Base of every sampler's options: values are checked against their declarations when created."""

    def __post_init__(self) -> None:
        for name, spec in declared(type(self)).items():
            spec.validate(getattr(self, name))

    @classmethod
    def specs(cls) -> dict[str, OptionSpec]:
        return declared(cls)

    @classmethod
    def build(cls, sampler: str, presets: dict | None = None, **values) -> SamplerOptions:
        """Options from keyword values over the sampler's preset defaults; unknown names fail in one line."""
        accepted = cls.specs()
        unknown = sorted(set(values) - set(accepted))
        if unknown:
            takes = ", ".join(accepted) if accepted else "no options"
            raise ValueError(f"sampler '{sampler}' does not take {', '.join(unknown)} (it takes {takes})")
        return cls(**{**(presets or {}), **values})

    def non_default(self) -> dict[str, Any]:
        """Options whose value differs from the declared default (what identifies a configuration)."""
        return {name: getattr(self, name) for name, spec in self.specs().items()
                if getattr(self, name) != spec.default}


@dataclass
class NoOptions(SamplerOptions):
    """A sampler without options."""


def collect(option_classes: Iterable[type]) -> dict[str, OptionSpec]:
    """The union of several declarations; a name declared twice must be the same declaration (one meaning)."""
    union: dict[str, OptionSpec] = {}
    for cls in option_classes:
        for name, spec in declared(cls).items():
            if name in union and union[name] != spec:
                raise TypeError(f"option '{name}' is declared twice with different meanings ({cls.__name__}); "
                                "share one declaration through a mixin or rename one of them")
            union[name] = spec
    return union


def add_option_arguments(group, specs: dict[str, OptionSpec], users: dict[str, list[str]] | None = None,
                         defaults: bool = False) -> None:
    """One argparse flag per declared option.

    ``defaults=False`` (sampler options): every flag defaults to None, so "not given" is visible and the
    sampler's own (or preset) default applies; the help names the samplers that take it (``users``).
    ``defaults=True`` (sampling settings): flags default to the declared value.
    """
    for name, spec in specs.items():
        taken_by = f" [{', '.join(users[name])}]" if users and name in users else ""
        default_text = "" if spec.model or spec.default in (None, False) else f"; default {spec.default}"
        help_text = spec.help + default_text + taken_by
        if spec.type is bool:
            group.add_argument(spec.flag, dest=name, action="store_true", default=False if defaults else None,
                               help=help_text)
            continue
        kwargs = dict(dest=name, type=checked(spec.parse), help=help_text, metavar=spec.metavar)
        if spec.choices is not None:
            kwargs.update(choices=spec.choices, metavar=None)
        if spec.per_scale:
            kwargs.update(nargs="+", default=[spec.default] if defaults else None)
            kwargs["help"] = help_text + " (one value or one per scale)"
        else:
            kwargs["default"] = spec.default if defaults else None
        group.add_argument(spec.flag, **kwargs)


def given_options(args, specs: dict[str, OptionSpec]) -> dict[str, Any]:
    """The options set on the command line (flags left at None are not given)."""
    return {name: getattr(args, name) for name in specs if getattr(args, name, None) is not None}


def check_applicable(given: dict[str, Any], sampler: str, accepted: dict[str, OptionSpec],
                     specs: dict[str, OptionSpec]) -> None:
    """Raise a ValueError naming every given flag that sampler ``sampler`` does not declare."""
    stray = [specs[name].flag for name in given if name not in accepted]
    if stray:
        verb = "does" if len(stray) == 1 else "do"
        raise ValueError(f"{', '.join(stray)} {verb} not apply to --sampler {sampler}")


def parse_budget(text: str) -> float | str:
    """A KV budget on the command line: a fraction of the cache, or the path of a budget JSON."""
    try:
        return float(text)
    except ValueError:
        return text


def check_budget(name: str, value: Any) -> None:
    """A fraction in (0, 1], a budget file path, or a budget object (anything with ``history``)."""
    if isinstance(value, (str, os.PathLike)) or hasattr(value, "history"):
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ValueError(f"{name}: the KV budget is a fraction of the cache in (0, 1] or a budget JSON from "
                         f"'var calibrate-kv', got {value!r}")
