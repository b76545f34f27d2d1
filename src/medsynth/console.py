"""The one stderr console (ground floor): progress lines and results that must not mix with stdout.

stdout carries only what a script may capture (a path, JSON); everything for a person's
eyes goes through :data:`console` on stderr.
"""

from __future__ import annotations

from rich.console import Console

console = Console(stderr=True)


def step(stage: str, message: str) -> None:
    """One progress line, e.g. ``medsynth demo 3/6 train cvae``."""
    console.print(f"[bold cyan]medsynth {stage}[/] {message}")


def note(message: str) -> None:
    """One line of information (a registration's quality, a demo's metrics) on stderr."""
    console.print(message, highlight=False, markup=False, soft_wrap=True)  # one line, whatever the terminal width
