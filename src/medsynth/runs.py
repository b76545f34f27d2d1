"""The run directory: one folder holds everything a training run made.

```
RUN/config.yaml          fully resolved config (prev_config.yaml: the one before a --resume)
RUN/checkpoints/         last.ckpt, best.ckpt (atomic writes, full training state)
RUN/tb/                  TensorBoard logs
RUN/samples/             generated images and figures
RUN/metrics.json         evaluation results
RUN/report.html          self-contained report
RUN/model.safetensors    weights for sharing (config.yaml beside it rebuilds the model)
RUN/.lock                while a process writes the run: its PID (see :meth:`Run.lock`)
```

A cross-validation fold set (``medsynth train RECIPE --folds K``) is a folder of runs instead:
``RUN/folds.json`` (recipe, K, seed, held-out subjects per fold), ``RUN/fold-<i>/`` (each a full
run, its data view in ``RUN/fold-<i>/data/dataset.json``), ``RUN/metrics.json`` (per fold, mean
and sd) and ``RUN/report.html``; it has no ``config.yaml`` of its own.

It also holds the ground floor's file primitives: the one atomic writer
(:func:`atomic_write_bytes`) every file a kill could corrupt goes through (with the umask's mode),
the one reader of JSON/YAML files (:func:`read_structured`) that fails with one line naming the
file, and the one check of a command's ``--out`` (:func:`check_output`: never an input, never an
earlier result without ``--force``).
"""

from __future__ import annotations

import errno
import json
import math
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from medsynth.errors import BadInputError, MedsynthError, RunBusyError, quote_path

try:  # POSIX advisory locks; elsewhere runs are not locked
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

TEMP_SUFFIX = ".medsynth-tmp"  # the atomic writer's temporary files end so
FOLDS_NAME = "folds.json"  # marks a cross-validation fold set
LOCK_NAME = ".lock"  # held (flock) by the process writing a run; holds its PID
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID")  # set by Lightning's launcher, torchrun, SLURM

_held: dict[Path, list[int]] = {}  # run folder -> [lock file descriptor, nesting depth] held by this process


def is_rank_zero() -> bool:
    """True in the process that owns a run's files: a single process, or global rank 0 of a
    multi-process run (Lightning's launcher sets ``LOCAL_RANK``/``NODE_RANK`` for the processes it
    starts; torchrun ``RANK``; SLURM ``SLURM_PROCID``). Other ranks find the run, never write it."""
    return all(os.environ.get(name, "0") in ("", "0") for name in RANK_VARIABLES)


@dataclass(frozen=True)
class Run:
    """Paths of one run directory."""

    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))  # Run("folder") works as Run(Path("folder"))

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
        run.check_new(force)
        run.path.mkdir(parents=True, exist_ok=True)
        return run

    def check_new(self, force: bool = False) -> None:
        """Refuse to start a new run here (one line): another process writes it, or a run exists
        (without ``force``). Writes nothing."""
        self.check_free()
        if (self.config_path.exists() or self.is_fold_set) and not force:
            raise MedsynthError(f"{self.path}: a run already exists here; use --resume to continue it or --force to start over")

    @property
    def lock_path(self) -> Path:
        return self.path / LOCK_NAME

    def holder(self) -> int | None:
        """The PID of the process holding this run's lock now, or None when it is free."""
        if fcntl is None or not self.lock_path.exists() or self.path.resolve() in _held:
            return None
        try:
            fd = os.open(self.lock_path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_pid(fd) or -1
        finally:
            os.close(fd)  # closing drops a shared lock we may have taken
        return None

    def check_free(self) -> None:
        """Refuse with one line naming the holder's PID when another process writes this run."""
        pid = self.holder()
        if pid is not None:
            raise RunBusyError(self.path, pid if pid > 0 else None)

    @contextmanager
    def lock(self) -> Iterator[Run]:
        """Hold ``RUN/.lock`` (an advisory ``flock`` with this PID in it) while writing the run.

        A second process is refused with :class:`~medsynth.errors.RunBusyError` (its message names
        the holder's PID). The kernel releases the lock of a killed process, so its leftover file
        is taken over (with a note naming the dead PID). Re-entrant within one process; the file is
        removed on release. Creates the folder.
        """
        key = self.path.resolve()
        if fcntl is None or key in _held:
            if key in _held:
                _held[key][1] += 1
            try:
                yield self
            finally:
                if key in _held:
                    _held[key][1] -= 1
            return
        self.path.mkdir(parents=True, exist_ok=True)
        while True:
            try:
                fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
            except (PermissionError, OSError) as exc:
                if exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                    raise
                yield self  # a read-only run (shared weights): no one can write it, so no lock is needed
                return
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid = _read_pid(fd)
                os.close(fd)
                raise RunBusyError(self.path, pid) from None
            try:  # the previous holder may have removed the file between our open and flock: retry
                if os.path.samestat(os.fstat(fd), os.stat(self.lock_path)):
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        stale = _read_pid(fd)
        if stale and stale != os.getpid():
            from medsynth.console import note

            note(f"{self.path}: took over the lock left by process {stale}, which no longer runs")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        _held[key] = [fd, 1]
        try:
            yield self
        finally:
            _held[key][1] -= 1
            if _held[key][1] == 0:
                del _held[key]
                self.lock_path.unlink(missing_ok=True)  # while still holding it: no one can hold the old file
                os.close(fd)

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


def _read_pid(fd: int) -> int | None:
    try:
        return int(os.pread(fd, 32, 0).decode().strip() or 0) or None
    except (OSError, ValueError):
        return None


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


def check_output(out: str | Path, inputs: Iterable[str | Path | None] = (), force: bool | None = False, *,
                 folder: bool = False) -> Path:
    """The one check of a command's ``--out`` before its first write: it never clobbers an input, and an
    existing result is only replaced with ``--force``.

    Refused (one line naming ``out``; a missing input, naming it, comes first): an ``out`` that is an input
    (the same path after resolving symlinks, or the same file through a hard link); with ``folder``, an
    ``out`` inside an input folder or holding an input; a file ``out`` that is a folder or the reverse; an
    existing ``out`` (a file, or a folder that is not empty) without ``force``.

    Args:
        out: the command's ``--out``: a file, or with ``folder`` the folder it writes into.
        inputs: every file and folder the command reads (``None`` entries are skipped).
        force: replace an existing ``out``; ``None``: the command has its own rule for an existing folder
            (one it resumes into: ``register --data``, ``prepare``), so only the inputs are checked.
        folder: ``out`` is a folder.

    Returns:
        ``out`` as a ``Path``. Writes nothing.

    Raises:
        BadInputError: naming ``out`` and the input or the flag (a missing input: naming it).
    """
    out = Path(out)
    target = out.resolve()
    for given in inputs:
        if given is None:
            continue
        source = Path(given)
        if not source.exists():  # said first: the input is the problem to fix, not an earlier output
            raise BadInputError(source, "not found")
        resolved = source.resolve()
        if resolved == target or (out.exists() and os.path.samefile(source, out)):
            raise BadInputError(out, f"--out is the input {quote_path(source)}; choose another output")
        if folder and target in resolved.parents:
            raise BadInputError(out, f"--out holds the input {quote_path(source)}; choose a folder outside it")
        if folder and resolved.is_dir() and resolved in target.parents:
            raise BadInputError(out, f"--out is inside the input folder {quote_path(source)}; choose a folder outside it")
    if folder and out.exists() and not out.is_dir():
        raise BadInputError(out, "--out is a file; it names the folder to write into")
    if not folder and out.is_dir():
        raise BadInputError(out, "--out is a folder; it names the file to write")
    if force is False and out.exists() and (not folder or any(out.iterdir())):
        raise BadInputError(out, "already exists" + (" and is not empty" if folder else "") + "; pass --force to replace it")
    return out


STAGING_PREFIX = ".staging-"  # TARGET/.staging-<pid>/: a request's files before they replace TARGET/<name>/


def write_staged(target: Path, name: str, write: Callable[[Path], list[Path]]) -> list[Path]:
    """Let ``write(staging)`` write into ``TARGET/.staging-<pid>/<name>/`` and return its files, then replace
    ``TARGET/<name>/`` with that folder; the files' final paths.

    A request's files are never mixed with an earlier request's (``--force`` with a smaller ``--n``), a failure or
    a refusal (non-finite output) leaves the earlier files as they were, and the staging folder of a killed
    process is removed by the next request.
    """
    import shutil

    for stale in target.glob(f"{STAGING_PREFIX}*"):
        pid = stale.name.removeprefix(STAGING_PREFIX)
        if not (pid.isdigit() and _alive(int(pid))):
            shutil.rmtree(stale, ignore_errors=True)
    staging = target / f"{STAGING_PREFIX}{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        written = write(staging)
        final, old = target / name, staging / f"{name}.previous"
        if final.exists():
            final.rename(old)
        (staging / name).rename(final)
        return [final / path.relative_to(staging / name) for path in written]
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """The one atomic writer: a uniquely named temporary file in the same folder, fsync of the
    file, rename over ``path``, fsync of the folder. A kill leaves the old file or the new one,
    never half of one; two writers never share a temporary file. The file gets the mode a plain
    ``open`` would give it, ``0o666 & ~umask`` (mkstemp's own is 0600), so a group-shared run stays
    readable by the group."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as handle:
            if hasattr(os, "fchmod"):  # POSIX; elsewhere files have no such mode bits
                os.fchmod(handle.fileno(), 0o666 & ~current_umask())
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


_UMASK_FALLBACK: list[int] = []  # where /proc is missing: the umask read once (setting and restoring it)


def proc_field(path: str, key: str) -> str | None:
    """The first word after ``key:`` in a Linux ``/proc`` table (``/proc/self/status``, ``/proc/meminfo``),
    or None where the file or the key is missing (not Linux). The one reader of these tables."""
    try:
        with open(path, encoding="ascii") as table:
            for line in table:
                if line.startswith(key + ":"):
                    words = line.split()
                    return words[1] if len(words) > 1 else None
    except OSError:
        pass
    return None


def current_umask() -> int:
    """The process's file-creation mask, read without changing it (Linux: ``/proc/self/status``);
    elsewhere read once by setting and restoring it (the only portable way, racy if threads create files then)."""
    mask = proc_field("/proc/self/status", "Umask")
    if mask is not None:
        return int(mask, 8)
    if not _UMASK_FALLBACK:
        mask = os.umask(0o022)
        os.umask(mask)
        _UMASK_FALLBACK.append(mask)
    return _UMASK_FALLBACK[0]


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
