"""Evaluation of a class-conditional image generator (``cvae``, ``class-diffusion``): one protocol for both.

A recipe hands over ``generate_for(classes, seed) -> images``: one generated image ``(C, *spatial)`` in [0, 1] for
each class index of ``classes`` ``(N,)``, in that order, a function of ``seed`` alone. Scored here:

- the evaluation classifier (trained on the real training split) on the real test split and on generated images;
- feature MMD, MS-SSIM diversity, the memorisation audit and ``spectrum_ratio_high``, each beside its real reference;
- train-on-synthetic and the augmentation test of :mod:`medsynth.evaluate.image_utility`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import Field
from torch import Tensor

from medsynth.config import StrictModel
from medsynth.data.datasets import held_out, load_split, stack_items
from medsynth.errors import MedsynthError
from medsynth.evaluate.classifier import accuracy_by_class, classify, train_classifier
from medsynth.evaluate.metrics import feature_mmd, memorisation_audit, ms_ssim_diversity, real_reference, spectrum_ratio_high

GenerateFor = Callable[[Tensor, int], Tensor]  # (class indices (N,), seed) -> images (N, C, *spatial) in [0, 1]


class ClassGeneratorEvaluateConfig(StrictModel):
    """The ``evaluate`` section of a class-conditional image recipe."""

    n_per_class: int = Field(64, ge=2)
    classifier_epochs: int = Field(15, ge=1)
    seed: int = 0
    utility: bool = Field(True, description="train-on-synthetic and the augmentation test (medsynth.evaluate.image_utility)")
    n_labelled: int | None = Field(None, ge=1, description="augmentation test: training images in the labelled pool "
                                   "(default a quarter of the training split); the rest are the pool of which only the classes are used")
    utility_seeds: list[int] = Field([0], min_length=1, description="seeds of the task network in the utility tests (>= 3 in benchmarks)")


def _mean_finite(values: Any) -> float:
    finite = [v for v in values if np.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


def evaluate_class_generator(generate_for: GenerateFor, data_dir: Path, classes: Sequence[str],
                             settings: ClassGeneratorEvaluateConfig) -> dict[str, Any]:
    """Classifier accuracy (real test vs generated), feature MMD, MS-SSIM diversity and the memorisation audit;
    each distribution metric also as ``<metric>_real_reference`` on held-out real images; the utility tests.

    Args:
        generate_for: the generator (module docstring); called with ``settings.seed`` for the
            ``n_per_class`` images a class judged here, and ``seed + 1``, ``seed + 2`` for the utility tests.
        data_dir: the prepared dataset (train and test splits, class indices into ``classes``).
        classes: class names in index order.
        settings: the ``evaluate`` section.

    Raises:
        MedsynthError: the dataset has no test split.
    """
    train, test = load_split(data_dir, "train"), held_out(data_dir)
    if not test:
        raise MedsynthError(f"{data_dir}: the prepared dataset has no test split to evaluate on")
    train_x, train_y = stack_items(train, "image"), stack_items(train, "class")
    test_x, test_y = stack_items(test, "image"), stack_items(test, "class")

    classifier = train_classifier(train_x, train_y, len(classes), epochs=settings.classifier_epochs, seed=settings.seed)
    real = classify(classifier, test_x)

    generated_y = torch.arange(len(classes)).repeat_interleave(settings.n_per_class)
    generated = generate_for(generated_y, settings.seed)
    fake = classify(classifier, generated)

    utility = class_utility(generate_for, (train_x, train_y), (test_x, test_y), len(classes), settings) if settings.utility else {}
    acc_real = accuracy_by_class(real.predictions, test_y, classes)
    acc_fake = accuracy_by_class(fake.predictions, generated_y, classes)
    diversity_generated = {n: ms_ssim_diversity(generated[generated_y == k]) for k, n in enumerate(classes)}
    diversity_real = {n: ms_ssim_diversity(test_x[test_y == k]) for k, n in enumerate(classes)}
    return {
        "classifier_accuracy_real": acc_real.pop("all"),
        "classifier_accuracy_generated": acc_fake.pop("all"),
        "classifier_accuracy_real_per_class": acc_real,
        "classifier_accuracy_generated_per_class": acc_fake,
        # Diversity: mean MS-SSIM within a class (lower = more diverse); the reference is the real test images'.
        "ms_ssim_generated_per_class": diversity_generated,
        "ms_ssim_real_per_class": diversity_real,
        "ms_ssim_generated_per_class_real_reference": diversity_real,
        "ms_ssim_generated": _mean_finite(diversity_generated.values()),
        "ms_ssim_generated_real_reference": _mean_finite(diversity_real.values()),
        "mmd_classifier_features": feature_mmd(real.features, fake.features, seed=settings.seed),
        "mmd_classifier_features_real_reference": real_reference(feature_mmd, real.features, seed=settings.seed, size=len(fake.features)),
        **memorisation_audit(generated, train_x, held_out=test_x),
        "spectrum_ratio_high": spectrum_ratio_high(test_x, generated),
        "spectrum_ratio_high_real_reference": real_reference(spectrum_ratio_high, test_x, seed=settings.seed),
        **utility,
        "n_generated_per_class": settings.n_per_class,
        "n_test_real": len(test_x),
    }


def class_utility(generate_for: GenerateFor, train: tuple[Tensor, Tensor], test: tuple[Tensor, Tensor], num_classes: int,
                  settings: ClassGeneratorEvaluateConfig) -> dict[str, Any]:
    """Train-on-synthetic (as many generated images as the training split, its class balance) and the augmentation
    test (a labelled pool, classic augmentation, images generated for the other pool's classes, the oracle), with the
    evaluation classifier as the task network; ``train``/``test`` are ``(images (N, C, *S), class indices (N,))``."""
    from medsynth.evaluate.image_utility import augmentation_test, classifier_task, labelled_pools, tstr

    images, classes = train
    n_labelled = settings.n_labelled if settings.n_labelled is not None else max(1, len(classes) // 4)
    labelled, unlabelled = labelled_pools(classes, n_labelled, seed=settings.seed, setting="evaluate.n_labelled")
    task = classifier_task(num_classes, settings.classifier_epochs)
    seeds = settings.utility_seeds
    # Other seeds than the evaluation's samples, so these images are new draws.
    synthetic = (generate_for(classes, settings.seed + 1), classes)
    for_unlabelled = generate_for(classes[unlabelled], settings.seed + 2)
    return {**tstr(task, train, synthetic, test, seeds),
            **augmentation_test(task, (images[labelled], classes[labelled]), (images[unlabelled], classes[unlabelled]),
                                for_unlabelled, test, seeds)}


def real_vs_generated_section(real: Sequence[Sequence[Tensor]], generated: Sequence[Tensor], classes: Sequence[str], per_class: int = 6) -> Any:
    """The report's grid: per class a row of ``per_class`` real test images (left; black where fewer) and as many generated (right).

    Args:
        real: per class, real images ``(C, *spatial)`` (the first ``per_class`` are shown).
        generated: per class, ``(per_class, C, *spatial)``.
        classes: class names.

    Returns:
        A :class:`medsynth.report.sections.ReportSection`.
    """
    from medsynth.report.html import figure_html, image_grid
    from medsynth.report.sections import ReportSection

    rows, titles = [], []
    for name, real_k, fake_k in zip(classes, real, generated):
        fake = list(fake_k)
        shown = list(real_k)[:per_class]
        rows += shown + [torch.zeros_like(fake[0])] * (per_class - len(shown)) + fake
        titles += [f"real {name}"] * per_class + [f"generated {name}"] * per_class
    return ReportSection("Real (left) versus generated (right), per class",
                         figure_html(image_grid(rows, ncols=2 * per_class, titles=titles), "real vs generated"))
