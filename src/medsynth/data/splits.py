"""Splits by subject (never by slice or phase): stratified by class, seeded, or kept as a dataset gives them."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np

from medsynth.data.manifest import MANIFEST_NAME, Manifest
from medsynth.errors import BadInputError


def split_subjects(subject_classes: dict[str, str | None], val_fraction: float, test_fraction: float,
                   seed: int) -> dict[str, str]:
    """Assign each subject to ``train``/``val``/``test``, stratified by class, seeded.

    Each class's subjects are shuffled and cut by the fractions (rounded half up). A class
    with at least 3 subjects gets at least one subject in every split whose fraction is
    above 0; every class keeps at least one training subject.

    Args:
        subject_classes: subject -> its class (``None`` when the dataset has no classes).

    Returns:
        subject -> split.
    """
    rng = np.random.default_rng(seed)
    groups: dict[str | None, list[str]] = {}
    for subject in sorted(subject_classes):
        groups.setdefault(subject_classes[subject], []).append(subject)
    assignment = {}
    for group in sorted(groups, key=lambda name: (name is None, name or "")):
        subjects = [groups[group][i] for i in rng.permutation(len(groups[group]))]
        n = len(subjects)
        n_test, n_val = math.floor(n * test_fraction + 0.5), math.floor(n * val_fraction + 0.5)
        if n >= 3:
            n_test, n_val = max(n_test, int(test_fraction > 0)), max(n_val, int(val_fraction > 0))
        while n_test + n_val > n - 1:
            if n_val >= n_test:
                n_val -= 1
            else:
                n_test -= 1
        for k, subject in enumerate(subjects):
            assignment[subject] = "test" if k < n_test else "val" if k < n_test + n_val else "train"
    return assignment


def subject_splits(manifest: Manifest, val_fraction: float, test_fraction: float, seed: int) -> dict[str, str]:
    """subject -> split for a manifest: the splits it already gives every case (e.g. a prepared one),
    else :func:`split_subjects` stratified by each subject's most frequent class.

    Raises:
        BadInputError: a subject whose cases the manifest puts in different splits.
    """
    if manifest.cases and all(case.split is not None for case in manifest.cases):
        given: dict[str, str] = {}
        for case in manifest.cases:
            if given.setdefault(case.subject, case.split) != case.split:
                raise BadInputError(manifest.resolve(MANIFEST_NAME), f"subject '{case.subject}' is in splits {given[case.subject]} and {case.split}")
        return given
    classes: dict[str, Counter] = {}
    for case in manifest.cases:
        classes.setdefault(case.subject, Counter())[case.class_name] += 1
    # A subject's stratum is its most frequent class (ties: the first by name).
    strata = {s: min(c.items(), key=lambda item: (-item[1], item[0] or ""))[0] for s, c in classes.items()}
    return split_subjects(strata, val_fraction, test_fraction, seed)
