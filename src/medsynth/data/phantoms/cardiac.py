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

The scene primitives (grids, SDFs, smooth noise, painting, rendering and writing a
sequence) are in :mod:`medsynth.data.phantoms._scene`, shared with the lung phantom.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from scipy.spatial.transform import Rotation

from medsynth.data.fields import save_field
from medsynth.data.io import save_image, spacing_of
from medsynth.data.phantoms._scene import (
    Anatomy,
    Motion,
    PhantomSequence,
    SmoothNoise,
    centred_affine,
    ellipsoid_sdf,
    elliptic_cylinder_sdf,
    grid_size,
    paint,
    render_sequence,
    subject_rng,
    texture_length,
    vessels,
    window,
    write_manifest,
    write_sequence,
)
from medsynth.errors import MedsynthError
from medsynth.runs import atomic_write_json

__all__ = [
    "CARDIAC_LABELS",
    "CARDIAC_SIZE",
    "CardiacParams",
    "PhantomSequence",
    "SmoothNoise",
    "cardiac_geometry",
    "cardiac_planes",
    "make_cardiac_dataset",
    "render_cardiac",
    "render_sequence",
    "sample_cardiac_params",
]


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


def _cardiac_anatomy(params: CardiacParams, modality: str, voxel_mm: float, trabeculation: bool = False) -> Anatomy:
    """The analytic ED anatomy of a subject, band-limited for a grid of ``voxel_mm``: points (N, 3) mm -> (intensity, label).

    ``trabeculation``: muscle strands of about 3 mm along the endocardium of the apical two thirds (a smooth
    random field above a threshold within 3.5 mm inside the cavity, labelled cavity as the papillary muscles are,
    as clinical segmentations include them in the blood pool): detail that changes from one SAX slice to the next.
    Drawn from a stream of its own, so the rest of the subject is the same with or without it.
    """
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
    trabeculae = SmoothNoise.sample(np.random.default_rng((params.seed, 1)), texture_length(3.0, voxel_mm), waves=64) if trabeculation else None

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
        if trabeculae is not None:  # strands where the field is high, in a 3.5 mm rim inside the apical cavity
            rim = np.maximum(np.maximum(lv_endo, -3.5 - lv_endo), local[:, 2] + 0.35 * length)
            layers.append((np.maximum(rim, 2.0 * (0.6 - trabeculae(p))), myocardium, 8))
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


def cardiac_planes(params: CardiacParams, sax_slices: int = 10, sax_spacing_mm: float | None = None) -> dict[str, dict[str, np.ndarray]]:
    """The SAX slice planes and 2-, 3-, 4-chamber planes at end-diastole, unrounded (world mm).

    Returns ``{"sax_000": plane, ..., "2ch": plane, "3ch": plane, "4ch": plane}``, each plane
    ``{"origin", "u", "v", "normal"}`` (its centre and unit axes, ``normal = u x v``). The SAX
    stack starts 5 mm below the base and goes towards the apex: ``sax_slices`` planes down to
    5 mm above the apex, or, with ``sax_spacing_mm``, as many planes that far apart as fit there.
    """
    rotation, base, apex = params.rotation, np.asarray(params.lv_base), params.apex
    ex, ey, ez = rotation.T
    if sax_spacing_mm is None:
        offsets = np.linspace(-5.0, -(params.lv_length - 5.0), sax_slices)
    else:
        offsets = -5.0 - sax_spacing_mm * np.arange(int((params.lv_length - 10.0) // sax_spacing_mm) + 1)
    planes = {f"sax_{k:03d}": {"origin": base + o * ez, "u": ex, "v": ey, "normal": ez} for k, o in enumerate(offsets)}

    def towards(offset: np.ndarray) -> np.ndarray:  # unit in-plane direction from the long axis to base + offset
        radial = offset - (offset @ ez) * ez
        return radial / np.linalg.norm(radial)

    # Long-axis planes contain the long axis and one more structure: the RV (4-chamber), the
    # left atrium (2-chamber) or the aortic root, i.e. the LV outflow tract (3-chamber).
    for name, u in {"4ch": ex, "2ch": towards(_LEFT_ATRIUM), "3ch": towards(_AORTIC_ROOT)}.items():
        planes[name] = {"origin": 0.5 * (base + apex), "u": u, "v": ez, "normal": np.cross(u, ez)}
    return planes


def cardiac_geometry(params: CardiacParams, frames: int, sax_slices: int = 10, pixel_mm: float = 1.5, plane_mm: float = 160.0,
                     sax_spacing_mm: float | None = None, sax_thickness_mm: float | None = None, lax_thickness_mm: float = 6.0) -> dict:
    """Short-axis stack and 2-, 3- and 4-chamber long-axis planes at end-diastole (world mm, JSON-ready).

    The planes of :func:`cardiac_planes` rounded to 1e-4 mm. Each plane is ``origin`` (its
    centre), unit in-plane axes ``u``, ``v`` and ``normal``; a plane pixel ``(i, j)`` of a
    ``size`` x ``size`` image lies at
    ``origin + (i - (size - 1) / 2) * pixel_mm * u + (j - (size - 1) / 2) * pixel_mm * v``.
    SAX slice thickness: ``sax_thickness_mm``, else the slice spacing.
    """
    planes = cardiac_planes(params, sax_slices, sax_spacing_mm)
    sax = [{key: _vec(value) for key, value in plane.items()} for name, plane in planes.items() if name.startswith("sax_")]
    lax = {name: {key: _vec(value) for key, value in planes[name].items()} for name in ("4ch", "2ch", "3ch")}
    origins = np.array([plane["origin"] for name, plane in planes.items() if name.startswith("sax_")])
    spacing = float(np.linalg.norm(origins[1] - origins[0])) if len(origins) > 1 else 0.0
    thickness = spacing if sax_thickness_mm is None else sax_thickness_mm
    size = int(round(plane_mm / pixel_mm))
    return {
        "frames": frames,
        "ed_frame": 0,
        "es_frame": params.end_systole(frames),
        "long_axis": {"base": _vec(np.asarray(params.lv_base)), "apex": _vec(params.apex), "direction": _vec(params.rotation[:, 2])},
        "sax": {"slices": sax, "slice_spacing_mm": round(spacing, 4), "slice_thickness_mm": round(thickness, 4), "pixel_mm": pixel_mm, "size": size},
        "lax": {**lax, "pixel_mm": pixel_mm, "size": size, "thickness_mm": lax_thickness_mm},
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
    seed: int = 0,
    size: int | Sequence[int] = CARDIAC_SIZE,
    progress: bool = False,
    frames: int = 10,
    modality: str = "ct",
    flow_pairs: str | bool | None = None,
) -> Path:
    """Write ``n`` cardiac subjects and return ``out``.

    Default layout, the cine (importable, with ``<out>/dataset.json``, one case per subject and frame)::

        <out>/sub000/image_t00.nii.gz ...   frame t (HU or a.u.), real affine
        <out>/sub000/label_t00.nii.gz ...   label map (CARDIAC_LABELS)
        <out>/sub000/dvf_t00.nii.gz ...     exact field frame 0 -> t, mm vector NIfTI
        <out>/sub000/geometry.json          SAX stack + 2/3/4-chamber planes, ED/ES frames
        <out>/sub000/params.json            the sampled parameters

    ``flow_pairs`` writes one (end-systole frame, flow to end-diastole) pair per subject
    instead. The flow ``u`` lives on the ES frame's grid in the pull convention,
    ``warp_image(ED, u) == ES``: each ES voxel ``x`` lay at ``x + u(x)`` at end-diastole.

    - ``"npy"`` (the layout of the original cardiac CT flow-field system), in ``<out>``:
      ``template_img_<n>.npy`` (ES frame ``(X, Y, Z)`` float32), ``flow_<n>.npy``
      (``(3, X, Y, Z)`` float32, voxels), ``label_<n>.npy`` (ES labels ``(X, Y, Z)`` int16,
      CARDIAC_LABELS), ``diastole_img_<n>.npy`` (ED frame), ``affine_<n>.npy`` (4x4) and
      ``flow_pairs.json`` describing them (with the label names).
    - ``"nifti"``: ``<out>/sub000/frame_es.nii.gz``, ``flow_es_ed.nii.gz`` (mm vector NIfTI
      with the frame's affine), ``label_es.nii.gz``, ``frame_ed.nii.gz``, ``geometry.json``,
      ``params.json`` and ``<out>/dataset.json``: one case per subject (image = ES frame,
      flow, label, moving = the ED frame).

    The simulated cine-MRI acquisitions (UK Biobank layout) are written by
    :func:`medsynth.data.phantoms.cardiac_views.make_cardiac_phantom` with ``views``.

    Args:
        out: output folder (created).
        n: number of subjects.
        frames: frames per cardiac cycle (>= 2).
        modality: ``"ct"`` or ``"mri"``.
        size: grid ``(X, Y, Z)``, or ``n`` for ``(n, n, n / 2)``.
        seed: dataset seed; subject ``i`` is drawn from ``(seed, i)``.
        progress: show a progress bar on stderr.
        flow_pairs: ``None`` (cine), ``"npy"`` or ``"nifti"`` (``True`` means ``"npy"``).
    """
    from tqdm import tqdm

    if frames < 2:
        raise MedsynthError(f"phantom cardiac: a cardiac cycle needs at least 2 frames, got {frames}")
    layout = "npy" if flow_pairs is True else (flow_pairs or None)
    if layout not in (None, "npy", "nifti"):
        raise MedsynthError(f"phantom cardiac: flow_pairs must be 'npy' or 'nifti', got {flow_pairs!r}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cases, pairs = [], []
    for index in tqdm(range(n), desc="cardiac phantom", disable=not progress):
        params = sample_cardiac_params(int(subject_rng(seed, index).integers(2**31)))
        sequence = render_cardiac(params, frames, modality, size)
        subject = f"sub{index:03d}"
        if layout == "npy":
            pairs.append(_write_npy_pair(sequence, params.end_systole(frames), out, index))
            continue
        if layout == "nifti":
            cases.append(_write_nifti_pair(sequence, params.end_systole(frames), out, subject))
        else:
            cases += write_sequence(sequence, out, subject)
        atomic_write_json(out / subject / "geometry.json", cardiac_geometry(params, frames))
        atomic_write_json(out / subject / "params.json", asdict(params))
    if layout == "npy":
        atomic_write_json(out / "flow_pairs.json", {
            "modality": modality.upper(),
            "template": "end-systole frame, (X, Y, Z) float32",
            "flow": "(3, X, Y, Z) float32 displacement in voxels on the template grid: warp_image(end_diastole, flow) == template (MONAI Warp convention)",
            "label": "end-systole label map, (X, Y, Z) int16 (labels below)",
            "diastole": "end-diastole frame, (X, Y, Z) float32, on the template grid",
            "affine": "4x4 RAS voxel-to-world affine (mm) of template, flow, label and diastole",
            "labels": {str(k): v for k, v in CARDIAC_LABELS.items()},
            "pairs": pairs,
        })
        return out
    write_manifest(out, "phantom-cardiac", "CT" if modality.lower() == "ct" else "MRI", "phantom-cardiac", CARDIAC_LABELS, cases)
    return out


def _write_npy_pair(sequence: PhantomSequence, es: int, out: Path, index: int) -> dict:
    """The NumPy flow pair of one subject (raw arrays, geometry in the affine sidecar); its flow_pairs.json entry."""
    arrays = {"template_img": sequence.images[es].astype(np.float32), "flow": sequence.fields[es].astype(np.float32),
              "label": sequence.labels[es].astype(np.int16), "diastole_img": sequence.images[0].astype(np.float32),
              "affine": np.asarray(sequence.affine, dtype=np.float64)}
    for kind, array in arrays.items():
        save_image(array, out / f"{kind}_{index}.npy")
    return {"template": f"template_img_{index}.npy", "flow": f"flow_{index}.npy", "label": f"label_{index}.npy",
            "diastole": f"diastole_img_{index}.npy", "affine": f"affine_{index}.npy", "es_frame": es, "ed_frame": 0}


def _write_nifti_pair(sequence: PhantomSequence, es: int, out: Path, subject: str) -> dict:
    """The NIfTI flow pair of one subject (the frame's affine everywhere, the flow in mm); its manifest case."""
    names = {kind: f"{subject}/{kind}.nii.gz" for kind in ("frame_es", "flow_es_ed", "label_es", "frame_ed")}
    save_image(sequence.images[es][None], out / names["frame_es"], affine=sequence.affine)
    save_field(sequence.fields[es], out / names["flow_es_ed"], sequence.affine)
    save_image(sequence.labels[es][None].astype(np.int16), out / names["label_es"], affine=sequence.affine)
    save_image(sequence.images[0][None], out / names["frame_ed"], affine=sequence.affine)
    return {"id": subject, "subject": subject, "image": names["frame_es"], "flow": names["flow_es_ed"],
            "label": names["label_es"], "moving": names["frame_ed"], "phase": es}
