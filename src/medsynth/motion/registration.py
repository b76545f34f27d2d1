"""Multi-resolution B-spline free-form deformation (FFD) registration in PyTorch (CPU or GPU).

Rueckert et al., IEEE TMI 1999: the displacement is a cubic B-spline tensor product over
a grid of control points at ``control_spacing_mm``, fitted by gradient descent to a
similarity (MSE, global or local NCC, mutual information: MONAI losses) plus a
bending-energy penalty, coarse to fine over an image pyramid. In diffeomorphic mode the
B-spline field is a stationary velocity integrated by scaling and squaring (Arsigny et
al., MICCAI 2006; MONAI ``DVF2DDF``), so the map is invertible.

The result is the control grid (:class:`BSplineTransform`, a compact ``.npz``); the
dense field (voxels, MONAI DDF convention: ``warp_image(moving, u) ~ fixed``) is made on
demand. :func:`register_pair` registers two files; :func:`register_dataset` registers
every phase of every 4D case to a reference phase, resuming where a killed run stopped.
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
from medsynth.data.manifest import MANIFEST_NAME, Manifest
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
    "register_dataset",
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

    def ncc(warped: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:  # global NCC: MONAI's is local only
        a, b = warped - warped.mean(), fixed - fixed.mean()
        return -(a * b).mean() / (a.std(unbiased=False) * b.std(unbiased=False) + 1e-8)

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
    config = config or RegistrationConfig()
    start = time.perf_counter()
    device = config.torch_device()
    # Plain tensors: MetaTensor bookkeeping on every operation would only slow the loop down.
    fixed_t, moving_t = (torch.as_tensor(image.as_tensor() if isinstance(image, MetaTensor) else image, dtype=torch.float32, device=device)[None] for image in (fixed, moving))
    fixed_t, moving_t = _normalise(fixed_t, moving_t)
    shape = tuple(fixed_t.shape[2:])
    spacing = spacing_of(fixed.affine)
    control_mm = np.broadcast_to(np.asarray(config.control_spacing_mm, dtype=np.float64), (3,))
    control = tuple(float(v) for v in control_mm / spacing)
    coefficients = torch.zeros(3, *BSplineTransform.grid_shape(shape, control), device=device, requires_grad=True)
    transform = BSplineTransform(coefficients, control, shape, np.asarray(fixed.affine, dtype=np.float64), config.diffeomorphic, config.integration_steps)
    similarity = _similarity(config)
    if isinstance(similarity, torch.nn.Module):
        similarity = similarity.to(device)

    for size, iterations in zip(_pyramid_sizes(shape, config.levels), config.iterations_per_level()):
        fixed_l, moving_l = _downsample(fixed_t, size), _downsample(moving_t, size)
        level_spacing = spacing * (np.asarray(shape) - 1) / np.maximum(np.asarray(size) - 1, 1)

        def objective(size=size, fixed_l=fixed_l, moving_l=moving_l, level_spacing=level_spacing) -> torch.Tensor:  # this level's
            spline = transform.spline_field(size)
            ddf = transform.displacement(size) if config.diffeomorphic else spline
            return similarity(warp_image(moving_l, ddf), fixed_l) + config.regularisation * bending_energy(spline, level_spacing)

        _optimise(coefficients, objective, iterations, config)

    with torch.no_grad():
        ddf = transform.displacement()
        quality = {
            "before": float(similarity(moving_t, fixed_t)),
            "after": float(similarity(warp_image(moving_t, ddf), fixed_t)),
            "folding": folding_share(ddf),
        }
    transform.coefficients = coefficients.detach()
    quality["seconds"] = time.perf_counter() - start
    return transform, quality


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
# Files: pair mode and dataset mode
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


@dataclass
class _Case:
    """A 4D case: its phases as files (manifest) or as one 4D file."""

    subject: str
    phase_paths: dict[int, Path] = field(default_factory=dict)  # manifest layout
    volume: Path | None = None  # one 4D NIfTI

    def phases(self) -> list[int]:
        return sorted(self.phase_paths) if self.volume is None else list(range(_phase_count(self.volume)))


def _phase_count(path: Path) -> int:
    import nibabel as nib

    try:
        image = nib.load(str(path))
    except Exception as exc:  # nibabel raises several types for broken headers
        raise BadInputError(path, f"cannot read image ({type(exc).__name__})") from None
    if image.ndim != 4:
        raise BadInputError(path, f"expected a 4D scan (X, Y, Z, phase), got {image.ndim}D")
    if image.shape[3] < 2:
        raise BadInputError(path, "4D scan has only one phase (registration needs at least two)")
    return int(image.shape[3])


def _find_cases(data_dir: Path, reference_phase: int) -> list[_Case]:
    """Cases of ``data_dir``: a ``dataset.json`` with ``subject``/``phase`` cases, or a folder of 4D NIfTI files."""
    manifest_path = data_dir / MANIFEST_NAME
    if manifest_path.exists():
        manifest = Manifest.load(manifest_path)
        cases: dict[str, _Case] = {}
        for entry in manifest.cases:
            if entry.phase is None or not isinstance(entry.image, str):
                raise BadInputError(manifest_path, f"case {entry.id} is not one phase of a series (dataset mode needs a phase and one image per case)")
            cases.setdefault(entry.subject, _Case(entry.subject)).phase_paths[entry.phase] = manifest.resolve(entry.image)
        found = list(cases.values())
        for case in found:
            expected = set(range(max(case.phase_paths) + 1)) | {reference_phase}
            missing = sorted(expected - set(case.phase_paths))
            if missing:
                raise BadInputError(manifest_path, f"subject {case.subject} is missing phase(s) {', '.join(map(str, missing))}")
            if len(case.phase_paths) < 2:
                raise BadInputError(manifest_path, f"subject {case.subject} has only one phase")
    else:
        files = sorted(p for p in data_dir.iterdir() if suffix_of(p) in NIFTI_SUFFIXES) if data_dir.is_dir() else []
        found = [_Case(p.name[: -len(suffix_of(p))], volume=p) for p in files]
        for case in found:
            if reference_phase >= len(case.phases()):
                raise BadInputError(case.volume, f"has {len(case.phases())} phases, no reference phase {reference_phase}")
    if not found:
        raise BadInputError(data_dir, "no dataset.json with phase cases and no 4D NIfTI files found")
    return found


def register_dataset(
    data_dir: str | Path,
    out_dir: str | Path,
    config: RegistrationConfig | None = None,
    reference_phase: int = 0,
    progress: bool = True,
    callback: Callable[[RegistrationResult], None] | None = None,
) -> list[RegistrationResult]:
    """Register every phase of every case to its reference phase (``medsynth register --data DIR --out DIR``).

    Phase ``t`` is the fixed image and the reference phase the moving one, so the field
    ``u_t`` of ``<out>/<case>/grid_tNN.npz`` warps the reference phase onto phase ``t``
    (``warp_image(reference, u_t) ~ phase_t``), like a phantom's ``dvf_tNN``. Grids are
    written atomically and existing ones are skipped, so a killed run resumes where it
    stopped. Each finished registration prints a quality line under the progress bar.

    Args:
        data_dir: a folder with ``dataset.json`` (cases with ``subject`` and ``phase``), or
            a folder of 4D NIfTI files ``(X, Y, Z, phase)``, one per case.
        out_dir: output folder.
        config: registration settings.
        reference_phase: the phase every other phase is registered to.
        progress: show a progress bar and the quality lines (stderr).
        callback: called with each result (done now or earlier), in order.

    Returns:
        One result per registered phase, in order.

    Raises:
        BadInputError: no cases, a 4D file with one phase, a missing phase, unreadable or
            NaN images.
    """
    from tqdm import tqdm

    config = config or RegistrationConfig()
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    cases = _find_cases(data_dir, reference_phase)
    jobs = [(case, phase) for case in cases for phase in case.phases() if phase != reference_phase]
    results: list[RegistrationResult] = []
    loaded: tuple[str, MetaTensor] | None = None  # the current 4D case, loaded once
    with tqdm(jobs, desc="register", unit="phase", disable=not progress) as bar:
        for case, phase in bar:
            out = out_dir / case.subject / f"grid_t{phase:02d}.npz"
            if out.exists():
                _, extra = load_transform(out)
                result = RegistrationResult(str(extra["fixed"]), str(extra["moving"]), out, str(extra["similarity"]), float(extra["before"]), float(extra["after"]), float(extra["folding"]), float(extra["seconds"]), skipped=True)
            else:
                if case.volume is None:
                    fixed_name, moving_name = case.phase_paths[phase], case.phase_paths[reference_phase]
                    fixed, moving = _load_volume(fixed_name), _load_volume(moving_name)
                    moving, notes = _on_fixed_grid(fixed, moving, moving_name, fixed_name)
                else:
                    if loaded is None or loaded[0] != case.subject:
                        loaded = (case.subject, load_image(case.volume))
                    volume = loaded[1]
                    fixed, moving, notes = volume[phase : phase + 1], volume[reference_phase : reference_phase + 1], []
                    fixed_name, moving_name = f"{case.volume}[phase {phase}]", f"{case.volume}[phase {reference_phase}]"
                transform, quality = register(fixed, moving, config)
                transform.save(out, fixed=str(fixed_name), moving=str(moving_name), similarity=config.similarity, **quality)
                result = RegistrationResult(str(fixed_name), str(moving_name), out, config.similarity, quality["before"], quality["after"], quality["folding"], quality["seconds"], notes=notes)
            results.append(result)
            if progress:
                bar.write(result.line())
            if callback is not None:
                callback(result)
    return results
