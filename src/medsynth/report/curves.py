"""Training curves a reader can read: one panel per quantity, train and validation overlaid,
stages shaded and named, resumes marked, a log scale where values span decades.

The scalars come from the run's TensorBoard folder (``RUN/tb``). Tags are ``<split>/<name>``;
a staged recipe logs ``<split>/<stage>_<name>`` (motion-ldm: ``train/image-ae_loss``), so a
quantity is the name without its stage, and a stage spans the steps where its tags were logged.
Each process that trains (the first start, every ``--resume``) writes its own events file: the
first step of every file but the first is a resume.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

# Panels in this order of families; within a family, quantities by name.
_FAMILIES = (("losses", ("loss", "kl", "recon", "mse", "nll", "epe", "adv", "smooth", "bending")),
             ("learning rate and loss weights", ("lr", "beta", "weight", "scale")))
_METRICS = "metrics"
_SKIPPED = ("epoch",)  # Lightning's own bookkeeping, not a quantity
PANEL_INCHES = (4.6, 3.0)  # at the report's 90 dpi: 414 x 270 px a panel, three to a row in 1280 px
PANELS_PER_ROW = 3


@dataclass
class Series:
    """The scalars of one tag: steps and values in step order."""

    steps: np.ndarray
    values: np.ndarray


@dataclass
class Curves:
    """What :func:`read_curves` finds: ``quantities[name][split]`` series, stage spans and resume steps."""

    quantities: dict[str, dict[str, Series]] = field(default_factory=dict)
    stages: list[tuple[str, int, int]] = field(default_factory=list)  # (stage, first step, last step)
    resumes: list[int] = field(default_factory=list)


def read_events(tb_dir: Path) -> list[dict[str, tuple[list[int], list[float]]]]:
    """The scalar series of every events file under ``tb_dir``, one dict (tag -> (steps, values)) per file, oldest first."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = sorted(Path(tb_dir).rglob("events.out.tfevents.*"), key=lambda p: (p.stat().st_mtime, p.name))
    found = []
    for events in files:
        accumulator = EventAccumulator(str(events), size_guidance={"scalars": 0})
        accumulator.Reload()
        found.append({tag: ([e.step for e in accumulator.Scalars(tag)], [e.value for e in accumulator.Scalars(tag)])
                      for tag in accumulator.Tags().get("scalars", [])})
    return found


def _stage_prefixes(names: set[str]) -> set[str]:
    """Prefixes ``p`` of ``p_rest`` names that look like stages: at least two prefixes share a suffix (``image-ae_loss``, ``ldm_loss``)."""
    by_suffix: dict[str, set[str]] = {}
    for name in names:
        if "_" in name:
            prefix, suffix = name.split("_", 1)
            by_suffix.setdefault(suffix, set()).add(prefix)
    return {prefix for prefixes in by_suffix.values() if len(prefixes) >= 2 for prefix in prefixes}


def read_curves(tb_dir: Path) -> Curves:
    """Quantities, stages and resumes of a run's TensorBoard folder (empty when nothing was logged)."""
    files = read_events(tb_dir)
    merged: dict[str, tuple[list[int], list[float]]] = {}
    resumes = []
    for number, tags in enumerate(files):
        first = min((min(steps) for steps, _ in tags.values() if steps), default=None)
        if number and first is not None and first > 0:
            resumes.append(int(first))
        for tag, (steps, values) in tags.items():
            into = merged.setdefault(tag, ([], []))
            into[0].extend(steps)
            into[1].extend(values)
    names = {tag.split("/", 1)[1] for tag in merged if "/" in tag}
    staged = _split(merged, _stage_prefixes(names))
    # Prefixes are stages only when they train one after the other (disjoint step ranges).
    spans = sorted(staged.stages, key=lambda span: span[1])
    if any(later[1] < earlier[2] for earlier, later in zip(spans, spans[1:])):
        staged = _split(merged, set())
    staged.resumes = resumes
    return staged


def _split(merged: dict[str, tuple[list[int], list[float]]], stages: set[str]) -> Curves:
    """Group tags into quantities, with ``stages`` as the name prefixes that are stages."""
    curves = Curves()
    spans: dict[str, list[int]] = {}
    for tag, (steps, values) in merged.items():
        split, name = tag.split("/", 1) if "/" in tag else ("", tag)
        if name in _SKIPPED or not steps:
            continue
        stage, quantity = name.split("_", 1) if "_" in name and name.split("_", 1)[0] in stages else (None, name)
        order = np.argsort(steps, kind="stable")
        series = Series(np.asarray(steps)[order], np.asarray(values, dtype=float)[order])
        if stage is not None:
            spans.setdefault(stage, []).extend([int(series.steps[0]), int(series.steps[-1])])
        label = f"{split or 'logged'} ({stage})" if stage else (split or "logged")
        curves.quantities.setdefault(quantity, {})[label] = series
    curves.stages = sorted(((stage, min(s), max(s)) for stage, s in spans.items()), key=lambda span: span[1])
    return curves


def _family(quantity: str) -> int:
    for index, (_, words) in enumerate(_FAMILIES):
        if any(word in quantity.lower() for word in words):
            return index if index == 0 else 2  # losses first, then metrics, then learning rate and weights
    return 1


def _spans_decades(values: np.ndarray) -> bool:
    finite = values[np.isfinite(values)]
    return finite.size > 1 and bool((finite > 0).all()) and finite.max() / finite.min() > 30.0


def training_curves(tb_dir: Path) -> Figure | None:
    """The run's training curves (None when nothing was logged).

    One panel per quantity (losses first, then metrics, then learning rate and loss weights),
    train and validation overlaid in each, at most three panels a row; staged runs get their
    stages shaded and named; a resume is a dashed vertical line; log scale where values span
    more than 30x.
    """
    curves = read_curves(tb_dir)
    if not curves.quantities:
        return None
    quantities = sorted(curves.quantities, key=lambda q: (_family(q), q))
    rows = -(-len(quantities) // PANELS_PER_ROW)
    columns = min(PANELS_PER_ROW, len(quantities))
    fig = Figure(figsize=(PANEL_INCHES[0] * columns, PANEL_INCHES[1] * rows), layout="constrained")
    axes = fig.subplots(rows, columns, squeeze=False)
    shades = ("#f2f2f2", "#dde8f5", "#f5ecdd", "#e3f2e1")
    for ax, quantity in zip(axes.flat, quantities):
        values = np.concatenate([series.values for series in curves.quantities[quantity].values()])
        for number, (stage, first, last) in enumerate(curves.stages):
            ax.axvspan(first, last, color=shades[number % len(shades)], zorder=0)
            ax.text((first + last) / 2, 1.0, stage, transform=ax.get_xaxis_transform(), ha="center", va="top", fontsize=7, color="#555")
        for step in curves.resumes:
            ax.axvline(step, color="#888", ls="--", lw=0.8)
        for label, series in sorted(curves.quantities[quantity].items()):
            style = {"lw": 1.4, "marker": "o", "ms": 2.5} if label.startswith("val") else {"lw": 0.9, "alpha": 0.8}
            ax.plot(series.steps, series.values, label=label, **style)
        if _spans_decades(values):
            ax.set_yscale("log")
        ax.set_title(quantity, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(quantities):]:
        ax.axis("off")
    if curves.resumes:
        fig.suptitle("dashed: resumed here", fontsize=8, x=0.99, ha="right")
    return fig
