"""Lung 4D CT phantom: a breathing thorax with its exact motion.

As :mod:`medsynth.data.phantoms.cardiac`: :func:`sample_lung_params` draws a subject from
a seed and :func:`render_lung` renders it deterministically. Anatomy (world mm, HU):
body with a fat layer, two lungs with vessel texture (thicker towards the hila) above a
domed diaphragm, nodules, liver, heart with pericardial fat, descending aorta and a
spine of vertebrae and discs. Breathing: 10 phases per cycle by default, end-inhale
first (phase 0, the reference) and end-exhale in the middle. Frame ``t`` is the
end-inhale anatomy evaluated at ``x + d_t(x)``; ``d_t`` (backward, mm) combines the
diaphragm's superior-inferior excursion, fading towards the lung apices, the spine and
the chest wall, with the chest wall's anterior-posterior and lateral expansion; the
chest-wall term lags the diaphragm by a per-subject phase (hysteresis).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from scipy.special import expit

from medsynth.data.io import spacing_of
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
    write_manifest,
    write_sequence,
)
from medsynth.errors import MedsynthError
from medsynth.runs import atomic_write_json

__all__ = ["LUNG_LABELS", "LungParams", "make_lung_dataset", "render_lung", "sample_lung_params"]

LUNG_LABELS = {0: "background", 1: "body", 2: "lung", 3: "spine", 4: "heart", 5: "aorta", 6: "liver", 7: "nodule"}

# Field of view (mm) and centre: the whole thorax from the lung apices to the upper abdomen.
LUNG_FOV_MM = (360.0, 270.0, 260.0)
LUNG_CENTRE_MM = (0.0, -20.0, 0.0)
# Default grid: the aspect of a 256 x 256 x 50 4D CT at half scale.
LUNG_SIZE = (128, 128, 25)

_HU = {"air": -1000.0, "fat": -100.0, "soft": 40.0, "lung": -860.0, "vessel": 650.0, "bone": 450.0, "bone_mod": 250.0, "heart": 45.0, "liver": 60.0, "nodule": 30.0, "texture": 12.0}
_LUNG_CENTRES = {"right": (-75.0, -25.0, 5.0), "left": (75.0, -25.0, 5.0)}
_SPINE_XY = (0.0, -95.0)


@dataclass(frozen=True)
class LungParams:
    """Anatomy and breathing of one lung subject (world mm, RAS)."""

    body_radii: tuple[float, float]  # elliptic body cross-section (x, y)
    lung_radii: tuple[float, float, float]
    dome_right: float  # height (z) of the right diaphragm dome's apex; the left is 10 mm lower
    heart_radii: tuple[float, float, float]
    nodules: tuple[tuple[float, float, float, float], ...]  # (x, y, z, radius)
    si_amplitude: float  # diaphragm excursion, end-inhale -> end-exhale
    ap_amplitude: float  # anterior chest-wall excursion
    hysteresis: float  # phase lag of the chest wall behind the diaphragm (share of a cycle)
    seed: int  # texture seed

    def dome(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Height (z, mm) of the diaphragm under ``(x, y)``: two paraboloid domes, the right one higher."""
        right = self.dome_right - 25.0 * (((x + 75.0) / 70.0) ** 2 + ((y + 25.0) / 90.0) ** 2)
        left = self.dome_right - 10.0 - 25.0 * (((x - 75.0) / 70.0) ** 2 + ((y + 25.0) / 90.0) ** 2)
        return np.maximum(right, left)

    def excursion(self, t: int, phases: int) -> tuple[float, float]:
        """Diaphragm and chest-wall fractions of phase ``t``: ``(0, 0)`` at end-inhale, diaphragm 1 at end-exhale."""
        phase = t / phases
        diaphragm = np.sin(np.pi * phase) ** 2
        chest = np.sin(np.pi * (phase - self.hysteresis)) ** 2 - np.sin(np.pi * self.hysteresis) ** 2
        return float(diaphragm), float(chest)


def sample_lung_params(seed: int) -> LungParams:
    """Draw the anatomy (body and lung size, diaphragm height, nodules) and breathing of one subject."""
    rng = np.random.default_rng(seed)
    lung_radii = (float(rng.uniform(52.0, 62.0)), float(rng.uniform(78.0, 90.0)), float(rng.uniform(115.0, 130.0)))
    dome_right = float(rng.uniform(-50.0, -30.0))
    count, nodules = int(rng.integers(1, 4)), []
    while len(nodules) < count:
        centre = np.asarray(_LUNG_CENTRES[str(rng.choice(["right", "left"]))])
        offset = rng.uniform(-0.65, 0.65, size=3)
        point = centre + offset * lung_radii
        if np.linalg.norm(offset) < 0.65 and point[2] > dome_right + 20.0:  # inside the lung, above the diaphragm
            nodules.append((*(float(v) for v in point), float(rng.uniform(3.0, 7.0))))
    return LungParams(
        body_radii=(float(rng.uniform(150.0, 172.0)), float(rng.uniform(105.0, 122.0))),
        lung_radii=lung_radii,
        dome_right=dome_right,
        heart_radii=(float(rng.uniform(50.0, 60.0)), float(rng.uniform(40.0, 48.0)), float(rng.uniform(45.0, 55.0))),
        nodules=tuple(nodules),
        si_amplitude=float(rng.uniform(8.0, 20.0)),
        ap_amplitude=float(rng.uniform(3.0, 8.0)),
        hysteresis=float(rng.uniform(0.03, 0.1)),
        seed=int(rng.integers(2**31)),
    )


def _lung_anatomy(params: LungParams, voxel_mm: float) -> Anatomy:
    """The analytic end-inhale anatomy, band-limited for a grid of ``voxel_mm``: points (N, 3) mm -> (HU, label)."""
    rng = np.random.default_rng(params.seed)
    body_texture = SmoothNoise.sample(rng, texture_length(12.0, voxel_mm))
    vessel_a, vessel_b = SmoothNoise.sample(rng, 16.0), SmoothNoise.sample(rng, 16.0)
    edge_mm = 0.6 * voxel_mm  # partial-volume edge of about one voxel (the scanner PSF)
    rx, ry = params.body_radii
    heart_centre = np.array([15.0, 5.0, params.dome_right + 0.6 * params.heart_radii[2]])

    def anatomy(p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x, y, z = p.T
        dome = params.dome(x, y)
        # Vessels, thicker near the hila (radius 1.5 -> 4 mm, at least 0.7 voxel).
        hilum = np.minimum(np.linalg.norm(p - (-45.0, -20.0, 20.0), axis=-1), np.linalg.norm(p - (45.0, -20.0, 20.0), axis=-1))
        radius = np.maximum(1.5 + 2.5 * np.exp(-((hilum / 60.0) ** 2)), 0.7 * voxel_mm)
        lung = _HU["lung"] + _HU["vessel"] * vessels(vessel_a, vessel_b, p, radius)
        bone = _HU["bone"] + _HU["bone_mod"] * np.cos(np.pi * z / 28.0) ** 2  # vertebrae and discs
        layers = [
            (elliptic_cylinder_sdf(p, (0.0, -20.0), (rx, ry)), _HU["fat"], 1),
            (elliptic_cylinder_sdf(p, (0.0, -20.0), (rx - 14.0, ry - 14.0)), _HU["soft"] + _HU["texture"] * body_texture(p), 1),
            (np.maximum(ellipsoid_sdf(p, (-45.0, -15.0, params.dome_right - 80.0), (110.0, 95.0, 80.0)), z - dome), _HU["liver"], 6),
            *[(np.maximum(ellipsoid_sdf(p, centre, params.lung_radii), dome - z), lung, 2) for centre in _LUNG_CENTRES.values()],
            *[(ellipsoid_sdf(p, (cx, cy, cz), (r, r, r)), _HU["nodule"], 7) for cx, cy, cz, r in params.nodules],
            (ellipsoid_sdf(p, heart_centre, np.asarray(params.heart_radii) + 4.0), _HU["fat"], 4),  # pericardial fat
            (ellipsoid_sdf(p, heart_centre, params.heart_radii), _HU["heart"], 4),
            (elliptic_cylinder_sdf(p, (20.0, -68.0), (12.0, 12.0)), _HU["heart"], 5),
            (elliptic_cylinder_sdf(p, _SPINE_XY, (19.0, 17.0)), bone, 3),
        ]
        return paint(layers, _HU["air"], edge_mm)

    return anatomy


def _lung_motion(params: LungParams, phases: int) -> Motion:
    """Backward displacement (phase ``t`` -> end-inhale, mm).

    Superior-inferior: ``d_z = -a_SI c_D(t) g(z) h(x, y)`` with ``g`` a tanh ramp from 1 at
    the diaphragm and below to 0 at the lung apices and ``h`` vanishing at the spine and
    the chest wall (the lungs slide along it). Chest wall: ``d_y = a_AP c_W(t) (y - y_back) / (2 r_y)``
    and ``d_x = 0.4 a_AP c_W(t) x / r_x``, where ``c_W`` lags ``c_D`` (hysteresis).
    ``|d d_z / d z| <= a_SI / 90 < 1``: every phase is a diffeomorphism.
    """
    rx, ry = params.body_radii

    def motion(p: np.ndarray, t: int) -> np.ndarray:
        diaphragm, chest = params.excursion(t, phases)
        x, y, z = p.T
        ramp = 0.5 * (1.0 - np.tanh((z - 30.0) / 45.0))
        spine = 1.0 - np.exp(-((x - _SPINE_XY[0]) ** 2 + (y - _SPINE_XY[1]) ** 2) / (2 * 40.0**2))
        radius = np.hypot(x / rx, (y + 20.0) / ry)  # 1 on the skin
        inside = expit((0.82 - radius) / 0.05)
        d_z = -params.si_amplitude * diaphragm * ramp * spine * inside
        d_y = params.ap_amplitude * chest * (y - (-20.0 - ry)) / (2 * ry)
        d_x = 0.4 * params.ap_amplitude * chest * x / rx
        return np.c_[d_x, d_y, d_z]

    return motion


def render_lung(params: LungParams, phases: int = 10, size: int | Sequence[int] = LUNG_SIZE) -> PhantomSequence:
    """Render a subject's breathing cycle of ``phases`` phases (HU) on a ``size`` grid over ``LUNG_FOV_MM``.

    ``size`` is ``(X, Y, Z)``, or ``n`` for ``(n, n, n * 25 / 128)`` (the aspect of ``LUNG_SIZE``).
    """
    size = grid_size(size, LUNG_SIZE)
    affine = centred_affine(size, LUNG_FOV_MM, LUNG_CENTRE_MM)
    return render_sequence(_lung_anatomy(params, float(spacing_of(affine).max())), _lung_motion(params, phases), phases, size, affine)


def make_lung_dataset(out: str | Path, n: int = 4, seed: int = 0, size: int | Sequence[int] = LUNG_SIZE, progress: bool = False,
                      frames: int = 10) -> Path:
    """Write ``n`` 4D CT subjects and return ``out``.

    Layout, with ``<out>/dataset.json`` (one case per subject and phase)::

        <out>/sub000/image_t00.nii.gz ...   phase t in HU (t = 0: end-inhale, phases // 2: end-exhale)
        <out>/sub000/label_t00.nii.gz ...   label map (LUNG_LABELS)
        <out>/sub000/dvf_t00.nii.gz ...     exact field phase 0 -> t, mm vector NIfTI
        <out>/sub000/params.json            the sampled parameters

    Args:
        out: output folder (created).
        n: number of subjects.
        seed: dataset seed; subject ``i`` is drawn from ``(seed, i)``.
        size: grid ``(X, Y, Z)``, or ``n`` for ``(n, n, n * 25 / 128)``; the default has the
            aspect of a 256 x 256 x 50 scan.
        progress: show a progress bar on stderr.
        frames: breathing phases per cycle (>= 2); named ``frames`` as every phantom's time axis.
    """
    from tqdm import tqdm

    if frames < 2:
        raise MedsynthError(f"phantom lung: a breathing cycle needs at least 2 phases (frames), got {frames}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cases = []
    for index in tqdm(range(n), desc="lung phantom", disable=not progress):
        params = sample_lung_params(int(subject_rng(seed, index).integers(2**31)))
        subject = f"sub{index:03d}"
        cases += write_sequence(render_lung(params, frames, size), out, subject)
        atomic_write_json(out / subject / "params.json", asdict(params))
    write_manifest(out, "phantom-lung", "CT", "phantom-lung", LUNG_LABELS, cases)
    return out
