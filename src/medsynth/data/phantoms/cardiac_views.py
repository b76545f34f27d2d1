"""Simulated cine-MRI acquisitions of a cardiac phantom subject, in the UK Biobank layout.

A subject's clinical acquisition is a short-axis (SAX) stack of thick slices 8-10 mm apart
and three single long-axis (LAX) planes (2-, 3-, 4-chamber), each a 4D NIfTI ``(X, Y, S, T)``
with its own oblique affine in the phantom's one world frame (RAS mm). A pixel is the
analytic anatomy evaluated where the tissue was at end-diastole, ``anatomy(x + d_t(x))``
(the motion and anatomy of :mod:`medsynth.data.phantoms.cardiac`), averaged over the
slice thickness (a box slice profile, sampled at evenly spaced depths along the normal).
Labels are taken at the slice centre. Beside them, a high-resolution SAX-aligned ground
truth: the SAX in-plane grid, through-plane spacing ``sax_spacing / factor``, first slice
on the SAX's first slice, point-sampled (thin) slices.

Layout of one subject folder (what UK Biobank users have, plus the ground truth)::

    sa.nii.gz       (X, Y, S, T) float32   SAX stack, slice k on cardiac_planes' "sax_k"
    sa_gt.nii.gz    (X, Y, S, T) uint8     labels on the same stack (slice centres)
    la_2ch.nii.gz, la_3ch.nii.gz, la_4ch.nii.gz   (X, Y, 1, T) float32   LAX planes
    sa_hr.nii.gz, sa_hr_gt.nii.gz   (X, Y, (S - 1) * factor + 1, T)   thin ground truth
    Info.cfg        ED/ES frames (0-based here, ``FirstFrame: 0``; ACDC's are 1-based)

Labels keep the values of ``CARDIAC_LABELS`` for the three structures an SAX segmentation
holds (7 RV blood pool, 8 LV blood pool with papillary muscles, 9 LV myocardium); every
other structure is background.
"""

from __future__ import annotations

import gzip
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from medsynth.data.cine import LABELS_NAME, import_ukbb
from medsynth.data.phantoms._scene import Anatomy, Motion, SmoothNoise, subject_rng, world_grid
from medsynth.data.phantoms.cardiac import (
    CARDIAC_LABELS,
    CARDIAC_SIZE,
    CardiacParams,
    _cardiac_anatomy,
    _cardiac_motion,
    cardiac_geometry,
    cardiac_planes,
    make_cardiac_dataset,
    sample_cardiac_params,
)
from medsynth.errors import MedsynthError
from medsynth.runs import atomic_write_bytes, atomic_write_json, atomic_write_text

# Structures an SAX ground truth holds (values of CARDIAC_LABELS), the rest is background.
VIEW_LABELS = {0: "background", 7: CARDIAC_LABELS[7], 8: CARDIAC_LABELS[8], 9: CARDIAC_LABELS[9]}
VIEW_FOV_MM = 160.0  # default square field of view of every plane (covers LV, RV and atria)
CYCLE_MS = 1000.0  # one cardiac cycle (the NIfTI time step is CYCLE_MS / frames)
LAX_VIEWS = ("2ch", "3ch", "4ch")


@dataclass(frozen=True)
class ViewSettings:
    """Acquisition settings (mm).

    Attributes:
        size: pixels per side of every plane image.
        pixel_mm: in-plane pixel; ``None``: ``VIEW_FOV_MM / size`` (2.5 mm at 64 px).
        sax_spacing_mm: distance between SAX slice centres.
        sax_thickness_mm: SAX slice thickness (the box profile's width).
        lax_thickness_mm: LAX slice thickness.
        factor: through-plane refinement of the high-resolution ground truth (>= 2).
        noise: Rician noise of the acquired SAX and LAX images: the sd of each of the two Gaussian channels,
            relative to the LV blood pool's signal (1). The ground truth is noise-free.
        shading: coil-sensitivity shading: the images are multiplied by ``1 + shading * n(p)`` (clipped to
            [0.5, 1.5]), n a smooth unit-variance field of world position (80 mm correlation length), the same in
            every file of a subject, the truth included (it is the scanner's, not an error to undo).
        trabeculation: endocardial trabeculae (:func:`~medsynth.data.phantoms.cardiac._cardiac_anatomy`).
    """

    size: int = 64
    pixel_mm: float | None = None
    sax_spacing_mm: float = 10.0
    sax_thickness_mm: float = 8.0
    lax_thickness_mm: float = 6.0
    factor: int = 8
    noise: float = 0.0
    shading: float = 0.0
    trabeculation: bool = False

    @property
    def pixel(self) -> float:
        return float(self.pixel_mm) if self.pixel_mm is not None else VIEW_FOV_MM / self.size


def plane_affine(origin: np.ndarray, u: np.ndarray, v: np.ndarray, step: np.ndarray, size: int, pixel_mm: float) -> np.ndarray:
    """4x4 voxel-to-world affine of a stack of ``size`` x ``size`` planes.

    Voxel ``(i, j, k)`` lies at ``origin + (i - (size - 1) / 2) p u + (j - (size - 1) / 2) p v + k step``
    (``p = pixel_mm``): ``origin`` is the centre of slice 0, ``step`` (mm vector) goes from one
    slice centre to the next (for a single plane, its normal times its thickness).
    """
    affine = np.eye(4)
    affine[:3, 0], affine[:3, 1], affine[:3, 2] = pixel_mm * np.asarray(u), pixel_mm * np.asarray(v), np.asarray(step)
    affine[:3, 3] = np.asarray(origin) - (size - 1) / 2 * pixel_mm * (np.asarray(u) + np.asarray(v))
    return affine


def profile_offsets(thickness_mm: float, pixel_mm: float) -> np.ndarray:
    """Depths (mm, along the normal) that sample a box slice profile of ``thickness_mm``.

    The midpoints of ``n`` equal parts of ``[-thickness / 2, thickness / 2]``, ``n`` odd (so
    the centre is one of them) and the parts at most half a pixel deep.
    """
    n = 2 * math.ceil(thickness_mm / pixel_mm) + 1
    return ((np.arange(n) + 0.5) / n - 0.5) * thickness_mm


def render_points(anatomy: Anatomy, motion: Motion, points: np.ndarray, t: int, normal: np.ndarray | None = None,
                  offsets: Sequence[float] = (0.0,)) -> tuple[np.ndarray, np.ndarray]:
    """Frame ``t`` at ``points`` (N, 3) mm, averaged over ``points + o * normal`` for ``o`` in ``offsets``.

    Returns:
        ``intensity (N,) float32`` (the mean over the profile) and ``label (N,) uint8`` at
        the points themselves (the slice centre), restricted to ``VIEW_LABELS``.
    """
    normal = np.zeros(3) if normal is None else np.asarray(normal, dtype=np.float64)
    total = np.zeros(len(points))
    for offset in offsets:
        shifted = points + offset * normal
        total += anatomy(shifted + motion(shifted, t))[0]
    _, label = anatomy(points + motion(points, t))
    return (total / len(offsets)).astype(np.float32), np.where(np.isin(label, list(VIEW_LABELS)), label, 0).astype(np.uint8)


def render_stack(anatomy: Anatomy, motion: Motion, frames: int, affine: np.ndarray, size: int, slices: int,
                 offsets: Sequence[float] = (0.0,)) -> tuple[np.ndarray, np.ndarray]:
    """A stack of planes over the cycle: ``(X, Y, S, T)`` float32 images and uint8 labels.

    The profile runs along the unit normal of the planes (the cross product of the affine's
    in-plane columns), whatever the slice step is.
    """
    points = world_grid((size, size, slices), affine)
    normal = np.cross(affine[:3, 0], affine[:3, 1])
    normal /= np.linalg.norm(normal)
    images, labels = [], []
    for t in range(frames):
        image, label = render_points(anatomy, motion, points, t, normal, offsets)
        images.append(image.reshape(size, size, slices))
        labels.append(label.reshape(size, size, slices))
    return np.stack(images, axis=-1), np.stack(labels, axis=-1)


def save_cine(array: np.ndarray, affine: np.ndarray, path: Path, frames: int) -> Path:
    """Write a 4D ``(X, Y, S, T)`` NIfTI (time step ``CYCLE_MS / frames`` ms) atomically."""
    import nibabel as nib

    image = nib.Nifti1Image(array, affine)
    image.header.set_xyzt_units("mm", "msec")
    image.header.set_zooms((*image.header.get_zooms()[:3], CYCLE_MS / frames))
    atomic_write_bytes(path, gzip.compress(image.to_bytes(), compresslevel=1, mtime=0))
    return path


def write_views(params: CardiacParams, frames: int, folder: Path, settings: ViewSettings) -> dict:
    """Write one subject's acquisitions into ``folder`` (layout in the module docstring).

    Returns:
        ``{name: 4x4 affine (list)}`` of every file written, for its geometry record.
    """
    size, pixel = settings.size, settings.pixel
    planes = cardiac_planes(params, sax_spacing_mm=settings.sax_spacing_mm)
    sax = [plane for name, plane in planes.items() if name.startswith("sax_")]
    anatomy, motion = _cardiac_anatomy(params, "mri", pixel, settings.trabeculation), _cardiac_motion(params, frames)
    coil = SmoothNoise.sample(np.random.default_rng((params.seed, 2)), 80.0)
    noise = np.random.default_rng((params.seed, 3))
    step = sax[1]["origin"] - sax[0]["origin"]
    first = sax[0]
    stacks = {
        "sa": (plane_affine(first["origin"], first["u"], first["v"], step, size, pixel), len(sax),
               profile_offsets(settings.sax_thickness_mm, pixel)),
        "sa_hr": (plane_affine(first["origin"], first["u"], first["v"], step / settings.factor, size, pixel),
                  (len(sax) - 1) * settings.factor + 1, (0.0,)),
    }
    for view in LAX_VIEWS:
        plane = planes[view]
        stacks[f"la_{view}"] = (plane_affine(plane["origin"], plane["u"], plane["v"], settings.lax_thickness_mm * plane["normal"], size, pixel),
                                1, profile_offsets(settings.lax_thickness_mm, pixel))
    affines = {}
    for name, (affine, slices, offsets) in stacks.items():
        image, label = render_stack(anatomy, motion, frames, affine, size, slices, offsets)
        if settings.shading:
            gain = np.clip(1.0 + settings.shading * coil(world_grid((size, size, slices), affine)), 0.5, 1.5)
            image = image * gain.reshape(size, size, slices, 1).astype(np.float32)
        if settings.noise and name != "sa_hr":  # Rician: the magnitude of the signal plus complex Gaussian noise
            real = image + noise.normal(0.0, settings.noise, image.shape)
            image = np.hypot(real, noise.normal(0.0, settings.noise, image.shape)).astype(np.float32)
        save_cine(image, affine, folder / f"{name}.nii.gz", frames)
        if not name.startswith("la_"):
            save_cine(label, affine, folder / f"{name}_gt.nii.gz", frames)
        affines[name] = np.round(affine, 6).tolist()
    atomic_write_text(folder / "Info.cfg", f"ED: 0\nES: {params.end_systole(frames)}\nNbFrame: {frames}\nFirstFrame: 0\n")
    return affines


def make_cardiac_phantom(out: Path, n: int, seed: int = 0, size: int | Sequence[int] = CARDIAC_SIZE, progress: bool = False,
                         views: bool = False, frames: int = 10, modality: str = "ct", flow_pairs: str | bool | None = None,
                         sax_spacing_mm: float = 10.0, sax_thickness_mm: float = 8.0, lax_thickness_mm: float = 6.0,
                         view_pixel_mm: float | None = None, hr_factor: int = 8, noise: float = 0.03, shading: float = 0.2,
                         trabeculation: bool = True) -> Path:
    """The ``cardiac`` phantom's writer: the cine volumes of :func:`make_cardiac_dataset`, or with ``views``
    the acquisitions of ``n`` subjects (the same subjects: subject ``i`` drawn from ``(seed, i)``).

    ``views`` writes, instead of the cine volumes, ``<out>/sub000/`` as in this module's docstring
    plus ``geometry.json`` (the planes and each file's affine) and ``params.json``, then
    ``<out>/labels.json`` and ``<out>/dataset.json`` as :func:`medsynth.data.cine.import_ukbb` makes
    it (one case per subject and frame). Planes are ``size`` x ``size`` pixels of ``view_pixel_mm``
    (default: a 160 mm field of view); ``size`` ``(X, Y, Z)`` uses ``X``. ``noise``, ``shading`` and
    ``trabeculation``: :class:`ViewSettings` (on by default: a cine acquisition as UK Biobank's, whose slices
    interpolation cannot simply fill in).

    Raises:
        MedsynthError: ``views`` with CT or with ``flow_pairs``, ``hr_factor < 2``, or a
            ``sax_spacing_mm`` that leaves one SAX slice.
    """
    if not views:
        return make_cardiac_dataset(out, n, seed, size, progress, frames, modality, flow_pairs)
    if flow_pairs or modality.lower() != "mri":
        raise MedsynthError("phantom cardiac: views simulates cine-MRI acquisitions: use modality mri and no flow_pairs")
    if frames < 2 or hr_factor < 2:
        raise MedsynthError(f"phantom cardiac: views need frames >= 2 and hr_factor >= 2 (got {frames}, {hr_factor})")
    settings = ViewSettings(size if isinstance(size, int) else int(size[0]), view_pixel_mm, sax_spacing_mm,
                            sax_thickness_mm, lax_thickness_mm, hr_factor, noise, shading, trabeculation)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for index in tqdm(range(n), desc="cardiac views", disable=not progress):
        params = sample_cardiac_params(int(subject_rng(seed, index).integers(2**31)))
        folder = out / f"sub{index:03d}"
        if len(cardiac_planes(params, sax_spacing_mm=settings.sax_spacing_mm)) < 5:  # 2 SAX slices + 3 LAX planes
            raise MedsynthError(f"phantom cardiac: sax_spacing_mm {settings.sax_spacing_mm} leaves one SAX slice on sub{index:03d}")
        affines = write_views(params, frames, folder, settings)
        geometry = cardiac_geometry(params, frames, pixel_mm=settings.pixel, plane_mm=settings.pixel * settings.size,
                                    sax_spacing_mm=settings.sax_spacing_mm, sax_thickness_mm=settings.sax_thickness_mm,
                                    lax_thickness_mm=settings.lax_thickness_mm)
        atomic_write_json(folder / "geometry.json", {**geometry, "hr_factor": settings.factor, "affines": affines})
        atomic_write_json(folder / "params.json", asdict(params))
    atomic_write_json(out / LABELS_NAME, {str(k): v for k, v in VIEW_LABELS.items()})
    import_ukbb(out).save(out)
    return out
