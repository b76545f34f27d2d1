"""Reconstructing a fine short-axis volume from a thick-slice SAX stack and long-axis views.

The fine grid (:func:`~medsynth.inverse.planes.fine_stack_affine`): the SAX in-plane grid, the first
slice where the SAX's first slice is, the slice spacing divided by ``factor``; acquired slice k is
fine slice k * factor, so the output has (S - 1) * factor + 1 slices and the stack's array layout
(the slice axis stays where it is in the file, :func:`~medsynth.inverse.planes.stack_slice_axis`;
internally it is moved last and back).

Methods (:data:`METHODS`, declared with the settings each reads in :data:`METHOD_SPECS`):

- ``nearest``, ``linear``, ``cubic``: through-plane interpolation of the SAX slices along the slice
  axis (``scipy.interpolate``; ``cubic`` is a not-a-knot cubic spline, exact on polynomials up to
  degree 3 with 4 or more slices, on quadratics with 3); need no prior, ignore the LAX views
  (which are still checked).
- ``latent`` (the original, :mod:`medsynth.inverse.latent`), ``pnp`` (:mod:`medsynth.inverse.pnp`) and ``diffpir``
  (posterior sampling, the default: the best on the 64 px benchmark, :mod:`medsynth.inverse.diffpir`): through a :class:`~medsynth.inverse.prior.SlicePrior`. Intensities are mapped to the
  prior's [-1, 1] with the frame's SAX percentiles and back; slices are resized in-plane to the prior's
  size and back.

:func:`reconstruct_stack` does one frame in memory; :func:`reconstruct_files` a cine series of
NIfTI files (every frame in one call) into one (X, Y, Z[, T]) NIfTI with the fine affine.

Before any work (:func:`check_inputs`, :func:`check_memory`, :func:`settings_for`): ``--set`` keys the method
does not read are refused naming the right one, a LAX plane that misses the SAX stack is refused with its
distance in mm, and a reconstruction larger than the memory the machine has free is refused with its estimate.
A LAX view whose intensities along its intersections with the SAX slices do not follow the stack's (another
subject, another frame of reference) is warned about with the measured correlation (:func:`lax_agreement`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from nibabel.affines import apply_affine
from scipy.interpolate import CubicSpline, interp1d
from tqdm import tqdm

from medsynth.config import apply_overrides, validate_config
from medsynth.console import note
from medsynth.data.cine import cine_header
from medsynth.data.io import NIFTI_SUFFIXES, check_finite_output, load_image, save_image
from medsynth.errors import BadInputError, MedsynthError, NonFiniteOutputError
from medsynth.inverse.diffpir import diffpir_timesteps, sample_posterior
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
from medsynth.runs import atomic_write_json, proc_field

__all__ = ["BASELINES", "DEFAULT_METHOD", "METHODS", "METHOD_SPECS", "MethodSpec", "check_inputs", "check_memory", "check_output_name", "interpolate_stack",
           "lax_agreement", "lax_distance_mm", "reconstruct_files", "reconstruct_stack", "settings_for"]

_FITTING = ("tolerance", "patience", "lax_weight", "sax_weight", "batch", "sax_thickness_mm", "lax_intensity",
            "lax_profile_samples", "percentiles")  # the data terms and the early stop, read by latent and pnp


@dataclass(frozen=True)
class MethodSpec:
    """What a method reads and holds.

    Attributes:
        reads: the :class:`~medsynth.inverse.latent.ReconstructSettings` it reads (``--set`` of any other is refused).
        counterparts: another method's key -> this method's key for the same thing (named in the refusal).
        step_size: the setting blamed for a non-finite result (``None``: the baselines and ``diffpir``, which have none).
        copies: float32 copies of one frame's fine volume held while it runs (the memory estimate).
        code_copies: float32 copies of every fine slice at the prior's size (codes, their start, gradient, Adam's two moments).
        backprop_steps: the prior's activations are kept for ``steps`` DDIM steps of a batch (``latent``) or one pass.
    """

    reads: tuple[str, ...] = ()
    counterparts: dict[str, str] = field(default_factory=dict)
    step_size: str | None = None
    copies: int = 4
    code_copies: int = 0
    backprop_steps: bool = False


# One table: which settings each method reads (checked against ReconstructSettings by a test) and what it holds.
# copies measured (peak RSS growth, a 256 x 256 x 12 stack at factor 16, 2 frames, an identity prior): cubic 431 MiB
# (estimate 443), pnp 1559 (1618), latent 1587 (1638): the operators' sample tables, Adam's moments, the graph.
METHOD_SPECS: dict[str, MethodSpec] = {
    "latent": MethodSpec(("steps", "init", "iterations", "lr", "drift_weight", "smooth_weight", "pull", *_FITTING),
                         {"pnp_iterations": "iterations", "pnp_lr": "lr"}, "lr", copies=30, code_copies=6, backprop_steps=True),
    "pnp": MethodSpec(("pnp_iterations", "pnp_lr", "pnp_weight", "pnp_timestep", "seed", *_FITTING),
                      {"iterations": "pnp_iterations", "lr": "pnp_lr"}, "pnp_lr", copies=30, code_copies=3),
    # diffpir projects onto the measurements: no step size, no weights, no early stop
    "diffpir": MethodSpec(("diffpir_iterations", "diffpir_t_start", "diffpir_dc_steps", "diffpir_relax", "diffpir_prior", "seed", "batch", "sax_thickness_mm",
                           "lax_intensity", "lax_profile_samples", "percentiles"),
                          {"iterations": "diffpir_iterations", "pnp_iterations": "diffpir_iterations"}, copies=30, code_copies=3),
    **{name: MethodSpec() for name in ("nearest", "linear", "cubic")},
}
BASELINES = tuple(name for name, spec in METHOD_SPECS.items() if not spec.reads)
# The best method on the benchmark among those that rebuild a 10-slice stack at factor 8 within a minute on a 2-core
# CPU (BENCHMARKS.md, "diffae and medsynth reconstruct"); the original's ``latent`` stays available by name.
DEFAULT_METHOD = "diffpir"
METHODS = tuple(METHOD_SPECS)
MAX_FACTOR = 64  # 8 mm slices at factor 64 are 0.125 mm apart: finer than any MRI pixel
PRIOR_FLOATS_PER_PIXEL = 64  # one slice's pass through the prior holds about this many floats per pixel (rough: UNet feature maps)


def settings_for(method: str, overrides: Sequence[str] = ()) -> ReconstructSettings:
    """The settings of ``method`` from ``--set key=value`` overrides, refusing a key the method does not read.

    Raises:
        MedsynthError: an unknown method; a key no method reads (the valid keys named); a key another method reads
            (its counterpart named, e.g. ``iterations`` for ``pnp``: ``pnp_iterations``); a value out of bounds.
    """
    if method not in METHOD_SPECS:
        raise MedsynthError(f"reconstruct: unknown method '{method}' (one of {', '.join(METHODS)})")
    spec = METHOD_SPECS[method]
    data = apply_overrides({}, list(overrides))
    for key in data:
        if key in spec.reads:
            continue
        if key not in ReconstructSettings.model_fields:
            valid = f"method '{method}' reads {', '.join(spec.reads)}" if spec.reads else \
                f"the interpolation baselines take none; the prior methods read {', '.join(ReconstructSettings.model_fields)}"
            raise MedsynthError(f"reconstruct --set {key}: no such setting ({valid})")
        if not spec.reads:
            raise MedsynthError(f"reconstruct --set {key}: not used by method '{method}' (the interpolation baselines "
                                f"take no settings; {key} is read by {', '.join(_readers(key))})")
        hint = f"its {_SAME_THING[key.removeprefix('pnp_')]} {spec.counterparts[key]}" if key in spec.counterparts else \
            f"it reads {', '.join(spec.reads)}; {key} is read by {', '.join(_readers(key))}"
        raise MedsynthError(f"reconstruct --set {key}: not used by method '{method}' ({hint})")
    return validate_config(ReconstructSettings, data, "reconstruct --set")


_SAME_THING = {"iterations": "iterations are", "lr": "learning rate is"}  # a counterpart's words in the refusal


def _readers(key: str) -> list[str]:
    return [f"'{name}'" for name, spec in METHOD_SPECS.items() if key in spec.reads]


def check_output_name(out: str | Path) -> Path:
    """``out`` as a path, refused unless it names a NIfTI file (the result is a 3D or 4D volume with its affine)."""
    out = Path(out)
    if not out.name.lower().endswith(NIFTI_SUFFIXES):
        raise BadInputError(out, "reconstruct --out must be a NIfTI file (.nii.gz or .nii): the result is a 3D/4D volume "
                                 "with its affine")
    if out.is_dir():
        raise BadInputError(out, "reconstruct --out is a folder; name the output NIfTI file")
    return out


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


def reconstruct_stack(prior: SlicePrior | None, sax: Any, lax: Sequence[Any] = (), factor: int = 8, method: str = DEFAULT_METHOD,
                      settings: ReconstructSettings | None = None, *, lax_names: Sequence[str] | None = None,
                      keep_steps: bool = False, tick: Callable[[], None] | None = None
                      ) -> tuple[np.ndarray, np.ndarray, ReconstructionHistory]:
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
        tick: latent methods: called after every iteration (a progress bar).

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
    _check_factor(factor)
    if prior is None and method not in BASELINES:
        raise MedsynthError(f"reconstruct: method '{method}' needs a trained diffae run (or its DDIM baseline) as its prior")
    affine, order, stack, stack_affine, fine_affine, fine_shape, views = _stack_and_views(sax, lax, factor, settings, lax_names)
    history = ReconstructionHistory(method=method)
    if method in BASELINES:
        volume = interpolate_stack(stack, factor, method)
    else:
        volume = _with_prior(prior, stack, stack_affine, fine_affine, fine_shape, views, factor, method, settings, history, keep_steps,
                             tick)
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
            distance = lax_distance_mm(fine_affine, fine_shape, affine, image.shape)
            raise BadInputError(name, f"does not intersect the SAX stack: {_missed(distance)}")
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
        near = _near_slices(view, fine_affine, factor) if how == "intersections" else torch.zeros_like(view.mask)
        if int(near.sum()) < 8:
            view.image, view.standardise = ((values - values.mean()) / (values.std(unbiased=False) + 1e-6)).float(), True
            continue
        if volume is None:
            volume = torch.from_numpy(interpolate_stack(stack.cpu().numpy(), factor, "linear"))[None, None]
        seen = view.operator(volume)[0, 0][near].double()
        pixels = values[near[view.mask.cpu()]]
        scale = seen.std(unbiased=False) / (pixels.std(unbiased=False) + 1e-6)
        view.image, view.standardise = ((values - pixels.mean()) * scale + seen.mean()).float(), False


def _near_slices(view: LaxView, fine_affine: np.ndarray, factor: int) -> torch.Tensor:
    """The view's pixels (nu, nv), inside its mask, within half a fine step of an observed SAX slice (the slice axis last)."""
    points = apply_affine(np.linalg.inv(fine_affine), pixel_points(view.operator.plane))
    offset = np.abs(points[..., 2] / factor - np.round(points[..., 2] / factor)) * factor  # fine steps to a slice
    # a plane whose pixel rows step over several fine slices may put no pixel centre within half a fine
    # step of an observed slice: the tolerance grows to half the plane's own step across the slices
    step = max(abs(points[1, 0, 2] - points[0, 0, 2]), abs(points[0, 1, 2] - points[0, 0, 2])) if min(points.shape[:2]) > 1 else 0.0
    return torch.from_numpy(offset <= max(0.5, step / 2)) & view.mask.cpu()


def _device(prior: SlicePrior) -> torch.device:
    parameters = getattr(prior, "parameters", None)
    if callable(parameters):
        first = next(iter(parameters()), None)
        if first is not None:
            return first.device
    return torch.device("cpu")


def _with_prior(prior: SlicePrior | None, stack: np.ndarray, stack_affine: np.ndarray, fine_affine: np.ndarray,
            fine_shape: Sequence[int], views: list[LaxView], factor: int, method: str, settings: ReconstructSettings,
            history: ReconstructionHistory, keep_steps: bool, tick: Callable[[], None] | None = None) -> np.ndarray:
    """A prior method (``latent``, ``pnp``, ``diffpir``) on a stack with its slice axis last; the fine volume (X, Y, N) in the stack's units."""
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
        volume, run = optimise_volume(prior, cubic[None, None], data, settings, keep if keep_steps else None, tick)
    elif method == "diffpir":
        volume, run = sample_posterior(prior, cubic[None, None], data, settings, keep if keep_steps else None, tick)
    else:
        interpolated = None
        if settings.init == "interpolation":  # at the prior's size, slice axis first
            interpolated = resize_slices(cubic.permute(2, 0, 1).unsqueeze(1), size)
        slices = resize_slices(observed.permute(2, 0, 1).unsqueeze(1), size)  # (S, 1, s, s)
        with torch.no_grad():
            z0, x_t0 = initial_codes(prior, slices, factor, settings.steps, interpolated)
        volume, run = optimise_codes(prior, z0, x_t0, data, settings, keep if keep_steps else None, tick)
    history.iterations, history.losses, history.steps = run.iterations, run.losses, steps
    return from_unit(volume[0, 0], lo, hi).float().cpu().numpy()


def _check_factor(factor: int) -> None:
    if int(factor) != factor or factor < 2:
        raise MedsynthError(f"reconstruct: --factor must be an integer >= 2, got {factor}")
    if factor > MAX_FACTOR:
        raise MedsynthError(f"reconstruct: --factor {factor} is above the bound {MAX_FACTOR} (the slice spacing divided by "
                            f"{MAX_FACTOR} is already finer than any in-plane pixel)")


def _inside(sax_affine: np.ndarray, sax_shape: Sequence[int], lax_affine: np.ndarray, lax_shape: Sequence[int]
            ) -> tuple[np.ndarray, np.ndarray]:
    """The LAX pixel centres in the stack's voxel coordinates (P, 3) and the same points clamped into the stack's box."""
    points = pixel_points(Plane.from_affine(lax_affine, lax_shape)).reshape(-1, 3)
    index = apply_affine(np.linalg.inv(sax_affine), points)
    return index, np.clip(index, 0.0, np.asarray(sax_shape[:3], dtype=np.float64) - 1)


def lax_distance_mm(sax_affine: np.ndarray, sax_shape: Sequence[int], lax_affine: np.ndarray, lax_shape: Sequence[int]) -> float:
    """World distance (mm) from a LAX plane's pixel grid to a stack's box (its voxel centres' extent): 0 when a pixel
    centre lies inside.

    For a stack whose affine columns are orthogonal (any oblique SAX) clamping a point's voxel coordinates into
    the box is its nearest point there, so this is the distance of the nearest pixel centre; for a sheared
    affine an upper bound.
    """
    index, clamped = _inside(sax_affine, sax_shape, lax_affine, lax_shape)
    gaps = apply_affine(sax_affine, clamped) - apply_affine(sax_affine, index)
    return float(np.sqrt(np.min(np.sum(gaps * gaps, axis=-1))))


def _missed(distance: float) -> str:
    if distance > 1e-3:
        return (f"its nearest pixel is {distance:.1f} mm from the stack's volume (another subject, session or frame "
                "of reference?)")
    return "it only touches the stack's edge (fewer than 2 of its pixels lie inside)"


def check_inputs(sax_path: str | Path, lax_paths: Sequence[str | Path], factor: int) -> int:
    """Refuse bad input from the headers alone, before a prior is loaded; the frame count T.

    Raises:
        BadInputError: a SAX file with one slice, a LAX file that is not a single plane, whose frame count differs
            from the SAX's, or whose plane misses the SAX stack (its distance in mm named; each names the file).
        MedsynthError: a factor < 2 or above :data:`MAX_FACTOR`.
    """
    _check_factor(factor)
    shape, affine = cine_header(Path(sax_path))
    if min(shape[:3]) < 2 or shape[stack_slice_axis(affine)] < 2:
        raise BadInputError(sax_path, f"has one slice (shape {shape[:3]}): a short-axis stack needs at least 2")
    for path in lax_paths:
        lax_shape, lax_affine = cine_header(Path(path))
        if 1 not in lax_shape[:3]:
            raise BadInputError(path, f"is not a single-plane long-axis image (shape {lax_shape[:3]}, no axis of size 1)")
        if lax_shape[3] != shape[3]:
            raise BadInputError(path, f"has {lax_shape[3]} frames, the SAX file {Path(sax_path).name} has {shape[3]}")
        index, clamped = _inside(affine, shape, lax_affine, lax_shape)
        if int(np.sum(np.all(np.abs(index - clamped) <= 1e-6, axis=-1))) < 2:
            raise BadInputError(path, f"does not intersect the SAX stack {Path(sax_path).name}: "
                                      f"{_missed(lax_distance_mm(affine, shape, lax_affine, lax_shape))}")
    return shape[3]


def _stack_and_views(sax: Any, lax: Sequence[Any], factor: int, settings: ReconstructSettings,
                     lax_names: Sequence[str] | None) -> tuple:
    """The SAX affine, its axis order with the slice axis last, the stack (X, Y, S) and its affine, the fine
    grid's affine and shape at ``factor``, and the LAX views on that grid: what every method and check starts from."""
    image, affine = _image_and_affine(sax)
    if image.ndim != 3 or min(image.shape) < 2:
        raise MedsynthError(f"reconstruct: the SAX stack must be (X, Y, S) with at least 2 slices, got shape {image.shape}")
    axis = stack_slice_axis(affine)
    order = [a for a in range(3) if a != axis] + [axis]  # slice axis last
    stack = np.transpose(image, order)
    stack_affine = affine[:, [*order, 3]]
    fine_affine = fine_stack_affine(stack_affine, factor)
    fine_shape = fine_stack_shape(stack_affine, stack.shape, factor)
    return affine, order, stack, stack_affine, fine_affine, fine_shape, _lax_views(lax, lax_names, fine_affine, fine_shape, settings)


def lax_agreement(sax: Any, lax: Sequence[Any], factor: int, settings: ReconstructSettings | None = None,
                  lax_names: Sequence[str] | None = None) -> list[float | None]:
    """How well each LAX view's intensities follow the SAX stack where its plane crosses the observed slices.

    Per view: the Pearson correlation, over the view's pixels within half a fine step of an observed slice, between
    the pixels and the stack's linear through-plane interpolation seen through the view's operator (the pixels
    ``_match_lax`` maps the view with). ``None`` where fewer than 8 pixels lie there. Measured on the cardiac phantom
    (``--views``, 6 subjects at 32 px and 4 at 64 px, every frame, factor 4): a subject's own views r >= 0.99, and
    >= 0.89 with noise of 10 % of the intensity range and a 5 mm breath-hold shift of the LAX plane; another
    subject's views median 0.74 - 0.80, at most 0.98 (the phantom's subjects share one anatomy; 61 - 82 % of them
    fall below :data:`LAX_WARN_CORRELATION`, and real subjects differ more).

    Args:
        sax, lax: as :func:`reconstruct_stack` takes them (one frame).
    """
    settings = settings or ReconstructSettings()
    _, _, stack, _, fine_affine, fine_shape, views = _stack_and_views(sax, lax, factor, settings, lax_names)
    volume = torch.from_numpy(interpolate_stack(stack, factor, "linear"))[None, None]
    result: list[float | None] = []
    for view in views:
        near = _near_slices(view, fine_affine, factor)
        if int(near.sum()) < 8:
            result.append(None)
            continue
        seen = view.operator(volume)[0, 0][near].double()
        pixels = view.image.double()[near[view.mask.cpu()]]
        spread = float(seen.std()) * float(pixels.std())
        result.append(float(torch.mean((seen - seen.mean()) * (pixels - pixels.mean())) / spread) if spread > 0 else 0.0)
    return result


LAX_WARN_CORRELATION = 0.85  # below this a LAX view is warned about (calibration: lax_agreement's docstring)


# -- memory ------------------------------------------------------------------------------------------------


def available_bytes() -> int | None:
    """Memory the machine has free now: ``MemAvailable`` of /proc/meminfo (Linux), else free physical pages
    (``os.sysconf``), else ``None`` (not known). Our own: psutil is not a dependency."""
    available_kib = proc_field("/proc/meminfo", "MemAvailable")
    if available_kib is not None and available_kib.isdigit():
        return int(available_kib) * 1024
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def _size(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} TiB"


def estimate_bytes(in_plane: Sequence[int], slices: int, frames: int, method: str, settings: ReconstructSettings,
                   prior_size: int | None = None, keep_steps: bool = False) -> int:
    """Rough bytes a reconstruction holds at its peak.

    Args:
        in_plane: (X, Y) of the stack; slices: N, the fine slices ((S - 1) * factor + 1); frames: T.
        method: its :class:`MethodSpec` says the copies held.
        prior_size: the prior's slice size s (default the larger in-plane side).

    The frames' results, stacked, and the file's bytes (3 T fine float32 volumes); the method's working copies of
    one frame; for the prior methods the codes of every fine slice at s x s, one batch of slices through the prior
    (:data:`PRIOR_FLOATS_PER_PIXEL`, times ``steps`` for ``latent``, which keeps them for the backward pass), and
    with ``keep_steps`` the volume at every iteration.
    """
    spec = METHOD_SPECS[method]
    fine = 4.0 * float(in_plane[0]) * float(in_plane[1]) * float(slices)
    total = (3 * frames + spec.copies) * fine
    if spec.reads:
        side = float(prior_size or max(in_plane))
        total += spec.code_copies * slices * side * side * 4.0
        passes = settings.steps if spec.backprop_steps else 1
        total += min(settings.batch, slices) * side * side * 4.0 * PRIOR_FLOATS_PER_PIXEL * passes
        if keep_steps:
            total += 2 * (_iterations(method, settings) + 1) * fine
    return int(total)


def _iterations(method: str, settings: ReconstructSettings) -> int:
    """Iterations a method runs per frame (its progress bar's share): diffpir's distinct timesteps, else its iteration setting."""
    if method == "diffpir":
        return len(diffpir_timesteps(settings.diffpir_t_start, settings.diffpir_iterations))
    key = next((k for k in METHOD_SPECS[method].reads if k.endswith("iterations")), None)
    return int(getattr(settings, key)) if key else 0


def check_memory(sax_path: str | Path, factor: int, method: str, settings: ReconstructSettings, prior_size: int | None = None,
                 keep_steps: bool = False) -> str:
    """Refuse a reconstruction whose estimate (:func:`estimate_bytes`) exceeds the memory free now; the one line that
    says what will run (method, sizes, the settings it reads, the estimate).

    Raises:
        MedsynthError: the estimate above :func:`available_bytes`, naming both and the factor.
    """
    _check_factor(factor)
    shape, affine = cine_header(Path(sax_path))
    fine_shape = fine_stack_shape(affine, shape[:3], factor)
    axis = stack_slice_axis(affine)
    frames = shape[3]
    needed = estimate_bytes([n for a, n in enumerate(fine_shape) if a != axis], fine_shape[axis], frames, method, settings,
                            prior_size, keep_steps)
    free = available_bytes()
    sizes = f"{frames} frame(s) of {'x'.join(map(str, shape[:3]))} -> {'x'.join(map(str, fine_shape))}"
    if free is not None and needed > free:
        hint = ", --set batch" if METHOD_SPECS[method].reads else ""
        raise MedsynthError(f"reconstruct: needs about {_size(needed)} of memory ({sizes} at --factor {factor}, method {method}) "
                            f"but {_size(free)} is available; lower --factor{hint} or reconstruct fewer frames")
    chosen = " ".join(f"{key}={getattr(settings, key)}" for key in METHOD_SPECS[method].reads)
    return (f"reconstruct: method {method}, --factor {factor}, {sizes}{'; ' + chosen if chosen else ''}; "
            f"needs about {_size(needed)} of memory ({_size(free) if free is not None else 'unknown'} available)")


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def reconstruct_files(prior: SlicePrior | None, sax_path: str | Path, lax_paths: Sequence[str | Path], out: str | Path,
                      factor: int = 8, method: str = DEFAULT_METHOD, settings: ReconstructSettings | None = None,
                      keep_steps: bool = False, progress: bool = False) -> tuple[Path, list[ReconstructionHistory]]:
    """Reconstruct every frame of a cine series of NIfTI files and write the fine volume.

    Before any work: ``out`` must be a NIfTI name, the headers are checked (:func:`check_inputs`), the memory
    estimated (:func:`check_memory`: refused if too large, else one line names the method, the sizes, the settings it
    reads and the estimate), and each LAX view's agreement with the stack measured on every frame
    (:func:`lax_agreement`): one line warns of a view below :data:`LAX_WARN_CORRELATION`.

    Args:
        sax_path: SAX stack, (X, Y, S) or (X, Y, S, T).
        lax_paths: LAX views, (X, Y, 1[, T]) with the same T (may be empty).
        out: the output NIfTI: (X, Y, Z) or, for T > 1, (X, Y, Z, T), with the fine affine. Beside it,
            ``<stem>_history.json`` (per frame: seconds, iterations, losses; per view: the correlation) and,
            with ``keep_steps`` and a latent method, ``<stem>_steps/frameTT.nii.gz`` (X, Y, Z, K): the volume
            before each iteration and the final one.
        progress: a bar of the iterations (the baselines: of the frames) on stderr.

    Returns:
        ``out`` and the history of every frame.

    Raises:
        NonFiniteOutputError: a frame's volume holds NaN or infinity: nothing is written, the message names the
            method's step size (:attr:`MethodSpec.step_size`) and its value.
    """
    settings = settings or ReconstructSettings()
    out = check_output_name(out)
    if method not in METHOD_SPECS:
        raise MedsynthError(f"reconstruct: unknown method '{method}' (one of {', '.join(METHODS)})")
    spec = METHOD_SPECS[method]
    frames = check_inputs(sax_path, lax_paths, factor)
    note(check_memory(sax_path, factor, method, settings, getattr(prior, "image_size", None), keep_steps))
    sax = load_image(sax_path)  # (T, X, Y, S)
    lax = [load_image(path) for path in lax_paths]  # (T, X, Y, 1) each
    names = [str(path) for path in lax_paths]
    agreement = [lax_agreement((sax[t].numpy(), sax.affine), [(image[t].numpy(), image.affine) for image in lax], factor, settings,
                               names) for t in range(frames)] if lax else []
    for k, name in enumerate(names):
        measured = [frame[k] for frame in agreement if frame[k] is not None]
        if measured and min(measured) < LAX_WARN_CORRELATION:
            note(f"reconstruct: warning: {name}: where it crosses the SAX slices its intensities follow the stack's poorly "
                 f"(correlation {min(measured):.2f}, below {LAX_WARN_CORRELATION}; a subject's own views measure 0.89 - 0.99 "
                 "on the cardiac phantom): another subject, session or frame of reference?")
    if spec.step_size is not None:
        cause = f"method {method}: lower {spec.step_size} (now {getattr(settings, spec.step_size):g}), or check the prior's weights"
    else:  # the baselines and diffpir (a projection: no step size to blame)
        cause = f"method {method}: the SAX stack {Path(sax_path).name} holds non-finite values" + (", or the prior's weights do" if spec.reads else "")
    per_frame = max(1, _iterations(method, settings)) if spec.reads else 1
    volumes, histories = [], []
    fine_affine = None
    with tqdm(total=frames * per_frame, desc=f"reconstruct {method}", unit="it" if spec.reads else "frame", disable=not progress) as bar:
        for t in range(frames):
            views = [(image[t].numpy(), image.affine) for image in lax]
            volume, fine_affine, history = reconstruct_stack(prior, (sax[t].numpy(), sax.affine), views, factor, method, settings,
                                                             lax_names=names, keep_steps=keep_steps, tick=bar.update)
            bar.update((t + 1) * per_frame - bar.n)  # an early stop leaves iterations unused
            try:  # each frame at once: a diverged frame 0 is refused before the other frames' minutes
                check_finite_output(volume, out)
            except NonFiniteOutputError as exc:
                raise exc.blaming(f"frame {t}, {cause}") from None
            volumes.append(volume)
            histories.append(history)
            if keep_steps and history.steps:
                _save(np.stack(history.steps), out.parent / f"{_stem(out)}_steps" / f"frame{t:02d}.nii.gz", fine_affine, cause)
                history.steps = []  # on disk now: do not keep every frame's steps in memory
    _save(np.stack(volumes), out, fine_affine, cause, series=frames > 1)
    atomic_write_json(out.parent / f"{_stem(out)}_history.json", {
        "method": method, "factor": factor, "sax": str(sax_path), "lax": names,
        "lax_correlation": {name: [frame[k] for frame in agreement] for k, name in enumerate(names)},
        "frames": [{"seconds": h.seconds, "iterations": h.iterations, "losses": h.losses} for h in histories]})
    return out, histories


def _save(array: np.ndarray, path: Path, affine: Any, cause: str, series: bool = True) -> None:
    """save_image, its refusal of a non-finite array naming the setting at fault."""
    try:
        save_image(array, path, affine, series=series)
    except NonFiniteOutputError as exc:
        raise exc.blaming(cause) from None
