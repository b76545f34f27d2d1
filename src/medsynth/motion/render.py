"""Movies (GIF) and still figures of 4D sequences and deformation fields (``medsynth render``).

A panel shows one slice of one view: ``axial`` (a slice along the third array axis,
first axis to the right, second up), ``coronal`` (along the second axis) or ``sagittal``
(along the first axis), drawn in mm so anisotropic voxels keep their aspect. A field is
drawn over the image as in-plane arrows (``quiver``, every few voxels) or as a heatmap of
its magnitude in mm (``magnitude``). A movie has one frame per phase; rows are views and
columns slices.
"""

from __future__ import annotations

import io
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from monai.data import MetaTensor

from medsynth.data.io import load_image, spacing_of, suffix_of
from medsynth.errors import BadInputError
from medsynth.motion.fields import jacobian_determinant, load_field, voxel_to_mm
from medsynth.runs import atomic_write_bytes

__all__ = ["VIEWS", "load_fields", "load_frames", "render_movie", "render_still", "slice_indices", "write_motion"]

View = Literal["axial", "coronal", "sagittal"]
VIEWS: dict[str, int] = {"sagittal": 0, "coronal": 1, "axial": 2}  # the array axis each view slices along
_VIEW_OF_AXIS = {axis: view for view, axis in VIEWS.items()}
Anchor = Literal["middle", "first", "last"]
Style = Literal["quiver", "magnitude", "jacobian"]

FrameSource = str | Path | Sequence[str | Path] | np.ndarray | torch.Tensor
FieldSource = str | Path | Sequence[str | Path] | np.ndarray | torch.Tensor
_PHASE = re.compile(r"_t(\d+)\.(nii\.gz|nii|npz)$")


def slice_indices(length: int, count: int, anchor: Anchor = "middle") -> list[int]:
    """``count`` slice indices of an axis of ``length``: around the middle, from the first or up to the last.

    Slices are ``max(1, length // (2 count))`` apart, so together they span about half the axis.
    """
    if count < 1:
        raise ValueError(f"slices must be >= 1, got {count}")
    step = max(1, length // (2 * count))
    if anchor == "middle":
        start = length // 2 - step * (count - 1) // 2
    elif anchor == "first":
        start = 0
    elif anchor == "last":
        start = length - 1 - step * (count - 1)
    else:
        raise ValueError(f"anchor must be 'middle', 'first' or 'last', got {anchor!r}")
    return sorted({int(np.clip(start + k * step, 0, length - 1)) for k in range(count)})


def _phase_files(folder: Path, prefixes: Sequence[str]) -> dict[int, Path]:
    files = {}
    for path in sorted(folder.iterdir()):
        match = _PHASE.search(path.name)
        if match and path.name.startswith(tuple(prefixes)):
            files[int(match.group(1))] = path
    return files


def load_frames(frames: FrameSource) -> tuple[np.ndarray, np.ndarray]:
    """A sequence as ``(T, X, Y, Z)`` float32 and its affine.

    Args:
        frames: a 4D NIfTI ``(X, Y, Z, T)``, a folder of ``image_tNN`` files (a phantom
            subject), a DICOM series folder, a list of 3D image files, or an array ``(T, X, Y, Z)`` / ``(X, Y, Z)``
            (identity affine).
    """
    if isinstance(frames, (np.ndarray, torch.Tensor)):
        array = np.asarray(frames.detach().cpu() if isinstance(frames, torch.Tensor) else frames, dtype=np.float32)
        return (array[None] if array.ndim == 3 else array), np.eye(4)
    if isinstance(frames, (str, Path)) and Path(frames).is_dir():
        files = _phase_files(Path(frames), ["image"])
        if files:
            frames = [files[t] for t in sorted(files)]
        # otherwise the folder is one image (a DICOM series), read by load_image like a file
    paths = [frames] if isinstance(frames, (str, Path)) else list(frames)
    images = [load_image(p) for p in paths]
    affine = np.asarray(images[0].affine, dtype=np.float64)
    for path, image in zip(paths, images):
        if image.ndim != 4:
            raise BadInputError(path, f"expected a 3D volume or a 4D sequence, got shape {tuple(image.shape[1:])}")
        if image.shape[1:] != images[0].shape[1:] or not np.allclose(np.asarray(image.affine), affine, atol=1e-4):
            raise BadInputError(path, f"shape or affine differs from {paths[0]}")
    return np.concatenate([np.asarray(image.as_tensor()) for image in images]).astype(np.float32), affine


def load_fields(field: FieldSource, phases: int | None = None) -> np.ndarray:
    """Fields in voxels ``(T, 3, X, Y, Z)`` float32.

    Args:
        field: a folder of ``dvf_tNN`` NIfTI fields or ``grid_tNN.npz`` control grids (a
            phase without a file, such as a registration's reference phase, gets the zero
            field), a list of field or grid files, a single file, or an array
            ``(T, 3, X, Y, Z)`` / ``(3, X, Y, Z)`` in voxels.
        phases: for a folder, the number of phases (default: up to its last file).
    """
    from medsynth.motion.registration import load_transform

    def read(path: Path) -> np.ndarray:
        if suffix_of(path) == ".npz":
            return np.asarray(load_transform(path)[0].dense_field().as_tensor())
        return np.asarray(load_field(path).as_tensor())

    if isinstance(field, (np.ndarray, torch.Tensor)):
        array = np.asarray(field.detach().cpu() if isinstance(field, torch.Tensor) else field, dtype=np.float32)
        array = array[None] if array.ndim == 4 else array
    elif isinstance(field, (str, Path)) and Path(field).is_dir():
        files = _phase_files(Path(field), ["dvf", "grid"])
        if not files:
            raise BadInputError(field, "folder holds no dvf_tNN or grid_tNN files")
        loaded = {t: read(path) for t, path in files.items()}
        shape = next(iter(loaded.values())).shape
        array = np.stack([loaded.get(t, np.zeros(shape, dtype=np.float32)) for t in range(phases or max(loaded) + 1)])
    else:
        paths = [field] if isinstance(field, (str, Path)) else list(field)
        array = np.stack([read(Path(p)) for p in paths])
    if array.ndim != 5 or array.shape[1] != 3:
        raise ValueError(f"fields must be (T, 3, X, Y, Z), got {array.shape}")
    return array.astype(np.float32)


def _plane(volume: np.ndarray, axis: int, index: int) -> np.ndarray:
    """The slice of a ``(..., X, Y, Z)`` array, transposed for ``imshow(origin='lower')`` (second in-plane axis up)."""
    plane = np.take(volume, index, axis=volume.ndim - 3 + axis)
    return np.swapaxes(plane, -1, -2)


class _Figure:
    """A grid of panels (views x slices) whose data is replaced frame by frame."""

    def __init__(self, images: np.ndarray, affine: np.ndarray, fields: np.ndarray | None, views: Sequence[View], slices: int, anchor: Anchor, style: Style, window: tuple[float, float] | None, arrows: int):
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure  # no pyplot: no global state, no display needed

        for view in views:
            if view not in VIEWS:
                raise ValueError(f"view must be one of {', '.join(VIEWS)}, got {view!r}")
        if style not in ("quiver", "magnitude", "jacobian"):
            raise ValueError(f"style must be 'quiver', 'magnitude' or 'jacobian', got {style!r}")
        self.images, self.style = images, style
        spacing = spacing_of(affine)
        self.fields_mm = None if fields is None else np.asarray(voxel_to_mm(torch.from_numpy(np.array(fields, dtype=np.float32)), affine))
        low, high = window or tuple(np.percentile(images, [1.0, 99.5]))
        magnitudes = None if self.fields_mm is None else np.linalg.norm(self.fields_mm, axis=1)
        peak = float(magnitudes.max()) if magnitudes is not None and magnitudes.max() > 0 else 1.0
        # The scalar map over the image: |u| in mm, or the Jacobian determinant (< 0: folding, 1: no volume change).
        self.scalars, scale = None, None
        if fields is not None and style == "magnitude":
            self.scalars, scale = magnitudes, {"cmap": "inferno", "vmin": 0.0, "vmax": peak, "label": "displacement (mm)"}
        elif fields is not None and style == "jacobian":
            self.scalars = jacobian_determinant(torch.from_numpy(np.array(fields, dtype=np.float64))).numpy()
            scale = {"cmap": "RdBu_r", "vmin": 0.0, "vmax": 2.0, "label": "Jacobian determinant"}
        self.panels = [(VIEWS[view], index) for view in views for index in slice_indices(images.shape[1 + VIEWS[view]], slices, anchor)]
        columns = len(self.panels) // len(views)
        bars = 1.1 * (1 + (self.scalars is not None))  # inches for the grey window's and the field's colour bars
        self.figure = Figure(figsize=(3.2 * columns + bars, 3.2 * len(views) + 0.4), dpi=80, layout="constrained")
        self.canvas = FigureCanvasAgg(self.figure)
        self.artists = []
        for number, (axis, index) in enumerate(self.panels):
            plot = self.figure.add_subplot(len(views), columns, number + 1)
            in_plane = [a for a in range(3) if a != axis]
            extent = (0.0, images.shape[1 + in_plane[0]] * spacing[in_plane[0]], 0.0, images.shape[1 + in_plane[1]] * spacing[in_plane[1]])
            image = plot.imshow(_plane(images[0], axis, index), cmap="gray", vmin=low, vmax=high, origin="lower", extent=extent, interpolation="nearest")
            overlay, sample = None, (slice(None), slice(None))
            if self.scalars is not None:
                overlay = plot.imshow(_plane(self.scalars[0], axis, index), cmap=scale["cmap"], vmin=scale["vmin"], vmax=scale["vmax"],
                                      alpha=0.55, origin="lower", extent=extent, interpolation="bilinear")
            elif magnitudes is not None:
                # Arrows every ``step`` voxels, drawn at their length in mm times ``gain`` (about one arrow spacing at the peak).
                steps = [max(1, images.shape[1 + a] // arrows) for a in in_plane]
                grid = np.meshgrid(*[(np.arange(0, images.shape[1 + a], s) + 0.5) * spacing[a] for a, s in zip(in_plane, steps)], indexing="ij")
                sample = (slice(None, None, steps[1]), slice(None, None, steps[0]))
                gain = min(steps[0] * spacing[in_plane[0]], steps[1] * spacing[in_plane[1]]) / peak
                u, v = self._arrows(0, axis, index, in_plane, sample)
                overlay = plot.quiver(grid[0].T, grid[1].T, u, v, color="yellow", angles="xy", scale_units="xy", scale=1.0 / gain, width=0.006)
                plot.set_title(f"arrows x{gain:.1f}", fontsize=7, loc="right")
            plot.set_title(f"{_VIEW_OF_AXIS[axis]} {index}", fontsize=8, loc="left")
            plot.set_xticks([])
            plot.set_yticks([])
            self.artists.append((image, overlay, axis, index, in_plane, sample))
        panels = list(self.figure.axes)
        if self.scalars is not None:
            self.figure.colorbar(self.artists[0][1], ax=panels, shrink=0.6, label=scale["label"])
        # The grey scale's window, in the image's units (HU for CT), so a reader knows what grey means.
        self.figure.colorbar(self.artists[0][0], ax=panels, shrink=0.6, location="left",
                             label=f"image, window {low:.4g} .. {high:.4g}")
        self.title = self.figure.suptitle("", fontsize=9)

    def _arrows(self, t: int, axis: int, index: int, in_plane: list[int], sample: tuple[slice, slice]) -> tuple[np.ndarray, np.ndarray]:
        """In-plane field components (mm) at the arrow positions of a panel."""
        return tuple(_plane(self.fields_mm[t, a], axis, index)[sample] for a in in_plane)

    def draw(self, t: int, title: str) -> np.ndarray:
        """Show frame ``t`` and return the picture ``(H, W, 3)`` uint8."""
        for image, overlay, axis, index, in_plane, sample in self.artists:
            image.set_data(_plane(self.images[t], axis, index))
            if overlay is not None and self.scalars is not None:
                overlay.set_data(_plane(self.scalars[t], axis, index))
            elif overlay is not None:
                overlay.set_UVC(*self._arrows(t, axis, index, in_plane, sample))
        self.title.set_text(title)
        self.canvas.draw()
        return np.asarray(self.canvas.buffer_rgba())[..., :3].copy()


def render_movie(
    frames: FrameSource,
    out_gif: str | Path,
    field: FieldSource | None = None,
    views: Sequence[View] = ("axial", "coronal", "sagittal"),
    slices: int = 1,
    anchor: Anchor = "middle",
    style: Style = "quiver",
    fps: float = 5.0,
    window: tuple[float, float] | None = None,
    arrows: int = 16,
) -> Path:
    """Write a looping GIF of a 4D sequence, optionally with its field over the cycle.

    Args:
        frames: the sequence (see :func:`load_frames`); a single 3D image is repeated for
            every field, to show a field over the cycle on its reference image.
        out_gif: output ``.gif``.
        field: fields per frame (see :func:`load_fields`), in voxels of the frames' grid.
        views: any of ``"axial"``, ``"coronal"``, ``"sagittal"``: one row each.
        slices: slices per view (columns), around the ``anchor``.
        anchor: ``"middle"``, ``"first"`` or ``"last"`` slice.
        style: ``"quiver"`` (in-plane arrows), ``"magnitude"`` (heatmap in mm) or ``"jacobian"``
            (the Jacobian determinant: < 1 compression, > 1 expansion, <= 0 folding).
        fps: frames per second.
        window: grey-level range; default the 1st-99.5th percentile of the sequence.
        arrows: about this many arrows along each panel axis.

    Returns:
        ``out_gif``.
    """
    import imageio.v3 as iio

    images, affine = load_frames(frames)
    fields = None
    if field is not None:
        fields = load_fields(field, len(images) if len(images) > 1 else None)
        count = max(len(images), len(fields))
        if {len(images), len(fields)} - {1, count}:
            raise ValueError(f"got {len(fields)} fields for {len(images)} frames (give one per frame, or one)")
        if fields.shape[2:] != images.shape[1:]:
            raise ValueError(f"field grid {fields.shape[2:]} differs from the image grid {images.shape[1:]}")
        images = np.broadcast_to(images, (count, *images.shape[1:]))
        fields = np.broadcast_to(fields, (count, *fields.shape[1:]))
    figure = _Figure(images, affine, fields, views, slices, anchor, style, window, arrows)
    pictures = [figure.draw(t, f"frame {t} / {len(images)}") for t in range(len(images))]
    out_gif = Path(out_gif)
    atomic_write_bytes(out_gif, iio.imwrite("<bytes>", np.stack(pictures), extension=".gif", duration=1000.0 / fps, loop=0))
    return out_gif


def render_still(
    image: FrameSource,
    out_png: str | Path,
    field: FieldSource | None = None,
    views: Sequence[View] = ("axial", "coronal", "sagittal"),
    slices: int = 1,
    anchor: Anchor = "middle",
    style: Style = "quiver",
    window: tuple[float, float] | None = None,
    arrows: int = 16,
) -> Path:
    """Write a still figure (PNG/PDF/SVG) of a 3D image with a field over it; arguments as :func:`render_movie`."""
    images, affine = load_frames(image)
    fields = None if field is None else load_fields(field)
    if len(images) != 1 or (fields is not None and len(fields) != 1):
        raise ValueError("a still shows one image and at most one field")
    figure = _Figure(images, affine, fields, views, slices, anchor, style, window, arrows)
    figure.draw(0, Path(str(image)).name if isinstance(image, (str, Path)) else "")
    out_png = Path(out_png)
    buffer = io.BytesIO()
    figure.figure.savefig(buffer, format=out_png.suffix.lstrip(".") or "png")
    atomic_write_bytes(out_png, buffer.getvalue())
    return out_png


def write_motion(folder: str | Path, image: MetaTensor, fields: torch.Tensor, phases: Sequence[int],
                 views: Sequence[View] = ("axial", "coronal", "sagittal"), style: Style = "quiver") -> list[Path]:
    """A motion over phases on disk: what ``medsynth sample`` writes for a generated breathing cycle.

    Writes ``field_tNN.nii.gz`` (mm vectors with the image's affine), ``image_tNN.nii.gz`` (``image`` warped by
    that field), ``image_4d.nii.gz`` (the phases as one 4D scan) and ``movie_<view>.gif`` per view
    (the field drawn as ``style``); the folder is a sequence :func:`load_frames` and ``medsynth render`` read.

    Args:
        folder: output folder.
        image: ``(1, *S)`` the reference image (e.g. HU), a ``MetaTensor`` carrying the 4x4 affine of its grid.
        fields: ``(P, 3, *S)`` voxel fields, ``warp_image(image, fields[i])`` = phase ``phases[i]``.
        phases: the phase number of each field (file names).

    Returns:
        The written files, fields first.
    """
    from medsynth.data.io import save_image
    from medsynth.motion.fields import save_field, warp_image

    folder, affine = Path(folder), np.asarray(image.affine, dtype=np.float64)
    image = image.as_tensor()
    frames = warp_image(image[None].expand(len(fields), *image.shape).float(), fields.float())[:, 0]
    field_paths = [save_field(f, folder / f"field_t{p:02d}.nii.gz", affine) for p, f in zip(phases, fields)]
    frame_paths = [save_image(frame[None], folder / f"image_t{p:02d}.nii.gz", affine=affine) for p, frame in zip(phases, frames)]
    written = [*field_paths, *frame_paths, save_image(frames, folder / "image_4d.nii.gz", affine=affine, series=True)]
    return written + [render_movie(frame_paths, folder / f"movie_{view}.gif", field=field_paths, views=(view,), style=style) for view in views]
