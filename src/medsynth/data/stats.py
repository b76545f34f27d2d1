"""Statistics of a prepared dataset: per-case intensities (``stats.csv``) and the dataset fingerprint."""

from __future__ import annotations

import csv
import io
import math
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from medsynth.data.manifest import SPLITS, Manifest
from medsynth.runs import atomic_write_text

STATS_COLUMNS = ("id", "subject", "class", "split", "original_shape", "original_spacing", "prepared_shape",
                 "min", "max", "mean", "std", "p1", "p99")
# Percentiles of large volumes are taken on a regular subsample of at most this many voxels.
_PERCENTILE_SAMPLE = 1_000_000


def intensity_stats(values: np.ndarray) -> dict[str, float]:
    """min, max, mean, std and the 0.5/1/99/99.5 percentiles of an array (all its values)."""
    flat = np.asarray(values, dtype=np.float64).ravel()
    sample = flat[:: max(1, flat.size // _PERCENTILE_SAMPLE)]
    p = np.percentile(sample, [0.5, 1.0, 99.0, 99.5])
    return {"n": int(flat.size), "min": float(flat.min()), "max": float(flat.max()), "mean": float(flat.mean()),
            "std": float(flat.std()), "p0_5": float(p[0]), "p1": float(p[1]), "p99": float(p[2]), "p99_5": float(p[3])}


def _shape_text(values: list[float]) -> str:
    return "x".join(f"{v:g}" for v in values)


def write_stats(manifest: Manifest, path: Path) -> None:
    """``stats.csv``: one row per case of a prepared manifest (:data:`STATS_COLUMNS`), atomically."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(STATS_COLUMNS)
    for case in manifest.cases:
        stats = case.stats
        writer.writerow([case.id, case.subject, case.class_name or "", case.split, _shape_text(stats["original_shape"]),
                         _shape_text(stats["original_spacing"]), _shape_text(stats["prepared_shape"]),
                         *(f"{stats['intensity'][k]:.6g}" for k in ("min", "max", "mean", "std", "p1", "p99"))])
    atomic_write_text(path, buffer.getvalue())


def fingerprint(manifest: Manifest) -> dict[str, Any]:
    """Dataset-wide summary of a prepared manifest (from the cases' ``stats``).

    Intensities are the source images', over the foreground (label > 0) where a case has a
    label: min/max over all voxels, mean/std pooled exactly, and the 0.5/99.5 percentiles
    as the median of the cases' percentiles.
    """
    stats = [case.stats for case in manifest.cases]
    regions = [s["foreground"] or s["intensity"] for s in stats]
    n = sum(r["n"] for r in regions)
    mean = sum(r["n"] * r["mean"] for r in regions) / n
    variance = sum(r["n"] * (r["std"] ** 2 + r["mean"] ** 2) for r in regions) / n - mean**2
    label_voxels: Counter = Counter()
    for s in stats:
        label_voxels.update(s.get("label_voxels", {}))

    def summary(key: str) -> dict[str, list[float]]:
        values = np.asarray([s[key] for s in stats], dtype=np.float64)
        return {"median": np.median(values, axis=0).tolist(), "min": values.min(axis=0).tolist(), "max": values.max(axis=0).tolist()}

    return {
        "n_cases": len(stats),
        "n_subjects": len(manifest.subjects()),
        "spatial_dims": manifest.spatial_dims,
        "modality": manifest.modality,
        "original_shape": summary("original_shape"),
        "original_spacing": summary("original_spacing"),
        "prepared_shape": summary("prepared_shape"),
        "intensity": {
            "over": "foreground" if all(s["foreground"] for s in stats) else "image" if not any(s["foreground"] for s in stats) else "foreground where labelled",
            "min": min(r["min"] for r in regions), "max": max(r["max"] for r in regions),
            "mean": mean, "std": math.sqrt(max(variance, 0.0)),
            "p0_5": float(np.median([r["p0_5"] for r in regions])), "p99_5": float(np.median([r["p99_5"] for r in regions])),
        },
        "class_counts": {name: sum(case.class_name == name for case in manifest.cases) for name in manifest.classes},
        "label_counts": {manifest.labels.get(value, value): count for value, count in sorted(label_voxels.items(), key=lambda kv: int(kv[0]))},
        "splits": {split: {"cases": len(cases), "subjects": len({c.subject for c in cases})}
                   for split in SPLITS for cases in [manifest.split_cases(split)]},
    }
