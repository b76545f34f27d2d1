"""Splits by subject (never by slice or phase): stratified by class, seeded, or kept as a dataset gives them;
and cross-validation folds by subject, each a view of a prepared dataset."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from medsynth.data.manifest import MANIFEST_NAME, PATH_FIELDS, Case, Manifest
from medsynth.errors import BadInputError, MedsynthError


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
    return split_subjects(subject_strata(manifest.cases), val_fraction, test_fraction, seed)


def subject_strata(cases: Sequence[Case]) -> dict[str, str | None]:
    """subject -> its stratum: its most frequent class (ties: the first by name)."""
    classes: dict[str, Counter] = {}
    for case in cases:
        classes.setdefault(case.subject, Counter())[case.class_name] += 1
    return {s: min(c.items(), key=lambda item: (-item[1], item[0] or ""))[0] for s, c in classes.items()}


# -- cross-validation folds -------------------------------------------------------------------


def fold_assignments(subjects: Sequence[str], k: int, seed: int, strata: Mapping[str, str | None] | None = None) -> list[list[str]]:
    """``k`` folds of held-out subjects: every subject in exactly one fold, fold sizes differing by at most one.

    The subjects (sorted, so their given order does not matter) are shuffled by ``seed`` within
    each stratum (``strata``: subject -> class; one stratum without) and dealt round-robin, the
    strata one after another, so each class spreads evenly over the folds. Each fold's list is
    sorted. ``k = len(subjects)`` is leave-one-out.

    Raises:
        MedsynthError: ``k < 2`` or ``k`` larger than the number of subjects.
    """
    names = sorted(set(subjects))
    if k < 2:
        raise MedsynthError(f"--folds {k}: cross-validation needs at least 2 folds")
    if k > len(names):
        raise MedsynthError(f"--folds {k} is larger than the number of subjects ({len(names)})")
    rng = np.random.default_rng(seed)
    groups: dict[str | None, list[str]] = {}
    for name in names:
        groups.setdefault((strata or {}).get(name), []).append(name)
    order: list[str] = []
    for key in sorted(groups, key=lambda group: (group is None, group or "")):
        order += [groups[key][i] for i in rng.permutation(len(groups[key]))]
    return [sorted(order[i::k]) for i in range(k)]


def fold_view(data_dir: str | Path, held_out: Sequence[str], out: str | Path, seed: int = 0) -> Path:
    """Write ``out/dataset.json``: the prepared dataset ``data_dir`` as one fold sees it.

    The ``held_out`` subjects are the test split; the others are split into train/val by the
    prepared dataset's ``val_fraction`` (of the remaining subjects, stratified by class,
    seeded), as :func:`split_subjects` does. Case paths are absolute and name the prepared
    files of ``data_dir``: nothing is copied, and the view stays valid wherever the run moves.

    Returns:
        ``out``.

    Raises:
        BadInputError: ``data_dir`` is not a prepared dataset, or a held-out subject is not in it.
    """
    data_dir, out = Path(data_dir), Path(out)
    manifest = Manifest.load(data_dir)
    if manifest.prepare is None:
        raise BadInputError(manifest.resolve(MANIFEST_NAME), "not a prepared dataset; run `medsynth prepare` first")
    missing = sorted(set(held_out) - set(manifest.subjects()))
    if missing:
        raise BadInputError(manifest.resolve(MANIFEST_NAME), f"has no subject '{missing[0]}' (a fold's held-out subject)")
    val_fraction = float((manifest.prepare.get("settings") or {}).get("val_fraction", 0.1))
    rest = subject_strata([case for case in manifest.cases if case.subject not in set(held_out)])
    splits = {**split_subjects(rest, val_fraction, 0.0, seed), **dict.fromkeys(held_out, "test")}

    def absolute(value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list):
            return [str(manifest.resolve(v).resolve()) for v in value]
        return None if value is None else str(manifest.resolve(value).resolve())

    cases = [case.model_copy(update={"split": splits[case.subject], **{name: absolute(getattr(case, name)) for name in PATH_FIELDS}})
             for case in manifest.cases]
    view = manifest.model_copy(update={"cases": cases, "prepare": {**manifest.prepare, "fold_of": str(data_dir.resolve())}})
    return view.with_root(out).save(out).parent
