"""Are generated images worth training on? Train-on-synthetic-test-on-real and the augmentation test.

Shared by the image recipes: ``cvae`` (the task network is the classifier, scored by accuracy) and
``sdm`` (the segmenter, scored by mean foreground Dice). The same architecture, budget and seeds
serve every arm; only the training data changes, and every arm is scored on the real test split.

- **TSTR** (Med-DDPM's test): the task network trained on generated images alone (as many as the
  real training split, with its class balance or from its label maps) against the same network
  trained on the real training split (``tstr_<m>_real_reference``).
- **Augmentation test** (as MAISI and Med-DDPM argue for synthetic data): the training subjects are
  split into a labelled pool L (real images) and a pool U of which only the targets (class labels,
  label maps) are used. The arms: (a) L only, no augmentation; (b) L with classic augmentation
  (nnU-Net's, MONAI transforms: :mod:`medsynth.evaluate.augmentation`); (c) L + images generated for
  U's targets; (d) L + U's real images (the oracle). (c) and (d) train with the classic augmentation
  too, as a user would: it is free, so generated images earn their place only by adding to it.
  ``gain share (x - a) / (d - a)`` says how much of the oracle's gain the arm reaches; (c) must beat
  (b) or the generator is not worth training.

With several seeds every figure is the mean, with ``_sd`` and ``_per_seed``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from medsynth.errors import MedsynthError

__all__ = ["ImageTask", "augmentation_test", "classifier_task", "gain_share", "labelled_pools", "segmenter_task", "tstr"]


@dataclass(frozen=True)
class ImageTask:
    """A task network and its score: ``train(images, targets, seed, augmentation) -> model``,
    ``score(model, images, targets) -> float`` (higher is better), named by the score (``accuracy``, ``dice``)."""

    score_name: str
    train: Callable[[Tensor, Tensor, int, str], torch.nn.Module]
    score: Callable[[torch.nn.Module, Tensor, Tensor], float]


def classifier_task(num_classes: int, epochs: int) -> ImageTask:
    """The classifier of :mod:`medsynth.evaluate.classifier` on images in [0, 1] and class indices, by accuracy."""
    from medsynth.evaluate.classifier import classify, train_classifier

    def train(images: Tensor, targets: Tensor, seed: int, augmentation: str) -> torch.nn.Module:
        return train_classifier(images, targets, num_classes, epochs=epochs, seed=seed, augmentation=augmentation)

    def score(model: torch.nn.Module, images: Tensor, targets: Tensor) -> float:
        return float((classify(model, images).predictions == targets).float().mean())

    return ImageTask("accuracy", train, score)


def segmenter_task(class_names: Sequence[str], epochs: int, channels: Sequence[int]) -> ImageTask:
    """The segmenter of :mod:`medsynth.evaluate.segmentation` on volumes in their units and class maps, by mean foreground Dice."""
    from medsynth.evaluate.segmentation import dice_per_class, segment, train_segmenter

    def train(images: Tensor, targets: Tensor, seed: int, augmentation: str) -> torch.nn.Module:
        return train_segmenter(images, targets, len(class_names), epochs=epochs, seed=seed, channels=channels,
                               augmentation="none" if augmentation == "none" else "classic")

    def score(model: torch.nn.Module, images: Tensor, targets: Tensor) -> float:
        return float(dice_per_class(segment(model, images), targets, len(class_names), class_names)["mean_foreground"])

    return ImageTask("dice", train, score)


def gain_share(real_only: float, arm: float, oracle: float) -> float | None:
    """``(arm - a) / (d - a)``: the share of the oracle's gain over L alone that the arm reaches (None when d = a)."""
    return (arm - real_only) / (oracle - real_only) if oracle != real_only else None


def labelled_pools(targets: Tensor, n_labelled: int, seed: int, setting: str) -> tuple[Tensor, Tensor]:
    """Indices of the labelled pool L and the unlabelled pool U of a training split (one item a subject).

    Class labels ``(N,)`` are split class by class (L keeps the class balance); label maps ``(N, *S)`` at random.

    Raises:
        MedsynthError: ``n_labelled`` leaves L or U empty (names ``setting``).
    """
    n = len(targets)
    if not 1 <= n_labelled < n:
        raise MedsynthError(f"{setting}={n_labelled}: the labelled pool needs 1 .. {n - 1} of the {n} training subjects, "
                            "so that neither pool is empty")
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=generator)
    if targets.ndim == 1:  # classes: take them in turn, each in its random order, so that L keeps the balance
        by_class = [order[targets[order] == k].tolist() for k in torch.unique(targets)]
        order = torch.tensor([items[r] for r in range(max(map(len, by_class))) for items in by_class if r < len(items)])
    return order[:n_labelled].sort().values, order[n_labelled:].sort().values


def _summary(key: str, values: Sequence[float]) -> dict[str, float | list[float]]:
    out: dict[str, float | list[float]] = {key: float(np.mean(values))}
    if len(values) > 1:
        out[f"{key}_sd"] = float(np.std(values, ddof=1))
        out[f"{key}_per_seed"] = [float(v) for v in values]
    return out


def tstr(task: ImageTask, real: tuple[Tensor, Tensor], generated: tuple[Tensor, Tensor], test: tuple[Tensor, Tensor],
         seeds: Sequence[int]) -> dict[str, float | list[float]]:
    """Train on synthetic, test on real: ``tstr_<m>`` (trained on ``generated``) and ``tstr_<m>_real_reference``
    (trained on ``real``), both scored on ``test``; each pair is ``(images (N, C, *S), targets)``."""
    on_generated = [task.score(task.train(*generated, seed, "none"), *test) for seed in seeds]
    on_real = [task.score(task.train(*real, seed, "none"), *test) for seed in seeds]
    return {**_summary(f"tstr_{task.score_name}", on_generated), **_summary(f"tstr_{task.score_name}_real_reference", on_real)}


def augmentation_test(task: ImageTask, labelled: tuple[Tensor, Tensor], unlabelled: tuple[Tensor, Tensor], generated_images: Tensor,
                      test: tuple[Tensor, Tensor], seeds: Sequence[int]) -> dict[str, float | list[float] | int | None]:
    """The four arms (a) L only, (b) L + classic augmentation, (c) L + generated for U's targets, (d) L + U real
    ((c) and (d) with the classic augmentation too).

    Args:
        task: the task network.
        labelled: L's real ``(images, targets)``.
        unlabelled: U's real ``(images, targets)``; its images serve the oracle only.
        generated_images: images generated for U's targets, ``(len(U), C, *S)`` in the same units.
        test: the real test split.
        seeds: the task network's seeds.

    Returns:
        ``downstream_<m>_{real_only,classic,with_generated,oracle}`` (mean, and ``_sd``/``_per_seed``),
        ``downstream_gain_share_{generated,classic}`` (of the means), ``downstream_n_labelled``,
        ``downstream_n_unlabelled``, ``downstream_seeds``.
    """
    (images_l, targets_l), (images_u, targets_u) = labelled, unlabelled
    if len(generated_images) != len(targets_u):
        raise ValueError(f"generated images: {len(generated_images)} for {len(targets_u)} unlabelled targets")
    arms = {
        "real_only": (images_l, targets_l, "none"),
        "classic": (images_l, targets_l, "classic"),
        "with_generated": (torch.cat([images_l, generated_images.to(images_l.dtype)]), torch.cat([targets_l, targets_u]), "classic"),
        "oracle": (torch.cat([images_l, images_u]), torch.cat([targets_l, targets_u]), "classic"),
    }
    name = task.score_name
    metrics: dict[str, float | list[float] | int | None] = {}
    for arm, (images, targets, augmentation) in arms.items():
        metrics |= _summary(f"downstream_{name}_{arm}", [task.score(task.train(images, targets, seed, augmentation), *test) for seed in seeds])
    a, d = metrics[f"downstream_{name}_real_only"], metrics[f"downstream_{name}_oracle"]
    metrics["downstream_gain_share_generated"] = gain_share(a, metrics[f"downstream_{name}_with_generated"], d)
    metrics["downstream_gain_share_classic"] = gain_share(a, metrics[f"downstream_{name}_classic"], d)
    return metrics | {"downstream_n_labelled": len(targets_l), "downstream_n_unlabelled": len(targets_u), "downstream_seeds": len(seeds)}
