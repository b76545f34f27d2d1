"""A small image classifier trained here on real data, used to judge generated data.

No pretrained weights can be downloaded, so quality is measured with a network trained
on the real training split: its accuracy on generated images (per class) and its
features (for MMD) stand in for Inception-based scores.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from monai.networks.layers import GaussianFilter
from monai.networks.nets import Classifier
from torch import nn

from medsynth.evaluate.augmentation import classic_augmentation
from medsynth.seeds import seeded
from medsynth.training import fit_minibatches

Augmentation = Literal["judge", "classic", "none"]


@dataclass
class ClassifierResult:
    """Predicted classes ``(N,)`` and penultimate features ``(N, F)``."""

    predictions: torch.Tensor
    features: torch.Tensor


class ImageClassifier(nn.Module):
    """MONAI ``Classifier`` (strided residual conv stack + linear head), 2D or 3D."""

    def __init__(self, in_shape: tuple[int, ...], num_classes: int, channels: tuple[int, ...] = (16, 32, 64, 128)):
        super().__init__()
        self.net = Classifier(in_shape=in_shape, classes=num_classes, channels=channels,
                              strides=(2,) * len(channels), num_res_units=1, dropout=0.1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Globally pooled last conv features ``(B, channels[-1])``: compact and shift-tolerant."""
        return self.net.net(x).flatten(2).mean(dim=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def augment_batch(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Flips, quarter turns, Gaussian blur (MONAI ``GaussianFilter``) and noise on a whole batch.

    Batched rather than per image: per-image MONAI transforms cost more than the training step.
    """
    x = images.flip(2) if torch.rand((), generator=generator) < 0.5 else images
    x = torch.rot90(x, int(torch.randint(0, 4, (), generator=generator)), dims=(2, 3))
    sigma = float(torch.empty(()).uniform_(0.3, 1.5, generator=generator))
    blurred = GaussianFilter(spatial_dims=images.ndim - 2, sigma=sigma)(x)
    pick = (torch.rand(len(x), generator=generator) < 0.5).view(-1, *([1] * (x.ndim - 1)))
    x = torch.where(pick, blurred, x)
    noisy = (torch.rand(len(x), generator=generator) < 0.3).view(-1, *([1] * (x.ndim - 1)))
    return x + noisy * 0.03 * torch.randn(x.shape, generator=generator)


def train_classifier(
    images: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    epochs: int = 15,
    batch_size: int = 32,
    lr: float = 2e-3,
    seed: int = 0,
    augmentation: Augmentation = "judge",
) -> ImageClassifier:
    """Train on images ``(N, C, *spatial)`` in [0, 1] with class indices ``(N,)``.

    ``augmentation``: ``"judge"`` (flips, 90-degree turns, blur and noise, so that a classifier that
    judges generated images looks at structure, not at the sharpness that separates real from
    generated), ``"classic"`` (nnU-Net's augmentation, :func:`~medsynth.evaluate.augmentation.classic_augmentation`:
    the free baseline of the utility test) or ``"none"``. Everything random comes from ``seed``; the global torch RNG
    is left as it was.
    """
    generator = torch.Generator().manual_seed(seed)
    with seeded(seed):  # the weights and the dropout draws
        model = ImageClassifier(tuple(images.shape[1:]), num_classes)
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
        steps = epochs * max(1, -(-len(images) // batch_size))
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)

        classic = classic_augmentation(images.ndim - 2, with_label=False, seed=seed, noise_std=0.03) if augmentation == "classic" else None

        def batch_of(index: torch.Tensor) -> torch.Tensor:
            x = images[index].float()
            if augmentation == "judge":
                return augment_batch(x, generator)
            if classic is not None:
                return torch.stack([torch.as_tensor(classic({"image": image})["image"]) for image in x]).float()
            return x

        def loss_of(index: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(model(batch_of(index)), labels[index])

        return fit_minibatches(model, loss_of, len(images), epochs=epochs, batch_size=batch_size, optimizer=optimizer,
                               scheduler=scheduler, generator=generator)


@torch.no_grad()
def classify(model: ImageClassifier, images: torch.Tensor, batch_size: int = 64) -> ClassifierResult:
    """Predictions and features for images ``(N, C, *spatial)``."""
    predictions, features = [], []
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size].float()
        predictions.append(model(batch).argmax(dim=1))
        features.append(model.features(batch))
    return ClassifierResult(torch.cat(predictions), torch.cat(features))


def accuracy_by_class(predictions: torch.Tensor, labels: torch.Tensor, class_names: list[str]) -> dict[str, float]:
    """Overall accuracy (key ``"all"``) and per class, for classes present in ``labels``."""
    result = {"all": float((predictions == labels).float().mean())}
    for index, name in enumerate(class_names):
        mask = labels == index
        if mask.any():
            result[name] = float((predictions[mask] == index).float().mean())
    return result
