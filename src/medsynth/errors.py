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
