"""Reconstructing a fine short-axis volume from a thick-slice SAX stack and long-axis views.

The fine grid (:func:`~medsynth.inverse.planes.fine_stack_affine`): the SAX in-plane grid, the first
slice where the SAX's first slice is, the slice spacing divided by ``factor``; acquired slice k is
fine slice k * factor, so the output has (S - 1) * factor + 1 slices and the stack's array layout
(the slice axis stays where it is in the file, :func:`~medsynth.inverse.planes.stack_slice_axis`;
internally it is moved last and back).

Methods (:data:`METHODS`):

- ``nearest``, ``linear``, ``cubic``: through-plane interpolation of the SAX slices along the slice
  axis (``scipy.interpolate``; ``cubic`` is a not-a-knot cubic spline, exact on polynomials up to
  degree 3 with 4 or more slices, on quadratics with 3); need no prior, ignore the LAX views
  (which are still checked).
- ``latent`` (the original, :mod:`medsynth.inverse.latent`), ``pnp`` (faster, :mod:`medsynth.inverse.pnp`):
  optimisation through a :class:`~medsynth.inverse.prior.SlicePrior`. Intensities are mapped to the
  prior's [-1, 1] with the frame's SAX percentiles and back; slices are resized in-plane to the prior's
  size and back.

:func:`reconstruct_stack` does one frame in memory; :func:`reconstruct_files` a cine series of
NIfTI files (every frame in one call) into one (X, Y, Z[, T]) NIfTI with the fine affine.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.interpolate import CubicSpline, interp1d

from medsynth.data.cine import cine_header
from medsynth.data.io import load_image, save_image
from medsynth.errors import BadInputError, MedsynthError
from medsynth.inverse.latent import (
    LaxView,
    Measurements,
    ReconstructionHistory,
    ReconstructSettings,
    initial_codes,
    optimise_codes,
)
from medsynth.inverse.operators import PlaneOperator, SliceStackOperator
from medsynth.inverse.planes import Plane, fine_stack_affine, fine_stack_shape, pixel_points, stack_slice_axis
from medsynth.inverse.pnp import optimise_volume
from medsynth.inverse.prior import SlicePrior, from_unit, resize_slices, to_unit, unit_range
from medsynth.runs import atomic_write_json

__all__ = ["BASELINES", "METHODS", "check_inputs", "interpolate_stack", "reconstruct_files", "reconstruct_stack"]

BASELINES = ("nearest", "linear", "cubic")
METHODS = ("latent", "pnp", *BASELINES)


def interpolate_stack(stack: np.ndarray, factor: int, method: str) -> np.ndarray:
    """Through-plane interpolation of a stack (X, Y, S), slice axis last, onto (X, Y, (S - 1) * factor + 1).

    Fine slice n sits at stack index n / factor; observed slices are kept exactly. ``nearest`` takes
    the lower slice at a tie (half way between two slices).
    """
    stack = np.asarray(stack, dtype=np.float64)
    count = stack.shape[-1]
    known = np.arange(count, dtype=np.float64)
    wanted = np.arange((count - 1) * factor + 1, dtype=np.float64) / factor
    if method == "cubic":
        result = CubicSpline(known, stack, axis=-1)(wanted)
    elif method in ("nearest", "linear"):
        result = interp1d(known, stack, kind="nearest" if method == "nearest" else "linear", axis=-1)(wanted)
    else:
        raise ValueError(f"interpolation must be one of {', '.join(BASELINES)}, got {method!r}")
    result[..., ::factor] = stack  # exact at the observed slices (no round-off)
    return result


def _image_and_affine(item: Any) -> tuple[np.ndarray, np.ndarray]:
    """(array, 4x4 affine) from a MetaTensor-like (``.affine``) or a pair ``(image, affine)``."""
    if isinstance(item, tuple | list):
        image, affine = item
    else:
        image, affine = item, item.affine
    array = image.detach().cpu().numpy() if hasattr(image, "detach") else np.asarray(image)
    affine = affine.detach().cpu().numpy() if hasattr(affine, "detach") else np.asarray(affine)
    return np.asarray(array, dtype=np.float32), np.asarray(affine, dtype=np.float64)


def _plane_image(image: np.ndarray, name: str) -> np.ndarray:
    """A single-plane image (X, Y, 1) as its (nu, nv) pixels, in the order Plane.from_affine reads them."""
    spatial = image.shape[:3]
    if image.ndim != 3 or 1 not in spatial:
        raise BadInputError(name, f"a long-axis view needs one spatial axis of size 1, got shape {image.shape}")
    return np.take(image, 0, axis=2 - spatial[::-1].index(1))


def reconstruct_stack(prior: SlicePrior | None, sax: Any, lax: Sequence[Any] = (), factor: int = 8, method: str = "latent",
                      settings: ReconstructSettings | None = None, *, lax_names: Sequence[str] | None = None,
                      keep_steps: bool = False) -> tuple[np.ndarray, np.ndarray, ReconstructionHistory]:
    """Reconstruct one frame on the fine grid.

    Args:
        prior: the slice prior (``None`` for the interpolation baselines).
        sax: the SAX stack (X, Y, S) (any array axis may be the slice axis) with its affine: a
            MetaTensor-like with ``.affine`` or a pair ``(image, affine)``.
        lax: long-axis views, each (X, Y, 1) with its affine, the same way (``[]``: SAX only).
        factor: through-plane refinement (>= 2).
        method: one of :data:`METHODS`.
        settings: the latent methods' settings (default :class:`ReconstructSettings`).
        lax_names: names of the LAX views for error messages (default ``LAX view i``).
        keep_steps: latent methods: keep the volume before every iteration and the final one in
            ``history.steps``.

    Returns:
        The volume (X, Y, Z) float32 in the SAX's units and array layout, with Z (or the slice axis)
        (S - 1) * factor + 1; its 4x4 affine (``fine_stack_affine(sax affine, factor)``); the history.

    Raises:
        BadInputError: a LAX view that is not single-plane or does not intersect the stack.
        MedsynthError: a stack with one slice, a factor < 2, an unknown method, a latent method without prior.
    """
    settings = settings or ReconstructSettings()
    start = time.perf_counter()
    if method not in METHODS:
        raise MedsynthError(f"reconstruct: unknown method '{method}' (one of {', '.join(METHODS)})")
    if int(factor) != factor or factor < 2:
        raise MedsynthError(f"reconstruct: --factor must be an integer >= 2, got {factor}")
    if prior is None and method not in BASELINES:
        raise MedsynthError(f"reconstruct: method '{method}' needs a trained diffae or ddim run as its prior")
    image, affine = _image_and_affine(sax)
    if image.ndim != 3 or min(image.shape) < 2:
        raise MedsynthError(f"reconstruct: the SAX stack must be (X, Y, S) with at least 2 slices, got shape {image.shape}")
    axis = stack_slice_axis(affine)
    order = [a for a in range(3) if a != axis] + [axis]  # slice axis last
    stack = np.transpose(image, order)
    stack_affine = affine[:, [*order, 3]]
    fine_affine = fine_stack_affine(stack_affine, factor)
    fine_shape = fine_stack_shape(stack_affine, stack.shape, factor)
    views = _lax_views(lax, lax_names, fine_affine, fine_shape, settings)
    history = ReconstructionHistory(method=method)
    if method in BASELINES:
        volume = interpolate_stack(stack, factor, method)
    else:
        volume = _with_prior(prior, stack, stack_affine, fine_affine, fine_shape, views, factor, method, settings, history, keep_steps)
    back = list(np.argsort(order))
    history.steps = [np.transpose(step, back) for step in history.steps]
    history.seconds = time.perf_counter() - start
    return np.transpose(volume, back).astype(np.float32), fine_stack_affine(affine, factor), history


def _lax_views(lax: Sequence[Any], names: Sequence[str] | None, fine_affine: np.ndarray, fine_shape: Sequence[int],
               settings: ReconstructSettings) -> list[LaxView]:
    """Each LAX view's operator on the fine grid, its image standardised inside the mask, and the mask."""
    views = []
    for index, item in enumerate(lax):
        name = names[index] if names is not None else f"LAX view {index}"
        image, affine = _image_and_affine(item)
        pixels = _plane_image(image, name)
        plane = Plane.from_affine(affine, image.shape)
        operator = PlaneOperator(fine_affine, fine_shape, plane, profile_samples=settings.lax_profile_samples)
        mask = operator.mask()
        if int(mask.sum()) < 2:
            raise BadInputError(name, "does not intersect the SAX stack (no pixel of the plane lies inside it)")
        views.append(LaxView(operator, torch.from_numpy(pixels)[mask].float(), mask))  # raw: matched in _match_lax
    return views


def _match_lax(views: list[LaxView], stack: torch.Tensor, fine_affine: np.ndarray, factor: int, how: str) -> None:
    """Put each view's pixels (inside its mask) in the units the loss compares them in (in place).

    ``standardise``: mean 0, sd 1 (the loss standardises the volume's samples every iteration too).
    ``intersections``: a fixed linear map onto the prior's units, whose mean and sd match the SAX
    stack's where the LAX plane crosses an observed slice (pixels within half a fine step of one): the
    through-plane interpolation of the stack, seen through the view's operator, is the observed data
    there. Fewer than 8 such pixels fall back to ``standardise``.
    """
    volume = None
    for view in views:
        values = view.image.double()
        near = torch.zeros_like(view.mask)
        if how == "intersections":
            points = pixel_points(view.operator.plane) @ np.linalg.inv(fine_affine)[:3, :3].T + np.linalg.inv(fine_affine)[:3, 3]
            offset = np.abs(points[..., 2] / factor - np.round(points[..., 2] / factor)) * factor  # fine steps to a slice
            # a plane whose pixel rows step over several fine slices may put no pixel centre within half a fine
            # step of an observed slice: the tolerance grows to half the plane's own step across the slices
            step = max(abs(points[1, 0, 2] - points[0, 0, 2]), abs(points[0, 1, 2] - points[0, 0, 2])) if min(points.shape[:2]) > 1 else 0.0
            near = torch.from_numpy(offset <= max(0.5, step / 2)) & view.mask.cpu()
        if int(near.sum()) < 8:
            view.image, view.standardise = ((values - values.mean()) / (values.std(unbiased=False) + 1e-6)).float(), True
            continue
        if volume is None:
            volume = torch.from_numpy(interpolate_stack(stack.cpu().numpy(), factor, "linear"))[None, None]
        seen = view.operator(volume)[0, 0][near].double()
        pixels = values[near[view.mask.cpu()]]
        scale = seen.std(unbiased=False) / (pixels.std(unbiased=False) + 1e-6)
        view.image, view.standardise = ((values - pixels.mean()) * scale + seen.mean()).float(), False


def _device(prior: SlicePrior) -> torch.device:
    parameters = getattr(prior, "parameters", None)
    if callable(parameters):
        first = next(iter(parameters()), None)
        if first is not None:
            return first.device
    return torch.device("cpu")


def _with_prior(prior: SlicePrior | None, stack: np.ndarray, stack_affine: np.ndarray, fine_affine: np.ndarray,
            fine_shape: Sequence[int], views: list[LaxView], factor: int, method: str, settings: ReconstructSettings,
            history: ReconstructionHistory, keep_steps: bool) -> np.ndarray:
    """``latent`` or ``pnp`` on a stack with its slice axis last; the fine volume (X, Y, N) in the stack's units."""
    assert prior is not None
    device = _device(prior)
    lo, hi = unit_range(stack, settings.percentiles)
    observed = to_unit(torch.from_numpy(stack).float().to(device), lo, hi)  # (X, Y, S)
    in_plane = (int(stack.shape[0]), int(stack.shape[1]))
    size = (int(prior.image_size), int(prior.image_size))
    sax_operator = SliceStackOperator(fine_affine, fine_shape, stack_affine, stack.shape, thickness=settings.sax_thickness_mm)
    _match_lax(views, observed, fine_affine, factor, settings.lax_intensity)
    for view in views:
        view.image, view.mask = view.image.to(device), view.mask.to(device)
    data = Measurements(sax_operator, observed[None, None], views, in_plane)
    cubic = torch.from_numpy(interpolate_stack(observed.cpu().numpy(), factor, "cubic")).float().to(device)  # (X, Y, N)
    steps: list[np.ndarray] = []

    def keep(volume: torch.Tensor) -> None:
        steps.append(from_unit(volume[0, 0], lo, hi).float().cpu().numpy())

    if method == "pnp":
        volume, run = optimise_volume(prior, cubic[None, None], data, settings, keep if keep_steps else None)
    else:
        interpolated = None
        if settings.init == "interpolation":  # at the prior's size, slice axis first
            interpolated = resize_slices(cubic.permute(2, 0, 1).unsqueeze(1), size)
        slices = resize_slices(observed.permute(2, 0, 1).unsqueeze(1), size)  # (S, 1, s, s)
        with torch.no_grad():
            z0, x_t0 = initial_codes(prior, slices, factor, settings.steps, interpolated)
        volume, run = optimise_codes(prior, z0, x_t0, data, settings, keep if keep_steps else None)
    history.iterations, history.losses, history.steps = run.iterations, run.losses, steps
    return from_unit(volume[0, 0], lo, hi).float().cpu().numpy()


def check_inputs(sax_path: str | Path, lax_paths: Sequence[str | Path], factor: int) -> int:
    """Refuse bad input from the headers alone, before a prior is loaded; the frame count T.

    Raises:
        BadInputError: a SAX file with one slice, a LAX file that is not a single plane, or a LAX file
            whose frame count differs from the SAX's (each names the file).
        MedsynthError: a factor < 2.
    """
    if int(factor) != factor or factor < 2:
        raise MedsynthError(f"reconstruct: --factor must be an integer >= 2, got {factor}")
    shape, affine = cine_header(Path(sax_path))
    if min(shape[:3]) < 2 or shape[stack_slice_axis(affine)] < 2:
        raise BadInputError(sax_path, f"has one slice (shape {shape[:3]}): a short-axis stack needs at least 2")
    for path in lax_paths:
        lax_shape, _ = cine_header(Path(path))
        if 1 not in lax_shape[:3]:
            raise BadInputError(path, f"is not a single-plane long-axis image (shape {lax_shape[:3]}, no axis of size 1)")
        if lax_shape[3] != shape[3]:
            raise BadInputError(path, f"has {lax_shape[3]} frames, the SAX file {Path(sax_path).name} has {shape[3]}")
    return shape[3]


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def reconstruct_files(prior: SlicePrior | None, sax_path: str | Path, lax_paths: Sequence[str | Path], out: str | Path,
                      factor: int = 8, method: str = "latent", settings: ReconstructSettings | None = None,
                      keep_steps: bool = False) -> tuple[Path, list[ReconstructionHistory]]:
    """Reconstruct every frame of a cine series of NIfTI files and write the fine volume.

    Args:
        sax_path: SAX stack, (X, Y, S) or (X, Y, S, T).
        lax_paths: LAX views, (X, Y, 1[, T]) with the same T (may be empty).
        out: the output NIfTI: (X, Y, Z) or, for T > 1, (X, Y, Z, T), with the fine affine. Beside it,
            ``<stem>_history.json`` (per frame: seconds, iterations, losses) and, with ``keep_steps`` and
            a latent method, ``<stem>_steps/frameTT.nii.gz`` (X, Y, Z, K): the volume before each
            iteration and the final one.

    Returns:
        ``out`` and the history of every frame.
    """
    frames = check_inputs(sax_path, lax_paths, factor)
    out = Path(out)
    sax = load_image(sax_path)  # (T, X, Y, S)
    lax = [load_image(path) for path in lax_paths]  # (T, X, Y, 1) each
    names = [str(path) for path in lax_paths]
    volumes, histories = [], []
    fine_affine = None
    for t in range(frames):
        views = [(image[t].numpy(), image.affine) for image in lax]
        volume, fine_affine, history = reconstruct_stack(prior, (sax[t].numpy(), sax.affine), views, factor, method, settings,
                                                         lax_names=names, keep_steps=keep_steps)
        volumes.append(volume)
        histories.append(history)
        if keep_steps and history.steps:
            save_image(np.stack(history.steps), out.parent / f"{_stem(out)}_steps" / f"frame{t:02d}.nii.gz", fine_affine,
                       series=True)
            history.steps = []  # on disk now: do not keep every frame's steps in memory
    save_image(np.stack(volumes), out, fine_affine, series=frames > 1)
    atomic_write_json(out.parent / f"{_stem(out)}_history.json", {
        "method": method, "factor": factor, "sax": str(sax_path), "lax": names,
        "frames": [{"seconds": h.seconds, "iterations": h.iterations, "losses": h.losses} for h in histories]})
    return out, histories
