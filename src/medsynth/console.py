"""The one stderr console (ground floor): progress lines and results that must not mix with stdout.

stdout carries only what a script may capture (a path, JSON); everything for a person's
eyes goes through :data:`console` on stderr. Lightning's own notices (its banner of
accelerators, tips, data-loader and logging-interval warnings) are not for that console:
while a run trains, :func:`lightning_to_log` sends them to the run's ``train.log``.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path

from rich.console import Console

console = Console(stderr=True)

LOG_NAME = "train.log"  # RUN/train.log: Lightning's notices of the run's trainings, appended
LIGHTNING_LOGGERS = ("lightning.pytorch", "lightning.fabric")  # where Lightning's rank_zero_info/warn lines are logged


def step(stage: str, message: str) -> None:
    """One progress line, e.g. ``medsynth demo 3/6 train cvae``."""
    console.print(f"[bold cyan]medsynth {stage}[/] {message}")


def note(message: str) -> None:
    """One line of information (a registration's quality, a demo's metrics) on stderr."""
    console.print(message, highlight=False, markup=False, soft_wrap=True)  # one line, whatever the terminal width


class RunLog(logging.Handler):
    """Lines for a run's log file: held in memory until the run folder may be written (:meth:`open`; nothing is
    written before a training's checks pass), then appended to the file; lines never opened are dropped."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
        self.held: list[str] = []
        self.path: Path | None = None

    def emit(self, record: logging.LogRecord) -> None:
        self.write(self.format(record))

    def write(self, line: str) -> None:
        """One line (held, or appended to the file)."""
        if self.path is None:
            self.held.append(line)
            return
        with open(self.path, "a", encoding="utf-8") as stream:  # a log grows: appended, not replaced atomically
            stream.write(line.rstrip("\n") + "\n")

    def open(self, path: str | Path) -> None:
        """Append the held lines, and every later one, to ``path``."""
        self.path, held, self.held = Path(path), self.held, []
        for line in held:
            self.write(line)


def _from_lightning(category: type[Warning], filename: str) -> bool:
    from lightning.fabric.utilities.warnings import PossibleUserWarning

    return issubclass(category, PossibleUserWarning) or "lightning" in Path(filename).parts


@contextlib.contextmanager
def lightning_to_log(log: RunLog) -> Iterator[RunLog]:
    """Within: Lightning's logger records and the warnings it raises go to ``log``, not stderr; other warnings and
    medsynth's own lines stay on stderr. Lightning's handlers and the warning display are restored on exit."""
    loggers = [logging.getLogger(name) for name in LIGHTNING_LOGGERS]
    saved = [(logger.handlers[:], logger.propagate, logger.level) for logger in loggers]
    for logger in loggers:
        logger.handlers, logger.propagate = [log], False
        logger.setLevel(logging.INFO)
    try:
        with warnings.catch_warnings():  # restores warnings.showwarning (and the filters) on exit
            shown = warnings.showwarning

            def show(message, category, filename, lineno, file=None, line=None):  # warnings.showwarning's signature
                if _from_lightning(category, filename):
                    log.handle(logging.LogRecord("lightning.warnings", logging.WARNING, filename, lineno,
                                                 f"{category.__name__}: {message}", None, None))
                else:
                    shown(message, category, filename, lineno, file, line)

            warnings.showwarning = show
            yield log
    finally:
        for logger, (handlers, propagate, level) in zip(loggers, saved):
            logger.handlers, logger.propagate = handlers, propagate
            logger.setLevel(level)
