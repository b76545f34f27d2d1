"""Scene primitives shared by the 3D+t phantoms (cardiac, lung): world grids, SDFs, noise, painting.

A phantom is an analytic anatomy (world mm -> intensity, label) and an analytic motion
(world mm, frame -> backward displacement mm); :func:`render_sequence` evaluates frame ``t``
as ``anatomy(x + d_t(x))`` on a voxel grid and keeps ``d_t`` as the exact field.

The coronary phantom paints differently (boolean voxel masks in FOV units, then blur and
noise): it is one static volume whose thin vessels are painted by distance to centrelines,
so it needs no motion and keeps its own, cheaper voxel painting.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from nibabel.affines import apply_affine
from scipy.special import expit

from medsynth.data.fields import mm_to_voxel, save_field
from medsynth.data.io import save_image
from medsynth.data.manifest import Manifest

Anatomy = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]  # points (N, 3) mm -> intensity (N,), label (N,)
Motion = Callable[[np.ndarray, int], np.ndarray]  # points (N, 3) mm, frame -> backward displacement (N, 3) mm


def centred_affine(size: Sequence[int], fov_mm: Sequence[float], centre_mm: Sequence[float]) -> np.ndarray:
    """RAS voxel-to-world affine of a grid of ``size`` voxels covering ``fov_mm`` around ``centre_mm``."""
    spacing = np.asarray(fov_mm, dtype=np.float64) / np.asarray(size)
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = np.asarray(centre_mm, dtype=np.float64) - spacing * (np.asarray(size) - 1) / 2
    return affine


def grid_size(size: int | Sequence[int], default: Sequence[int]) -> tuple[int, int, int]:
    """A grid ``(X, Y, Z)``: as given, or for one number ``n``, ``(n, n, Z)`` with the default's aspect."""
    if isinstance(size, int):
        return (size, size, max(4, round(size * default[2] / default[0])))
    if len(size) != 3 or min(size) < 4:
        raise ValueError(f"size must be one int or (X, Y, Z) with every axis >= 4, got {size}")
    return tuple(int(n) for n in size)


def world_grid(size: Sequence[int], affine: np.ndarray) -> np.ndarray:
    """World (mm) coordinates of every voxel centre, ``(X * Y * Z, 3)`` in C order."""
    index = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in size], indexing="ij"), axis=-1).reshape(-1, 3)
    return apply_affine(affine, index)


def ellipsoid_sdf(points: np.ndarray, centre: Sequence[float], radii: Sequence[float], rotation: np.ndarray | None = None) -> np.ndarray:
    """Approximate signed distance (mm, < 0 inside) to an ellipsoid (Quilez' bound ``k0 (k0 - 1) / k1``).

    ``rotation`` (3x3, columns = the ellipsoid's axes in world) orients it; ``None`` is axis-aligned.
    """
    local = points - np.asarray(centre)
    if rotation is not None:
        local = local @ rotation
    radii = np.asarray(radii, dtype=np.float64)
    k0 = np.linalg.norm(local / radii, axis=-1)
    k1 = np.maximum(np.linalg.norm(local / radii**2, axis=-1), 1e-9)
    return k0 * (k0 - 1.0) / k1


def elliptic_cylinder_sdf(points: np.ndarray, centre_xy: Sequence[float], radii_xy: Sequence[float]) -> np.ndarray:
    """Approximate signed distance (mm) to an infinite elliptic cylinder along world z."""
    return ellipsoid_sdf(np.c_[points[:, :2], np.zeros(len(points))], (*centre_xy, 0.0), (*radii_xy, 1.0))


@dataclass(frozen=True)
class SmoothNoise:
    """A smooth random field ``n(p) = sqrt(2 / K) sum_k cos(w_k . p + phi_k)`` of unit variance.

    Random Fourier features (Rahimi & Recht, NIPS 2007) of a Gaussian process with a
    squared-exponential kernel of length ``length_mm``: ``w_k ~ N(0, I / length^2)``.
    It is a function of world position, so a texture moves exactly with the tissue.
    """

    frequencies: np.ndarray  # (K, 3) rad/mm
    phases: np.ndarray  # (K,)

    @classmethod
    def sample(cls, rng: np.random.Generator, length_mm: float, waves: int = 24) -> SmoothNoise:
        return cls(rng.normal(0.0, 1.0 / length_mm, size=(waves, 3)), rng.uniform(0.0, 2 * np.pi, size=waves))

    def __call__(self, points: np.ndarray) -> np.ndarray:
        waves = np.cos((points @ self.frequencies.T + self.phases).astype(np.float32))  # float32: a texture needs no more
        return np.sqrt(2.0 / len(self.phases)) * waves.sum(axis=-1, dtype=np.float64)


def paint(layers: Sequence[tuple[np.ndarray, np.ndarray | float, int]], background: float, edge_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """Paint structures in order: later layers cover earlier ones.

    Args:
        layers: ``(sdf (N,) mm, intensity (N,) or scalar, label)`` per structure.
        background: intensity outside every structure (label 0).
        edge_mm: width of the partial-volume edge: a layer's weight is
            ``sigmoid(-sdf / edge_mm)``.

    Returns:
        ``intensity (N,) float32`` with soft edges and ``label (N,) uint8`` (hard, ``sdf < 0``).
    """
    n = len(layers[0][0])
    intensity = np.full(n, background, dtype=np.float64)
    label = np.zeros(n, dtype=np.uint8)
    for sdf, value, index in layers:
        weight = expit(-sdf / edge_mm)
        intensity += weight * (value - intensity)
        label[sdf < 0] = index
    return intensity.astype(np.float32), label


def texture_length(length_mm: float, voxel_mm: float) -> float:
    """A texture's correlation length, at least two voxels so that the grid resolves it (no aliasing)."""
    return max(length_mm, 2.0 * voxel_mm)


def vessels(first: SmoothNoise, second: SmoothNoise, points: np.ndarray, radius_mm: float) -> np.ndarray:
    """Vessel-like tubes in [0, 1]: where both noise fields are near zero (their level sets meet in curves).

    The noise's gradient has RMS ``g = sqrt(mean |w_k|^2)`` (about ``sqrt(3) / length``,
    mm^-1), so tubes of about ``radius_mm`` are where ``|n| < radius_mm * g``.
    """
    width = radius_mm * np.sqrt(np.mean(np.sum(first.frequencies**2, axis=1)))
    return np.exp(-(first(points) ** 2 + second(points) ** 2) / (2 * width**2))


def window(x: np.ndarray, low: float, high: float, width: float) -> np.ndarray:
    """1 on ``[low, high]``, Gaussian fall-off of ``width`` outside (smooth, C1)."""
    distance = np.maximum(low - x, 0.0) + np.maximum(x - high, 0.0)
    return np.exp(-((distance / width) ** 2))


@dataclass
class PhantomSequence:
    """A rendered 3D+t subject.

    Attributes:
        images: ``(T, X, Y, Z)`` float32 (HU for CT, arbitrary units for MRI).
        labels: ``(T, X, Y, Z)`` uint8 label maps.
        fields: ``(T, 3, X, Y, Z)`` float32 exact displacement in voxels from frame 0 to
            frame ``t``: ``warp_image(images[0], fields[t]) == images[t]`` up to interpolation.
        affine: 4x4 RAS voxel-to-world affine (mm).
    """

    images: np.ndarray
    labels: np.ndarray
    fields: np.ndarray
    affine: np.ndarray


def render_sequence(anatomy: Anatomy, motion: Motion, frames: int, size: Sequence[int], affine: np.ndarray) -> PhantomSequence:
    """Render frame ``t`` as ``anatomy(x + d_t(x))`` with ``d_t = motion(x, t)`` (backward, mm) and keep ``d_t`` in voxels."""
    grid = world_grid(size, affine)
    images, labels, fields = [], [], []
    for t in range(frames):
        displacement = motion(grid, t)  # (N, 3) mm
        intensity, label = anatomy(grid + displacement)
        images.append(intensity.reshape(size))
        labels.append(label.reshape(size))
        field_mm = torch.from_numpy(np.ascontiguousarray(displacement.T.reshape(3, *size)))
        fields.append(mm_to_voxel(field_mm, affine).float().numpy())
    return PhantomSequence(np.stack(images), np.stack(labels), np.stack(fields), affine)


def write_sequence(sequence: PhantomSequence, out: Path, subject: str) -> list[dict]:
    """Write ``<out>/<subject>/{image,label,dvf}_tNN.nii.gz`` and return the manifest's cases."""
    cases = []
    for t in range(len(sequence.images)):
        names = {kind: f"{subject}/{kind}_t{t:02d}.nii.gz" for kind in ("image", "label", "dvf")}
        save_image(sequence.images[t][None], out / names["image"], affine=sequence.affine)
        save_image(sequence.labels[t][None], out / names["label"], affine=sequence.affine)
        save_field(sequence.fields[t], out / names["dvf"], sequence.affine)
        cases.append({"id": f"{subject}_t{t:02d}", "subject": subject, "image": names["image"], "label": names["label"], "phase": t, "flow": names["dvf"]})
    return cases


def write_manifest(out: Path, name: str, modality: str, source: str, labels: dict[int, str], cases: list[dict]) -> Path:
    """Write the project's ``dataset.json`` manifest (paths relative to ``out``)."""
    manifest = Manifest(name=name, spatial_dims=3, modality=modality, source=source, classes=[], labels={str(k): v for k, v in labels.items()}, cases=cases)
    return manifest.with_root(out).save(out)


def subject_rng(seed: int, index: int) -> np.random.Generator:
    """Independent generator of subject ``index`` in a dataset made with ``seed``."""
    return np.random.default_rng(np.random.SeedSequence([seed, index]))
