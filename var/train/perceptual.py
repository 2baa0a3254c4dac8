"""Optional tokenizer losses that need outside help: a VGG16 perceptual distance and a patch-GAN critic.

The perceptual distance is LPIPS-style (unit-normalised VGG16 features at five depths, squared differences,
spatial mean) with unit channel weights, because LPIPS' learned heads are not available offline.  Its VGG16
ImageNet weights come from the torch hub cache; when they are absent :func:`load_perceptual_loss` warns and
returns None, and training goes on without the term.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
VGG_FEATURE_LAYERS = (3, 8, 15, 22, 29)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3


def vgg16_weights_path() -> Path:
    """Where torchvision caches the VGG16 ImageNet weights (``torch.hub.get_dir()/checkpoints``)."""
    from torchvision.models import VGG16_Weights

    return Path(torch.hub.get_dir()) / "checkpoints" / Path(VGG16_Weights.IMAGENET1K_V1.url).name


class PerceptualLoss(nn.Module):
    """Mean LPIPS-style distance between image batches in [-1, 1] (frozen VGG16)."""

    def __init__(self, state_dict: dict[str, torch.Tensor]):
        super().__init__()
        from torchvision.models import vgg16

        features = vgg16().features
        features.load_state_dict({k.removeprefix("features."): v for k, v in state_dict.items()
                                  if k.startswith("features.")})
        self.features = features[: VGG_FEATURE_LAYERS[-1] + 1].eval().requires_grad_(False)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        both = torch.cat((images, targets)).add(1).mul(0.5).sub(self.mean).div(self.std)
        distance = both.new_zeros(())
        for index, layer in enumerate(self.features):
            both = layer(both)
            if index in VGG_FEATURE_LAYERS:
                normed = F.normalize(both, dim=1)
                first, second = normed.chunk(2)
                distance = distance + (first - second).square().sum(dim=1).mean()
        return distance


def load_perceptual_loss() -> PerceptualLoss | None:
    """The perceptual loss, or None with a warning when the VGG16 weights are not available offline."""
    path = vgg16_weights_path()
    if not path.is_file():
        warnings.warn(
            f"perceptual loss disabled: VGG16 ImageNet weights not found at {path} (no download offline); "
            "copy vgg16-397923af.pth there to enable it, or set tokenizer.loss.perceptual_weight=0",
            stacklevel=2,
        )
        return None
    return PerceptualLoss(torch.load(path, map_location="cpu", weights_only=True))


class PatchDiscriminator(nn.Module):
    """PatchGAN critic: strided 4x4 convolutions, one real/fake score per overlapping patch (no weights needed)."""

    def __init__(self, image_size: int, channels: int = 64, max_layers: int = 3):
        super().__init__()
        num_layers = max(1, min(max_layers, image_size.bit_length() - 4))  # keep >= 2x2 patches at 16 px
        layers: list[nn.Module] = [nn.Conv2d(3, channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        width = channels
        for _ in range(1, num_layers):
            layers += [nn.Conv2d(width, width * 2, 4, stride=2, padding=1), nn.GroupNorm(8, width * 2),
                       nn.LeakyReLU(0.2)]
            width *= 2
        layers.append(nn.Conv2d(width, 1, 3, stride=1, padding=1))
        self.net = nn.Sequential(*layers)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)


def hinge_discriminator_loss(real_scores: torch.Tensor, fake_scores: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1 - real_scores).mean() + F.relu(1 + fake_scores).mean())
