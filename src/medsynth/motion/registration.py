"""Multi-resolution B-spline free-form deformation (FFD) registration in PyTorch (CPU or GPU).

Rueckert et al., IEEE TMI 1999: the displacement is a cubic B-spline tensor product over
a grid of control points at ``control_spacing_mm``, fitted by gradient descent to a
similarity (MSE, global or local NCC, mutual information: MONAI losses) plus a
bending-energy penalty, coarse to fine over an image pyramid. In diffeomorphic mode the
B-spline field is a stationary velocity integrated by scaling and squaring (Arsigny et
al., MICCAI 2006; MONAI ``DVF2DDF``), so the map is invertible.

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
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.losses import GlobalMutualInformationLoss, LocalNormalizedCrossCorrelationLoss
from monai.networks.layers import GaussianFilter
from monai.transforms import SpatialResample
from pydantic import Field, model_validator

from medsynth.config import StrictModel
from medsynth.data.io import NIFTI_SUFFIXES, load_image, spacing_of, suffix_of
from medsynth.errors import BadInputError
from medsynth.motion.bspline import BSplineTransform, load_transform
from medsynth.motion.fields import bending_energy, folding_share, save_field, warp_image

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


class RegistrationConfig(StrictModel):
    """Settings of the B-spline FFD registration (``medsynth register``)."""

    control_spacing_mm: float | tuple[float, float, float] = Field(20.0, description="control-point spacing (mm), one value or one per axis")
    levels: int = Field(3, ge=1, le=6, description="pyramid levels, each halving the grid (axes stop at 8 voxels)")
    similarity: Literal["mse", "ncc", "lncc", "mi"] = "lncc"
    lncc_kernel: int = Field(5, ge=3, description="LNCC window (voxels, odd)")
    mi_bins: int = Field(32, ge=8, description="histogram bins of mutual information")
    regularisation: float = Field(100.0, ge=0, description="bending-energy weight (energy in mm^-2; tuned for LNCC on phantoms)")
    diffeomorphic: bool = Field(False, description="the B-spline field is a velocity integrated by scaling and squaring")
    integration_steps: int = Field(7, ge=1, description="scaling-and-squaring steps (diffeomorphic mode)")
    optimiser: Literal["adam", "lbfgs"] = "adam"
    iterations: int | tuple[int, ...] = Field(60, description="iterations per level (one value, or one per level coarse to fine)")
    learning_rate: float = Field(0.3, gt=0, description="Adam step (voxels); L-BFGS uses its line search")
    device: str = Field("auto", description="'auto' (CUDA when available), 'cpu', 'cuda', 'cuda:1', ...")

    @model_validator(mode="after")
    def _iterations_match_levels(self) -> RegistrationConfig:
        self.iterations_per_level()
        return self

    def iterations_per_level(self) -> list[int]:
        """Iterations at each level, coarse to fine."""
        iterations = [self.iterations] * self.levels if isinstance(self.iterations, int) else list(self.iterations)
        if len(iterations) != self.levels or min(iterations) < 1:
            raise ValueError(f"iterations must be a positive int or {self.levels} positive ints (one per level), got {self.iterations}")
        return iterations

    def torch_device(self) -> torch.device:
        return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if self.device == "auto" else self.device)


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


def register(fixed: MetaTensor, moving: MetaTensor, config: RegistrationConfig | None = None) -> tuple[BSplineTransform, dict[str, float]]:
    """Register ``moving`` to ``fixed`` (both ``(1, X, Y, Z)`` on the fixed grid).

    Returns:
        The transform (``warp_image(moving, transform.dense_field()) ~ fixed``) and its
        quality: ``before``/``after`` (similarity loss at full resolution, lower is
        better), ``folding`` (share of voxels with Jacobian determinant <= 0) and
        ``seconds``.
    """
    return register_batch([fixed], [moving], config)[0]


def register_batch(fixed: Sequence[MetaTensor], moving: Sequence[MetaTensor], config: RegistrationConfig | None = None) -> list[tuple[BSplineTransform, dict[str, float]]]:
    """Register ``B`` pairs of one shape and spacing jointly: one optimisation over ``(B, 3, ...)`` coefficients.

    The loss is the sum of the pairs' losses, so each pair's coefficients get their own
    gradient, and Adam's steps are element-wise: the result equals :func:`register` of
    each pair (up to float rounding). L-BFGS couples the pairs (shared line search and
    curvature history), so with ``optimiser="lbfgs"`` the pairs are registered one by one.

    Args:
        fixed, moving: ``B`` images ``(1, X, Y, Z)`` each, every pair on its fixed grid; all
            fixed images of one shape and voxel spacing (affines may differ otherwise).

    Returns:
        ``(transform, quality)`` per pair, as :func:`register`; ``seconds`` is the batch's
        time shared equally.
    """
    config = config or RegistrationConfig()
    if config.optimiser == "lbfgs" and len(fixed) > 1:
        return [result for pair in zip(fixed, moving) for result in register_batch([pair[0]], [pair[1]], config)]
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

    for size, iterations in zip(_pyramid_sizes(shape, config.levels), config.iterations_per_level()):
        # Pair by pair: a batched convolution rounds differently, and Adam's normalised steps
        # amplify such 1e-7 differences where the gradient is near zero.
        fixed_l, moving_l = (torch.cat([_downsample(image[b : b + 1], size) for b in range(batch)]) for image in (fixed_t, moving_t))
        level_spacing = spacing * (np.asarray(shape) - 1) / np.maximum(np.asarray(size) - 1, 1)

        def objective(size=size, fixed_l=fixed_l, moving_l=moving_l, level_spacing=level_spacing) -> torch.Tensor:  # this level's
            spline = transform.spline_field(size)
            ddf = transform.displacement(size) if config.diffeomorphic else spline
            # Both terms are means over the batch of per-pair means of equal size: times B, the sum of the pairs' losses.
            return batch * (similarity(warp_image(moving_l, ddf), fixed_l) + config.regularisation * bending_energy(spline, level_spacing))

        _optimise(coefficients, objective, iterations, config)

    results = []
    with torch.no_grad():
        ddf = transform.displacement()
        for b, image in enumerate(fixed):
            quality = {
                "before": float(similarity(moving_t[b : b + 1], fixed_t[b : b + 1])),
                "after": float(similarity(warp_image(moving_t[b : b + 1], ddf[b : b + 1]), fixed_t[b : b + 1])),
                "folding": folding_share(ddf[b : b + 1]),
            }
            pair_transform = BSplineTransform(coefficients[b].detach(), control, shape, np.asarray(image.affine, dtype=np.float64), config.diffeomorphic, config.integration_steps)
            results.append((pair_transform, quality))
    seconds = (time.perf_counter() - start) / batch
    for _, quality in results:
        quality["seconds"] = seconds
    return results


def _optimise(parameters: torch.Tensor, objective: Callable[[], torch.Tensor], iterations: int, config: RegistrationConfig) -> None:
    if config.optimiser == "lbfgs":
        optimiser = torch.optim.LBFGS([parameters], lr=1.0, max_iter=iterations, history_size=20, tolerance_grad=0.0, tolerance_change=0.0, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            optimiser.zero_grad()
            loss = objective()
            loss.backward()
            return loss

        optimiser.step(closure)
        return
    optimiser = torch.optim.Adam([parameters], lr=config.learning_rate)
    for _ in range(iterations):
        optimiser.zero_grad()
        objective().backward()
        optimiser.step()


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

    def line(self) -> str:
        """The one-line quality report."""
        status = "done earlier" if self.skipped else f"{self.seconds:.1f} s"
        notes = "".join(f" ({note})" for note in self.notes)
        return f"{self.output}: {self.similarity} {self.before:.4f} -> {self.after:.4f}, folding {100 * self.folding:.3f}%, {status}{notes}"


def _write_field(transform: BSplineTransform, path: Path) -> Path:
    # save_field writes through the one atomic writer: a killed job leaves no half file.
    if suffix_of(path) not in NIFTI_SUFFIXES:
        raise BadInputError(path, "a dense field is written as NIfTI (.nii.gz or .nii)")
    return save_field(transform.dense_field(), path, transform.affine)


def _load_volume(path: str | Path) -> MetaTensor:
    image = load_image(path)
    if image.ndim != 4 or min(image.shape[1:]) < 4:
        raise BadInputError(path, f"registration needs a 3D volume (at least 4 voxels per axis), got shape {tuple(image.shape[1:])}")
    if image.shape[0] != 1:
        raise BadInputError(path, f"expected one 3D volume, got {image.shape[0]} channels or phases (register a 4D scan with dataset mode)")
    return image


def _on_fixed_grid(fixed: MetaTensor, moving: MetaTensor, moving_path: str | Path, fixed_path: str | Path) -> tuple[MetaTensor, list[str]]:
    """``moving`` resampled onto the fixed grid when their shapes or affines differ; refused when they do not overlap."""
    fixed_affine, moving_affine = np.asarray(fixed.affine, dtype=np.float64), np.asarray(moving.affine, dtype=np.float64)
    if fixed.shape == moving.shape and np.allclose(fixed_affine, moving_affine, atol=1e-4):
        return moving, []
    # Share of fixed voxels whose world point falls inside the moving image (a subsample of the grid).
    stride = max(1, int(np.ceil((np.prod(fixed.shape[1:]) / 200_000) ** (1 / 3))))
    index = np.stack(np.meshgrid(*[np.arange(0, n, stride) for n in fixed.shape[1:]], indexing="ij"), -1).reshape(-1, 3)
    to_moving = np.linalg.inv(moving_affine) @ fixed_affine
    inside = (index @ to_moving[:3, :3].T + to_moving[:3, 3] > -0.5) & (index @ to_moving[:3, :3].T + to_moving[:3, 3] < np.asarray(moving.shape[1:]) - 0.5)
    overlap = float(inside.all(axis=1).mean())
    if overlap == 0.0:
        raise BadInputError(moving_path, f"does not overlap the fixed image {fixed_path} in world space (check the affines)")
    resampled = SpatialResample(mode="bilinear", padding_mode="border")(moving, dst_affine=torch.as_tensor(fixed_affine), spatial_size=fixed.shape[1:])
    note = f"moving resampled onto the fixed grid: shape {tuple(moving.shape[1:])} -> {tuple(fixed.shape[1:])}, {100 * overlap:.0f}% of the fixed image overlaps it"
    return MetaTensor(resampled.as_tensor().float(), affine=fixed.affine), [note]


def register_pair(fixed_path: str | Path, moving_path: str | Path, out_path: str | Path, config: RegistrationConfig | None = None) -> RegistrationResult:
    """Register MOVING to FIXED and write the result (``medsynth register FIXED MOVING --out OUT``).

    Args:
        fixed_path: the fixed 3D image.
        moving_path: the moving 3D image; resampled onto the fixed grid (and said so in
            ``notes``) when shape or affine differ.
        out_path: ``.nii.gz``/``.nii``: the dense field, a mm vector NIfTI with the fixed
            image's affine; ``.npz``: the control grid (:func:`field_from_grid` makes the field).
        config: registration settings.

    Raises:
        BadInputError: unreadable, non-3D or NaN images, images that do not overlap in
            world space, or an output type other than NIfTI or NPZ.
    """
    out_path = Path(out_path)
    if suffix_of(out_path) not in (*NIFTI_SUFFIXES, ".npz"):
        raise BadInputError(out_path, "output must be .nii.gz/.nii (dense field, mm) or .npz (control grid)")
    config = config or RegistrationConfig()
    fixed, moving = _load_volume(fixed_path), _load_volume(moving_path)
    moving, notes = _on_fixed_grid(fixed, moving, moving_path, fixed_path)
    transform, quality = register(fixed, moving, config)
    if suffix_of(out_path) == ".npz":
        transform.save(out_path, fixed=str(fixed_path), moving=str(moving_path), similarity=config.similarity, **quality)
    else:
        _write_field(transform, out_path)
    return RegistrationResult(str(fixed_path), str(moving_path), out_path, config.similarity, quality["before"], quality["after"], quality["folding"], quality["seconds"], notes=notes)
