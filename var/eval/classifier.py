"""A small digit classifier trained on the embedded digits: the offline judge of sample quality.

It measures class-consistency (does a sample of class c look like a c?) and, through its penultimate
features, a classifier-space FID that moves monotonically with quality on digits, where a randomly
initialised Inception network would not (spec_eval.md 4c).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from var.data.digits import DigitsDataset
from var.utils import atomic_write


class DigitClassifier(nn.Module):
    """Two conv blocks and two linears over (B, 3, S, S) images in [-1, 1]; ``features`` is 128-d.

    ``image_size`` is the side it was trained at (any side runs, but features are comparable at that one).
    """

    feature_dim = 128

    def __init__(self, num_classes: int = 10, image_size: int = 16):
        super().__init__()
        self.num_classes = num_classes
        self.image_size = image_size
        self.conv = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.AdaptiveAvgPool2d(4),
        )
        self.fc = nn.Linear(64 * 16, self.feature_dim)
        self.out = nn.Linear(self.feature_dim, num_classes)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate features (B, 128) of images in [-1, 1]."""
        return F.relu(self.fc(self.conv(images).flatten(1)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.out(self.features(images))


def train_digit_classifier(
    image_size: int = 16, epochs: int = 15, seed: int = 0, augment: bool = True
) -> DigitClassifier:
    """Train on the digits training split (a few seconds on a CPU); returns the model in eval mode.

    Augmentation (random shifts of up to one eighth of the side) makes it judge shape, not exact placement.
    """
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    data = DigitsDataset("train", image_size=image_size)
    model = DigitClassifier(image_size=image_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    steps_per_epoch = (len(data) + 63) // 64
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 3e-3, total_steps=epochs * steps_per_epoch)
    shift = max(1, image_size // 8)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(data), generator=generator)
        for start in range(0, len(data), 64):
            batch = order[start:start + 64]
            images, labels = data.images[batch], data.labels[batch]
            if augment:
                dx, dy = torch.randint(-shift, shift + 1, (2,), generator=generator).tolist()
                images = torch.roll(images, shifts=(dy, dx), dims=(2, 3))
            loss = F.cross_entropy(model(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    return model.eval()


@torch.no_grad()
def predict(classifier: nn.Module, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Predicted labels of images in [-1, 1] (B, 3, S, S), resized to the classifier's input if needed."""
    predictions = []
    for start in range(0, len(images), batch_size):
        predictions.append(classifier(images[start:start + batch_size].float()).argmax(dim=1))
    return torch.cat(predictions)


def class_consistency(classifier: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of images (in [-1, 1]) that the classifier assigns to their conditioning label."""
    return (predict(classifier, images).cpu() == labels.cpu()).float().mean().item()


def save_digit_classifier(model: DigitClassifier, path: str | os.PathLike) -> None:
    """Write the weights (safetensors, atomically) with the class count and training side as metadata."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    metadata = {"num_classes": str(model.num_classes), "image_size": str(model.image_size)}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def load_digit_classifier(path: str | os.PathLike) -> DigitClassifier:
    """Load a classifier written by :func:`save_digit_classifier`, in eval mode."""
    try:
        with safe_open(str(path), "pt") as handle:
            metadata = handle.metadata() or {}
    except Exception as error:  # a damaged file or not safetensors at all (a pickle is never unpickled here)
        raise ValueError(f"cannot read {path} as a safetensors file ({error})") from None
    if "image_size" not in metadata:
        raise ValueError(f"{path} is not a digit classifier written by save_digit_classifier")
    model = DigitClassifier(int(metadata["num_classes"]), int(metadata["image_size"]))
    model.load_state_dict(load_file(str(path)))
    return model.eval()
