"""The headline metrics of a run, each beside the reference that says whether it is good.

A recipe names its headline metrics (``Recipe.headline_metrics``); the report opens with
them and the demo prints them. A metric's reference is ``<metric>_real_reference`` (the
same measure between two halves of the real data); for a downstream ``*_with_generated`` score, its
``*_real_only`` arm; for a ``*_generated`` score, its ``*_real`` counterpart (the same score on real
data); for a field's ``*_epe_mean_mm``, the mean-field baseline, else the zero field.
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
    if "_with_generated" in name:  # downstream utility: generated data against the labelled real data alone
        candidates.append(name.replace("_with_generated", "_real_only"))
    if "_generated" in name:
        candidates.append(name.replace("_generated", "_real"))
    if name.endswith("_epe_mean_mm"):  # a field's error against the baselines any user has: the mean field, no motion
        candidates += [name.replace("_epe_mean_mm", "_epe_mean_flow_mm"), name.replace("_epe_mean_mm", "_epe_zero_mm")]
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
