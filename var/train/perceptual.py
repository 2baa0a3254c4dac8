"""Optional tokenizer losses that need outside help: LPIPS (VGG16) perceptual distance and a patch-GAN critic.

LPIPS (Zhang et al. 2018, VGG variant) compares unit-normalised VGG16 features at five depths and weights
the squared differences per channel with small learned "linear heads".  Both parts are weights that cannot
be downloaded here:

* VGG16 ImageNet weights, from the torch hub cache (``vgg16-397923af.pth``); without them
  :func:`load_perceptual_loss` warns and returns None, and training goes on without the term;
* the LPIPS v0.1 heads, from the installed ``lpips`` package (they ship inside it) or
  ``lpips_vgg_v0.1.pth`` in the hub cache; without them every channel weighs 1 (an LPIPS-style distance,
  not LPIPS), with a warning.
"""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

LPIPS_SHIFT = (-0.030, -0.088, -0.188)  # LPIPS' input scaling of [-1, 1] images (ImageNet statistics)
LPIPS_SCALE = (0.458, 0.448, 0.450)
VGG_FEATURE_LAYERS = (3, 8, 15, 22, 29)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
VGG_FEATURE_CHANNELS = (64, 128, 256, 512, 512)
LPIPS_HEADS_FILE = "lpips_vgg_v0.1.pth"


def vgg16_weights_path() -> Path:
    """Where torchvision caches the VGG16 ImageNet weights (``torch.hub.get_dir()/checkpoints``)."""
    from torchvision.models import VGG16_Weights

    return Path(torch.hub.get_dir()) / "checkpoints" / Path(VGG16_Weights.IMAGENET1K_V1.url).name


def lpips_heads_path() -> Path | None:
    """The LPIPS v0.1 VGG heads file: the ``lpips`` package's own copy, else the hub cache; None if neither."""
    spec = importlib.util.find_spec("lpips")
    candidates = [Path(torch.hub.get_dir()) / "checkpoints" / LPIPS_HEADS_FILE]
    if spec is not None and spec.origin is not None:
        candidates.insert(0, Path(spec.origin).parent / "weights" / "v0.1" / "vgg.pth")
    return next((path for path in candidates if path.is_file()), None)


def read_lpips_heads(path: str | Path) -> list[torch.Tensor]:
    """Per-channel weights (C,) of the five heads from an LPIPS ``vgg.pth`` (keys ``lin{i}.model.1.weight``)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    heads = []
    for index, channels in enumerate(VGG_FEATURE_CHANNELS):
        weight = state.get(f"lin{index}.model.1.weight")
        if weight is None or weight.numel() != channels:
            raise ValueError(f"{path} is not an LPIPS VGG heads file: lin{index}.model.1.weight missing or not "
                             f"{channels} channels")
        heads.append(weight.reshape(channels).float())
    return heads


class PerceptualLoss(nn.Module):
    """Mean LPIPS distance between image batches in [-1, 1] (frozen VGG16; unit heads when none are given)."""

    def __init__(self, vgg_state_dict: dict[str, torch.Tensor], heads: list[torch.Tensor] | None = None):
        super().__init__()
        from torchvision.models import vgg16

        features = vgg16().features
        features.load_state_dict({k.removeprefix("features."): v for k, v in vgg_state_dict.items()
                                  if k.startswith("features.")})
        self.features = features[: VGG_FEATURE_LAYERS[-1] + 1].eval().requires_grad_(False)
        self.register_buffer("shift", torch.tensor(LPIPS_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(LPIPS_SCALE).view(1, 3, 1, 1), persistent=False)
        self.learned_heads = heads is not None
        heads = heads or [torch.ones(channels) for channels in VGG_FEATURE_CHANNELS]
        self.register_buffer("heads", torch.cat(heads), persistent=False)  # the five (C,) heads, concatenated

    def forward(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        both = (torch.cat((images, targets)) - self.shift) / self.scale
        heads = self.heads.split(VGG_FEATURE_CHANNELS)
        distance = both.new_zeros(())
        for index, layer in enumerate(self.features):
            both = layer(both)
            if index in VGG_FEATURE_LAYERS:
                normed = both / (both.square().sum(dim=1, keepdim=True).sqrt() + 1e-10)
                first, second = normed.chunk(2)
                weights = heads[VGG_FEATURE_LAYERS.index(index)].view(1, -1, 1, 1)
                distance = distance + ((first - second).square() * weights).sum(dim=1).mean()
        return distance


def load_perceptual_loss() -> PerceptualLoss | None:
    """LPIPS (VGG16), or None with a warning when the VGG16 weights are not available offline."""
    path = vgg16_weights_path()
    if not path.is_file():
        warnings.warn(
            f"perceptual loss disabled: VGG16 ImageNet weights not found at {path} (no download offline); "
            "copy vgg16-397923af.pth there to enable it, or set tokenizer.loss.perceptual_weight=0",
            stacklevel=2,
        )
        return None
    heads_path = lpips_heads_path()
    if heads_path is None:
        warnings.warn(
            "perceptual loss without LPIPS' learned heads (every VGG channel weighs 1): pip install lpips, or "
            f"copy its weights/v0.1/vgg.pth to {path.parent / LPIPS_HEADS_FILE}",
            stacklevel=2,
        )
    heads = read_lpips_heads(heads_path) if heads_path is not None else None
    return PerceptualLoss(torch.load(path, map_location="cpu", weights_only=True), heads)


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
