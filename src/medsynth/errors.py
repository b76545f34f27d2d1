"""User-facing errors: the CLI prints them as one line and exits with status 2."""

from __future__ import annotations

from pathlib import Path


class MedsynthError(Exception):
    """An error caused by the user's input or request, not by a bug.

    The CLI prints ``medsynth: error: <message>`` on stderr and exits with status 2,
    without a traceback.
    """


class BadInputError(MedsynthError):
    """A file that cannot be used: the message names the file and the problem."""

    def __init__(self, path: str | Path, problem: str):
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}")


class DivergedError(MedsynthError):
    """Training met a non-finite loss or weights: it stopped before saving or exporting them."""


class RunBusyError(MedsynthError):
    """Another process holds the run folder's lock (``RUN/.lock``): the message names its PID."""

    def __init__(self, path: str | Path, pid: int | None):
        self.path = Path(path)
        self.pid = pid
        holder = f"process {pid}" if pid else "another process"
        super().__init__(f"{path}: busy: {holder} is writing this run (lock {Path(path) / '.lock'}); "
                         "wait for it to finish or stop it")


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training; ``run`` is the run folder to continue (``medsynth train --resume RUN``)."""

    def __init__(self, run: str | Path, resumable: bool):
        self.run = Path(run)
        self.resumable = resumable
        super().__init__(str(run))
