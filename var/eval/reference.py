"""Reference sets for FID/KID/precision-recall, checked before sampling and cached after their first extraction.

A reference is one of

* a statistics ``.npz`` with ``mu``/``sigma`` (OpenAI's ``VIRTUAL_*.npz`` as is: its ``arr_0`` reference
  images, when present, give KID and precision/recall);
* an images ``.npz`` in the samples format (``arr_0`` uint8 NHWC);
* a folder of real images;
* an embedded dataset by name (``digits``, ``digits-test``, ``shapes``, ...), rendered at the samples' size;
* a training config (``configs/*.yaml``, optionally ``:train``/``:val``, default train): the images of its
  ``data:`` section, at the samples' size, with the deterministic (centre-crop, no flip) transform.

Features of reference images are cached in :func:`~var.utils.cache_dir` under a key made of the
source's content fingerprint, the extractor name, its weights' sha256, the layer and the image size, so a
different weights file (say random test weights) can never be served stale statistics.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import PartialState
from accelerate.utils import broadcast_object_list
from torch.utils.data import Dataset

from var.config import ConfigError, load_experiment
from var.data import DigitsDataset, ShapesDataset
from var.data.digits import UPSAMPLING as DIGITS_UPSAMPLING
from var.data.imagefolder import ImageFolderDataset, official_transform
from var.data.registry import SPLITS, DataConfig, build_dataset
from var.eval.fidelity import FeatureExtractor
from var.eval.images import ImageFolder, load_npz_samples
from var.eval.metrics import FeatureStats
from var.utils import atomic_savez, atomic_write, cache_dir, open_npz, sha256_of, to_uint8

SHAPES_REFERENCE_SIZE = 2000
DATASETS = {
    "digits": lambda size: DigitsDataset("train", size),
    "digits-train": lambda size: DigitsDataset("train", size),
    "digits-test": lambda size: DigitsDataset("test", size),
    "digits-all": lambda size: DigitsDataset("all", size),
    "shapes": lambda size: ShapesDataset(SHAPES_REFERENCE_SIZE, size, seed=1),  # seed 1: not the training draw
}


class Uint8Images(Dataset):
    """A dataset of (image in [-1, 1], label) seen as uint8 (3, H, W) images, as extractors want them."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> torch.Tensor:
        image, _ = self.dataset[index]
        return to_uint8(image.unsqueeze(0).add(1).mul(0.5))[0]


@dataclass
class Reference:
    """FID statistics of the reference, its FID-layer features when it has images (for KID, P/R), and provenance."""

    stats: FeatureStats
    features: torch.Tensor | None
    meta: dict = field(default_factory=dict)


CONFIG_SUFFIXES = (".yaml", ".yml")


def _config_data(spec: str) -> tuple[DataConfig, str]:
    """The ``data:`` section and split of a ``CONFIG.yaml[:split]`` reference (the whole config is validated)."""
    path, _, split = spec.rpartition(":") if not spec.endswith(CONFIG_SUFFIXES) else (spec, "", "")
    split = split or "train"
    if split not in SPLITS:
        raise ValueError(f"reference {spec}: unknown split '{split}'; use {path}:{' or :'.join(SPLITS)}")
    try:
        data = load_experiment(path).data
    except ConfigError as error:
        raise ValueError(f"reference {spec}: {error}") from None
    if data.name == "imagefolder":
        folder = Path(data.root or "") / split
        if not data.root or not folder.is_dir():
            raise FileNotFoundError(
                f"reference {spec}: data.root/{split} ({folder}) is not a folder; set data.root in the config"
            )
    return data, split


def _is_config(spec: str) -> bool:
    return spec.endswith(CONFIG_SUFFIXES) or spec.rpartition(":")[0].endswith(CONFIG_SUFFIXES)


def _folder_listing(root: str | os.PathLike, paths) -> str:
    """A hash of file names, sizes and modification times: changes whenever the folder's images do."""
    listing = hashlib.sha256()
    for path in paths:
        stat = path.stat()
        listing.update(f"{path.relative_to(root)}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return listing.hexdigest()


@dataclass
class ReferenceSource:
    """What ``--ref`` names, validated (exists, right format) without reading any pixels."""

    spec: str
    kind: str  # "stats" | "images" | "folder" | "dataset" | "config"
    has_images: bool
    config: tuple[DataConfig, str] | None = None  # a config reference's data section and split

    @classmethod
    def parse(cls, spec: str) -> ReferenceSource:
        path = Path(spec)
        if spec in DATASETS:
            return cls(spec, "dataset", True)
        if _is_config(spec):
            return cls(spec, "config", True, _config_data(spec))
        if path.is_dir():
            return cls(spec, "folder", True)
        if path.suffix == ".npz":
            if not path.is_file():
                raise FileNotFoundError(f"reference {path} not found")
            with open_npz(path) as data:
                keys = set(data.files)
            if {"mu", "sigma"} <= keys:
                return cls(spec, "stats", "arr_0" in keys)
            if "arr_0" in keys:
                return cls(spec, "images", True)
            raise ValueError(f"reference {path} has neither mu/sigma statistics nor an arr_0 image array")
        if not path.exists():
            raise FileNotFoundError(
                f"reference '{spec}' is not a file, a folder, a config (.yaml) or a dataset name "
                f"({', '.join(DATASETS)})"
            )
        raise ValueError(
            f"reference {spec}: expected a .npz (mu/sigma or arr_0), a folder of images, a config (.yaml) "
            "or a dataset name"
        )

    def fingerprint(self, image_size: int | None, resize: int | None) -> str:
        """Identity of the reference pixels: file content hash, folder listing, or dataset settings and size."""
        if self.kind == "dataset":  # digits: the upsampling is part of the pixels
            return f"{self.spec}@{image_size}" + (f"/{DIGITS_UPSAMPLING}" if self.spec.startswith("digits") else "")
        if self.kind == "config":
            data, split = self.config
            settings = {**vars(data), "num_workers": None, "hflip": None, "image_size": image_size, "split": split}
            if data.name == "imagefolder":
                settings["root"] = _folder_listing(data.root, (p for p, _ in self._config_dataset(image_size).samples))
            return "config:" + json.dumps(settings, sort_keys=True)
        if self.kind == "folder":
            return f"folder:{_folder_listing(self.spec, ImageFolder(self.spec).paths)}@{resize}"
        return f"npz:{sha256_of(self.spec)}"

    def _config_dataset(self, image_size: int) -> Dataset:
        data, split = self.config
        if data.name == "imagefolder":  # centre crops, no flips, on either split: reference pixels must not vary
            return ImageFolderDataset(data.root, split, transform=official_transform(image_size, train=False))
        return build_dataset(DataConfig(**{**vars(data), "image_size": image_size}), split)

    def images(self, image_size: int | None, resize: int | None) -> torch.Tensor | Dataset:
        if self.kind in ("dataset", "config"):
            if image_size is None:
                raise ValueError(f"reference dataset '{self.spec}' needs the samples' image size")
            if self.kind == "config":
                return Uint8Images(self._config_dataset(image_size))
            return Uint8Images(DATASETS[self.spec](image_size))
        if self.kind == "folder":
            return ImageFolder(self.spec, resize)
        return load_npz_samples(self.spec).images


def _read_stats(path: str, extractor: FeatureExtractor) -> FeatureStats:
    """mu/sigma of a statistics npz; ours also name their extractor and weights, which must match."""
    with open_npz(path) as data:
        for key, expected in (("extractor", extractor.name), ("weights_sha256", extractor.weights.sha256)):
            if key in data.files and expected is not None and str(data[key]) != expected:
                raise ValueError(
                    f"reference statistics {path} were computed with {key} {str(data[key])[:16]}, not "
                    f"{expected[:16]}: recompute them with the same feature extractor and weights"
                )
        count = int(data["count"]) if "count" in data.files else None
        return FeatureStats(data["mu"], data["sigma"], count)


def save_stats(path: str | os.PathLike, stats: FeatureStats, extractor: FeatureExtractor, layer: str) -> None:
    """Write mu/sigma (usable as ``--ref``) tagged with the extractor, its weights' sha256, the layer and N."""
    arrays = dict(mu=stats.mu, sigma=stats.sigma, count=stats.count or 0, extractor=extractor.name,
                  weights_sha256=extractor.weights.sha256 or "", layer=layer)
    atomic_savez(path, **arrays)


def reference_features(
    source: ReferenceSource,
    extractor: FeatureExtractor,
    layer: str,
    image_size: int | None = None,
    resize: int | None = None,
    batch_size: int = 100,
    use_cache: bool = True,
    progress: bool = True,
    state: PartialState | None = None,
) -> tuple[torch.Tensor | None, dict]:
    """FID-layer features of the reference images, extracted once and then read from the cache.

    Under several processes (``state``) every process takes part in the extraction (sharded, see
    :meth:`FeatureExtractor.extract`) and only the main process reads or writes the cache and gets the features
    (the others get None).
    """
    key_fields = {
        "source": source.fingerprint(image_size, resize),
        "extractor": extractor.name,
        "weights_sha256": extractor.weights.sha256,
        "layer": layer,
        "image_size": image_size if source.kind in ("dataset", "config") else None,
    }
    key = hashlib.sha256(json.dumps(key_fields, sort_keys=True).encode()).hexdigest()[:20]
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(source.spec).stem)[:40]
    cache_path = cache_dir() / "reference" / f"{slug}-{extractor.name}-{key}.pt"
    meta = {"cache_key": key_fields, "cache_path": str(cache_path) if use_cache else None}
    main = state is None or state.is_main_process
    cached = [use_cache and cache_path.is_file()]
    if state is not None:
        broadcast_object_list(cached)  # the main process's answer: all processes skip or all extract
    if cached[0]:
        return (torch.load(cache_path, weights_only=True) if main else None), {**meta, "cached": True}
    tensor_source = source.kind in ("stats", "images")  # read by the main process, which scatters the batches
    images = source.images(image_size, resize) if main or not tensor_source else None
    features = extractor.extract(images, batch_size, progress, desc="reference features", state=state)
    if not main:
        return None, meta
    features = features[layer]
    if use_cache:
        atomic_write(cache_path, lambda tmp: torch.save(features, tmp))
    return features, {**meta, "cached": False, "extraction_shares": extractor.shares}


def load_reference(
    source: ReferenceSource,
    extractor: FeatureExtractor,
    layer: str,
    need_features: bool,
    image_size: int | None = None,
    resize: int | None = None,
    batch_size: int = 100,
    use_cache: bool = True,
    progress: bool = True,
    state: PartialState | None = None,
) -> Reference | None:
    """Statistics (and, when ``need_features`` and the reference has images, features) of a reference.

    Under several processes (``state``) all of them must call this; the main process gets the reference, the
    others (which only help extract) None.
    """
    meta = {"spec": source.spec, "kind": source.kind}
    features = None
    if source.kind != "stats" or (need_features and source.has_images):
        features, cache_meta = reference_features(
            source, extractor, layer, image_size, resize, batch_size, use_cache, progress, state
        )
        meta.update(cache_meta, num_images=len(features) if features is not None else None)
    if state is not None and not state.is_main_process:
        return None
    if source.kind == "stats":
        stats = _read_stats(source.spec, extractor)  # FID uses the file's mu/sigma, as the OpenAI evaluator does
    else:
        stats = FeatureStats.from_features(features)
    meta["stats_count"] = stats.count
    return Reference(stats, features, meta)
