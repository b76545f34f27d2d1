"""The run folder: strict metrics.json, the atomic writer, the run lock, the writing rank."""

from __future__ import annotations

import errno
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from medsynth.errors import RunBusyError
from medsynth.runs import RANK_VARIABLES, Run, atomic_write_text, is_rank_zero, strict_metrics

SRC = Path(__file__).resolve().parents[1] / "src"


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


def test_the_run_lock_is_exclusive_reentrant_and_removed_on_release(tmp_path):
    run = Run(tmp_path / "run")
    with run.lock():
        assert run.lock_path.read_text().strip() == str(os.getpid())
        with run.lock():  # the same process may nest (a fold set's folds, evaluate inside report)
            pass
        assert run.lock_path.exists() and run.holder() is None  # this process's own lock does not block it
    assert not run.lock_path.exists()


def test_a_second_process_is_refused_with_the_holders_pid_and_a_dead_holders_lock_is_taken_over(tmp_path):
    run = Run(tmp_path / "run")
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from medsynth.runs import Run\n"
                               "with Run(sys.argv[1]).lock():\n    print('held', flush=True); time.sleep(600)", str(run.path)],
                              stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(SRC)})
    try:
        assert holder.stdout.readline().strip() == "held"
        assert run.holder() == holder.pid
        with pytest.raises(RunBusyError, match=rf"busy: process {holder.pid} is writing this run"), run.lock():
            pass
        with pytest.raises(RunBusyError):
            run.check_new(force=True)
    finally:
        holder.kill()
        holder.wait()
    assert run.holder() is None and run.lock_path.read_text().strip() == str(holder.pid)  # left behind, not held
    with run.lock():
        assert run.lock_path.read_text().strip() == str(os.getpid())


@pytest.mark.parametrize(("environment", "zero"), [({}, True), ({"LOCAL_RANK": "0", "NODE_RANK": "0"}, True),
                                                    ({"LOCAL_RANK": "1"}, False), ({"LOCAL_RANK": "0", "NODE_RANK": "1"}, False),
                                                    ({"RANK": "3"}, False), ({"SLURM_PROCID": "2"}, False)])
def test_only_global_rank_zero_writes(monkeypatch, environment, zero):
    for name in RANK_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    assert is_rank_zero() is zero


def test_a_read_only_run_is_read_without_a_lock(tmp_path, monkeypatch):
    run = Run(tmp_path / "run")
    run.path.mkdir()
    real_open = os.open

    def read_only(path, flags, *args):
        if flags & os.O_CREAT:
            raise PermissionError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr("medsynth.runs.os.open", read_only)
    with run.lock():
        assert not run.lock_path.exists()
