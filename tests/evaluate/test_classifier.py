"""The judging classifier learns a separable task; classify gives predictions and features."""

from __future__ import annotations

import torch

from medsynth.evaluate.classifier import ClassifierResult, accuracy_by_class, classify, train_classifier


def two_classes(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Class 0: a bright disc; class 1: a bright ring (flip-, turn-, blur- and noise-proof), 32 px."""
    generator = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    radius = ((yy - 15.5) ** 2 + (xx - 15.5) ** 2).sqrt()
    disc, ring = (radius < 7).float(), ((radius > 10) & (radius < 14)).float()
    labels = torch.arange(n) % 2
    shapes = torch.stack([disc if label == 0 else ring for label in labels])[:, None]
    return (shapes * 0.8 + 0.1 * torch.rand(n, 1, 32, 32, generator=generator)), labels


def test_learns_a_separable_task_and_gives_features():
    train_x, train_y = two_classes(32, seed=0)
    test_x, test_y = two_classes(10, seed=1)
    model = train_classifier(train_x, train_y, num_classes=2, epochs=8, batch_size=16, seed=0)
    result = classify(model, test_x, batch_size=4)
    assert isinstance(result, ClassifierResult)
    assert result.predictions.shape == (10,) and result.features.shape[0] == 10 and result.features.ndim == 2
    accuracy = accuracy_by_class(result.predictions, test_y, ["disc", "ring"])
    assert accuracy["all"] >= 0.9 and set(accuracy) == {"all", "disc", "ring"}
