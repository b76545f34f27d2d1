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
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medsynth.errors import BadInputError, MedsynthError

TEMP_SUFFIX = ".medsynth-tmp"  # the atomic writer's temporary files end so


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

    @classmethod
    def open(cls, path: str | Path) -> Run:
        """An existing run; anything else is refused with one line."""
        path = Path(path)
        if not path.is_dir():
            raise BadInputError(path, "not a run directory (no such folder)")
        if not (path / "config.yaml").is_file():
            raise BadInputError(path, "not a medsynth run (no config.yaml)")
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
        if not self.metrics_path.exists():
            return {}
        try:
            return json.loads(self.metrics_path.read_text())
        except json.JSONDecodeError:
            raise BadInputError(self.metrics_path, "not valid JSON") from None

    def write_metrics(self, metrics: dict[str, Any]) -> Path:
        """Merge ``metrics`` into ``metrics.json`` (atomically)."""
        merged = {**self.read_metrics(), **metrics}
        atomic_write_text(self.metrics_path, json.dumps(merged, indent=2, sort_keys=True))
        return self.metrics_path


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
    atomic_write_bytes(path, text.encode())


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
