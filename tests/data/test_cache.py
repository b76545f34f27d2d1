"""data/cache.py: a prepared case's stamp changes exactly when its settings or a source file (size, mtime, a slice of a
series folder) change, and a cached case is reused only under its own stamp."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np

from medsynth.data.cache import cached_meta, source_files, stamp


def _file(path: Path, data: bytes = b"abcd", mtime_ns: int = 1_700_000_000_000_000_000) -> Path:
    path.write_bytes(data)
    os.utime(path, ns=(mtime_ns, mtime_ns))
    return path


def _prepared(path: Path, meta: dict) -> Path:
    buffer = io.BytesIO()
    np.savez(buffer, image=np.zeros((2, 2), np.float32), meta=np.array(json.dumps(meta)))
    path.write_bytes(buffer.getvalue())
    return path


def test_the_stamp_changes_with_the_settings_and_each_sources_size_and_mtime(tmp_path):
    a, b = _file(tmp_path / "a.nii"), _file(tmp_path / "b.nii")
    first = stamp("settings-1", [a, b])
    assert len(first) == 16 and set(first) <= set("0123456789abcdef")
    assert stamp("settings-1", [a, b]) == first  # nothing changed: reused
    assert stamp("settings-2", [a, b]) != first
    _file(a, b"abcd", mtime_ns=1_700_000_000_000_000_001)  # touched, same bytes: prepared again (contents are not hashed)
    touched = stamp("settings-1", [a, b])
    assert touched != first
    _file(b, b"abcde", mtime_ns=1_700_000_000_000_000_000)  # same mtime, another size
    assert stamp("settings-1", [a, b]) != touched
    _file(a, b"abcd", mtime_ns=1_700_000_000_000_000_000)
    _file(b, b"abcd", mtime_ns=1_700_000_000_000_000_000)
    assert stamp("settings-1", [a, b]) == first  # the same path, size and mtime again: the same stamp


def test_a_missing_source_has_its_own_stamp(tmp_path):
    a = _file(tmp_path / "a.nii")
    present = stamp("s", [a])
    a.unlink()
    assert stamp("s", [a]) != present


def test_a_series_folder_counts_as_every_slice_it_holds(tmp_path):
    series = tmp_path / "series"
    series.mkdir()
    slices = [_file(series / f"{k}.dcm") for k in range(3)]
    _file(series / ".DS_Store")  # hidden files are not read by the series reader: they do not count
    assert source_files([series, tmp_path / "x.nii"]) == [*slices, tmp_path / "x.nii"]
    first = stamp("s", [series])
    assert stamp("s", [series]) == first
    _file(series / ".DS_Store", b"changed")
    assert stamp("s", [series]) == first
    _file(slices[1], b"edited in place")
    edited = stamp("s", [series])
    assert edited != first
    _file(series / "3.dcm")  # a slice added
    added = stamp("s", [series])
    assert added != edited
    (series / "3.dcm").unlink()  # and removed again
    assert stamp("s", [series]) == edited


def test_cached_meta_only_under_its_own_stamp(tmp_path):
    target = _prepared(tmp_path / "case.npz", {"stamp": "0123456789abcdef", "spacing": [1.0, 2.0]})
    assert cached_meta(target, "0123456789abcdef") == {"stamp": "0123456789abcdef", "spacing": [1.0, 2.0]}
    assert cached_meta(target, "fedcba9876543210") is None
    assert cached_meta(tmp_path / "absent.npz", "0123456789abcdef") is None
    assert cached_meta(_file(tmp_path / "foreign.npz", b"not an npz"), "0123456789abcdef") is None
    assert cached_meta(_prepared(tmp_path / "old.npz", {"spacing": [1.0]}), "0123456789abcdef") is None  # made before stamps
