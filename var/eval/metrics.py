"""Distribution metrics over extracted features: FID, Inception Score (OpenAI protocol), KID, precision/recall.

FID and IS are computed here, in float64, so that a reference given only as ``mu``/``sigma`` (OpenAI's
``VIRTUAL_*.npz``) works and so that IS follows the OpenAI evaluator (consecutive, unshuffled splits of
5000); KID and precision/recall are torch-fidelity's.  Every metric refuses too few samples with a clear
error instead of returning NaN.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric
from torch_fidelity.metric_prc import KEY_METRIC_PRECISION, KEY_METRIC_RECALL, prc_features_to_metric

from var.eval.fidelity import fidelity_kwargs, strict_fp32

IS_SPLIT_SIZE = 5000  # OpenAI evaluator: consecutive splits of 5000 samples
KID_SUBSET_SIZE = 1000
PR_NEIGHBOURHOOD = 3  # k of the k-NN manifold (Kynkäänniemi et al.), as in the OpenAI evaluator


def require_samples(count: int, minimum: int, metric: str) -> None:
    if count < minimum:
        raise ValueError(f"{metric} needs at least {minimum} samples, got {count}; generate more (--per-class)")


@dataclass
class FeatureStats:
    """Mean and covariance of features, in float64; ``count`` is None for statistics read from a foreign file."""

    mu: np.ndarray  # (D,)
    sigma: np.ndarray  # (D, D)
    count: int | None = None

    @classmethod
    def from_features(cls, features: torch.Tensor) -> FeatureStats:
        require_samples(len(features), 2, "FID")
        values = features.double().cpu().numpy()  # (N, D)
        return cls(values.mean(axis=0), np.cov(values, rowvar=False), len(values))

    def __post_init__(self) -> None:
        self.mu = np.asarray(self.mu, dtype=np.float64)
        self.sigma = np.atleast_2d(np.asarray(self.sigma, dtype=np.float64))
        if self.mu.ndim != 1 or self.sigma.shape != (len(self.mu), len(self.mu)):
            raise ValueError(
                f"FID statistics need mu (D,) and sigma (D, D), got {self.mu.shape} and {self.sigma.shape}"
            )


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix (negative round-off eigenvalues clipped)."""
    values, vectors = np.linalg.eigh(matrix)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def frechet_distance(a: FeatureStats, b: FeatureStats) -> float:
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^1/2), clamped at 0.

    tr((S_a S_b)^1/2) is computed as tr((S_a^1/2 S_b S_a^1/2)^1/2): the same number, but every matrix stays
    symmetric PSD, so there is no complex round-off to discard and no sqrtm fallback is needed.
    """
    if a.mu.shape != b.mu.shape:
        raise ValueError(
            f"FID statistics have different dimensions ({a.mu.shape[0]} vs {b.mu.shape[0]}): they come from "
            "different feature extractors or layers"
        )
    diff = a.mu - b.mu
    root_a = _psd_sqrt(a.sigma)
    middle = root_a @ b.sigma @ root_a
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum()
    fid = diff @ diff + np.trace(a.sigma) + np.trace(b.sigma) - 2 * trace_sqrt
    return max(float(fid), 0.0)


def inception_score(logits: torch.Tensor, split_size: int = IS_SPLIT_SIZE) -> tuple[float, float, int]:
    """(mean, std, number of splits) of exp(E[KL(p(y|x) || p(y))]) over consecutive, unshuffled splits.

    The OpenAI protocol: split i is samples [i * split_size, (i + 1) * split_size), the last one possibly
    shorter; with fewer than ``split_size`` samples it is a single split (biased low: not comparable with
    published 50k-sample numbers).
    """
    require_samples(len(logits), 2, "Inception Score")
    if not bool(torch.isfinite(logits).all()):
        raise ValueError("Inception Score: the classifier logits contain NaN or inf")
    log_probs = logits.double().log_softmax(dim=1)  # (N, classes)
    scores = []
    for part in log_probs.split(split_size):
        log_marginal = part.exp().mean(dim=0).log()  # log p(y) over the split
        kl = (part.exp() * (part - log_marginal)).sum(dim=1).mean()
        scores.append(kl.exp().item())
    return float(np.mean(scores)), float(np.std(scores)), len(scores)


def kernel_inception_distance(
    features: torch.Tensor, reference: torch.Tensor, subsets: int = 100, subset_size: int = KID_SUBSET_SIZE
) -> tuple[float, float]:
    """(mean, std) of the unbiased polynomial-kernel MMD^2 over random subsets (torch-fidelity's KID)."""
    size = min(subset_size, len(features), len(reference))
    require_samples(size, 2, "KID")
    result = kid_features_to_metric(
        features.cpu(), reference.cpu(), **fidelity_kwargs(False, kid_subsets=subsets, kid_subset_size=size)
    )
    return result[KEY_METRIC_KID_MEAN], result[KEY_METRIC_KID_STD]


def precision_recall(
    features: torch.Tensor, reference: torch.Tensor, device: torch.device | str = "cpu",
    neighbourhood: int = PR_NEIGHBOURHOOD,
) -> tuple[float, float]:
    """Improved precision (samples inside the reference manifold) and recall (the reverse), k-NN radii."""
    require_samples(min(len(features), len(reference)), neighbourhood + 1, "precision/recall")
    device = torch.device(device)
    # save_cpu_ram selects torch-fidelity's chunked path: it never holds an N x N distance matrix
    with strict_fp32():  # cdist runs as a matmul, which TF32 would round
        result = prc_features_to_metric(
            features.to(device), reference.to(device),
            **fidelity_kwargs(device.type == "cuda", prc_neighborhood=neighbourhood, save_cpu_ram=True),
        )
    return result[KEY_METRIC_PRECISION], result[KEY_METRIC_RECALL]


def class_consistency_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of samples whose predicted class is their conditioning label."""
    if len(logits) != len(labels):
        raise ValueError(f"{len(logits)} predictions for {len(labels)} labels")
    return (logits.argmax(dim=1).cpu() == labels.cpu()).float().mean().item()


def within_class_spread(features: torch.Tensor, labels: torch.Tensor) -> float:
    """Root mean squared distance of features to their class mean, averaged over classes: how varied the
    samples of one class are (compare it with the real data's; collapsed samples give ~0)."""
    spreads = []
    for label in labels.unique():
        members = features[labels == label].double()
        spreads.append((members - members.mean(dim=0)).pow(2).sum(dim=1).mean().sqrt())
    return torch.stack(spreads).mean().item()
