"""A titled block of a run's report (no plotting imports: recipes declare sections cheaply)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ReportSection:
    """A titled block of HTML for ``report.html``."""

    title: str
    html: str
