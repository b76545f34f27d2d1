"""The run directory: one folder holds everything a training run made.

```
RUN/config.yaml          fully resolved config (prev_config.yaml: the one before a --resume)
RUN/checkpoints/         last.ckpt, best.ckpt (atomic writes, full training state)
RUN/tb/                  TensorBoard logs
RUN/samples/             generated images and figures
RUN/metrics.json         evaluation results
RUN/report.html          self-contained report
RUN/model.safetensors    weights for sharing (config.yaml beside it rebuilds the model)
```

A cross-validation fold set (``medsynth train RECIPE --folds K``) is a folder of runs instead:
``RUN/folds.json`` (recipe, K, seed, held-out subjects per fold), ``RUN/fold-<i>/`` (each a full
run, its data view in ``RUN/fold-<i>/data/dataset.json``), ``RUN/metrics.json`` (per fold, mean
and sd) and ``RUN/report.html``; it has no ``config.yaml`` of its own.

It also holds the ground floor's two file primitives: the one atomic writer
(:func:`atomic_write_bytes`) every file a kill could corrupt goes through, and the one reader of
JSON/YAML files (:func:`read_structured`) that fails with one line naming the file.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from medsynth.errors import BadInputError, MedsynthError

TEMP_SUFFIX = ".medsynth-tmp"  # the atomic writer's temporary files end so
FOLDS_NAME = "folds.json"  # marks a cross-validation fold set


@dataclass(frozen=True)
class Run:
    """Paths of one run directory."""

    path: Path

    @property
    def config_path(self) -> Path:
        return self.path / "config.yaml"

    @property
    def prev_config_path(self) -> Path:
        return self.path / "prev_config.yaml"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def last_checkpoint(self) -> Path:
        return self.checkpoints / "last.ckpt"

    @property
    def tb(self) -> Path:
        return self.path / "tb"

    @property
    def samples(self) -> Path:
        return self.path / "samples"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.json"

    @property
    def report_path(self) -> Path:
        return self.path / "report.html"

    @property
    def weights_path(self) -> Path:
        return self.path / "model.safetensors"

    @property
    def folds_path(self) -> Path:
        return self.path / FOLDS_NAME

    @property
    def is_fold_set(self) -> bool:
        """A cross-validation fold set (``folds.json``, runs in ``fold-<i>/``) rather than one run."""
        return self.folds_path.is_file()

    def fold(self, index: int) -> Run:
        """The run of fold ``index`` of a fold set (it may not exist yet)."""
        return Run(self.path / f"fold-{index}")

    def read_folds(self) -> dict[str, Any]:
        """A fold set's ``folds.json``: ``recipe``, ``folds`` (K), ``seed``, ``subjects`` (held out, per fold), ..."""
        return read_structured(self.folds_path, "fold set")

    @classmethod
    def open(cls, path: str | Path) -> Run:
        """An existing run or fold set (``folds.json``); anything else is refused with one line."""
        path = Path(path)
        if not path.is_dir():
            raise BadInputError(path, "not a run directory (no such folder)")
        if not (path / "config.yaml").is_file() and not (path / FOLDS_NAME).is_file():
            raise BadInputError(path, "not a medsynth run (no config.yaml, nor folds.json of a fold set)")
        return cls(path)

    @classmethod
    def create(cls, path: str | Path, force: bool = False) -> Run:
        """A new run folder; an existing run is only reused with ``force``."""
        run = cls(Path(path))
        if run.config_path.exists() and not force:
            raise MedsynthError(f"{run.path}: a run already exists here; use --resume to continue it or --force to start over")
        run.path.mkdir(parents=True, exist_ok=True)
        return run

    def read_metrics(self) -> dict[str, Any]:
        """``metrics.json`` (``{}`` before any evaluation); a broken file is refused with one line."""
        if not self.metrics_path.exists():
            return {}
        return read_structured(self.metrics_path, "metrics")

    def write_metrics(self, metrics: dict[str, Any]) -> dict[str, Any]:
        """Merge ``metrics`` into ``metrics.json`` (atomically, strict JSON) and return what was written
        for them: see :func:`strict_metrics`."""
        written = strict_metrics(metrics)
        earlier = {k: v for k, v in self.read_metrics().items() if k != "not_computed"}  # reasons of this evaluation only
        merged = {**earlier, **written}
        atomic_write_text(self.metrics_path, json.dumps(merged, indent=2, sort_keys=True, allow_nan=False))
        return written


def strict_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """Metrics as strict JSON: a number that could not be computed (NaN, +-inf; e.g. a diversity of
    fewer than two images, the Dice of a class absent everywhere) becomes ``null``, and its dotted key
    is listed with the reason under ``"not_computed"``, so no reader meets a bare ``NaN``."""
    reasons: dict[str, str] = {}

    def clean(value: Any, key: str) -> Any:
        if isinstance(value, dict):
            return {k: clean(v, f"{key}.{k}" if key else str(k)) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v, f"{key}[{i}]") for i, v in enumerate(value)]
        if isinstance(value, float) and not math.isfinite(value):
            reasons[key] = f"not finite ({value})"
            return None
        return value

    cleaned = clean({k: v for k, v in metrics.items() if k != "not_computed"}, "")
    if reasons:
        cleaned["not_computed"] = reasons
    return cleaned


def fold_summary(per_fold: list[dict[str, Any]]) -> dict[str, Any]:
    """Every numeric metric of a fold set: ``<key>_per_fold`` (list, ``None`` where a fold has none),
    ``<key>_mean`` and ``<key>_sd`` (sample sd, ddof 1, over the folds with a finite value; ``None``
    when fewer than 1 resp. 2 have one). Nested metrics get dotted keys (``accuracy_per_class.normal``);
    booleans and strings are not metrics."""
    def numbers(value: Any, key: str, into: dict[str, float | None]) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                if k != "not_computed":
                    numbers(v, f"{key}.{k}" if key else str(k), into)
        elif value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)):
            into[key] = None if value is None or not math.isfinite(value) else float(value)

    flat: list[dict[str, float | None]] = []
    for metrics in per_fold:
        found: dict[str, float | None] = {}
        numbers(metrics, "", found)
        flat.append(found)
    keys = sorted({key for found in flat for key, value in found.items() if value is not None})
    summary: dict[str, Any] = {}
    for key in keys:
        values = [found.get(key) for found in flat]
        finite = [v for v in values if v is not None]
        mean = sum(finite) / len(finite)
        summary[f"{key}_per_fold"] = values
        summary[f"{key}_mean"] = mean
        summary[f"{key}_sd"] = math.sqrt(sum((v - mean) ** 2 for v in finite) / (len(finite) - 1)) if len(finite) > 1 else None
    return summary


JSON_SUFFIXES = (".json",)
YAML_SUFFIXES = (".yaml", ".yml")


def read_structured(path: str | Path, kind: str = "file") -> dict[str, Any]:
    """The one reader of JSON and YAML files (by suffix; anything else is read as YAML, a superset of JSON).

    Args:
        path: the file.
        kind: what the file should be, for the message (``"manifest"``, ``"config"`` ...).

    Returns:
        The mapping at the file's top level (an empty file is ``{}``).

    Raises:
        BadInputError: missing or unreadable file, invalid JSON/YAML, or a top level that
            is not a mapping: one line naming the file and the problem.
    """
    path = Path(path)
    if not path.is_file():
        raise BadInputError(path, f"{kind} not found")
    language = "JSON" if path.suffix.lower() in JSON_SUFFIXES else "YAML"
    try:
        text = path.read_text(encoding="utf-8")
        data = json.loads(text) if language == "JSON" else yaml.safe_load(text)
    except (OSError, UnicodeDecodeError) as exc:
        raise BadInputError(path, f"cannot read {kind} ({type(exc).__name__})") from None
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        where = f" at line {exc.lineno}" if isinstance(exc, json.JSONDecodeError) else _yaml_line(exc)
        raise BadInputError(path, f"{kind} is not valid {language}{where}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise BadInputError(path, f"expected a {language} mapping ({kind}), got {type(data).__name__}")
    return data


def _yaml_line(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    return f" at line {mark.line + 1}" if mark is not None else ""


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """The one atomic writer: a uniquely named temporary file in the same folder, fsync of the
    file, rename over ``path``, fsync of the folder. A kill leaves the old file or the new one,
    never half of one; two writers never share a temporary file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def remove_stale_temps(folder: Path) -> None:
    """Delete temporary files that a killed :func:`atomic_write_bytes` left in ``folder``."""
    for stale in Path(folder).glob(f".*{TEMP_SUFFIX}"):
        stale.unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
    """:func:`atomic_write_bytes` of ``text`` in UTF-8."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, data: Any, indent: int = 1) -> None:
    """``data`` as JSON (with a final newline) through :func:`atomic_write_bytes`."""
    atomic_write_text(path, json.dumps(data, indent=indent) + "\n")


def fsync_dir(folder: Path) -> None:
    """Make a rename durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
