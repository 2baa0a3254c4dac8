"""One evaluation: a feature extractor, an optional reference and the metrics to compute over a sample set.

:class:`Evaluator` checks everything that can fail cheaply (extractor name, weights file and hash, reference
source and format, metric names) when it is built, so a job fails *before* sampling, not after.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
from accelerate import PartialState
from accelerate.utils import broadcast_object_list
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

import var.eval.digit_features  # noqa: F401  (registers the "digits-classifier" extractor)
from var.eval.fidelity import FeatureExtractor, resolve_weights
from var.eval.images import Samples
from var.eval.metrics import (
    IS_SPLIT_SIZE,
    FeatureStats,
    class_consistency_from_logits,
    frechet_distance,
    inception_score,
    kernel_inception_distance,
    precision_recall,
)
from var.eval.reference import Reference, ReferenceSource, load_reference, save_stats

METRICS = ("fid", "is", "kid", "pr")
REFERENCE_METRICS = ("fid", "kid", "pr")


def parse_metrics(names: str | Sequence[str]) -> tuple[str, ...]:
    """'fid,is' -> ('fid', 'is'), rejecting unknown names."""
    if isinstance(names, str):
        names = [name.strip() for name in names.split(",") if name.strip()]
    unknown = sorted(set(names) - set(METRICS))
    if unknown:
        raise ValueError(f"unknown metric(s) {', '.join(unknown)}; choose from {', '.join(METRICS)}")
    return tuple(name for name in METRICS if name in names)


class Evaluator:
    """Computes metrics of sample sets against one reference with one feature extractor.

    Args:
        extractor: a registered torch-fidelity extractor name (inception-v3-compat, digits-classifier, ...).
        reference: what ``--ref`` names (None: only reference-free metrics, IS and class-consistency).
        metrics: subset of ("fid", "is", "kid", "pr"); the reference ones need ``reference``.
        weights_path: the extractor's weights file (None: its default location).
        allow_weights_mismatch: accept an Inception file whose sha256 is not the FID network's (test weights).
        device: where features are extracted.
        batch_size: extraction batch size.
        ref_resize: centre-crop/resize side for a folder reference of mixed sizes.
        use_cache: cache reference features (keyed by content, extractor and weights hash).
    """

    def __init__(
        self,
        extractor: str,
        reference: str | None,
        metrics: Sequence[str] = METRICS,
        weights_path: str | None = None,
        allow_weights_mismatch: bool = False,
        device: torch.device | str = "cpu",
        batch_size: int = 100,
        ref_resize: int | None = None,
        use_cache: bool = True,
        progress: bool = True,
    ):
        self.metrics = parse_metrics(metrics)
        if reference is None and any(m in REFERENCE_METRICS for m in self.metrics):
            needs = ", ".join(m for m in self.metrics if m in REFERENCE_METRICS)
            raise ValueError(f"{needs} need a reference: pass --ref (a stats .npz, images .npz, folder or dataset)")
        self.weights = resolve_weights(extractor, weights_path, allow_weights_mismatch)
        self.source = ReferenceSource.parse(reference) if reference is not None else None
        extractor_cls = FEATURE_EXTRACTORS_REGISTRY[extractor]
        self.fid_layer = extractor_cls.get_default_feature_layer_for_metric("fid")
        self.is_layer = extractor_cls.get_default_feature_layer_for_metric("isc")
        self.label_layer = getattr(extractor_cls, "label_logits", None)  # its argmax is the class label
        layers = [self.fid_layer, self.is_layer] + ([self.label_layer] if self.label_layer else [])
        self.extractor = FeatureExtractor(extractor, layers, self.weights, torch.device(device))
        self.batch_size, self.ref_resize, self.use_cache, self.progress = batch_size, ref_resize, use_cache, progress
        self._references: dict[int, Reference] = {}

    def describe(self) -> dict:
        """Every setting that determines the numbers (for the JSON report)."""
        return {
            "extractor": self.extractor.name,
            "weights_path": self.weights.path,
            "weights_sha256": self.weights.sha256,
            "layers": {"fid_kid_pr": self.fid_layer, "is": self.is_layer, "class_labels": self.label_layer},
            "metrics": list(self.metrics),
            "is_protocol": f"OpenAI: consecutive unshuffled splits of {IS_SPLIT_SIZE}",
            "pr_neighbourhood": 3,
            "reference": self.source.spec if self.source else None,
            "reference_loaded": [reference.meta for reference in self._references.values()],
            "ref_resize": self.ref_resize,
            "device": str(self.extractor.device),
        }

    def reference(self, image_size: int, state: PartialState | None = None) -> Reference | None:
        """The reference, loaded (and for image references, extracted or read from cache) once per image size.

        Under several processes every one calls this (the extraction is sharded); the others get None.
        """
        if image_size not in self._references:
            need_features = "kid" in self.metrics or "pr" in self.metrics
            self._references[image_size] = load_reference(
                self.source, self.extractor, self.fid_layer, need_features,
                image_size=image_size, resize=self.ref_resize, batch_size=self.batch_size,
                use_cache=self.use_cache, progress=self.progress, state=state,
            )
        return self._references[image_size]

    def evaluate(self, samples: Samples | None, save_stats_to: str | None = None) -> dict | None:
        """Metrics of ``samples`` (and their FID statistics written to ``save_stats_to``, if given).

        Under ``accelerate launch`` every process calls this, the main process with the samples and the others
        with None: each extracts its share of the features (and of the reference's), the main process gets the
        metrics, the others None.
        """
        state = PartialState()
        sharded = state if state.num_processes > 1 else None
        image_size = [samples.images.shape[-1] if samples is not None else None]
        if sharded:
            broadcast_object_list(image_size)
        uses_reference = self.source is not None and any(m in REFERENCE_METRICS for m in self.metrics)
        start = time.perf_counter()
        features = self.extractor.extract(samples.images if samples is not None else None, self.batch_size,
                                          self.progress, desc="sample features", state=sharded)
        seconds = time.perf_counter() - start
        if not state.is_main_process:
            if uses_reference:
                self.reference(image_size[0], sharded)
            return None
        results: dict = {"num_samples": len(samples.images), "extraction_s": round(seconds, 3),
                         "extraction_images_per_s": round(len(samples.images) / max(seconds, 1e-9), 2),
                         "extraction_shares": self.extractor.shares}
        notes = []
        stats = None
        if "fid" in self.metrics or save_stats_to:
            stats = FeatureStats.from_features(features[self.fid_layer])
        if save_stats_to:
            save_stats(save_stats_to, stats, self.extractor, self.fid_layer)
        if uses_reference:
            reference = self.reference(image_size[0], sharded)
            if "fid" in self.metrics:
                results["fid"] = frechet_distance(stats, reference.stats)
            if reference.features is None and ("kid" in self.metrics or "pr" in self.metrics):
                notes.append("KID and precision/recall skipped: the reference holds statistics only, no images")
            elif reference.features is not None:
                if "kid" in self.metrics:
                    results["kid"], results["kid_std"] = kernel_inception_distance(
                        features[self.fid_layer], reference.features
                    )
                if "pr" in self.metrics:
                    results["precision"], results["recall"] = precision_recall(
                        features[self.fid_layer], reference.features, self.extractor.device
                    )
        if "is" in self.metrics:
            results["is"], results["is_std"], results["is_splits"] = inception_score(features[self.is_layer])
            if len(samples.images) < IS_SPLIT_SIZE:
                notes.append(f"IS over fewer than {IS_SPLIT_SIZE} samples is biased low: not comparable with "
                             "published 50k-sample numbers")
        if self.label_layer and samples.labels is not None:
            results["class_consistency"] = class_consistency_from_logits(features[self.label_layer], samples.labels)
        if notes:
            results["notes"] = notes
        return results
