"""Sampler names -> sampler classes (and presets): every entry point takes these names.

``build_sampler(name, model, tokenizer, settings, **options)`` builds one; its options are the class's
declared ``Options`` (var/sample/options.py), over the preset's defaults for a preset name.  Add-ons are
options, not names: ``code`` with ``kv_budget`` is CoDe on ScaleKV caches, ``var`` with ``gumbel`` is
Gumbel-keyed plain sampling.  ``scalekv`` is a preset: plain next-scale sampling with a 10 % KV budget.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from var.sample.base import BaseSampler
from var.sample.code import CoDeSampler
from var.sample.logits import SamplingSettings
from var.sample.options import OptionSpec, collect
from var.sample.raster import ARSampler
from var.sample.scale import VARSampler
from var.sample.speculative.scales import ScaleSpeculativeSampler
from var.sample.speculative.sjd import SJDSampler


@dataclass(frozen=True)
class SamplerEntry:
    """A sampler class and the option values its name presets."""

    cls: type[BaseSampler]
    presets: dict = field(default_factory=dict)

    def specs(self) -> dict[str, OptionSpec]:
        return self.cls.Options.specs()


SAMPLERS: dict[str, SamplerEntry] = {
    "var": SamplerEntry(VARSampler),
    "scalekv": SamplerEntry(VARSampler, {"kv_budget": 0.1}),
    "code": SamplerEntry(CoDeSampler),
    "sjd-scale": SamplerEntry(ScaleSpeculativeSampler),
    "ar": SamplerEntry(ARSampler),
    "sjd": SamplerEntry(SJDSampler),
}
SAMPLER_NAMES = tuple(SAMPLERS)
BASE_SAMPLERS = ("var", "ar")  # plain decoding of each model kind, what add-ons are compared with


def entry(name: str) -> SamplerEntry:
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler '{name}'; choose one of {', '.join(SAMPLER_NAMES)}")
    return SAMPLERS[name]


def sampler_options(name: str) -> dict[str, OptionSpec]:
    """The options sampler ``name`` declares."""
    return entry(name).specs()


def all_options() -> dict[str, OptionSpec]:
    """Every declared sampler option, once (a name shared by samplers is one declaration)."""
    return collect(e.cls.Options for e in SAMPLERS.values())


def option_users() -> dict[str, list[str]]:
    """Option name -> the samplers that take it (with a preset's value where it sets one)."""
    users: dict[str, list[str]] = {}
    for name, item in SAMPLERS.items():
        for option in item.specs():
            preset = item.presets.get(option)
            users.setdefault(option, []).append(name if preset is None else f"{name}: {preset}")
    return users


def model_name_for(sampler: str) -> str:
    """The checkpoint a sampler decodes from a bundle: ``var`` (next-scale) or ``ar`` (raster)."""
    return entry(sampler).cls.kind.checkpoint


def build_sampler(name: str, model, tokenizer, settings: SamplingSettings | None = None, **options) -> BaseSampler:
    """Build the sampler called ``name`` around ``model`` and its ``tokenizer``."""
    item = entry(name)
    item.cls.Options.build(name, item.presets, **options)  # unknown or invalid options fail under this name
    return item.cls(model, tokenizer, settings, **{**item.presets, **options})
