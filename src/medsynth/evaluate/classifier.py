"""A small image classifier trained here on real data, used to judge generated data.

No pretrained weights can be downloaded, so quality is measured with a network trained
on the real training split: its accuracy on generated images (per class) and its
features (for MMD) stand in for Inception-based scores.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from monai.networks.nets import Classifier
from monai.transforms import Compose, RandFlip, RandGaussianNoise, RandGaussianSmooth, RandRotate90
from torch import nn


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


def train_classifier(
    images: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    epochs: int = 15,
    batch_size: int = 32,
    lr: float = 2e-3,
    seed: int = 0,
) -> ImageClassifier:
    """Train on real images ``(N, C, *spatial)`` in [0, 1] with class indices ``(N,)``.

    Training augments with flips, 90-degree turns, blur and noise so that the classifier
    judges structure, not the sharpness that separates real from generated images.
    """
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    spatial_dims = images.ndim - 2
    augment = Compose([
        RandFlip(prob=0.5, spatial_axis=0),
        RandRotate90(prob=0.5, spatial_axes=(0, 1)),
        RandGaussianSmooth(prob=0.5, sigma_x=(0.3, 1.5), sigma_y=(0.3, 1.5), sigma_z=(0.3, 1.5)),
        RandGaussianNoise(prob=0.3, std=0.03),
    ])
    augment.set_random_state(seed=seed)
    model = ImageClassifier(tuple(images.shape[1:]), num_classes)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * max(1, -(-len(images) // batch_size))
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(images), generator=generator)
        for start in range(0, len(images), batch_size):
            index = order[start:start + batch_size]
            batch = torch.stack([torch.as_tensor(augment(image)) for image in images[index]]) if spatial_dims in (2, 3) else images[index]
            loss = F.cross_entropy(model(batch.float()), labels[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
    return model.eval()


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
