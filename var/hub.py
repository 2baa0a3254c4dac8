"""Released weights by name: which Hugging Face Hub files make up each published model, and getting them.

A DiT-style size registry for the weights the VAR, CoDe, LlamaGen and Infinity authors published::

    paths = resolve("var-d16")       # {"tokenizer": .../vae_ch160v4096z32.pth, "transformer": .../var_d16.pth}
    vqvae, model = load_pair("var-d16")

Files live in the standard Hugging Face cache (``$HF_HUB_CACHE``, default ``~/.cache/huggingface/hub``), shared with
every other tool that uses ``huggingface_hub``.  :func:`resolve` takes what is cached without touching the network and
downloads the rest with :func:`huggingface_hub.hf_hub_download`; offline (``HF_HUB_OFFLINE=1``, or no network) a
missing file stops it at once with one line naming the repository, the files and the cache path, before any model
is built.  Where the publisher's Hub page gives a file's sha256 (the Git LFS object id) it is checked once per file
and remembered in :func:`var.utils.cache_dir` (``hub-verified/``); a different file is refused.  Where none is
published the registry holds None and the file is taken as it is.

Where each sha256 comes from (the Hub commit that last changed the file, shown on its page as "Git LFS Details"):

* ``FoundationVision/var``: vae_ch160v4096z32.pth at 2fc3ff1 ([init up]); var_d16 at b57aae6 ([upd] d16), var_d20
  at 367386c ([upd] d20), var_d24 at 3cea5e8 ([new] more ckpts), var_d30 at ba6edfa ([upd] d30, the file page on
  main), var_d36 at 6d0ee65.
* ``Zigeng/VAR_CoDe`` (CoDe, arXiv 2411.17787): drafter_6 21f1b73, drafter_7 d665f1c, drafter_8 d79838e (file page on
  main), drafter_9 edfa71d, refiner_8/9 b96b45b, refiner_6/7 09de562.  Its copy of the VQ-VAE (3ccb80e) has the same
  sha256 as FoundationVision/var's, so CoDe entries share that file.
* ``FoundationVision/LlamaGen``: vq_ds16_c2i e467ee8; c2i_{B_384,L_256,L_384,XL_384,XXL_384,3B_384} dc1fec5.
  c2i_B_256 (472fe06): no published sha256 was found, so None.
* ``peizesun/llamagen_t2i`` (where the official LlamaGen README links the text-to-image files): vq_ds16_t2i,
  t2i_XL_stage1_256, t2i_XL_stage2_512 at 276f5c5.
* ``FoundationVision/Infinity``: infinity_vae_d32reg 5fbd996, infinity_2b_reg f22cbcf,
  infinity_vae_d56_f8_14_patchify f6bf55e.  The 8B transformer shards (infinity_8b_weights/, 9fe79d8): None.
* ``google/flan-t5-xl``: model-00001/00002-of-00002.safetensors at 7d6315d; its small JSON/tokenizer files are
  plain git files with no published sha256 (None).
"""

from __future__ import annotations

import difflib
import json
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache
from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

from var.tokenizers.vqvae import OFFICIAL_PATCH_NUMS_256, OFFICIAL_PATCH_NUMS_512
from var.utils import atomic_write_text, cache_dir, format_bytes, sha256_of

VAR_REPO = "FoundationVision/var"
CODE_REPO = "Zigeng/VAR_CoDe"
LLAMAGEN_REPO = "FoundationVision/LlamaGen"
LLAMAGEN_T2I_REPO = "peizesun/llamagen_t2i"
INFINITY_REPO = "FoundationVision/Infinity"
T5_REPO = "google/flan-t5-xl"


@dataclass(frozen=True)
class HubFile:
    """One file of a Hub repository and its published sha256 (None where the publisher gives none)."""

    repo_id: str
    filename: str  # path inside the repository, subfolders included
    sha256: str | None = None


@dataclass(frozen=True)
class Release:
    """A published model: its files by role, and how its authors sample it.

    Roles: ``tokenizer``, ``transformer`` (CoDe: the drafter), ``refiner`` (CoDe), ``text_encoder`` (t2i).  A role of
    several files (sharded weights) resolves to the folder that holds them.  ``family`` says which loader builds it;
    ``sampling`` holds :class:`~var.sample.logits.SamplingSettings` fields of the publishers' evaluation protocol,
    ``sampler``/``sampler_options`` the sampler that protocol runs (None where the toolkit has no sampler for it yet).
    """

    name: str
    family: str  # var | code | llamagen-c2i | llamagen-t2i | infinity | t5
    components: Mapping[str, tuple[HubFile, ...]]
    description: str
    image_size: int | None = None
    sampling: Mapping[str, object] = field(default_factory=dict)
    sampler: str | None = None
    sampler_options: Mapping[str, object] = field(default_factory=dict)
    loader_args: Mapping[str, object] = field(default_factory=dict)

    @property
    def files(self) -> list[HubFile]:
        """Every file of the release, each once, in role order."""
        return list(dict.fromkeys(f for files in self.components.values() for f in files))


# ------------------------------------------------------------------------------------------------------------------
# the registry
VAR_VAE = HubFile(VAR_REPO, "vae_ch160v4096z32.pth", "7c3ec27ae28a3f87055e83211ea8cc8558bd1985d7b51742d074fb4c2fcf186c")
VAR_WEIGHTS = {  # depth -> sha256 of var_d{depth}.pth
    16: "4f6151aad91c94e03e224dd7358d8389fa05301c0c291279566998efb54b0ecb",
    20: "f7d232978e6fe82a4f2e0f5d82b012e01b1aa5abfe93ce2b56104ec0e878a10f",
    24: "1f5fa9cfec7be1c60034511eeacde06e24892f416d3d1e5fd227fdac56293dfc",
    30: "7b11551dd4d794c7d6ed10b3d2822d42efe609a86128171b646e543dd2633b56",
    36: "660201c829c6f7b775b9119867c12c11aaa68c72770dc33653eec1fa67e27d4d",
}
VAR_FID_SAMPLING = {"cfg": 1.5, "top_k": 900, "top_p": 0.96}  # official README, FID protocol
CODE_WEIGHTS = {  # draft steps N -> (sha256 of drafter_N.pth, sha256 of refiner_N.pth)
    6: ("ff45487149d8869056b41b11d64698d5c1dbae5d0b4b9992be4885a1fa721e14",
        "24a25b5564a0157506dbe8ca41dc9be5d5e3fc425310f136d89ae1b02b3c0b3f"),
    7: ("4c38c3dbea461bb12f825cfd685ed0c0b4e379c88a3c3261b15fad3424f4c1b8",
        "ce73bacee49f7dfb2e17f1ba4886e447fe81f266fcdcc8404e9be1d16bb4b0e5"),
    8: ("dd11c80e3f68e7fe1fb8ff33089d13ccae8c613456627d28b93f91d444f2a9c9",
        "dc9cd53c7490eefc88917224508a58da740900ce904180cc82265a48b8b4ebc7"),
    9: ("a355002396f40a1630ea8592c4650c6561f3a5934ea70941dc08ab668906be28",
        "f5688ddac91ea0d03f77e75146dcd6db9c7ec90adc169f3d3e5bfee5f8387355"),
}
CODE_FID_SAMPLING = {"cfg": 1.5, "top_k": 600, "top_p": 0.96, "temperature": [1.1] * 7 + [1.0] * 3}  # sample_CoDe.py

LLAMAGEN_VQ_C2I = HubFile(LLAMAGEN_REPO, "vq_ds16_c2i.pt",
                          "109aa8afb2cf3761eec23cdc8644154cb498f5ab7eef2a35264d25e5e0499f7d")
LLAMAGEN_C2I = {  # (size, image side) -> (sha256 of c2i_{size}_{side}.pt, GPT name, FID cfg_scale s (our cfg: s - 1))
    ("B", 256): (None, "GPT-B", 2.0),
    ("B", 384): ("7ddf3a659b180e4339e4dab8802183ede1ea8f44c5cfd4359ab27bef979c17ad", "GPT-B", 2.0),
    ("L", 256): ("15fe788b9c0e8dfe36f3e3fd701b44d0c934e4fd94a0ab599b69669aa8f44a55", "GPT-L", 2.0),
    ("L", 384): ("9b8cb63634d11e684b4a68017abffff6698752ef715058a77e5e089539ebc39a", "GPT-L", 2.0),
    ("XL", 384): ("736cb92bebdcb16737dbd35210a07ae4f7fd001cdfd55b26205d89182d1807ba", "GPT-XL", 1.75),
    ("XXL", 384): ("cba5a780b9d2394386e7410c630bced3a70e109cf7107e1783c9a986e9e7754e", "GPT-XXL", 1.75),
    ("3B", 384): ("1e9173ecbe81295b1d80b021b2bf57ed4ef089601b6745336ff20a9f382c4cac", "GPT-3B", 1.65),
}
FSDP_SIZES = ("XXL", "3B")  # saved as bare state dicts (the official --from-fsdp)
LLAMAGEN_VQ_T2I = HubFile(LLAMAGEN_T2I_REPO, "vq_ds16_t2i.pt",
                          "0e21fc1318e2e9ee641a07bdad0e20675e9ec35e6e3eb911d58b5d7a2cd8d4cb")
LLAMAGEN_T2I = {  # image side -> (file, sha256)
    256: ("t2i_XL_stage1_256.pt", "87d94b9b11cd80f44bd69122a4d4ed28304956e0fba07edcafce08c7a2716600"),
    512: ("t2i_XL_stage2_512.pt", "7d02d368751c21b61dc3914b0ccba70fc913dafc063dd5b16bc9abf7091f8be1"),
}

FLAN_T5_XL = (
    HubFile(T5_REPO, "config.json"),
    HubFile(T5_REPO, "model.safetensors.index.json"),
    HubFile(T5_REPO, "model-00001-of-00002.safetensors",
            "99196ddfbe886e8ef860f52de979df64890edfc792c3d94ce0502991f347dd18"),
    HubFile(T5_REPO, "model-00002-of-00002.safetensors",
            "c0c677ddeb21009b6efd97146f37fc3a0396707fb5e63ade7aff64884dce9806"),
    HubFile(T5_REPO, "spiece.model"),
    HubFile(T5_REPO, "tokenizer.json"),
    HubFile(T5_REPO, "tokenizer_config.json"),
    HubFile(T5_REPO, "special_tokens_map.json"),
)
INFINITY_8B_SHARDS = tuple(
    HubFile(INFINITY_REPO, f"infinity_8b_weights/{name}")
    for name in [f"model-0000{i}-of-00004.safetensors" for i in range(1, 5)] + ["model.safetensors.index.json"]
)


def _build_registry() -> dict[str, Release]:
    releases = []
    for depth, sha in VAR_WEIGHTS.items():
        side = 512 if depth == 36 else 256
        releases.append(Release(
            f"var-d{depth}", "var",
            {"tokenizer": (VAR_VAE,), "transformer": (HubFile(VAR_REPO, f"var_d{depth}.pth", sha),)},
            f"VAR-d{depth}, ImageNet {side}x{side} class-conditional (Tian et al. 2024)",
            side, VAR_FID_SAMPLING, "var",
            loader_args={"patch_nums": OFFICIAL_PATCH_NUMS_512 if side == 512 else OFFICIAL_PATCH_NUMS_256},
        ))
    for steps, (drafter_sha, refiner_sha) in CODE_WEIGHTS.items():
        releases.append(Release(
            f"code-n{steps}", "code",
            {"tokenizer": (VAR_VAE,), "transformer": (HubFile(CODE_REPO, f"drafter_{steps}.pth", drafter_sha),),
             "refiner": (HubFile(CODE_REPO, f"refiner_{steps}.pth", refiner_sha),)},
            f"CoDe: fine-tuned VAR-d30 drafter ({steps} scales) + VAR-d16 refiner ({10 - steps}), ImageNet 256x256",
            256, CODE_FID_SAMPLING, "code", {"draft_steps": steps},
            loader_args={"patch_nums": OFFICIAL_PATCH_NUMS_256},
        ))
    for (size, side), (sha, gpt, cfg) in LLAMAGEN_C2I.items():
        releases.append(Release(
            f"llamagen-c2i-{size.lower()}-{side}", "llamagen-c2i",
            {"tokenizer": (LLAMAGEN_VQ_C2I,), "transformer": (HubFile(LLAMAGEN_REPO, f"c2i_{size}_{side}.pt", sha),)},
            f"LlamaGen-{size} class-conditional, {side // 16}x{side // 16} tokens ({side} px)",
            side, {"cfg": round(cfg - 1.0, 6), "top_k": 0, "top_p": 1.0, "temperature": 1.0}, "ar",
            loader_args={"gpt_model": gpt, "from_fsdp": size in FSDP_SIZES, "downsample": 16},
        ))
    for side, (filename, sha) in LLAMAGEN_T2I.items():
        releases.append(Release(
            f"llamagen-t2i-xl-{side}", "llamagen-t2i",
            {"tokenizer": (LLAMAGEN_VQ_T2I,), "transformer": (HubFile(LLAMAGEN_T2I_REPO, filename, sha),),
             "text_encoder": FLAN_T5_XL},
            f"LlamaGen-XL text-to-image, {side} px, flan-t5-xl text encoder",
            side, {"cfg": 6.5, "top_k": 1000, "top_p": 1.0, "temperature": 1.0}, "ar",  # official cfg_scale 7.5
            loader_args={"gpt_model": "GPT-XL", "downsample": 16},
        ))
    releases += [
        Release(
            "infinity-2b", "infinity",
            {"tokenizer": (HubFile(INFINITY_REPO, "infinity_vae_d32reg.pth",
                                   "7a37fa3ea1b2a1ebd23de61d91a5e68202825e5a67edaef4b7c55f5fd5b9cf26"),),
             "transformer": (HubFile(INFINITY_REPO, "infinity_2b_reg.pth",
                                     "d5958b37e7ecb914230cd2b8c28aae0ec108ce08b315720bc3dc52596cc5b3a7"),),
             "text_encoder": FLAN_T5_XL},
            "Infinity-2B text-to-image, 1024 px, bitwise VAE d32", 1024,
            {"cfg": 4.0, "top_k": 900, "top_p": 0.97, "temperature": 0.5},  # infer.sh: cfg 4, tau 0.5
            loader_args={"model": "infinity_2b", "vae_type": 32},
        ),
        Release(
            "infinity-8b", "infinity",
            {"tokenizer": (HubFile(INFINITY_REPO, "infinity_vae_d56_f8_14_patchify.pth",
                                   "c4c695350125593dde7ec7120e6dff7039a9adea01516f6e14758eb94e3ec6c2"),),
             "transformer": INFINITY_8B_SHARDS, "text_encoder": FLAN_T5_XL},
            "Infinity-8B text-to-image, 1024 px (sharded safetensors)", 1024,
            {"cfg": 4.0, "top_k": 900, "top_p": 0.97, "temperature": 0.5},
            loader_args={"model": "infinity_8b"},
        ),
        Release("flan-t5-xl", "t5", {"text_encoder": FLAN_T5_XL},
                "flan-t5-xl, the text encoder of LlamaGen t2i and Infinity"),
    ]
    return {release.name: release for release in releases}


RELEASES: dict[str, Release] = _build_registry()


def release(name: str) -> Release:
    """The registry entry ``name``; a ValueError naming the closest names otherwise."""
    if name not in RELEASES:
        close = difflib.get_close_matches(name, RELEASES, n=3)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise ValueError(f"unknown released model '{name}': {hint}known: {', '.join(RELEASES)}")
    return RELEASES[name]


# ------------------------------------------------------------------------------------------------------------------
# the cache
def hub_cache_path(hub_cache: str | os.PathLike | None = None) -> Path:
    """The Hugging Face cache folder in use (``hub_cache``, else huggingface_hub's, from $HF_HUB_CACHE / $HF_HOME)."""
    return Path(hub_cache) if hub_cache is not None else Path(constants.HF_HUB_CACHE)


def offline() -> bool:
    """True when downloads are off: ``HF_HUB_OFFLINE`` set now or when huggingface_hub was imported."""
    return constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}


def cached_path(file: HubFile, hub_cache: str | os.PathLike | None = None) -> Path | None:
    """The cached copy of ``file`` (main revision), or None; never touches the network."""
    path = try_to_load_from_cache(file.repo_id, file.filename, cache_dir=hub_cache)
    return Path(path) if isinstance(path, str) else None


def _stamp(file: HubFile) -> Path:
    return cache_dir() / "hub-verified" / f"{file.sha256}.json"


def _identity(path: Path) -> dict:
    real = path.resolve()
    stat = real.stat()
    return {"path": str(real), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def is_verified(file: HubFile, path: Path) -> bool:
    """Whether ``path`` was already checked against ``file``'s sha256 (and is unchanged since)."""
    try:
        return json.loads(_stamp(file).read_text()) == _identity(path)
    except (OSError, ValueError):
        return False


def verify(file: HubFile, path: Path) -> None:
    """Check ``path`` against the published sha256 once (remembered while the file is unchanged); a different file
    raises one ValueError naming the file, the expected and the actual hash."""
    if file.sha256 is None or is_verified(file, path):
        return
    size = path.stat().st_size
    if size > 2**28:
        print(f"checking the sha256 of {file.filename} ({format_bytes(size)}, once)", file=sys.stderr)
    actual = sha256_of(path)
    if actual != file.sha256:
        raise ValueError(
            f"{path} ({file.repo_id}/{file.filename}) has sha256 {actual}, not the published {file.sha256}: the file "
            "is damaged or not the released one; delete it and run again to download it anew"
        )
    try:
        stamp = _stamp(file)
        stamp.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(stamp, json.dumps(_identity(path)))
    except OSError:
        pass  # a read-only cache folder only means hashing again next time


def _missing_error(name: str, missing: list[HubFile], hub_cache: Path, why: str) -> FileNotFoundError:
    by_repo: dict[str, list[str]] = {}
    for file in missing:
        by_repo.setdefault(file.repo_id, []).append(file.filename)
    listing = "; ".join(f"{repo}: {', '.join(files)}" for repo, files in by_repo.items())
    command = " && ".join(f"hf download {repo} {' '.join(files)} --cache-dir {hub_cache}"
                          for repo, files in by_repo.items())
    return FileNotFoundError(
        f"{name}: {len(missing)} file(s) not in the Hugging Face cache {hub_cache} and {why}: {listing}; "
        f"fetch them where the Hub is reachable ({command}) into that cache"
    )


def resolve(name: str, hub_cache: str | os.PathLike | None = None, roles: Sequence[str] | None = None
            ) -> dict[str, Path]:
    """Local paths of release ``name`` by role (all roles, or ``roles``): cached files as they are, missing ones
    downloaded, every file with a published sha256 checked.  Raises before any model work: FileNotFoundError when
    files are missing and cannot be downloaded (offline, no network), ValueError for an unknown name or role or for
    a file that is not the released one."""
    entry = release(name)
    unknown = sorted(set(roles or ()) - set(entry.components))
    if unknown:
        raise ValueError(f"{name} has no {', '.join(unknown)} (it has {', '.join(entry.components)})")
    components = {role: files for role, files in entry.components.items() if roles is None or role in roles}
    paths = {file: cached_path(file, hub_cache) for files in components.values() for file in files}
    missing = [file for file, path in paths.items() if path is None]
    if missing and offline():
        raise _missing_error(name, missing, hub_cache_path(hub_cache), "HF_HUB_OFFLINE is set")
    for index, file in enumerate(missing):
        try:
            paths[file] = Path(hf_hub_download(file.repo_id, file.filename, cache_dir=hub_cache))
        except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as error:
            reason = str(error).strip().splitlines()[0][:160] if str(error).strip() else type(error).__name__
            why = f"could not be downloaded ({reason})"
            raise _missing_error(name, missing[index:], hub_cache_path(hub_cache), why) from None
    for file, path in paths.items():
        verify(file, path)
    return {role: _role_path(role, [paths[f] for f in files]) for role, files in components.items()}


def _role_path(role: str, paths: list[Path]) -> Path:
    """One file: that file; several (shards, a tokenizer folder): the folder that holds them all."""
    if len(paths) == 1:
        return paths[0]
    folders = {path.parent for path in paths}
    if len(folders) > 1:
        listing = ", ".join(sorted(map(str, folders)))
        raise ValueError(f"the files of '{role}' are cached under different revisions ({listing}); download them "
                         "again together")
    return folders.pop()


def cache_report(name: str, hub_cache: str | os.PathLike | None = None) -> list[tuple[HubFile, Path | None, bool]]:
    """(file, cached path or None, sha256 already verified) for every file of ``name``; no network, no hashing."""
    report = []
    for file in release(name).files:
        path = cached_path(file, hub_cache)
        report.append((file, path, path is not None and file.sha256 is not None and is_verified(file, path)))
    return report


# ------------------------------------------------------------------------------------------------------------------
# loading: pairs of VAR, CoDe, LlamaGen (c2i and t2i; the t2i text encoder is var.text's, from its own resolved
# folder) and Infinity (var.loading tells the family by the transformer's keys); single components of all but
# Infinity.
COMPONENT_FAMILIES = ("var", "code", "llamagen-c2i", "llamagen-t2i")
PAIR_FAMILIES = (*COMPONENT_FAMILIES, "infinity")


def _loadable(name: str, families: tuple[str, ...] = COMPONENT_FAMILIES) -> Release:
    entry = release(name)
    if entry.family not in families:
        raise ValueError(f"{name}: its files resolve (var.hub.resolve) but no {entry.family} loader is hooked up yet")
    return entry


def load_component(name: str, role: str, device: str = "cpu"):
    """One model of release ``name`` (``tokenizer``, ``transformer`` or ``refiner``), in eval mode on ``device``."""
    from var.checkpoints import load_official_var, load_official_vqvae
    from var.checkpoints_llamagen import load_llamagen, load_llamagen_vq

    entry = _loadable(name)
    path = resolve(name, roles=[role])[role]
    if entry.family.startswith("llamagen"):
        model = load_llamagen_vq(path) if role == "tokenizer" else load_llamagen(path)  # size: args, else file name
    elif role == "tokenizer":
        model = load_official_vqvae(path, patch_nums=entry.loader_args["patch_nums"])
    else:
        model = load_official_var(path)
    return model.to(device).eval()


def load_pair(name: str, device: str = "cpu"):
    """(tokenizer, transformer) of release ``name`` (CoDe: the drafter; its refiner is ``load_component(name,
    "refiner")``), every file resolved and checked before either model is built."""
    from var.loading import load_pair as load_files

    _loadable(name, PAIR_FAMILIES)
    paths = resolve(name, roles=["tokenizer", "transformer"])  # Infinity-8B: the folder of its shards
    return load_files(vae=paths["tokenizer"], var=paths["transformer"], device=device)
