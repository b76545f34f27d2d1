"""User-facing errors: the CLI prints them as one line and exits with status 2."""

from __future__ import annotations

from pathlib import Path


class MedsynthError(Exception):
    """An error caused by the user's input or request, not by a bug.

    The CLI prints ``medsynth: error: <message>`` on stderr and exits with status 2,
    without a traceback.
    """


def quote_path(path: str | Path) -> str:
    """``path`` as a message shows it: as written when every character is printable, else quoted with
    its control characters escaped (``'a\\nb.nii.gz'``), so a newline in a file name cannot split a line."""
    text = str(path)
    return text if text.isprintable() else repr(text)


def one_line(text: str) -> str:
    """``text`` with its control characters (newlines, tabs, escapes) written as escapes: one line."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


class BadInputError(MedsynthError):
    """A file that cannot be used: the message names the file (:func:`quote_path`) and the problem."""

    def __init__(self, path: str | Path, problem: str):
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{quote_path(path)}: {problem}")


class NonFiniteOutputError(MedsynthError):
    """A result holding NaN or infinity, refused before its file was written (every image, field and control
    grid writer checks: :func:`medsynth.data.io.check_finite_output`).

    The writer knows the file, not the cause: a command adds the setting most likely at fault with
    :meth:`blaming` (register: ``learning_rate``; reconstruct: its method's step size).
    """

    def __init__(self, path: str | Path, count: int, total: int, cause: str = "a setting is likely out of range"):
        self.path, self.count, self.total, self.cause = Path(path), count, total, cause
        super().__init__(f"{quote_path(path)}: {count} of {total} value(s) hold NaN or infinity; nothing was written ({cause})")

    def blaming(self, cause: str) -> NonFiniteOutputError:
        """The same refusal naming ``cause`` (e.g. ``"lower learning_rate (now 1e+30)"``)."""
        return NonFiniteOutputError(self.path, self.count, self.total, cause)

    def __reduce__(self):  # survives pickling (worker processes of register --data)
        return type(self), (self.path, self.count, self.total, self.cause)


class DivergedError(MedsynthError):
    """Training met a non-finite loss or weights: it stopped before saving or exporting them."""


class RunBusyError(MedsynthError):
    """Another process holds the run folder's lock (``RUN/.lock``): the message names its PID."""

    def __init__(self, path: str | Path, pid: int | None):
        self.path = Path(path)
        self.pid = pid
        holder = f"process {pid}" if pid else "another process"
        super().__init__(f"{quote_path(path)}: busy: {holder} is writing this run (lock {Path(path) / '.lock'}); "
                         "wait for it to finish or stop it")


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training; ``run`` is the run folder to continue (``medsynth train --resume RUN``)."""

    def __init__(self, run: str | Path, resumable: bool):
        self.run = Path(run)
        self.resumable = resumable
        super().__init__(str(run))
