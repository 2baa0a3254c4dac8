"""The digit classifier as a torch-fidelity feature extractor ("digits-classifier"): offline FID/KID/IS/P-R.

Its 128-d penultimate features replace Inception's pool3 for FID, KID and precision/recall, and its logits
replace Inception's for IS and give class-consistency (argmax == conditioning label).  Unlike a randomly
initialised Inception, these move monotonically with image quality on digits (spec_eval.md 4c).

Without an explicit weights file the classifier is trained once (seeded, a few seconds) and cached under
:func:`~var.utils.cache_dir`, so every run uses the same judge.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch_fidelity.feature_extractor_base import FeatureExtractorBase

from var.data.digits import UPSAMPLING
from var.eval.classifier import DigitClassifier, load_digit_classifier, save_digit_classifier, train_digit_classifier
from var.eval.fidelity import ExtractorWeights, check_uint8_images, register_extractor
from var.utils import cache_dir, sha256_of

DIGITS_EXTRACTOR = "digits-classifier"
FEATURES = str(DigitClassifier.feature_dim)
LOGITS = "logits"
TRAIN_IMAGE_SIZE, TRAIN_EPOCHS, TRAIN_SEED = 16, 15, 0


def resolve_digit_classifier(path: str | None = None) -> ExtractorWeights:
    """The classifier weights to judge with: ``path``, else the cached one (trained on first use)."""
    if path is not None:
        if not Path(path).is_file():
            raise FileNotFoundError(f"digit classifier weights {path} not found")
    else:
        name = f"digit_classifier-{TRAIN_IMAGE_SIZE}px-{UPSAMPLING}-e{TRAIN_EPOCHS}-s{TRAIN_SEED}.safetensors"
        path = cache_dir() / name
        if not path.is_file():
            print(f"training the digit classifier once (cached at {path})", file=sys.stderr)
            save_digit_classifier(train_digit_classifier(TRAIN_IMAGE_SIZE, TRAIN_EPOCHS, TRAIN_SEED), path)
    return ExtractorWeights(str(path), sha256_of(path))


class DigitClassifierExtractor(FeatureExtractorBase):
    """uint8 (B, 3, H, W) images -> the classifier's features ("128") and/or logits ("logits").

    Images are scaled to [-1, 1] and resized (bilinear, antialiased) to the side the classifier was trained at.
    """

    label_logits = LOGITS  # this layer's argmax is the dataset label: class-consistency is defined

    def __init__(self, name: str, features_list: list[str], feature_extractor_weights_path: str | None = None,
                 **kwargs):
        super().__init__(name, features_list)
        self.classifier = load_digit_classifier(resolve_digit_classifier(feature_extractor_weights_path).path)

    @staticmethod
    def get_provided_features_list() -> tuple[str, ...]:
        return FEATURES, LOGITS

    @staticmethod
    def get_default_feature_layer_for_metric(metric: str) -> str:
        return LOGITS if metric == "isc" else FEATURES

    @staticmethod
    def can_be_compiled() -> bool:
        return False

    @staticmethod
    def get_dummy_input_for_compile() -> torch.Tensor:
        return torch.zeros(1, 3, TRAIN_IMAGE_SIZE, TRAIN_IMAGE_SIZE, dtype=torch.uint8)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        check_uint8_images(images)
        side = self.classifier.image_size
        pixels = images.float() / 127.5 - 1
        if pixels.shape[-2:] != (side, side):
            pixels = F.interpolate(pixels, size=(side, side), mode="bilinear", antialias=True, align_corners=False)
        features = self.classifier.features(pixels)
        outputs = {FEATURES: features, LOGITS: self.classifier.out(features)}
        return tuple(outputs[name] for name in self.features_list)


register_extractor(DIGITS_EXTRACTOR, DigitClassifierExtractor, resolve_digit_classifier)
