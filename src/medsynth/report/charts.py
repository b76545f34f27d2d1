"""Comparison charts drawn from metrics.json: the figures that decide whether a model is worth using.

Every chart is found by its keys, so a recipe that writes the keys gets the chart without report code:

- downstream utility (real only, classic augmentation, PCA, generated, oracle) and train-on-synthetic
  (``tstr_<m>`` against ``tstr_<m>_real_reference``), as bars with the seeds' spread
  (``<key>_sd``) and each seed as a dot (``<key>_per_seed``);
- reconstruction methods (``reconstruction_methods``): PSNR in the heart and myocardium Dice per
  method, with each learned method's no-prior variant beside it (``reconstruction_psnr_<m>_no_prior``);
- fold sets: every ``<key>_mean`` with its ``_sd`` and ``_per_fold`` values.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure

# The utility arms in reading order; a metric family is ``downstream_<measure>_<arm>[_<unit>]``.
UTILITY_ARMS = (("real_only", "real only"), ("classic", "classic aug."), ("pca", "PCA motion"),
                ("with_generated", "generated"), ("oracle", "oracle"))
UTILITY_MEASURES = (("epe", "_mm", "end-point error (mm), lower is better"), ("accuracy", "", "accuracy, higher is better"),
                    ("dice", "", "Dice, higher is better"))


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value) else None


def bar_chart(bars: Sequence[tuple[str, float, float | None, Sequence[float]]], ylabel: str,
              reference: tuple[str, float] | None = None) -> Figure:
    """Bars ``(label, value, sd or None, per-seed values)`` with sd whiskers and seed dots, and an optional reference line
    (the report's section heading is the chart's title)."""
    fig = Figure(figsize=(max(4.6, 1.1 * len(bars) + 1.5), 3.2), layout="constrained")
    ax = fig.subplots()
    x = np.arange(len(bars))
    values = [bar[1] for bar in bars]
    errors = [bar[2] or 0.0 for bar in bars]
    ax.bar(x, values, yerr=errors, capsize=4, color="#7aa6d6", edgecolor="#335", zorder=2)
    for index, (_, _, _, seeds) in enumerate(bars):
        if len(seeds) > 1:
            ax.scatter(np.full(len(seeds), index) + np.linspace(-0.15, 0.15, len(seeds)), seeds, s=10, color="#223", zorder=3)
    if reference is not None:
        ax.axhline(reference[1], color="#c44", ls="--", lw=1, label=reference[0])
        ax.legend(fontsize=7)
    low = min(v - e for v, e in zip(values, errors))
    high = max(v + e for v, e in zip(values, errors))
    margin = 0.15 * (high - low) if high > low else 0.1 * abs(high) + 1e-6
    ax.set_ylim(max(0.0, low - margin) if low >= 0 else low - margin, high + margin)
    ax.set_xticks(x, [bar[0] for bar in bars], fontsize=8, rotation=20 if len(bars) > 5 else 0)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(axis="y", alpha=0.3, zorder=0)
    return fig


def _bar(metrics: Mapping[str, Any], key: str, label: str) -> tuple[str, float, float | None, list[float]] | None:
    value = _number(metrics.get(key))
    if value is None:
        return None
    seeds = [v for v in (_number(s) for s in metrics.get(f"{key}_per_seed", []) or []) if v is not None]
    return label, value, _number(metrics.get(f"{key}_sd")), seeds


def utility_charts(metrics: Mapping[str, Any]) -> list[tuple[str, Figure]]:
    """(title, figure) for the downstream utility arms and train-on-synthetic results that ``metrics`` holds."""
    charts = []
    for measure, unit, ylabel in UTILITY_MEASURES:
        bars = [bar for arm, label in UTILITY_ARMS if (bar := _bar(metrics, f"downstream_{measure}_{arm}{unit}", label))]
        if len(bars) >= 2:
            seeds = metrics.get("downstream_seeds")
            count = len(seeds) if isinstance(seeds, list) else seeds
            spread = "" if not count else " (1 seed)" if count == 1 else f" ({count} seeds, mean ± sd, dots: seeds)"
            charts.append((f"Downstream {measure}: the task network trained on each pool{spread}", bar_chart(bars, ylabel)))
        tstr = _bar(metrics, f"tstr_{measure}", "trained on generated")
        real = _bar(metrics, f"tstr_{measure}_real_reference", "trained on real")
        if tstr and real:
            charts.append((f"Train on synthetic, test on real ({measure})", bar_chart([real, tstr], ylabel)))
    return charts


def reconstruction_charts(metrics: Mapping[str, Any]) -> list[tuple[str, Figure]]:
    """(title, figure): PSNR in the heart and myocardium Dice per reconstruction method (no-prior variants beside theirs)."""
    methods = metrics.get("reconstruction_methods")
    if not isinstance(methods, list) or not methods:
        return []
    charts = []
    for key, ylabel, ceiling in (("reconstruction_psnr_heart_{}", "PSNR in the heart (dB)", None),
                                 ("reconstruction_dice_myo_{}", "myocardium Dice", "reconstruction_dice_myo_truth")):
        bars = []
        for method in methods:
            for variant, label in ((method, method), (f"{method}_no_prior", f"{method} no prior")):
                bar = _bar(metrics, key.format(variant), label)
                if bar:
                    bars.append(bar)
        if len(bars) >= 2:
            limit = _number(metrics.get(ceiling)) if ceiling else None
            reference = ("segmenter on the truth", limit) if limit is not None else None
            charts.append((f"Reconstruction: {ylabel} per method", bar_chart(bars, ylabel, reference)))
    return charts


def fold_charts(metrics: Mapping[str, Any], per_chart: int = 6) -> list[tuple[str, Figure]]:
    """(title, figure): the fold set's metrics as mean ± sd bars with each fold as a dot, ``per_chart`` metrics a figure."""
    keys = sorted(key[:-5] for key in metrics if key.endswith("_mean") and _number(metrics[key]) is not None)
    charts = []
    for start in range(0, len(keys), per_chart):
        figure = Figure(figsize=(4.6 * min(3, len(keys[start:start + per_chart])), 3.0 * -(-len(keys[start:start + per_chart]) // 3)),
                        layout="constrained")
        chunk = keys[start:start + per_chart]
        axes = figure.subplots(-(-len(chunk) // 3), min(3, len(chunk)), squeeze=False)
        for ax, key in zip(axes.flat, chunk):
            folds = [v for v in (_number(f) for f in metrics.get(f"{key}_per_fold", []) or []) if v is not None]
            sd = _number(metrics.get(f"{key}_sd")) or 0.0
            ax.bar([0], [metrics[f"{key}_mean"]], yerr=[sd], capsize=4, color="#7aa6d6", edgecolor="#335", width=0.5)
            ax.scatter(np.linspace(-0.12, 0.12, len(folds)) if len(folds) > 1 else [0] * len(folds), folds, s=12, color="#223", zorder=3)
            ax.set_xticks([])
            ax.set_title(key, fontsize=9)
            ax.tick_params(labelsize=7)
        for ax in list(axes.flat)[len(chunk):]:
            ax.axis("off")
        charts.append((f"Cross-validation: mean ± sd over folds (dots: folds), {start + 1}-{start + len(chunk)} of {len(keys)}", figure))
    return charts
