"""Cross-validation by subject: fold assignment, fold views of a prepared dataset, and a fold set of
tiny cvae runs that trains, resumes after losing a fold, evaluates per fold and reports mean ± sd."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from medsynth import api
from medsynth.cli import main
from medsynth.data.datasets import load_split
from medsynth.data.manifest import Manifest
from medsynth.data.splits import fold_assignments, fold_view
from medsynth.errors import MedsynthError
from medsynth.recipes import get_recipe
from medsynth.runs import Run, fold_summary

EXAMPLE = get_recipe("cvae").tiny_example


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("folds")
    raw = api.phantom(EXAMPLE.phantom, root / "raw", n=EXAMPLE.n, seed=0, size=EXAMPLE.size, progress=False)
    return api.prepare(raw, root / "prepared", recipe="cvae", progress=False, **EXAMPLE.prepare)


def test_folds_hold_out_every_subject_once_balanced_and_seeded():
    subjects = [f"s{i:02d}" for i in range(11)]
    folds = fold_assignments(subjects, 3, seed=0)
    held_out = [s for fold in folds for s in fold]
    assert sorted(held_out) == subjects and len(set(held_out)) == len(subjects)  # covered, never twice
    assert sorted(len(fold) for fold in folds) == [3, 4, 4]
    assert folds == fold_assignments(list(reversed(subjects)), 3, seed=0)  # the given order does not matter
    assert folds != fold_assignments(subjects, 3, seed=1)
    assert sorted(map(len, fold_assignments(subjects, 11, seed=0))) == [1] * 11  # leave-one-out
    strata = {s: "a" if i < 6 else "b" for i, s in enumerate(subjects)}
    for fold in fold_assignments(subjects, 2, seed=0, strata=strata):  # each class spread over the folds
        assert sum(strata[s] == "a" for s in fold) == 3
    with pytest.raises(MedsynthError, match=r"--folds 12 is larger than the number of subjects \(11\)"):
        fold_assignments(subjects, 12, seed=0)
    with pytest.raises(MedsynthError, match="at least 2 folds"):
        fold_assignments(subjects, 1, seed=0)


def test_a_fold_view_names_the_prepared_files_and_holds_out_its_subjects(prepared, tmp_path):
    manifest = Manifest.load(prepared)
    held_out = manifest.subjects()[:4]
    view = Manifest.load(fold_view(prepared, held_out, tmp_path / "fold" / "data", seed=0))
    assert sorted({c.subject for c in view.split_cases("test")}) == held_out
    assert {c.split for c in view.cases if c.subject not in held_out} == {"train", "val"}
    assert not (tmp_path / "fold" / "data" / "cases").exists()  # nothing copied
    for case, original in zip(view.cases, manifest.cases):
        assert view.resolve(case.image).resolve() == manifest.resolve(original.image).resolve()
    test = load_split(tmp_path / "fold" / "data", "test")
    assert sorted(item["id"] for item in test) == sorted(c.id for c in manifest.cases if c.subject in held_out)


def test_fold_summary_gives_each_metric_per_fold_mean_and_sd():
    summary = fold_summary([{"acc": 0.5, "per_class": {"a": 1.0}, "n": 4, "name": "x", "ok": True, "d": None},
                            {"acc": 0.7, "per_class": {"a": 3.0}, "n": 4, "d": 2.0}])
    assert summary["acc_per_fold"] == [0.5, 0.7] and math.isclose(summary["acc_mean"], 0.6)
    assert math.isclose(summary["acc_sd"], float(np.std([0.5, 0.7], ddof=1)))
    assert summary["per_class.a_mean"] == 2.0 and summary["n_sd"] == 0.0
    assert summary["d_per_fold"] == [None, 2.0] and summary["d_mean"] == 2.0 and summary["d_sd"] is None
    assert not any(key.startswith(("name", "ok")) for key in summary)


def test_more_folds_than_subjects_is_one_line(prepared, tmp_path, capsys):
    n = len(Manifest.load(prepared).subjects())
    code = main(["train", "cvae", "--data", str(prepared), "--folds", str(n + 1), "--out", str(tmp_path / "cv")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert str(prepared) in err and f"--folds {n + 1} is larger than the number of subjects ({n})" in err
    assert not (tmp_path / "cv").exists()


def test_a_fold_set_trains_resumes_the_missing_fold_evaluates_and_reports(prepared, tmp_path, capsys):
    out = tmp_path / "cv"
    overrides = [*EXAMPLE.overrides, "train.max_epochs=1"]
    # A fold set stopped after its first fold: fold 1 never started.
    api.train("cvae", data=prepared, config=EXAMPLE.config, overrides=overrides, out=out, folds=2, only_folds=[0], progress=False)
    spec = json.loads((out / "folds.json").read_text())
    assert (spec["recipe"], spec["folds"], spec["seed"]) == ("cvae", 2, 0)
    assert sorted(s for fold in spec["subjects"] for s in fold) == Manifest.load(prepared).subjects()
    assert (out / "fold-0" / "model.safetensors").is_file() and not (out / "fold-1").exists()
    first = (out / "fold-0" / "model.safetensors").read_bytes()
    first_stamp = (out / "fold-0" / "checkpoints" / "last.ckpt").stat().st_mtime_ns

    run = api.train(resume=out, progress=False)
    assert run.path == out and Run.open(out).is_fold_set
    assert (out / "fold-1" / "model.safetensors").is_file()  # the missing fold trained ...
    assert (out / "fold-0" / "model.safetensors").read_bytes() == first  # ... the finished one skipped
    assert (out / "fold-0" / "checkpoints" / "last.ckpt").stat().st_mtime_ns == first_stamp
    for index, held_out in enumerate(spec["subjects"]):
        view = Manifest.load(out / f"fold-{index}" / "data")
        assert sorted({c.subject for c in view.split_cases("test")}) == held_out

    # Killed after fold 1's last checkpoint but before its weights were exported: resume finishes that fold.
    trained = (out / "fold-1" / "model.safetensors").read_bytes()
    (out / "fold-1" / "model.safetensors").unlink()
    api.train(resume=out, progress=False)
    assert (out / "fold-1" / "model.safetensors").read_bytes() == trained

    metrics = api.evaluate(out)
    assert metrics["folds"] == 2
    per_fold = [json.loads((out / f"fold-{i}" / "metrics.json").read_text()) for i in range(2)]  # the folds' own stay
    key = "classifier_accuracy_real"
    assert metrics[f"{key}_per_fold"] == [fold[key] for fold in per_fold]
    assert math.isclose(metrics[f"{key}_mean"], float(np.mean(metrics[f"{key}_per_fold"])))
    assert math.isclose(metrics[f"{key}_sd"], float(np.std(metrics[f"{key}_per_fold"], ddof=1)))
    assert json.loads((out / "metrics.json").read_text())[f"{key}_mean"] == metrics[f"{key}_mean"]

    page = api.report(out).read_text()
    assert "2-fold cross-validation" in page and f"{key}" in page and "±" in page
    capsys.readouterr()
    code = main(["sample", str(out), "--n", "1"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "fold-0" in err
