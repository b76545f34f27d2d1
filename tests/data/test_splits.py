"""data/splits.py: splits by subject (every case of a subject in one split), disjoint and covering, seeded, the sizes the
fractions ask for, a dataset's own splits kept, and a fold's view refusing what it cannot hold out before writing."""

from __future__ import annotations

import json

import pytest

from medsynth.data.manifest import Case, Manifest
from medsynth.data.splits import fold_view, split_subjects, subject_splits, subject_strata
from medsynth.errors import BadInputError


def _manifest(root, subjects=6, phases=3, splits=None, prepare=None, classes=None):
    """``subjects`` subjects of ``phases`` cases each (class ``classes[s]``, split ``splits[s]`` when given)."""
    cases = [Case(id=f"s{s}_p{p}", subject=f"s{s}", image=f"s{s}_p{p}.npy", phase=p,
                  **({"class": classes[s]} if classes else {}), split=None if splits is None else splits[s])
             for s in range(subjects) for p in range(phases)]
    return Manifest(name="toy", spatial_dims=2, cases=cases, prepare=prepare, classes=sorted(set(classes or []))).with_root(root)


def test_the_split_is_by_subject_disjoint_covering_and_sized_by_the_fractions():
    subjects = {f"s{k:02d}": None for k in range(20)}
    splits = split_subjects(subjects, val_fraction=0.1, test_fraction=0.2, seed=3)
    assert set(splits) == set(subjects)  # every subject in exactly one split
    counts = {name: sum(v == name for v in splits.values()) for name in ("train", "val", "test")}
    assert counts == {"train": 14, "val": 2, "test": 4}  # 20 * 0.1 and 20 * 0.2
    assert split_subjects(dict(reversed(list(subjects.items()))), 0.1, 0.2, seed=3) == splits  # the order given is irrelevant


def test_every_class_keeps_a_training_subject_whatever_the_fractions():
    subjects = {"a0": "a", "a1": "a", "a2": "a", "b0": "b"}
    splits = split_subjects(subjects, val_fraction=0.5, test_fraction=0.5, seed=0)
    assert sum(splits[s] == "train" for s in ("a0", "a1", "a2")) >= 1 and splits["b0"] == "train"
    assert {splits[s] for s in ("a0", "a1", "a2")} == {"train", "val", "test"}  # 3 subjects: one in each


def test_a_manifest_without_splits_puts_every_case_of_a_subject_in_one_split(tmp_path):
    manifest = _manifest(tmp_path, subjects=10, classes=["x", "y"] * 5)
    splits = subject_splits(manifest, 0.1, 0.2, seed=0)
    assert splits == split_subjects(subject_strata(manifest.cases), 0.1, 0.2, 0)  # stratified by each subject's class
    assert set(splits) == set(manifest.subjects()) and set(splits.values()) == {"train", "val", "test"}


def test_a_manifests_own_splits_are_kept_and_a_subject_in_two_is_refused(tmp_path):
    given = ["test", "train", "train", "val", "train", "train"]
    assert subject_splits(_manifest(tmp_path, splits=given), 0.1, 0.2, seed=0) == {f"s{k}": given[k] for k in range(6)}
    broken = _manifest(tmp_path, splits=given)
    broken.cases[1] = broken.cases[1].model_copy(update={"split": "val"})  # s0's second phase somewhere else
    with pytest.raises(BadInputError, match=r"dataset.json.*subject 's0' is in splits test and val") as info:
        subject_splits(broken, 0.1, 0.2, seed=0)
    assert "\n" not in str(info.value)


def test_a_subjects_stratum_is_its_most_frequent_class_and_ties_go_to_the_first_name():
    cases = [Case(id=f"c{k}", subject=subject, image="x.npy", **{"class": name})
             for k, (subject, name) in enumerate([("s", "b"), ("s", "a"), ("s", "b"), ("t", "b"), ("t", "a"), ("u", None)])]
    assert subject_strata(cases) == {"s": "b", "t": "a", "u": None}


def test_a_fold_view_holds_out_its_subjects_and_splits_the_rest_by_the_prepared_val_fraction(tmp_path):
    _manifest(tmp_path / "data", subjects=6, prepare={"settings": {"val_fraction": 0.25}}).save(tmp_path / "data")
    view = Manifest.load(fold_view(tmp_path / "data", ["s1", "s4"], tmp_path / "fold", seed=0))
    by_subject = {}
    for case in view.cases:
        by_subject.setdefault(case.subject, set()).add(case.split)
    assert all(len(splits) == 1 for splits in by_subject.values())
    assert {s for s, splits in by_subject.items() if splits == {"test"}} == {"s1", "s4"}
    assert sorted(next(iter(v)) for s, v in by_subject.items() if s not in ("s1", "s4")) == ["train", "train", "train", "val"]
    assert view.prepare["fold_of"] == str((tmp_path / "data").resolve())


def test_a_fold_view_of_an_unprepared_dataset_or_an_unknown_subject_is_refused_before_writing(tmp_path):
    _manifest(tmp_path / "raw").save(tmp_path / "raw")
    with pytest.raises(BadInputError, match="not a prepared dataset") as info:
        fold_view(tmp_path / "raw", ["s0"], tmp_path / "fold")
    assert "\n" not in str(info.value) and "dataset.json" in str(info.value)
    _manifest(tmp_path / "data", prepare={"settings": {}}).save(tmp_path / "data")
    before = json.loads((tmp_path / "data" / "dataset.json").read_text())
    with pytest.raises(BadInputError, match="has no subject 'nobody'"):
        fold_view(tmp_path / "data", ["s0", "nobody"], tmp_path / "fold")
    assert not (tmp_path / "fold").exists()
    assert json.loads((tmp_path / "data" / "dataset.json").read_text()) == before
