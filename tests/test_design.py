"""The package's structure: layering, options declared once, one sampler interface, reproducible models."""

from __future__ import annotations

import argparse
import ast
import hashlib
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_pair, tiny_llamagen

from var.bench import add_arguments as add_bench_arguments
from var.cli import build_parser
from var.eval.cli import SWEEPABLE, parse_sweep
from var.models.family import RasterModel, RasterTokenizer, ScaleModel, ScaleTokenizer
from var.models.kv_cache import KVCache
from var.models.llamagen import Captions, LlamaGen, attention_mask
from var.models.var import VAR, VARConfig
from var.sample import STATS
from var.sample.logits import SamplingSettings, gumbel_max, gumbel_noise_at
from var.sample.options import OptionSpec, collect, declared, option
from var.sample.registry import SAMPLER_NAMES, SAMPLERS, all_options, build_sampler

PACKAGE = Path(__file__).resolve().parents[1] / "var"
LIBRARY_PACKAGES = ("eval", "sample", "models", "tokenizers")
SETTINGS = declared(SamplingSettings)


# ------------------------------------------------------------------------------------------------------
# layering
def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """Every module an import statement of ``path`` names (``from a import b`` names a and a.b)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def command_modules() -> set[str]:
    """Modules that define a command (a top-level ``add_parser``), and the entry point."""
    commands = {"var.cli"}
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        if any(isinstance(node, ast.FunctionDef) and node.name == "add_parser" for node in tree.body):
            commands.add(module_name(path))
    return commands


def test_library_code_imports_neither_training_nor_command_modules():
    commands = command_modules()
    assert {"var.sample.cli", "var.eval.cli", "var.bench", "var.train.cli"} <= commands
    offenders = []
    for package in LIBRARY_PACKAGES:
        for path in (PACKAGE / package).rglob("*.py"):
            for name in imported_modules(path):
                if name == "var.train" or name.startswith("var.train.") or name in commands:
                    offenders.append(f"{module_name(path)} imports {name}")
    assert not offenders, offenders


def test_the_layer_test_sees_a_violation(tmp_path):
    """The check above reads real imports: an upward import is found."""
    bad = tmp_path / "bad.py"
    bad.write_text("from var.train.loop import Trainer\nimport var.sample.cli\n")
    assert {"var.train.loop", "var.sample.cli"} <= imported_modules(bad)


# ------------------------------------------------------------------------------------------------------
# options: declared once, every flag derived
def subparser(name: str) -> argparse.ArgumentParser:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices[name]


def option_flags(parser: argparse.ArgumentParser) -> list[str]:
    return [flag for action in parser._actions for flag in action.option_strings if flag.startswith("--")]


def declared_flags(specs: dict[str, OptionSpec]) -> set[str]:
    return {spec.flag for spec in specs.values()}


@pytest.mark.parametrize("command", ["sample", "eval"])
def test_sample_and_eval_list_every_declared_option_once(command):
    flags = option_flags(subparser(command))
    assert len(flags) == len(set(flags))
    assert declared_flags(SETTINGS) | declared_flags(all_options()) <= set(flags)
    assert not {"--window", "--kv-budget-file", "--refiner-kv-budget-file"} & set(flags)
    help_text = subparser(command).format_help()
    assert "--sjd-window" in help_text and "--spec-scales" in help_text


def test_sample_help_names_the_samplers_of_each_option():
    actions = {flag: action for action in subparser("sample")._actions for flag in action.option_strings}
    assert "[var, scalekv: 0.1, code]" in actions["--kv-budget"].help
    assert "[sjd]" in actions["--sjd-window"].help and "[sjd-scale]" in actions["--spec-scales"].help
    assert "[var, scalekv, code, sjd-scale, ar, sjd]" in actions["--gumbel"].help


def test_bench_takes_exactly_the_declared_options():
    parser = argparse.ArgumentParser()
    add_bench_arguments(parser)
    own = {"--device", "--dtype", "--tiny", "--depths", "--llamagen-sizes", "--batch-sizes", "--samplers", "--warmup",
           "--runs", "--no-decode", "--compile", "--out", "--help", "--infinity", "--resolution", "--aspect",
           "--official-var", "--official-code"}
    options = all_options()
    expected = declared_flags(SETTINGS) | {spec.flag for spec in options.values() if not spec.model}
    expected |= {f"{spec.flag}-depth" for spec in options.values() if spec.model}
    assert set(option_flags(parser)) - own == expected


def test_sweep_accepts_exactly_the_declared_options():
    assert set(SWEEPABLE) == {"sampler"} | set(SETTINGS) | set(all_options())
    assert parse_sweep("sjd_window=4,8") == ("sjd_window", [4, 8])
    assert parse_sweep("kv-budget=0.1,budget.json") == ("kv_budget", [0.1, "budget.json"])
    assert parse_sweep("gumbel=false,true") == ("gumbel", [False, True])
    for bad, message in (("window=3", "SETTING one of"), ("kv_budget=0.1,2", "kv_budget"),
                         ("draft_source=recycle,bogus", "unknown draft_source 'bogus'"),
                         ("sampler=var,code+scalekv", "unknown sampler 'code\\+scalekv'"),
                         ("top_p=1.5", "top_p must be in")):
        with pytest.raises(ValueError, match=message):
            parse_sweep(bad)


def test_one_name_has_one_meaning():
    from dataclasses import dataclass

    from var.sample.options import SamplerOptions

    @dataclass
    class Tokens(SamplerOptions):
        window: int = option(3, "tokens per pass", minimum=1)

    @dataclass
    class Scales(SamplerOptions):
        window: int = option(3, "scales per pass", minimum=1)

    with pytest.raises(TypeError, match="declared twice with different meanings"):
        collect([Tokens, Scales])
    assert collect(entry.cls.Options for entry in SAMPLERS.values())  # the real samplers agree


def test_options_are_checked_by_their_declarations():
    vqvae, model = make_tiny_pair()
    with pytest.raises(ValueError, match=r"kv_budget: the KV budget is a fraction"):
        build_sampler("var", model, vqvae, kv_budget=1.5)
    with pytest.raises(ValueError, match=r"spec_scales must be in \[1, inf\]"):
        build_sampler("sjd-scale", model, vqvae, spec_scales=0)
    with pytest.raises(ValueError, match="unknown kv_scoring 'mean'"):
        build_sampler("scalekv", model, vqvae, kv_scoring="mean")
    with pytest.raises(ValueError, match=r"temperature must be in \(0, inf\]"):
        SamplingSettings(temperature=0.0)


# ------------------------------------------------------------------------------------------------------
# one sampler interface over every model family
@pytest.fixture(scope="module")
def families():
    vqvae, model = make_tiny_pair()
    _, refiner = make_tiny_pair(5, depth=1, width=16, num_heads=1)
    raster = tiny_llamagen(n_layer=1)
    return vqvae, model, refiner, raster


def build(name: str, families, **options):
    vqvae, model, refiner, raster = families
    if name == "code":
        options.setdefault("refiner", refiner)
    return build_sampler(name, raster if SAMPLERS[name].cls.kind.checkpoint == "ar" else model, vqvae,
                         SamplingSettings(cfg=2.0, top_k=8, top_p=0.9), **options)


def test_the_current_models_satisfy_the_family_protocols(families):
    vqvae, model, _, raster = families
    assert isinstance(model, ScaleModel) and isinstance(vqvae, ScaleTokenizer)
    assert isinstance(raster, RasterModel) and isinstance(vqvae, RasterTokenizer)
    assert not isinstance(raster, ScaleModel) and not isinstance(model, RasterModel)


@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_every_sampler_has_one_call_and_one_stats_schema(families, name):
    sampler = build(name, families, gumbel=True)
    out = sampler.sample([0, 2], seed=1, record_logits=True)
    assert set(STATS) <= set(out.stats) and out.stats["passes_per_image"] <= out.stats["passes"]
    assert out.stats["peak_cuda_bytes"] is None and out.stats["seconds_decode"] > 0
    assert out.images.shape[0] == 2 and out.guided_logits and out.guided_logits[0].shape[0] == 2
    tokens_only = sampler.sample(None, seed=1, batch_size=3, decode=False)
    assert tokens_only.images is None and tokens_only.stats["seconds_decode"] == 0.0
    assert tokens_only.indices[0].shape[0] == 3


@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_every_kv_cache_is_freed_before_the_decode(families, name, monkeypatch):
    caches: list[weakref.ref] = []
    leaked: list[KVCache] | None = None  # set to a list to keep every cache alive (a leaking sampler)
    original = KVCache.__init__

    def tracked(self, *args, **kwargs):
        original(self, *args, **kwargs)
        caches.append(weakref.ref(self))
        if leaked is not None:
            leaked.append(self)

    monkeypatch.setattr(KVCache, "__init__", tracked)
    sampler = build(name, families)
    decode = sampler.tokenizer.fhat_to_image
    alive_at_decode = []

    def checked_decode(latent):
        alive_at_decode.append(sum(ref() is not None for ref in caches))
        return decode(latent)

    monkeypatch.setattr(sampler.tokenizer, "fhat_to_image", checked_decode)
    sampler.sample([0, 1], seed=0)
    assert caches and alive_at_decode == [0]
    leaked, alive_at_decode[:] = [], []  # the check sees a cache that outlives the loop
    sampler.sample([0, 1], seed=0)
    assert alive_at_decode[0] == len(leaked) > 0


def test_gumbel_noise_is_an_option_of_every_sampler_that_draws(families):
    """Gumbel mode is deterministic per seed and shared: CoDe with the drafter as refiner, ScaleKV at a full
    budget and scale-wise speculation reproduce plain next-scale sampling, SJD reproduces plain raster
    sampling, token for token."""
    vqvae, model, _, raster = families
    plain = build("var", families, gumbel=True).sample([0, 1, 2], seed=4)
    for name, options in (("code", {"refiner": model, "draft_steps": 2}), ("scalekv", {"kv_budget": 1.0}),
                          ("sjd-scale", {"spec_scales": 3, "spec_max_tokens": 16})):
        out = build(name, families, gumbel=True, **options).sample([0, 1, 2], seed=4)
        assert all(torch.equal(a, b) for a, b in zip(out.indices, plain.indices, strict=True)), name
    raster_plain = build("ar", families, gumbel=True).sample([0, 1, 2], seed=4)
    fast = build("sjd", families, gumbel=True, sjd_window=4).sample([0, 1, 2], seed=4)
    assert torch.equal(fast.indices[0], raster_plain.indices[0])
    other = build("ar", families, gumbel=True).sample([0, 1, 2], seed=5)
    assert not torch.equal(other.indices[0], raster_plain.indices[0])


def test_raster_samplers_handle_a_condition_prefix(families):
    """With T > 1 condition positions (a t2i LlamaGen's caption, left padded with a mask; pre-filled once,
    causally), plain raster sampling equals a teacher-forced pass over caption + tokens, and SJD equals plain
    sampling (Gumbel mode: tokens are functions of the logits)."""
    vqvae = families[0]
    model = tiny_llamagen(3, model_type="t2i", cls_token_num=3, caption_dim=8)
    captions = Captions(torch.randn(2, 3, 8), torch.tensor([[1, 1, 1], [0, 0, 1]]))
    captions.features[1, :2] = 0  # left padding: padded rows are zeros
    settings = SamplingSettings(cfg=1.0, top_k=0, top_p=0.0)
    plain = build_sampler("ar", model, vqvae, settings, gumbel=True).sample(captions, seed=9)
    tokens = plain.indices[0]
    assert plain.stats["passes"] == 1 + 16  # the prefill, then one pass per token
    with torch.no_grad():
        null = model.null_condition(2)
        rows = torch.cat((captions.features, null)), captions.mask.repeat(2, 1)  # the caption, then the null one
        length = 3 + 16
        mask = attention_mask(torch.arange(length - 1).expand(4, -1), length - 1, rows[1])
        logits = model(rows[0], tokens[:, :-1].repeat(2, 1), mask)[:, 2:]
        guided = logits[2:] + (logits[:2] - logits[2:]) * 2.0  # uncond + s (cond - uncond), s = 1 + cfg
        noise = gumbel_noise_at(9, torch.arange(16).expand(2, -1), 16)
    assert torch.equal(gumbel_max(guided, noise), tokens)
    fast = build_sampler("sjd", model, vqvae, settings, gumbel=True, sjd_window=5).sample(captions, seed=9)
    assert torch.equal(fast.indices[0], tokens) and fast.stats["passes"] < plain.stats["passes"]


# ------------------------------------------------------------------------------------------------------
# reproducible model construction
BUILD = """
import hashlib, sys, torch
from var.models.llamagen import LlamaGen
from var.models.var import VAR, VARConfig
torch.manual_seed(3)
var = VAR(VARConfig(depth=2, width=32, num_heads=2, vocab_size=16, z_channels=4, num_classes=3,
                    patch_nums=(1, 2, 3), shared_aln=True))
ar = LlamaGen(n_layer=1, dim=16, n_head=2, vocab_size=16, num_classes=3, block_size=9)
digest = hashlib.sha256()
for model in (var, ar):
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode() + tensor.numpy().tobytes())
print(digest.hexdigest())
"""


def test_building_a_model_after_seeding_gives_the_same_weights_in_every_process():
    torch.rand(1000)  # this process has drawn other numbers before
    digest = subprocess.run([sys.executable, "-c", BUILD], capture_output=True, text=True, check=True)
    torch.manual_seed(11)
    local = {}
    exec(compile(BUILD.replace("print(digest.hexdigest())", "result = digest.hexdigest()"), "build", "exec"),
         {"hashlib": hashlib}, local)
    assert digest.stdout.strip() == local["result"]


@pytest.mark.parametrize("shared_aln", [False, True])
def test_init_weights_draws_every_parameter(shared_aln):
    """Nothing keeps a value from construction: after init_weights no NaN planted before survives."""
    for model in (VAR(VARConfig(depth=2, width=32, num_heads=2, vocab_size=16, z_channels=4, num_classes=3,
                                patch_nums=(1, 2, 3), shared_aln=shared_aln)),
                  LlamaGen(n_layer=1, dim=16, n_head=2, vocab_size=16, num_classes=3, block_size=9)):
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.fill_(float("nan"))
        model.init_weights()
        assert not any(parameter.isnan().any() for parameter in model.parameters())
