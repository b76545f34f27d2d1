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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medsynth.errors import BadInputError, MedsynthError


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
    """Write through a temporary file in the same folder, fsync, then rename: never a half file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


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
