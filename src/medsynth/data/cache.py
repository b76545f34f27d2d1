"""Prepare's cache: a prepared case is reused only while its settings and every source file are unchanged.

The stamp hashes the settings' digest with each source file's resolved path, size and
modification time (ns). A DICOM series folder counts as every slice file in it
(:func:`medsynth.data.dicom.series_files`), so a slice edited in place, added or removed makes
the case prepared again. Contents are not hashed: reading every source to decide whether to
read it again would cost as much as preparing it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np


def source_files(paths: Iterable[Path]) -> list[Path]:
    """``paths`` with each folder (a DICOM series) replaced by the files its reader reads."""
    from medsynth.data.dicom import series_files

    files: list[Path] = []
    for path in paths:
        files.extend(series_files(path) if path.is_dir() else [path])
    return files


def stamp(digest: str, paths: Iterable[Path]) -> str:
    """A 16-hex-digit hash of the settings ``digest`` and each source file's path, size and mtime."""
    parts = [digest]
    for path in source_files(paths):
        stat = path.stat() if path.exists() else None
        parts.append(f"{path.resolve()}:{stat.st_size if stat else -1}:{stat.st_mtime_ns if stat else -1}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def cached_meta(target: Path, expected: str) -> dict[str, Any] | None:
    """The ``meta`` of a prepared case file when its stamp is ``expected``, else ``None`` (prepare it again)."""
    if not target.exists():
        return None
    try:
        with np.load(target, allow_pickle=False) as data:
            meta = json.loads(str(data["meta"]))
    except Exception:  # an unreadable or foreign file is simply prepared again
        return None
    return meta if meta.get("stamp") == expected else None
