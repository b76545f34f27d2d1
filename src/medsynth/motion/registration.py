"""Multi-resolution B-spline free-form deformation (FFD) registration in PyTorch (CPU or GPU).

Rueckert et al., IEEE TMI 1999: the displacement is a cubic B-spline tensor product over
a grid of control points at ``control_spacing_mm``, fitted by gradient descent to a
similarity (MSE, global or local NCC, mutual information: MONAI losses) plus a
bending-energy penalty, coarse to fine over an image pyramid. In diffeomorphic mode the
B-spline field is a stationary velocity integrated by scaling and squaring (Arsigny et
al., MICCAI 2006; MONAI ``DVF2DDF``), so the map is invertible. Levels of more than
``4 * samples`` voxels (a CT's finer levels) evaluate both terms on fresh, seeded, stratified
random blocks each iteration, as elastix's random sampler does, with the B-spline computed
only on them; Adam's step anneals to zero there (Klein et al., IJCV 2009, on stochastic
gradients in registration).

The result is the control grid (:class:`BSplineTransform`, a compact ``.npz``); the
dense field (voxels, MONAI DDF convention: ``warp_image(moving, u) ~ fixed``) is made on
demand. :func:`register_pair` registers two files, :func:`register_batch` several pairs of
one grid jointly; :mod:`medsynth.motion.phase_series` registers the phases of 4D datasets.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.losses import GlobalMutualInformationLoss, LocalNormalizedCrossCorrelationLoss
from monai.networks.layers import GaussianFilter
from monai.transforms import SpatialResample
from nibabel.affines import apply_affine
from pydantic import Field, ValidationInfo, field_validator
from tqdm import tqdm

from medsynth.config import StrictModel
from medsynth.data.io import NIFTI_SUFFIXES, load_image, spacing_of, suffix_of
from medsynth.errors import BadInputError, NonFiniteOutputError
from medsynth.motion.bspline import BSplineTransform, load_transform
from medsynth.motion.fields import bending_energy, folding_share, save_field, warp_image
from medsynth.motion.landmarks import PointSet, TargetError, read_pair, registration_error

__all__ = [
    "BSplineTransform",
    "RegistrationConfig",
    "RegistrationResult",
    "field_from_grid",
    "load_transform",
    "register",
    "register_batch",
    "register_pair",
]

MAX_CONTROL_SPACING_MM = 1000.0  # wider than any body: beyond it the grid is one cell (an affine-like fit)
MAX_ITERATIONS = 100_000  # per level
SAMPLES = 65536  # default voxels per iteration at a sampled level (measured in BENCHMARKS.md, issue 21)
SAMPLED_ITERATIONS = 150  # default iterations of a sampled level
TOLERANCE = 0.0  # default: off (1e-3 cost the cardiac phantom 9 % of its accuracy, 1e-4 the diffeomorphic lung 1 %)
WINDOW = 10  # iterations per window of the convergence stop
BLOCK = 8  # edge (voxels) of a random block at a sampled level (LNCC: at least its window + 3)


class RegistrationConfig(StrictModel):
    """Settings of the B-spline FFD registration (``medsynth register``), each refused outside its bounds with its name."""

    control_spacing_mm: float | tuple[float, float, float] = Field(20.0, description="control-point spacing (mm, > 0), one value or one per axis")
    levels: int = Field(3, ge=1, le=6, description="pyramid levels, each halving the grid (axes stop at 8 voxels)")
    similarity: Literal["mse", "ncc", "lncc", "mi"] = "lncc"
    lncc_kernel: int = Field(5, ge=3, le=51, description="LNCC window (voxels, odd)")
    mi_bins: int = Field(32, ge=8, le=256, description="histogram bins of mutual information")
    regularisation: float = Field(100.0, ge=0, le=1e6, description="bending-energy weight (energy in mm^-2; tuned for LNCC on phantoms)")
    diffeomorphic: bool = Field(False, description="the B-spline field is a velocity integrated by scaling and squaring")
    integration_steps: int = Field(7, ge=1, le=20, description="scaling-and-squaring steps (diffeomorphic mode)")
    optimiser: Literal["adam", "lbfgs"] = "adam"
    iterations: int | tuple[int, ...] = Field(60, description=f"iterations per level (1..{MAX_ITERATIONS}; one value, or one per level coarse to fine)")
    # Adam's step is in voxels of the control grid: steps beyond a few voxels per iteration only diverge.
    learning_rate: float = Field(0.3, gt=0, le=10, description="Adam step (voxels, 0 < lr <= 10); L-BFGS uses its line search")
    device: str = Field("auto", description="'auto' (CUDA when available), 'cpu', 'cuda', 'cuda:1', ...")
    # Speed at real size (issue 21): elastix's random sampler, a convergence stop, the threads.
    samples: int = Field(SAMPLES, ge=0, le=2**24, description="voxels per pair and iteration on which the similarity is evaluated at levels "
                         "of more than 4x this many voxels: random 8^3 blocks (larger for wide LNCC windows), fresh each iteration; "
                         "0: every voxel at every level (diffeomorphic mode always takes every voxel)")
    sampled_iterations: int = Field(SAMPLED_ITERATIONS, ge=1, le=MAX_ITERATIONS, description="iterations of a sampled level (instead of "
                                    "its iterations): each costs the same at any image size; Adam's step anneals to zero over them (cosine)")
    seed: int = Field(0, ge=0, le=2**32 - 1, description="seed of the random blocks: the same seed gives the same grid bit for bit (same machine, threads and versions)")
    tolerance: float = Field(TOLERANCE, ge=0, le=1, description=f"convergence stop: a level ends once its mean loss over {WINDOW} iterations fell "
                             f"by less than this share of its size against the {WINDOW} before (levels on every voxel; sampled ones anneal instead); 0 runs every iteration")
    threads: int | None = Field(None, ge=1, le=1024, description="CPU threads of torch while registering; unset: torch's own "
                                "(the machine's cores, or OMP_NUM_THREADS)")

    @field_validator("control_spacing_mm")
    @classmethod
    def _positive_spacing(cls, value: float | tuple[float, ...]) -> float | tuple[float, ...]:
        if not all(0 < v <= MAX_CONTROL_SPACING_MM for v in np.atleast_1d(value)):
            raise ValueError(f"must be > 0 and <= {MAX_CONTROL_SPACING_MM:g} mm (one value or one per axis), got {value}")
        return value

    @field_validator("lncc_kernel")
    @classmethod
    def _odd_kernel(cls, value: int) -> int:
        if value % 2 == 0:
            raise ValueError(f"must be odd (the window is centred on a voxel), got {value}")
        return value

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        if value != "auto":
            try:
                torch.device(value)
            except RuntimeError:
                raise ValueError(f"expected 'auto', 'cpu', 'cuda' or 'cuda:N', got {value!r}") from None
        return value

    @field_validator("iterations")
    @classmethod
    def _iterations_match_levels(cls, value: int | tuple[int, ...], info: ValidationInfo) -> int | tuple[int, ...]:
        # A field validator (levels is validated before it), so that a refusal names the key and its --set.
        _per_level(value, info.data.get("levels", 1))
        return value

    def iterations_per_level(self) -> list[int]:
        """Iterations at each level, coarse to fine."""
        return _per_level(self.iterations, self.levels)

    def grid_settings(self) -> dict[str, Any]:
        """The settings that change a grid, JSON-ready: ``registration.json`` records them and a rerun compares them.

        Left out: ``device`` and ``threads`` (they change float rounding only, so a run may resume on
        another device or machine), and the settings of a method not chosen (``lncc_kernel`` unless LNCC,
        ``mi_bins`` unless MI, ``integration_steps`` unless diffeomorphic), which the optimisation never
        reads. ``iterations`` is listed per level and ``control_spacing_mm`` is one value when the axes
        agree, so equal settings compare equal however they were written.
        """
        unused = {"device", "threads"} | {key for key, used in (("lncc_kernel", self.similarity == "lncc"), ("mi_bins", self.similarity == "mi"),
                                                                ("integration_steps", self.diffeomorphic)) if not used}
        settings = self.model_dump(mode="json", exclude=unused)
        spacing = [float(v) for v in np.broadcast_to(np.asarray(self.control_spacing_mm, dtype=np.float64), (3,))]
        settings["control_spacing_mm"] = spacing[0] if len(set(spacing)) == 1 else spacing
        settings["iterations"] = self.iterations_per_level()
        return settings

    def torch_device(self) -> torch.device:
        return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if self.device == "auto" else self.device)


def _per_level(iterations: int | tuple[int, ...], levels: int) -> list[int]:
    per_level = [iterations] * levels if isinstance(iterations, int) else list(iterations)
    if len(per_level) != levels or not all(1 <= n <= MAX_ITERATIONS for n in per_level):
        raise ValueError(f"must be an int in 1..{MAX_ITERATIONS} or {levels} such ints (one per level coarse to fine), got {iterations}")
    return per_level


def field_from_grid(grid_path: str | Path, out_path: str | Path) -> Path:
    """Write the dense field of a control grid as a mm vector NIfTI with the fixed image's affine."""
    transform, _ = load_transform(grid_path)
    return _write_field(transform, Path(out_path))


# ---------------------------------------------------------------------------------------
# Optimisation
# ---------------------------------------------------------------------------------------


def _similarity(config: RegistrationConfig) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Similarity loss (lower is better) on intensities scaled to about [0, 1]."""
    if config.similarity == "mse":
        return F.mse_loss
    if config.similarity == "lncc":
        return LocalNormalizedCrossCorrelationLoss(spatial_dims=3, kernel_size=config.lncc_kernel)
    if config.similarity == "mi":
        return GlobalMutualInformationLoss(num_bins=config.mi_bins)

    def ncc(warped: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:  # global NCC (MONAI's is local only), mean over the batch
        a, b = (x.flatten(1) - x.flatten(1).mean(1, keepdim=True) for x in (warped, fixed))
        return (-(a * b).mean(1) / (a.std(1, unbiased=False) * b.std(1, unbiased=False) + 1e-8)).mean()

    return ncc


def _lncc(warped: torch.Tensor, fixed: torch.Tensor, kernel: int, valid: bool = False) -> torch.Tensor:
    """Squared local NCC per voxel, ``(B, 1, *S)``: MONAI's ``LocalNormalizedCrossCorrelationLoss`` values, negated.

    Used where MONAI's loss does not serve: on blocks (``valid``: only the voxels whose window lies
    inside, ``S - kernel + 1`` per axis; MONAI zero-pads) and for the quality at full size (MONAI's
    box filters are 3D convolutions, 28-42 s on a 256x256x141 CT on 2 loaded threads; separable
    cumulative sums are about 5x faster there). Levels on every voxel keep MONAI's loss, faster
    with its gradient on small grids.
    """
    sums = torch.cat([fixed, warped, fixed * fixed, warped * warped, fixed * warped], 1).double()  # float64: exact window sums
    if not valid:
        sums = F.pad(sums, [kernel // 2] * 6)
    for dim in (2, 3, 4):  # box sums along one axis at a time, by differences of cumulative sums
        count = sums.shape[dim] - kernel + 1
        cumulative = F.pad(sums.cumsum(dim), [0, 0] * (4 - dim) + [1, 0])
        sums = cumulative.narrow(dim, kernel, count) - cumulative.narrow(dim, 0, count)
    t_sum, p_sum, t2_sum, p2_sum, tp_sum = sums.float().split(1, dim=1)
    volume = kernel**3
    cross = tp_sum - p_sum / volume * t_sum
    t_var = (t2_sum - t_sum / volume * t_sum).clamp_min(1e-5)  # MONAI's smooth_dr
    p_var = (p2_sum - p_sum / volume * p_sum).clamp_min(1e-5)
    return cross * cross / (t_var * p_var)


def _pyramid_sizes(shape: Sequence[int], levels: int) -> list[tuple[int, ...]]:
    """Grid sizes coarse to fine: each level halves every axis, down to 8 voxels (or the axis' size)."""
    return [tuple(max(int(round(n / 2**level)), min(n, 8)) for n in shape) for level in reversed(range(levels))]


def _downsample(image: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """Gaussian-smoothed (sigma = half the reduction factor) trilinear resampling to ``size``."""
    factors = [n / m for n, m in zip(image.shape[2:], size)]
    if max(factors) <= 1.0:
        return image
    smoothed = GaussianFilter(3, sigma=[max(0.5 * f, 0.01) if f > 1 else 0.01 for f in factors]).to(image.device)(image)
    return F.interpolate(smoothed, size=size, mode="trilinear", align_corners=True)


def _normalise(fixed: torch.Tensor, moving: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale both images by the fixed image's 0.5-99.5 percentile range to about [0, 1] (the same map for both)."""
    sample = fixed.flatten()[:: max(1, fixed.numel() // 1_000_000)]
    low, high = torch.quantile(sample.float(), torch.tensor([0.005, 0.995], device=fixed.device))
    scale = (high - low).clamp_min(1e-6)
    return ((fixed - low) / scale).clamp(-0.5, 1.5), ((moving - low) / scale).clamp(-0.5, 1.5)


def register(fixed: MetaTensor, moving: MetaTensor, config: RegistrationConfig | None = None,
             progress: bool = False) -> tuple[BSplineTransform, dict[str, Any]]:
    """Register ``moving`` to ``fixed`` (both ``(1, X, Y, Z)`` on the fixed grid).

    Returns:
        The transform (``warp_image(moving, transform.dense_field()) ~ fixed``) and its
        quality: ``before``/``after`` (similarity loss at full resolution, lower is
        better), ``folding`` (share of voxels with Jacobian determinant <= 0),
        ``seconds`` and ``level_seconds`` (a list, coarse to fine).
    """
    return register_batch([fixed], [moving], config, progress)[0]


def register_batch(fixed: Sequence[MetaTensor], moving: Sequence[MetaTensor], config: RegistrationConfig | None = None,
                   progress: bool = False) -> list[tuple[BSplineTransform, dict[str, Any]]]:
    """Register ``B`` pairs of one shape and spacing jointly: one optimisation over ``(B, 3, ...)`` coefficients.

    The loss is the sum of the pairs' losses, so each pair's coefficients get their own
    gradient, and Adam's steps are element-wise: the result equals :func:`register` of
    each pair (up to float rounding). L-BFGS couples the pairs (shared line search and
    curvature history), so with ``optimiser="lbfgs"`` the pairs are registered one by one. The
    convergence stop (``tolerance``) watches the batch's summed loss: with it a pair may run
    more or fewer iterations than alone (``tolerance=0`` for the same grids as alone).

    Args:
        fixed, moving: ``B`` images ``(1, X, Y, Z)`` each, every pair on its fixed grid; all
            fixed images of one shape and voxel spacing (affines may differ otherwise).
        config: settings; levels of more than ``4 * config.samples`` voxels evaluate the
            similarity and the bending energy on random blocks (the same blocks for every
            pair of the batch, drawn from ``config.seed``), smaller ones on every voxel.
        progress: a progress bar per level (stderr, with the time left).

    Returns:
        ``(transform, quality)`` per pair, as :func:`register`; ``seconds`` and
        ``level_seconds`` are the batch's time shared equally.
    """
    config = config or RegistrationConfig()
    if config.optimiser == "lbfgs" and len(fixed) > 1:
        return [result for pair in zip(fixed, moving) for result in register_batch([pair[0]], [pair[1]], config, progress)]
    threads = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(config.threads)
    try:
        return _register_batch(fixed, moving, config, progress)
    finally:
        torch.set_num_threads(threads)


def _register_batch(fixed: Sequence[MetaTensor], moving: Sequence[MetaTensor], config: RegistrationConfig, progress: bool) -> list[tuple[BSplineTransform, dict[str, Any]]]:
    start = time.perf_counter()
    device = config.torch_device()
    # Plain tensors: MetaTensor bookkeeping on every operation would only slow the loop down.
    pairs = [_normalise(*(torch.as_tensor(image.as_tensor() if isinstance(image, MetaTensor) else image, dtype=torch.float32, device=device)[None] for image in pair)) for pair in zip(fixed, moving)]
    fixed_t, moving_t = torch.cat([f for f, _ in pairs]), torch.cat([m for _, m in pairs])  # (B, 1, X, Y, Z)
    shape, batch = tuple(fixed_t.shape[2:]), len(pairs)
    spacing = spacing_of(fixed[0].affine)
    if any(not np.allclose(spacing_of(image.affine), spacing, rtol=1e-5) for image in fixed):
        raise ValueError("register_batch: every pair of a batch needs the same voxel spacing")
    control_mm = np.broadcast_to(np.asarray(config.control_spacing_mm, dtype=np.float64), (3,))
    control = tuple(float(v) for v in control_mm / spacing)
    coefficients = torch.zeros(batch, 3, *BSplineTransform.grid_shape(shape, control), device=device, requires_grad=True)
    transform = BSplineTransform(coefficients, control, shape, np.asarray(fixed[0].affine, dtype=np.float64), config.diffeomorphic, config.integration_steps)
    similarity = _similarity(config)
    if isinstance(similarity, torch.nn.Module):
        similarity = similarity.to(device)

    # One stream of random blocks for the whole run, drawn on the CPU: the same seed gives the same blocks on any device.
    generator = torch.Generator().manual_seed(config.seed)
    edge = max(BLOCK, config.lncc_kernel + 3) if config.similarity == "lncc" else BLOCK
    level_seconds = []
    sizes = _pyramid_sizes(shape, config.levels)
    for level, (size, iterations) in enumerate(zip(sizes, config.iterations_per_level())):
        level_start = time.perf_counter()
        # Pair by pair: a batched convolution rounds differently, and Adam's normalised steps
        # amplify such 1e-7 differences where the gradient is near zero.
        fixed_l, moving_l = (torch.cat([_downsample(image[b : b + 1], size) for b in range(batch)]) for image in (fixed_t, moving_t))
        level_spacing = spacing * (np.asarray(shape) - 1) / np.maximum(np.asarray(size) - 1, 1)
        sampled = not config.diffeomorphic and 0 < 4 * config.samples < np.prod(size) and min(size) >= edge

        def objective(size=size, fixed_l=fixed_l, moving_l=moving_l, level_spacing=level_spacing) -> torch.Tensor:  # this level's
            spline = transform.spline_field(size)
            ddf = transform.displacement(size) if config.diffeomorphic else spline
            # Both terms are means over the batch of per-pair means of equal size: times B, the sum of the pairs' losses.
            return batch * (similarity(warp_image(moving_l, ddf), fixed_l) + config.regularisation * bending_energy(spline, level_spacing))

        def sampled_objective(size=size, fixed_l=fixed_l, moving_l=moving_l, level_spacing=level_spacing) -> torch.Tensor:
            # elastix's random sampler: both terms on fresh random blocks, so an iteration costs the same at any image size.
            corners = _block_corners(size, edge, config.samples, generator)
            spline = transform.spline_blocks(size, corners, edge)  # (B, K, 3, E, E, E)
            warped, fixed_b = _sample_blocks(moving_l, corners, edge, spline), _sample_blocks(fixed_l, corners, edge)
            return batch * (_block_similarity(similarity, config, warped, fixed_b) + config.regularisation * bending_energy(spline.flatten(0, 1), level_spacing))

        description = f"level {level + 1}/{len(sizes)} {'x'.join(str(n) for n in size)}{' sampled' if sampled else ''}"
        iterations = config.sampled_iterations if sampled else iterations
        with tqdm(total=iterations, desc=description, unit="it", leave=False, disable=not progress) as bar:
            _optimise(coefficients, sampled_objective if sampled else objective, iterations, config, bar.update, anneal=sampled)
        level_seconds.append(time.perf_counter() - level_start)

    results = []
    score = (lambda warped, fixed: -_lncc(warped, fixed, config.lncc_kernel).mean()) if config.similarity == "lncc" else similarity  # MONAI's values
    with torch.no_grad():
        ddf = transform.displacement()
        for b, image in enumerate(fixed):
            quality = {
                "before": float(score(moving_t[b : b + 1], fixed_t[b : b + 1])),
                "after": float(score(warp_image(moving_t[b : b + 1], ddf[b : b + 1]), fixed_t[b : b + 1])),
                "folding": folding_share(ddf[b : b + 1]),
            }
            pair_transform = BSplineTransform(coefficients[b].detach(), control, shape, np.asarray(image.affine, dtype=np.float64), config.diffeomorphic, config.integration_steps)
            results.append((pair_transform, quality))
    seconds = (time.perf_counter() - start) / batch
    for _, quality in results:
        quality["seconds"] = seconds
        quality["level_seconds"] = [round(s / batch, 3) for s in level_seconds]
    return results


def _block_corners(size: tuple[int, ...], edge: int, samples: int, generator: torch.Generator) -> torch.Tensor:
    """Corners ``(K, 3)`` of about ``samples / edge^3`` random blocks of ``edge`` voxels inside a ``size`` grid, stratified.

    The grid is cut into ``K`` cells (in proportion to its axes) and each cell gets one block at a
    uniform random place in it: every region is sampled at every iteration, so every control point
    gets a gradient (jittered sampling; plain uniform blocks leave some control points without one).
    """
    free = torch.tensor([n - edge + 1 for n in size], dtype=torch.float64)  # corner positions per axis
    density = (samples / edge**3 / float(torch.prod(free))) ** (1 / 3)
    cells = [max(1, min(int(f), round(float(f) * density))) for f in free]
    index = torch.stack(torch.meshgrid(*[torch.arange(c, dtype=torch.float64) for c in cells], indexing="ij"), -1).reshape(-1, 3)
    jitter = torch.rand(index.shape, generator=generator, dtype=torch.float64)
    return torch.floor((index + jitter) * free / torch.tensor(cells, dtype=torch.float64)).long()


def _sample_blocks(image: torch.Tensor, corners: torch.Tensor, edge: int, ddf: torch.Tensor | None = None) -> torch.Tensor:
    """``image`` ``(B, 1, X, Y, Z)`` on the ``edge``-voxel blocks at ``corners`` ``(K, 3)``, displaced by ``ddf`` (voxels).

    As :func:`~medsynth.motion.fields.warp_image` samples (trilinear, border, MONAI's ``Warp``
    coordinates), but only at the blocks' voxels (``Warp`` takes a field the size of the
    image). Without ``ddf`` (``(B, K, 3, E, E, E)``) the blocks are cut out as they are.

    Returns:
        ``(B, 1, K, E, E, E)``.
    """
    index = [corners[:, axis, None].to(image.device) + torch.arange(edge, device=image.device) for axis in range(3)]  # (K, E) per axis
    if ddf is None:
        return image[:, :, index[0][:, :, None, None], index[1][:, None, :, None], index[2][:, None, None, :]]
    points = torch.stack(torch.broadcast_tensors(index[0][:, :, None, None], index[1][:, None, :, None], index[2][:, None, None, :])).to(ddf.dtype)
    points = points[None] + ddf.transpose(1, 2)  # (B, 3, K, E, E, E) voxels
    # grid_sample's coordinates: -1 .. 1 over each axis (align_corners), in the order z, y, x.
    grid = torch.stack([points[:, axis] * 2 / max(n - 1, 1) - 1 for axis, n in reversed(list(enumerate(image.shape[2:])))], -1)
    sampled = F.grid_sample(image, grid.flatten(1, 2), mode="bilinear", padding_mode="border", align_corners=True)
    return sampled.unflatten(2, (len(corners), edge))


def _block_similarity(similarity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], config: RegistrationConfig,
                      warped: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
    """The similarity loss on blocks ``(B, 1, K, E, E, E)``: a mean over the batch of per-pair values.

    LNCC: on each block, only where the whole window lies inside it. Other similarities: on the
    pair's blocks side by side.
    """
    if config.similarity == "lncc":
        return -_lncc(warped.transpose(1, 2).flatten(0, 1), fixed.transpose(1, 2).flatten(0, 1), config.lncc_kernel, valid=True).mean()
    return similarity(warped.flatten(2, 3), fixed.flatten(2, 3))


def _optimise(parameters: torch.Tensor, objective: Callable[[], torch.Tensor], iterations: int, config: RegistrationConfig,
              advance: Callable[[], Any] = lambda: None, anneal: bool = False) -> int:
    """Fit ``parameters`` to ``objective`` for at most ``iterations`` steps; ``advance`` after each. Returns the steps taken.

    Adam stops early once the mean loss of the last :data:`WINDOW` iterations fell by less than
    ``config.tolerance`` of its size against the window before (checked every window), except
    when it ``anneal``s: then its step follows a cosine to zero over all ``iterations`` (on random
    samples a constant step keeps its size in the noise, and a noisy loss would stop it early).
    """
    if config.optimiser == "lbfgs":
        optimiser = torch.optim.LBFGS([parameters], lr=1.0, max_iter=iterations, history_size=20, tolerance_grad=0.0, tolerance_change=0.0, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            optimiser.zero_grad()
            loss = objective()
            loss.backward()
            advance()
            return loss

        optimiser.step(closure)
        return iterations
    optimiser = torch.optim.Adam([parameters], lr=config.learning_rate)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, iterations) if anneal else None
    losses: list[float] = []
    for _ in range(iterations):
        optimiser.zero_grad()
        loss = objective()
        loss.backward()
        optimiser.step()
        if schedule is not None:
            schedule.step()
        losses.append(float(loss.detach()))
        advance()
        if not anneal and config.tolerance > 0 and len(losses) >= 2 * WINDOW and len(losses) % WINDOW == 0:
            before, last = np.mean(losses[-2 * WINDOW : -WINDOW]), np.mean(losses[-WINDOW:])
            if before - last < config.tolerance * abs(before):
                break
    return len(losses)


# ---------------------------------------------------------------------------------------
# Files: pair mode
# ---------------------------------------------------------------------------------------


@dataclass
class RegistrationResult:
    """One registration: where it went and how well it did."""

    fixed: str
    moving: str
    output: Path
    similarity: str
    before: float  # similarity loss of the identity (lower is better)
    after: float  # similarity loss after registration
    folding: float  # share of voxels with Jacobian determinant <= 0
    seconds: float
    skipped: bool = False  # found done by an earlier run
    notes: list[str] = field(default_factory=list)
    tre_before: TargetError | None = None  # landmark distances |q - p| (mm), with landmarks
    tre_after: TargetError | None = None  # landmark distances |p + u(p) - q| (mm)
    level_seconds: list[float] = field(default_factory=list)  # each pyramid level's share of seconds, coarse to fine

    def line(self) -> str:
        """The one-line quality report."""
        levels = f" (levels {' + '.join(f'{s:.1f}' for s in self.level_seconds)} s)" if self.level_seconds else ""
        status = "done earlier" if self.skipped else f"{self.seconds:.1f} s{levels}"
        notes = "".join(f" ({note})" for note in self.notes)
        tre = "" if self.tre_after is None else f", TRE {self.tre_before} -> {self.tre_after} mm over {self.tre_after.count} landmarks"
        # A NaN field has no voxel with det <= 0, so its folding would read 0%: say it diverged instead.
        finite = all(np.isfinite(v) for v in (self.before, self.after, self.folding))
        folding = f"folding {100 * self.folding:.3f}%" if finite else "not finite (diverged)"
        return f"{self.output}: {self.similarity} {self.before:.4f} -> {self.after:.4f}, {folding}{tre}, {status}{notes}"


def _write_field(transform: BSplineTransform, path: Path) -> Path:
    # save_field writes through the one atomic writer: a killed job leaves no half file.
    if suffix_of(path) not in NIFTI_SUFFIXES:
        raise BadInputError(path, "a dense field is written as NIfTI (.nii.gz or .nii)")
    return save_field(transform.dense_field(), path, transform.affine)


def diverged(exc: NonFiniteOutputError, config: RegistrationConfig) -> NonFiniteOutputError:
    """A grid or field refused as non-finite (its writer's guard) blamed on the setting most likely at fault:
    the optimiser diverged, Adam's step (``learning_rate``) being the usual cause."""
    if config.optimiser == "adam":
        return exc.blaming(f"the registration diverged: lower learning_rate (now {config.learning_rate:g})")
    return exc.blaming("the registration diverged under optimiser=lbfgs: try optimiser=adam or a larger regularisation")


def _load_volume(path: str | Path) -> MetaTensor:
    image = load_image(path)
    if image.ndim != 4 or min(image.shape[1:]) < 4:
        raise BadInputError(path, f"registration needs a 3D volume (at least 4 voxels per axis), got shape {tuple(image.shape[1:])}")
    if image.shape[0] != 1:
        raise BadInputError(path, f"expected one 3D volume, got {image.shape[0]} channels or phases (register a 4D scan with dataset mode)")
    refuse_constant(image, path)
    return image


def refuse_constant(image: torch.Tensor, source: str | Path) -> None:
    """Refuse an image whose voxels all hold one value (an empty or blank scan): no similarity can move a grid on it."""
    low, high = torch.aminmax(torch.as_tensor(image))
    if low == high:
        raise BadInputError(source, f"constant image (every voxel {float(low):g}): nothing to register")


def _on_fixed_grid(fixed: MetaTensor, moving: MetaTensor, moving_path: str | Path, fixed_path: str | Path) -> tuple[MetaTensor, list[str]]:
    """``moving`` resampled onto the fixed grid when their shapes or affines differ; refused when they do not overlap."""
    fixed_affine, moving_affine = np.asarray(fixed.affine, dtype=np.float64), np.asarray(moving.affine, dtype=np.float64)
    if fixed.shape == moving.shape and np.allclose(fixed_affine, moving_affine, atol=1e-4):
        return moving, []
    # Share of fixed voxels whose world point falls inside the moving image (a subsample of the grid).
    stride = max(1, int(np.ceil((np.prod(fixed.shape[1:]) / 200_000) ** (1 / 3))))
    index = np.stack(np.meshgrid(*[np.arange(0, n, stride) for n in fixed.shape[1:]], indexing="ij"), -1).reshape(-1, 3)
    to_moving = np.linalg.inv(moving_affine) @ fixed_affine
    mapped = apply_affine(to_moving, index)
    inside = (mapped > -0.5) & (mapped < np.asarray(moving.shape[1:]) - 0.5)
    overlap = float(inside.all(axis=1).mean())
    if overlap == 0.0:
        raise BadInputError(moving_path, f"does not overlap the fixed image {fixed_path} in world space (check the affines)")
    resampled = SpatialResample(mode="bilinear", padding_mode="border")(moving, dst_affine=torch.as_tensor(fixed_affine), spatial_size=fixed.shape[1:])
    note = f"moving resampled onto the fixed grid: shape {tuple(moving.shape[1:])} -> {tuple(fixed.shape[1:])}, {100 * overlap:.0f}% of the fixed image overlaps it"
    return MetaTensor(resampled.as_tensor().float(), affine=fixed.affine), [note]


def register_pair(fixed_path: str | Path, moving_path: str | Path, out_path: str | Path, config: RegistrationConfig | None = None,
                  landmarks: tuple[str | Path, str | Path] | None = None, progress: bool = False) -> RegistrationResult:
    """Register MOVING to FIXED and write the result (``medsynth register FIXED MOVING --out OUT``).

    Args:
        fixed_path: the fixed 3D image.
        moving_path: the moving 3D image; resampled onto the fixed grid (and said so in
            ``notes``) when shape or affine differ.
        out_path: ``.nii.gz``/``.nii``: the dense field, a mm vector NIfTI with the fixed
            image's affine; ``.npz``: the control grid (:func:`field_from_grid` makes the field).
        config: registration settings.
        landmarks: the fixed and the moving landmark files (:mod:`medsynth.motion.landmarks`:
            elastix ``point`` LPS mm / ``index`` voxels, or CSV RAS mm): the result's
            ``tre_before``/``tre_after`` (mm) and its line report them.
        progress: a progress bar per pyramid level (stderr, with the time left).

    Raises:
        BadInputError: unreadable, non-3D, constant or NaN images, images that do not overlap in
            world space, an output type other than NIfTI or NPZ, broken landmark files or
            landmarks outside their image; all before anything is written.
        NonFiniteOutputError: the fit diverged (NaN or infinity): ``learning_rate`` named, nothing written.
    """
    out_path = Path(out_path)
    if suffix_of(out_path) not in (*NIFTI_SUFFIXES, ".npz"):
        raise BadInputError(out_path, "output must be .nii.gz/.nii (dense field, mm) or .npz (control grid)")
    config = config or RegistrationConfig()
    fixed, moving = _load_volume(fixed_path), _load_volume(moving_path)
    points = read_pair(*landmarks) if landmarks else None
    moving_affine = moving.affine  # index landmarks of the moving file are its own voxels, before any resampling
    if points:
        points[0].check_inside(fixed.affine, fixed.shape, fixed_path)
        points[1].check_inside(moving.affine, moving.shape, moving_path)
    moving, notes = _on_fixed_grid(fixed, moving, moving_path, fixed_path)
    transform, quality = register(fixed, moving, config, progress)
    try:
        if suffix_of(out_path) == ".npz":
            transform.save(out_path, fixed=str(fixed_path), moving=str(moving_path), similarity=config.similarity, **quality)
        else:
            _write_field(transform, out_path)
    except NonFiniteOutputError as exc:
        raise diverged(exc, config) from None
    result = RegistrationResult(str(fixed_path), str(moving_path), out_path, config.similarity, quality["before"], quality["after"], quality["folding"], quality["seconds"], notes=notes,
                                level_seconds=quality["level_seconds"])
    return with_landmarks(result, points, transform, moving_affine)


def with_landmarks(result: RegistrationResult, points: tuple[PointSet, PointSet] | None, transform: BSplineTransform,
                   moving_affine: np.ndarray | torch.Tensor | None = None) -> RegistrationResult:
    """``result`` with the TRE before and after ``transform`` at ``points`` (unchanged without points)."""
    if points is not None:
        result.tre_before, result.tre_after = registration_error(points, transform.dense_field().as_tensor(), transform.affine, moving_affine)
    return result
