"""Cardiac 3D+t phantom: a beating heart in a thorax, with its exact motion.

A subject is a function of (parameters, seed), as torchio's random transforms are:
:func:`sample_cardiac_params` draws the anatomy and motion of one subject from a seed,
:func:`render_cardiac` renders it deterministically.

Anatomy is analytic (signed distance functions in world mm, painted in order with
partial-volume edges): body with a fat layer, lungs with vessel texture, spine, descending
and ascending aorta, left and right atria, RV blood pool, LV blood pool with papillary
muscles, LV myocardium. Motion is analytic too: frame ``t`` is the anatomy evaluated at
``x + d_t(x)``, where ``d_t`` is the backward displacement (frame ``t`` -> frame 0, mm)
of a beating cycle (radial contraction, longitudinal shortening, twist) from
end-diastole (frame 0) to end-systole and back. ``d_t`` is stored as the field of
frame ``t``, so ``warp_image(frame_0, u_t) == frame_t`` up to interpolation.

The module also holds the scene primitives shared by the lung phantom
(:mod:`medsynth.data.phantoms.lung`): grids, SDFs, smooth noise, painting, rendering a
sequence and writing it with its manifest.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from scipy.special import expit
from scipy.spatial.transform import Rotation

from medsynth.data.io import save_image, spacing_of
from medsynth.data.manifest import Manifest
from medsynth.data.fields import mm_to_voxel, save_field

__all__ = [
    "CARDIAC_LABELS",
    "CARDIAC_SIZE",
    "CardiacParams",
    "PhantomSequence",
    "SmoothNoise",
    "cardiac_geometry",
    "make_cardiac_dataset",
    "render_cardiac",
    "render_sequence",
    "sample_cardiac_params",
]

# ---------------------------------------------------------------------------------------
# Scene primitives (shared with the lung phantom)
# ---------------------------------------------------------------------------------------

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
    return index @ affine[:3, :3].T + affine[:3, 3]


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


def _vec(array: np.ndarray) -> list[float]:
    return [round(float(v), 4) for v in array]


# ---------------------------------------------------------------------------------------
# Cardiac phantom
# ---------------------------------------------------------------------------------------

CARDIAC_LABELS = {
    0: "background",
    1: "body",
    2: "lung",
    3: "spine",
    4: "aorta",
    5: "left_atrium",
    6: "right_atrium",
    7: "rv_blood_pool",
    8: "lv_blood_pool",
    9: "lv_myocardium",
}

# Field of view (mm) and its centre: a heart-centred cardiac reconstruction of the thorax.
CARDIAC_FOV_MM = (220.0, 220.0, 160.0)
CARDIAC_CENTRE_MM = (5.0, -15.0, 10.0)
CARDIAC_SIZE = (64, 64, 32)
# Offsets (mm, world) from the LV base centre of the left atrium's centre and of the aortic root.
_LEFT_ATRIUM = np.array([10.0, -35.0, 18.0])
_AORTIC_ROOT = np.array([-15.0, 10.0, 0.0])

# Tissue intensities: CT in HU (arterial-phase contrast; blood from the subject's
# ``blood_hu``), cine MRI (bSSFP, bright blood) in arbitrary units.
_CONTRAST = {
    "ct": {"air": -1000.0, "fat": -90.0, "soft": 40.0, "lung": -850.0, "vessel": 550.0, "bone": 450.0, "bone_mod": 250.0, "myocardium": 110.0, "texture": 12.0},
    "mri": {"air": 0.0, "fat": 0.9, "soft": 0.35, "lung": 0.04, "vessel": 0.25, "bone": 0.3, "bone_mod": 0.15, "myocardium": 0.22, "texture": 0.03},
}


@dataclass(frozen=True)
class CardiacParams:
    """Anatomy and motion of one cardiac subject (world mm, RAS; angles in radians).

    The heart frame has ``z`` along the LV long axis from apex to base (base centre at
    ``lv_base``, apex at local ``z = -lv_length``) and ``x`` towards the RV.
    """

    lv_base: tuple[float, float, float]
    heart_rotation: tuple[tuple[float, ...], ...]  # 3x3, columns: heart x, y, z axes in world
    lv_radius: float  # endocardial radius at end-diastole
    lv_length: float  # base-to-apex length of the cavity
    wall: float  # myocardial wall thickness
    rv_radius: float
    atrium_scale: float
    aorta_radius: float
    blood_hu: float  # contrast-enhanced (left-heart) blood pool in CT
    radial: float  # radial contraction amplitude (fraction)
    shortening: float  # longitudinal shortening (fraction of the length)
    twist: float  # base-to-apex twist at end-systole (rad)
    systole: float  # share of the cycle from end-diastole to end-systole
    seed: int  # texture seed

    @property
    def rotation(self) -> np.ndarray:
        return np.asarray(self.heart_rotation)

    @property
    def apex(self) -> np.ndarray:
        return np.asarray(self.lv_base) - self.lv_length * self.rotation[:, 2]

    def contraction(self, t: int, frames: int) -> float:
        """Systolic fraction ``s`` of frame ``t`` in ``[0, 1]``: 0 at end-diastole, 1 at end-systole."""
        phase = t / frames
        # Piecewise-linear time warp so that end-systole falls at ``systole`` of the cycle.
        warped = 0.5 * phase / self.systole if phase <= self.systole else 0.5 + 0.5 * (phase - self.systole) / (1 - self.systole)
        return float(np.sin(np.pi * warped) ** 2)

    def end_systole(self, frames: int) -> int:
        """Frame index of end-systole (largest contraction)."""
        return int(np.argmax([self.contraction(t, frames) for t in range(frames)]))


def sample_cardiac_params(seed: int) -> CardiacParams:
    """Draw the anatomy (sizes, wall thickness, position, heart-axis orientation) and motion of one subject."""
    rng = np.random.default_rng(seed)
    # Nominal long axis (apex -> base) points posterior-right-superior; tilt and roll it per subject.
    axis = np.array([-0.45, -0.45, 0.77])
    axis /= np.linalg.norm(axis)
    towards_rv = np.array([-0.6, 0.8, 0.0])
    towards_rv -= towards_rv @ axis * axis
    towards_rv /= np.linalg.norm(towards_rv)
    frame = np.stack([towards_rv, np.cross(axis, towards_rv), axis], axis=1)
    tilt = Rotation.from_rotvec(rng.normal(0.0, np.deg2rad(7.0), size=3))
    roll = Rotation.from_rotvec(axis * rng.uniform(-np.deg2rad(15.0), np.deg2rad(15.0)))
    rotation = (tilt * roll).as_matrix() @ frame
    return CardiacParams(
        lv_base=tuple(float(v) for v in np.array([10.0, 0.0, 25.0]) + rng.uniform(-8.0, 8.0, size=3)),
        heart_rotation=tuple(tuple(float(v) for v in row) for row in rotation),
        lv_radius=float(rng.uniform(20.0, 26.0)),
        lv_length=float(rng.uniform(68.0, 84.0)),
        wall=float(rng.uniform(8.0, 12.0)),
        rv_radius=float(rng.uniform(24.0, 30.0)),
        atrium_scale=float(rng.uniform(0.85, 1.15)),
        aorta_radius=float(rng.uniform(11.0, 15.0)),
        blood_hu=float(rng.uniform(280.0, 420.0)),
        radial=float(rng.uniform(0.35, 0.5)),
        shortening=float(rng.uniform(0.10, 0.16)),
        twist=float(np.deg2rad(rng.uniform(8.0, 16.0))),
        systole=float(rng.uniform(0.33, 0.4)),
        seed=int(rng.integers(2**31)),
    )


def _cardiac_anatomy(params: CardiacParams, modality: str, voxel_mm: float) -> Anatomy:
    """The analytic ED anatomy of a subject, band-limited for a grid of ``voxel_mm``: points (N, 3) mm -> (intensity, label)."""
    c = _CONTRAST[modality]
    # Left heart and aorta: contrast-enhanced; right heart: contrast mixed with unenhanced venous return.
    arterial, venous = (params.blood_hu, 0.6 * params.blood_hu) if modality == "ct" else (1.0, 0.95)
    rng = np.random.default_rng(params.seed)
    body_texture, myo_texture = (SmoothNoise.sample(rng, texture_length(length, voxel_mm)) for length in (12.0, 8.0))
    vessel_a, vessel_b = SmoothNoise.sample(rng, 18.0), SmoothNoise.sample(rng, 18.0)
    edge_mm = 0.6 * voxel_mm  # partial-volume edge of about one voxel (the scanner PSF)
    base, rotation = np.asarray(params.lv_base), params.rotation
    r, length, wall, s = params.lv_radius, params.lv_length, params.wall, params.atrium_scale
    # Papillary muscles: two columns in the LV cavity, 60 deg apart, opposite the septum.
    papillary = [0.55 * r * np.array([np.cos(a), np.sin(a)]) for a in np.deg2rad((150.0, 210.0))]

    def anatomy(p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        local = (p - base) @ rotation  # heart coordinates
        lv_cut = local[:, 2]  # > 0 above the base plane
        tubes = vessels(vessel_a, vessel_b, p, max(2.0, 0.7 * voxel_mm))
        soft = c["soft"] + c["texture"] * body_texture(p)
        myocardium = c["myocardium"] + c["texture"] * myo_texture(p)
        bone = c["bone"] + c["bone_mod"] * np.cos(np.pi * p[:, 2] / 30.0) ** 2  # vertebrae and discs
        rv = ellipsoid_sdf(p, base + rotation @ np.array([0.9 * (r + wall), 0.0, -0.35 * length]), (params.rv_radius, 1.4 * params.rv_radius, 0.8 * length), rotation)
        lv_epi = np.maximum(ellipsoid_sdf(local, (0, 0, 0), (r + wall, r + wall, length + 0.8 * wall)), lv_cut)
        lv_endo = np.maximum(ellipsoid_sdf(local, (0, 0, 0), (r, r, length)), lv_cut)
        columns = [np.maximum(np.linalg.norm(local[:, :2] - q, axis=-1) - 3.5, np.maximum(local[:, 2] + 0.35 * length, -0.85 * length - local[:, 2])) for q in papillary]
        layers = [
            (elliptic_cylinder_sdf(p, (0.0, -40.0), (165.0, 120.0)), c["fat"], 1),
            (elliptic_cylinder_sdf(p, (0.0, -40.0), (150.0, 106.0)), soft, 1),
            (ellipsoid_sdf(p, (85.0, -35.0, 10.0), (60.0, 75.0, 120.0)), c["lung"] + c["vessel"] * tubes, 2),
            (ellipsoid_sdf(p, (-85.0, -35.0, 10.0), (62.0, 75.0, 120.0)), c["lung"] + c["vessel"] * tubes, 2),
            (elliptic_cylinder_sdf(p, (0.0, -100.0), (20.0, 18.0)), bone, 3),
            (elliptic_cylinder_sdf(p, (25.0, -70.0), (params.aorta_radius - 1.5, params.aorta_radius - 1.5)), arterial, 4),
            (np.maximum(elliptic_cylinder_sdf(p, (base + _AORTIC_ROOT)[:2], (params.aorta_radius, params.aorta_radius)), base[2] - 5.0 - p[:, 2]), arterial, 4),
            (ellipsoid_sdf(p, base + _LEFT_ATRIUM, (32.0 * s, 22.0 * s, 22.0 * s)), arterial, 5),
            (ellipsoid_sdf(p, base + (-42.0, -5.0, 10.0), (24.0 * s, 26.0 * s, 30.0 * s)), venous, 6),
            (np.maximum(np.maximum(rv - 3.0, lv_cut - 0.1 * length), -lv_epi), myocardium, 1),  # RV free wall
            (np.maximum(np.maximum(rv, lv_cut - 0.1 * length), -lv_epi), venous, 7),
            (lv_epi, myocardium, 9),
            (lv_endo, arterial, 8),
            *[(np.maximum(column, lv_endo), myocardium, 8) for column in columns],  # papillary muscles belong to the cavity label
        ]
        return paint(layers, c["air"], edge_mm)

    return anatomy


def _cardiac_motion(params: CardiacParams, frames: int) -> Motion:
    """Backward displacement (frame ``t`` -> end-diastole, mm) of the beating cycle.

    In the heart frame (cylindrical ``rho, theta, z`` about the LV long axis), scaled by
    the systolic fraction ``s(t)`` and fading outside the ventricles:
    radial contraction ``d_rho = s rho (a1 exp(-(rho/R1)^2) + a2 exp(-(rho/R2)^2))`` (peak
    inside the cavity, so the wall thickens), longitudinal shortening
    ``d_z = s a_l (z + L) exp(-(rho/Rg)^2)`` (the base descends towards a still apex) and
    twist ``d_theta = -s tau ((z + L) / L - 1/2) exp(-(rho/Rg)^2)``. Each term has
    ``|grad d| < 1``, so every frame is a diffeomorphism of the ED anatomy.
    """
    base, rotation = np.asarray(params.lv_base), params.rotation
    r, length = params.lv_radius, params.lv_length
    r1, r2, rg = 1.2 * r, 2.5 * r, 2.2 * r

    def motion(p: np.ndarray, t: int) -> np.ndarray:
        s = params.contraction(t, frames)
        if s == 0.0:
            return np.zeros_like(p)
        local = (p - base) @ rotation
        x, y, z = local.T
        rho = np.hypot(x, y)
        along = window(z, -length - params.wall, 0.0, 20.0)
        d_rho = s * rho * (params.radial * np.exp(-((rho / r1) ** 2)) + 0.12 * np.exp(-((rho / r2) ** 2))) * along
        fade = np.exp(-((rho / rg) ** 2)) * along
        d_z = s * params.shortening * (z + length) * fade
        angle = -s * params.twist * ((z + length) / length - 0.5) * fade
        cos, sin = np.cos(angle), np.sin(angle)
        unit = np.divide(np.c_[x, y], rho[:, None], out=np.zeros((len(p), 2)), where=rho[:, None] > 1e-9)
        d_xy = d_rho[:, None] * unit + np.c_[x * cos - y * sin - x, x * sin + y * cos - y]
        return np.c_[d_xy, d_z] @ rotation.T

    return motion


def cardiac_geometry(params: CardiacParams, frames: int, sax_slices: int = 10, pixel_mm: float = 1.5, plane_mm: float = 160.0) -> dict:
    """Short-axis stack and 2-, 3- and 4-chamber long-axis planes at end-diastole (world mm).

    Each plane is ``origin`` (its centre), unit in-plane axes ``u``, ``v`` and ``normal``;
    a plane pixel ``(i, j)`` of a ``size`` x ``size`` image lies at
    ``origin + (i - (size - 1) / 2) * pixel_mm * u + (j - (size - 1) / 2) * pixel_mm * v``.
    """
    rotation, base, apex = params.rotation, np.asarray(params.lv_base), params.apex
    ex, ey, ez = rotation.T
    centre = 0.5 * (base + apex)
    size = int(round(plane_mm / pixel_mm))
    # SAX: planes normal to the long axis from just below the base to just above the apex.
    offsets = np.linspace(-5.0, -(params.lv_length - 5.0), sax_slices)
    spacing = float(abs(offsets[1] - offsets[0])) if sax_slices > 1 else 0.0
    sax = [{"origin": _vec(base + o * ez), "u": _vec(ex), "v": _vec(ey), "normal": _vec(ez)} for o in offsets]

    def towards(offset: np.ndarray) -> np.ndarray:  # unit in-plane direction from the long axis to base + offset
        radial = offset - (offset @ ez) * ez
        return radial / np.linalg.norm(radial)

    # Long-axis planes contain the long axis and one more structure: the RV (4-chamber), the
    # left atrium (2-chamber) or the aortic root, i.e. the LV outflow tract (3-chamber).
    planes = {"4ch": ex, "2ch": towards(_LEFT_ATRIUM), "3ch": towards(_AORTIC_ROOT)}
    lax = {name: {"origin": _vec(centre), "u": _vec(u), "v": _vec(ez), "normal": _vec(np.cross(u, ez))} for name, u in planes.items()}
    return {
        "frames": frames,
        "ed_frame": 0,
        "es_frame": params.end_systole(frames),
        "long_axis": {"base": _vec(base), "apex": _vec(apex), "direction": _vec(ez)},
        "sax": {"slices": sax, "slice_spacing_mm": round(spacing, 4), "slice_thickness_mm": round(spacing, 4), "pixel_mm": pixel_mm, "size": size},
        "lax": {**lax, "pixel_mm": pixel_mm, "size": size, "thickness_mm": 6.0},
    }


def render_cardiac(params: CardiacParams, frames: int = 10, modality: str = "ct", size: int | Sequence[int] = CARDIAC_SIZE) -> PhantomSequence:
    """Render a subject's cycle of ``frames`` frames on a ``size`` grid over the cardiac field of view.

    Args:
        params: the subject (see :func:`sample_cardiac_params`).
        frames: frames per cycle; frame 0 is end-diastole.
        modality: ``"ct"`` (HU, contrast-enhanced blood pool) or ``"mri"`` (cine bSSFP contrast).
        size: grid ``(X, Y, Z)``, or ``n`` for ``(n, n, n / 2)``; spacing is
            ``CARDIAC_FOV_MM / size`` (anisotropic).
    """
    size = grid_size(size, CARDIAC_SIZE)
    modality = modality.lower()
    if modality not in _CONTRAST:
        raise ValueError(f"modality must be 'ct' or 'mri', got {modality!r}")
    affine = centred_affine(size, CARDIAC_FOV_MM, CARDIAC_CENTRE_MM)
    anatomy = _cardiac_anatomy(params, modality, float(spacing_of(affine).max()))
    return render_sequence(anatomy, _cardiac_motion(params, frames), frames, size, affine)


def make_cardiac_dataset(
    out: str | Path,
    n: int = 4,
    frames: int = 10,
    modality: str = "ct",
    size: int | Sequence[int] = CARDIAC_SIZE,
    seed: int = 0,
    flow_pairs: bool = False,
) -> Path:
    """Write ``n`` cardiac subjects and return ``out``.

    Default layout (importable, with ``<out>/dataset.json``, one case per subject and frame)::

        <out>/sub000/image_t00.nii.gz ...   frame t (HU or a.u.), real affine
        <out>/sub000/label_t00.nii.gz ...   label map (CARDIAC_LABELS)
        <out>/sub000/dvf_t00.nii.gz ...     exact field frame 0 -> t, mm vector NIfTI
        <out>/sub000/geometry.json          SAX stack + 2/3/4-chamber planes, ED/ES frames
        <out>/sub000/params.json            the sampled parameters

    With ``flow_pairs=True`` the layout of the cardiac CT flow-field system instead:
    ``template_img_<n>.npy`` (the end-systole frame, ``(X, Y, Z)`` float32),
    ``flow_<n>.npy`` (``(3, X, Y, Z)`` float32, voxels: the exact displacement on the
    template's grid with ``warp_image(ED, flow) == template``, i.e. each template voxel
    ``x`` lay at ``x + flow(x)`` at end-diastole), ``affine_<n>.npy`` (4x4) and
    ``flow_pairs.json`` describing them.

    Args:
        out: output folder (created).
        n: number of subjects.
        frames: frames per cardiac cycle (>= 2).
        modality: ``"ct"`` or ``"mri"``.
        size: grid ``(X, Y, Z)``, or ``n`` for ``(n, n, n / 2)``.
        seed: dataset seed; subject ``i`` is drawn from ``(seed, i)``.
        flow_pairs: write the ``template_img``/``flow`` NumPy layout.
    """
    if frames < 2:
        raise ValueError(f"a cardiac cycle needs at least 2 frames, got {frames}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cases, pairs = [], []
    for index in range(n):
        params = sample_cardiac_params(int(subject_rng(seed, index).integers(2**31)))
        sequence = render_cardiac(params, frames, modality, size)
        if flow_pairs:
            es = params.end_systole(frames)
            np.save(out / f"template_img_{index}.npy", sequence.images[es].astype(np.float32))
            np.save(out / f"flow_{index}.npy", sequence.fields[es].astype(np.float32))
            np.save(out / f"affine_{index}.npy", sequence.affine)
            pairs.append({"template": f"template_img_{index}.npy", "flow": f"flow_{index}.npy", "affine": f"affine_{index}.npy", "es_frame": es})
            continue
        subject = f"sub{index:03d}"
        cases += write_sequence(sequence, out, subject)
        (out / subject / "geometry.json").write_text(json.dumps(cardiac_geometry(params, frames), indent=1))
        (out / subject / "params.json").write_text(json.dumps(asdict(params), indent=1))
    if flow_pairs:
        (out / "flow_pairs.json").write_text(json.dumps({
            "modality": modality.upper(),
            "template": "end-systole frame, (X, Y, Z) float32",
            "flow": "(3, X, Y, Z) float32 displacement in voxels on the template grid: warp_image(end_diastole, flow) == template (MONAI Warp convention)",
            "affine": "4x4 RAS voxel-to-world affine (mm) of template and flow",
            "pairs": pairs,
        }, indent=1))
        return out
    write_manifest(out, "phantom-cardiac", "CT" if modality.lower() == "ct" else "MRI", "phantom-cardiac", CARDIAC_LABELS, cases)
    return out
