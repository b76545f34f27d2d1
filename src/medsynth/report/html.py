"""A self-contained ``report.html``: figures embedded as base64 PNG, metrics as a table.

Figures are ``matplotlib.figure.Figure`` objects, never pyplot: no global state, so
importing medsynth never changes a notebook's backend and figures need no closing.
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure

from medsynth.report.headline import headlines
from medsynth.runs import Run, atomic_write_bytes, atomic_write_text


def middle_slice(image: torch.Tensor | np.ndarray) -> np.ndarray:
    """A 2D view of a channel-first image: the first channel, the middle axial slice for 3D."""
    array = image.detach().cpu().float().numpy() if isinstance(image, torch.Tensor) else np.asarray(image, dtype=np.float32)
    array = array[0]
    return array[..., array.shape[-1] // 2] if array.ndim == 3 else array


def image_grid(images: Sequence[torch.Tensor | np.ndarray], ncols: int = 8, titles: Sequence[str] | None = None,
               vmin: float | None = 0.0, vmax: float | None = 1.0, cell: float = 1.3) -> Figure:
    """A grid figure of channel-first images (3D shown by their middle slice)."""
    n = max(1, len(images))
    ncols = min(ncols, n)
    nrows = -(-n // ncols)
    fig = Figure(figsize=(cell * ncols, cell * nrows + (0.3 if titles else 0)))
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for index, ax in enumerate(axes.flat):
        ax.axis("off")
        if index < len(images):
            ax.imshow(middle_slice(images[index]), cmap="gray", vmin=vmin, vmax=vmax)
            if titles:
                ax.set_title(titles[index], fontsize=7)
    fig.tight_layout(pad=0.2)
    return fig


def label_map_grid(pairs: Sequence[tuple[str, str, torch.Tensor, torch.Tensor]], num_classes: int, ncols: int = 4) -> Figure:
    """Label maps beside their volumes (middle slices), one pair after another.

    Args:
        pairs: ``(name, kind, class indices (1, *S), volume (1, *S) in [0, 1])``, titled
            ``labels <name>`` and ``<kind> <name>`` (e.g. kind ``generated`` or ``real``).
        num_classes: Classes, background included (class indices are shown scaled to [0, 1]).
        ncols: Images per row (even, so that pairs stay together).
    """
    top = max(1, num_classes - 1)
    images = [image for _, _, labels, volume in pairs for image in (labels.float() / top, volume)]
    titles = [title for name, kind, _, _ in pairs for title in (f"labels {name}", f"{kind} {name}")]
    return image_grid(images, ncols=ncols, titles=titles, vmin=0.0, vmax=1.0)


def save_figure(fig: Figure, path: Path) -> Path:
    """Write the figure as an image file (PNG by its suffix) and return ``path``."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format=Path(path).suffix.lstrip(".") or "png", dpi=100)
    atomic_write_bytes(Path(path), buffer.getvalue())
    return path


def figure_html(fig: Figure, alt: str = "") -> str:
    """An ``<img>`` tag holding the figure as base64 PNG."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    data = base64.b64encode(buffer.getvalue()).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def file_html(path: Path) -> str:
    """An ``<img>`` tag holding a PNG or GIF file (a movie) as base64."""
    kind = "gif" if Path(path).suffix.lower() == ".gif" else "png"
    return f'<img alt="{html.escape(Path(path).name)}" src="data:image/{kind};base64,{base64.b64encode(Path(path).read_bytes()).decode()}">'


def read_scalars(tb_dir: Path) -> dict[str, tuple[list[int], list[float]]]:
    """All scalar series of a TensorBoard log folder: tag -> (steps, values)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    series: dict[str, tuple[list[int], list[float]]] = {}
    for events in sorted(tb_dir.rglob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events), size_guidance={"scalars": 0})
        accumulator.Reload()
        for tag in accumulator.Tags().get("scalars", []):
            steps, values = series.setdefault(tag, ([], []))
            for event in accumulator.Scalars(tag):
                steps.append(event.step)
                values.append(event.value)
    return series


def loss_curves(tb_dir: Path) -> Figure | None:
    """Training and validation curves of every ``*loss*`` scalar (None when nothing was logged)."""
    series = {tag: data for tag, data in read_scalars(tb_dir).items() if "loss" in tag or "kl" in tag or "recon" in tag}
    if not series:
        return None
    fig = Figure(figsize=(3.2 * len(series), 2.6))
    axes = fig.subplots(1, len(series), squeeze=False)
    for ax, (tag, (steps, values)) in zip(axes.flat, sorted(series.items())):
        order = np.argsort(steps)
        ax.plot(np.asarray(steps)[order], np.asarray(values)[order], lw=1)
        ax.set_title(tag, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    return fig


def _shown(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return html.escape(json.dumps(value) if isinstance(value, (list, tuple, dict)) else str(value))


def headline_table(metrics: dict[str, Any], names: Sequence[str]) -> str:
    """The headline metrics, each beside its reference (``<metric>_real_reference`` or the ``_real`` score)."""
    rows = [f"<tr><td>{html.escape(h.name)}</td><td>{_shown(h.value)}</td>"
            f"<td>{_shown(h.reference) if h.reference_name else ''}</td>"
            f"<td>{html.escape(h.reference_name or '')}</td></tr>" for h in headlines(metrics, names)]
    if not rows:
        return ""
    return ('<table class="headline"><tr><th>metric</th><th>value</th><th>reference</th><th>reference is</th></tr>'
            + "".join(rows) + "</table>")


def metrics_table(metrics: dict[str, Any]) -> str:
    """Flatten nested metrics into a two-column HTML table."""
    rows = []

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, child in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), child)
        else:
            rows.append(f"<tr><td>{html.escape(prefix)}</td><td>{_shown(value)}</td></tr>")

    walk("", metrics)
    return "<table><tr><th>metric</th><th>value</th></tr>" + "".join(rows) + "</table>"


_STYLE = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px;color:#222}
h1{font-size:1.5em}h2{font-size:1.15em;border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;font-size:.9em}td,th{border:1px solid #ddd;padding:.25em .6em;text-align:left}
img{max-width:100%}.meta{color:#666;font-size:.85em}"""


def write_report(run: Run, title: str, sections: Sequence[tuple[str, str]], headline: Sequence[str] = ()) -> Path:
    """Write ``run/report.html``: the ``headline`` metrics beside their references, the
    ``(title, html)`` sections, loss curves, then every metric and the config."""
    parts = [f"<h1>{html.escape(title)}</h1>",
             f'<p class="meta">run: {html.escape(str(run.path.resolve()))} &middot; {datetime.now():%Y-%m-%d %H:%M}</p>']
    metrics = run.read_metrics()
    top = headline_table(metrics, headline) if metrics else ""
    if top:
        parts.append("<h2>Headline metrics</h2>" + top)
    for section_title, body in sections:
        parts.append(f"<h2>{html.escape(section_title)}</h2>{body}")
    curves = loss_curves(run.tb) if run.tb.exists() else None
    if curves is not None:
        parts.append("<h2>Training curves</h2>" + figure_html(curves, "loss curves"))
    if metrics:
        parts.append("<h2>All metrics</h2>" + metrics_table(metrics))
    if run.config_path.exists():
        parts.append("<h2>Config</h2><pre>" + html.escape(run.config_path.read_text()) + "</pre>")
    page = f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>{''.join(parts)}</body></html>"
    atomic_write_text(run.report_path, page)
    return run.report_path
