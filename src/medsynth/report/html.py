"""A self-contained ``report.html``: figures embedded as base64 PNG, metrics as a table.

Figures are ``matplotlib.figure.Figure`` objects, never pyplot: no global state, so
importing medsynth never changes a notebook's backend and figures need no closing.
"""

from __future__ import annotations

import base64
import html
import io
import json
import re
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure

from medsynth.report.charts import fold_charts, reconstruction_charts, utility_charts
from medsynth.report.curves import training_curves
from medsynth.report.headline import headlines
from medsynth.runs import Run, atomic_write_bytes, atomic_write_text


def middle_slice(image: torch.Tensor | np.ndarray) -> np.ndarray:
    """A 2D view of a channel-first image: the first channel, the middle axial slice for 3D."""
    array = image.detach().cpu().float().numpy() if isinstance(image, torch.Tensor) else np.asarray(image, dtype=np.float32)
    array = array[0]
    return array[..., array.shape[-1] // 2] if array.ndim == 3 else array


FIGURE_DPI = 90  # the report's figures; a cell of CELL_INCHES is then 144 px
CELL_INCHES = 1.6
MIN_CELL_PX = 128  # the smallest picture cell a reader can judge anatomy in


def image_grid(images: Sequence[torch.Tensor | np.ndarray], ncols: int = 8, titles: Sequence[str] | None = None,
               vmin: float | None = 0.0, vmax: float | None = 1.0, cell: float = CELL_INCHES) -> Figure:
    """A grid figure of channel-first images (3D shown by their middle slice), ``cell`` inches a picture
    (never under :data:`MIN_CELL_PX` at the report's dpi), upscaled by nearest neighbour so voxels stay voxels."""
    cell = max(cell, MIN_CELL_PX / FIGURE_DPI)
    n = max(1, len(images))
    ncols = min(ncols, n)
    nrows = -(-n // ncols)
    fig = Figure(figsize=(cell * ncols, cell * nrows + (0.3 if titles else 0)))
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for index, ax in enumerate(axes.flat):
        ax.axis("off")
        if index < len(images):
            ax.imshow(middle_slice(images[index]), cmap="gray", vmin=vmin, vmax=vmax, interpolation="nearest")
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
    fig.savefig(buffer, format="png", dpi=FIGURE_DPI)
    data = base64.b64encode(buffer.getvalue()).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


MIN_FILE_PX = 480  # pictures and movies from files are shown at least this wide, by a whole factor


def file_html(path: Path, min_width: int = MIN_FILE_PX) -> str:
    """An ``<img>`` tag holding a PNG or GIF file (a movie) as base64, shown at least ``min_width`` px wide
    (a whole-number upscale, pixelated, so a small movie is readable and its voxels stay sharp)."""
    from PIL import Image

    data = Path(path).read_bytes()
    kind = "gif" if Path(path).suffix.lower() == ".gif" else "png"
    with Image.open(io.BytesIO(data)) as picture:
        width = picture.width
    factor = max(1, -(-min_width // max(1, width)))
    style = f' style="width:{width * factor}px;image-rendering:pixelated"' if factor > 1 else ""
    return f'<img alt="{html.escape(Path(path).name)}"{style} src="data:image/{kind};base64,{base64.b64encode(data).decode()}">'


def _shown(value: Any) -> str:
    if value is None:  # a metric that could not be computed (its reason is under "not_computed")
        return "–"
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


def settings_table(values: Mapping[str, Any]) -> str:
    """A two-column table of named settings (a recipe's declared data format), values as text."""
    rows = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(str(v))}</td></tr>" for k, v in values.items())
    return "<table>" + rows + "</table>"


_STYLE = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px;color:#222}
h1{font-size:1.5em}h2{font-size:1.15em;border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;font-size:.9em}td,th{border:1px solid #ddd;padding:.25em .6em;text-align:left}
img{max-width:100%;display:block;margin:.4em 0}.meta{color:#666;font-size:.85em}"""


def write_report(run: Run, title: str, sections: Sequence[tuple[str, str]], headline: Sequence[str] = ()) -> Path:
    """Write ``run/report.html``: the ``headline`` metrics beside their references, the
    ``(title, html)`` sections, the comparison charts that metrics.json allows (utility arms, reconstruction
    methods, folds: :mod:`medsynth.report.charts`), the training curves, then every metric and the config."""
    parts = [f"<h1>{html.escape(title)}</h1>",
             f'<p class="meta">run: {html.escape(str(run.path.resolve()))} &middot; {datetime.now():%Y-%m-%d %H:%M}</p>']
    metrics = run.read_metrics()
    top = headline_table(metrics, headline) if metrics else ""
    if top:
        parts.append("<h2>Headline metrics</h2>" + top)
    for section_title, body in sections:
        parts.append(f"<h2>{html.escape(section_title)}</h2>{body}")
    for chart_title, chart in [*utility_charts(metrics), *reconstruction_charts(metrics), *fold_charts(metrics)]:
        parts.append(f"<h2>{html.escape(chart_title)}</h2>" + figure_html(chart, chart_title))
    curves = training_curves(run.tb) if run.tb.exists() else None
    if curves is not None:
        parts.append("<h2>Training curves</h2>" + figure_html(curves, "training curves"))
    if metrics:
        parts.append("<h2>All metrics</h2>" + metrics_table(metrics))
    if run.config_path.exists():
        parts.append("<h2>Config</h2><pre>" + html.escape(run.config_path.read_text()) + "</pre>")
    page = f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>{''.join(parts)}</body></html>"
    atomic_write_text(run.report_path, page)
    return run.report_path


def embedded_images(page: str) -> list[tuple[str, int, int, int]]:
    """Every base64 ``<img>`` of a report page as ``(alt, width, height, shown width)`` in pixels, decoding each
    (a picture that does not decode raises); the shown width is the style's, else the picture's own."""
    from PIL import Image

    found = []
    for match in re.finditer(r'<img alt="([^"]*)"(?: style="width:(\d+)px[^"]*")? src="data:image/\w+;base64,([^"]+)">', page):
        with Image.open(io.BytesIO(base64.b64decode(match.group(3)))) as picture:
            picture.load()
            found.append((html.unescape(match.group(1)), picture.width, picture.height, int(match.group(2) or picture.width)))
    return found


def fold_table(metrics: dict[str, Any]) -> str:
    """The mean ± sd and per-fold values of every metric of a fold set (``runs.fold_summary``'s keys), as an HTML table."""

    def shown(value: Any) -> str:
        return "–" if value is None else f"{value:.4g}"

    rows = [f"<tr><td>{html.escape(key[:-5])}</td><td>{shown(metrics[key])} ± {shown(metrics.get(key[:-5] + '_sd'))}</td>"
            f"<td>{', '.join(shown(v) for v in metrics.get(key[:-5] + '_per_fold', []))}</td></tr>"
            for key in sorted(metrics) if key.endswith("_mean") and f"{key[:-5]}_per_fold" in metrics]
    if not rows:
        return "<p>Not evaluated yet: run <code>medsynth evaluate</code> on the fold set.</p>"
    return "<table><tr><th>metric</th><th>mean ± sd</th><th>per fold</th></tr>" + "".join(rows) + "</table>"
