"""The headline metrics of a run, each beside the reference that says whether it is good.

A recipe names its headline metrics (``Recipe.headline_metrics``); the report opens with
them and the demo prints them. A metric's reference is ``<metric>_real_reference`` (the
same measure between two halves of the real data) or, for a ``*_generated`` score, its
``*_real`` counterpart (the same score on real data).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Headline:
    """One headline metric: its value, and its reference's name and value when metrics.json has one."""

    name: str
    value: Any
    reference_name: str | None = None
    reference: Any = None


def reference_of(name: str, metrics: Mapping[str, Any]) -> str | None:
    """The key of ``name``'s reference in ``metrics``, or None."""
    candidates = [f"{name}_real_reference"]
    if "_generated" in name:
        candidates.append(name.replace("_generated", "_real"))
    return next((key for key in candidates if key in metrics), None)


def headlines(metrics: Mapping[str, Any], names: Sequence[str]) -> list[Headline]:
    """The metrics called ``names`` that ``metrics`` holds, in that order, with their references."""
    found = []
    for name in names:
        if name in metrics:
            reference = reference_of(name, metrics)
            found.append(Headline(name, metrics[name], reference, metrics.get(reference) if reference else None))
    return found


def rounded(value: Any, digits: int = 3) -> Any:
    """A float rounded for display; anything else as it is."""
    return round(value, digits) if isinstance(value, float) else value
