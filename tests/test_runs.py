"""The run folder: strict metrics.json, the atomic writer."""

from __future__ import annotations

import json
import math

from medsynth.runs import Run, atomic_write_text, strict_metrics


def test_metrics_that_could_not_be_computed_become_null_with_a_reason(tmp_path):
    run = Run(tmp_path)
    written = run.write_metrics({"a": 1.5, "per_class": {"x": math.nan, "y": 0.5}, "ratio": math.inf})
    on_disk = json.loads(run.metrics_path.read_text())  # strict JSON: Python's parser accepts NaN, so check the text too
    assert "NaN" not in run.metrics_path.read_text() and "Infinity" not in run.metrics_path.read_text()
    assert written == on_disk
    assert on_disk["per_class"] == {"x": None, "y": 0.5} and on_disk["ratio"] is None and on_disk["a"] == 1.5
    assert on_disk["not_computed"] == {"per_class.x": "not finite (nan)", "ratio": "not finite (inf)"}
    run.write_metrics({"ratio": 2.0})  # a later evaluation that computes everything drops the old reasons
    assert "not_computed" not in json.loads(run.metrics_path.read_text())


def test_strict_metrics_keeps_finite_values_and_strings():
    assert strict_metrics({"a": [1.0, "b", None, True]}) == {"a": [1.0, "b", None, True]}


def test_atomic_writer_leaves_no_temporary_file(tmp_path):
    atomic_write_text(tmp_path / "x.txt", "one")
    atomic_write_text(tmp_path / "x.txt", "two")
    assert (tmp_path / "x.txt").read_text() == "two" and [p.name for p in tmp_path.iterdir()] == ["x.txt"]
