"""Procedural CT coronary angiography (CTCA) volumes with a 9-class heart label map.

(One file over 450 lines: the heart frame, the coronary centrelines and the painter share
private geometry that no other module uses; split, each part would import the others'.)

A subject is drawn in *FOV units*: millimetres divided by half the mean field of view,
so the volume spans about [-1, 1] along each axis whatever its size, and the axes are
patient RAS (x to the right, y anterior, z superior). The heart has its own frame:
``e_l`` along the long axis from the base (mitral plane) to the apex, ``e_s`` across
the septum towards the right ventricle and ``e_t = e_l x e_s``.

- LV: a half-ellipsoid cavity from the base to the apex inside a myocardial shell
  (the label map's ``myocardium`` is the LV myocardium, as in common CT heart labels).
- RV: an ellipsoid on the septal side wrapped around the LV, with a thin free wall
  (myocardial HU, background label); atria: ellipsoids above the base, the LA
  posterior and the RA to the right.
- Aorta: a root bulb on the LV outflow and an ascending tube leaving the top of the
  volume, plus the descending aorta beside the spine; pulmonary artery: from the RV
  outflow tract up and to the left, splitting into its left and right branches.
- Coronary tree: tapering tubes around centrelines lying on the epicardium. The left
  main leaves the aortic root and splits into the LAD (down the anterior
  interventricular groove, with a diagonal branch) and the LCx (round the left AV
  groove, with an obtuse marginal); the RCA leaves the root, runs round the right AV
  groove to the crux and goes on as the posterior descending artery. A sleeve of
  epicardial fat is carved around them, as in the grooves of a real heart.
- Thorax: a body ellipse with subcutaneous fat and a muscle layer, lungs round the
  mediastinal fat, a vertebral body, and the liver and abdomen below a diaphragm dome.

Intensities are Hounsfield units of an arterial-phase scan: contrast-filled left heart
and aorta at ``contrast_hu`` (300-450, per subject), coronaries 5% lower, right heart and
pulmonary arteries 82-100% of it (mixing with unenhanced venous return), myocardium
80-120, fat -120..-80, lungs -870..-820, muscle 40, liver 70, bone 230-650, air -1000.
The clean volume is blurred (partial volume and scanner resolution, sigma 0.6 voxel)
and noise of 15-25 HU, correlated over about a voxel, is added. At 32^3 and above, the
median HU over a label's interior voxels (all 6 neighbours share the label) is 200-460
for the blood pools (lv, rv, la, ra, aorta, pulmonary_artery) and 60-150 for the
myocardium; over all coronary voxels, 150-460.

Coronary radii follow real calibres (left main ~2.2 mm, distal branches ~0.7 mm for a
220 mm field of view) but are raised, keeping their taper, to at least
:data:`MIN_VESSEL_VOXELS` voxels so the tree stays connected and visible at 32^3.

As in torchio, randomness lives only in :func:`sample_coronary_params`;
:func:`render_coronary` is a deterministic function of the parameters, size and spacing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from medsynth.errors import MedsynthError
from medsynth.runs import atomic_write_json

CORONARY_LABELS = {0: "background", 1: "lv", 2: "rv", 3: "la", 4: "ra", 5: "myocardium", 6: "aorta",
                   7: "pulmonary_artery", 8: "coronary"}
BACKGROUND, LV, RV, LA, RA, MYOCARDIUM, AORTA, PULMONARY_ARTERY, CORONARY = range(9)

MIN_VESSEL_VOXELS = 0.9  # thinnest coronary radius (voxels): > sqrt(3)/2 keeps a tube 26-connected
_TAPER_KEEP = 0.45  # exponent on the calibre ratio where the minimum radius applies: keeps a visible taper
_BLUR_VOXELS = 0.6  # partial-volume / scanner blur sigma
_NOISE_GRAIN_VOXELS = 0.7  # CT noise is correlated over about a voxel

# Calibres (FOV units, before vessel_scale) at the start and end of each branch.
_CALIBRES = {"lm": (0.021, 0.019), "lad": (0.018, 0.008), "d1": (0.012, 0.007), "lcx": (0.017, 0.009),
             "om1": (0.012, 0.007), "rca": (0.019, 0.011), "pda": (0.011, 0.006)}
_VESSEL_SCALE = (0.85, 1.15)  # range of the per-subject factor on all calibres
_THINNEST = _VESSEL_SCALE[0] * min(min(c) for c in _CALIBRES.values())  # gets MIN_VESSEL_VOXELS

# Heart frame before per-subject rotation (patient RAS): the apex points left, anterior
# and inferior; the septal axis towards the right and anterior.
_LONG_AXIS = np.array([-0.55, 0.5, -0.65])
_SEPTAL_HINT = np.array([0.7, 0.7, 0.0])
# Directions (l, s, t) of the coronary ostia on the aortic root, both above the LV outflow:
# the left one towards the anterior LV base, the right one towards the RV. About 90 degrees
# apart, so that the two trees stay separate down to 48^3.
_LEFT_OSTIUM = (-0.5, 0.0, -0.85)
_RIGHT_OSTIUM = (-0.1, 1.0, 0.1)


@dataclass(frozen=True)
class CoronaryParams:
    """Everything :func:`render_coronary` needs; lengths in FOV units unless noted.

    Heart-frame positions are ``(l, s, t)`` offsets along ``(e_l, e_s, e_t)`` from the
    LV base centre; semi-axes are along the same axes.

    Attributes:
        spacing: Default voxel spacing (mm) along the array axes.
        centre_mm: World position (RAS, mm) of the volume centre: scanner table offsets.
        heart_base: Centre of the LV base (mitral plane), patient coordinates (FOV units).
        heart_angles: Rotations (radians) of the heart frame about the x, y and z axes.
        lv_length: LV cavity length from base to apex.
        lv_radius: LV cavity radius at the base.
        wall: LV myocardium thickness.
        rv_centre: RV cavity centre ``(l, s, t)``.
        rv_size: RV cavity semi-axes.
        rv_wall: RV free-wall thickness.
        la_centre: Left atrium centre ``(l, s, t)``.
        la_size: Left atrium semi-axes.
        ra_centre: Right atrium centre ``(l, s, t)``.
        ra_size: Right atrium semi-axes.
        aortic_root: Aortic root centre ``(l, s, t)``.
        aorta_radius: Ascending aorta radius (the root bulb is 1.25 times wider).
        pa_radius: Pulmonary trunk radius.
        vessel_scale: Factor on all coronary calibres.
        lcx_reach: Share of the left AV groove (anterior to posterior groove) that the
            LCx covers; the rest belongs to the RCA (dominance).
        diaphragm: Height (z) of the top of the diaphragm dome.
        body_size: Body ellipse semi-axes (x, y).
        fat_pad: Thickness of mediastinal fat kept around the heart and vessels.
        lung_vessels: End points of the pulmonary arteries drawn in the lungs, each
            from the hilum on its side.
        contrast_hu: Attenuation of the enhanced left heart, aorta and coronaries (HU).
        right_contrast: Right heart and pulmonary artery HU as a fraction of ``contrast_hu``.
        myocardium_hu: Myocardium (HU).
        fat_hu: Fat (HU).
        lung_hu: Lung parenchyma (HU).
        noise_hu: Standard deviation of the image noise (HU).
        noise_seed: Seed of the noise.
    """

    spacing: tuple[float, float, float]
    centre_mm: tuple[float, float, float]
    heart_base: tuple[float, float, float]
    heart_angles: tuple[float, float, float]
    lv_length: float
    lv_radius: float
    wall: float
    rv_centre: tuple[float, float, float]
    rv_size: tuple[float, float, float]
    rv_wall: float
    la_centre: tuple[float, float, float]
    la_size: tuple[float, float, float]
    ra_centre: tuple[float, float, float]
    ra_size: tuple[float, float, float]
    aortic_root: tuple[float, float, float]
    aorta_radius: float
    pa_radius: float
    vessel_scale: float
    lcx_reach: float
    diaphragm: float
    body_size: tuple[float, float]
    fat_pad: float
    lung_vessels: tuple[tuple[float, float, float], ...]
    contrast_hu: float
    right_contrast: float
    myocardium_hu: float
    fat_hu: float
    lung_hu: float
    noise_hu: float
    noise_seed: int


@dataclass(frozen=True)
class Centreline:
    """One coronary branch as rendered, in voxel coordinates of the output array.

    Attributes:
        points: Centreline ``(K, 3)`` in voxel indices, from the proximal end.
        radius: Tube radius ``(K,)`` in voxels of the coarsest axis.
    """

    points: np.ndarray
    radius: np.ndarray


def sample_coronary_params(rng: np.random.Generator) -> CoronaryParams:
    """Draw the random anatomy, appearance and geometry of one subject.

    The parameters do not depend on the output size: one subject can be rendered at
    32^3 for tests and at 128^3 for training.

    Args:
        rng: Source of all randomness.

    Returns:
        The parameters; :func:`render_coronary` turns them into a volume.
    """
    u = rng.uniform

    def jitter(values: tuple[float, ...], amount: float) -> tuple[float, ...]:
        return tuple(float(v + u(-amount, amount)) for v in values)

    def scaled(values: tuple[float, ...], low: float, high: float) -> tuple[float, ...]:
        return tuple(float(v * u(low, high)) for v in values)

    lv_radius, wall = float(u(0.2, 0.25)), float(u(0.085, 0.11))
    contrast = float(u(300.0, 450.0))
    return CoronaryParams(
        spacing=tuple(float(s) for s in u(0.8, 1.2, size=3)),
        centre_mm=(float(u(-30, 30)), float(u(-40, 20)), float(u(-220, -120))),
        heart_base=jitter((0.0, 0.0, 0.25), 0.05),
        heart_angles=tuple(float(a) for a in u(-0.2, 0.2, size=3)),
        lv_length=float(u(0.55, 0.68)),
        lv_radius=lv_radius,
        wall=wall,
        rv_centre=(float(u(0.12, 0.2)), float(lv_radius + wall + u(-0.03, 0.03)), float(u(-0.06, 0.0))),
        rv_size=scaled((0.55, 0.2, 0.4), 0.9, 1.1),
        rv_wall=float(u(0.025, 0.035)),
        la_centre=jitter((-0.27, -0.14, 0.16), 0.04),
        la_size=scaled((0.17, 0.22, 0.2), 0.85, 1.15),
        ra_centre=jitter((-0.24, 0.35, 0.18), 0.04),
        ra_size=scaled((0.19, 0.19, 0.22), 0.85, 1.15),
        aortic_root=jitter((-0.1, 0.11, -0.05), 0.02),
        aorta_radius=float(u(0.12, 0.15)),
        pa_radius=float(u(0.1, 0.13)),
        vessel_scale=float(u(*_VESSEL_SCALE)),
        lcx_reach=float(u(0.4, 0.65)),
        diaphragm=float(u(-0.62, -0.48)),
        body_size=(float(u(1.5, 1.7)), float(u(1.0, 1.15))),
        fat_pad=float(u(0.05, 0.1)),
        lung_vessels=tuple((float(side * u(0.6, 1.3)), float(u(-1.0, 0.5)), float(u(-0.6, 0.9)))
                           for side in (-1, 1) for _ in range(6)),
        contrast_hu=contrast,
        right_contrast=float(u(0.82, 1.0)),
        myocardium_hu=float(u(80.0, 120.0)),
        fat_hu=float(u(-120.0, -80.0)),
        lung_hu=float(u(-870.0, -820.0)),
        noise_hu=float(u(15.0, 25.0)),
        noise_seed=int(rng.integers(2**31)),
    )


# -- geometry ---------------------------------------------------------------------------


def _rotation(angles: tuple[float, float, float]) -> np.ndarray:
    """Rotation matrix ``Rz @ Ry @ Rx`` for angles (radians) about x, y and z."""
    (cx, cy, cz), (sx, sy, sz) = np.cos(angles), np.sin(angles)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def _heart_frame(params: CoronaryParams) -> np.ndarray:
    """Rows ``(e_l, e_s, e_t)`` of the subject's heart frame in patient coordinates ``(3, 3)``."""
    e_l = _LONG_AXIS / np.linalg.norm(_LONG_AXIS)
    e_s = _SEPTAL_HINT - (_SEPTAL_HINT @ e_l) * e_l
    e_s /= np.linalg.norm(e_s)
    return np.stack([e_l, e_s, np.cross(e_l, e_s)]) @ _rotation(params.heart_angles).T


class _Grid:
    """Voxel centres of the output volume in FOV units, one 1D coordinate array per axis.

    The affine is LPS-ordered like CT converted from DICOM (``diag(-sx, -sy, sz)``), so
    patient x and y decrease along the first two array axes.
    """

    SIGNS = np.array([-1.0, -1.0, 1.0])

    def __init__(self, size: int, spacing: tuple[float, float, float], centre_mm: tuple[float, float, float]):
        self.size = size
        self.spacing = np.asarray(spacing, dtype=np.float64)
        self.half_fov = size * float(self.spacing.mean()) / 2.0  # mm per FOV unit
        self.step = self.SIGNS * self.spacing / self.half_fov  # FOV units per voxel, signed
        self.voxel = float(np.abs(self.step).max())  # coarsest voxel in FOV units
        centre_index = (size - 1) / 2.0
        self.axes = tuple(((np.arange(size) - centre_index) * step).astype(np.float32) for step in self.step)
        self.affine = np.eye(4)
        self.affine[:3, :3] = np.diag(self.SIGNS * self.spacing)
        self.affine[:3, 3] = np.asarray(centre_mm) - self.SIGNS * self.spacing * centre_index

    def to_voxels(self, points: np.ndarray) -> np.ndarray:
        """FOV-unit points ``(K, 3)`` to voxel indices ``(K, 3)``."""
        return points / self.step + (self.size - 1) / 2.0

    def local(self, origin: np.ndarray, frame: np.ndarray) -> tuple[np.ndarray, ...]:
        """Coordinates of every voxel along the rows of ``frame`` from ``origin``: three ``(X, Y, Z)`` arrays."""
        x, y, z = (axis - float(o) for axis, o in zip(self.axes, origin))
        return tuple(x[:, None, None] * float(row[0]) + y[None, :, None] * float(row[1]) + z[None, None, :] * float(row[2])
                     for row in frame)


def _index_range(axis: np.ndarray, low: float, high: float) -> slice:
    inside = np.flatnonzero((axis >= low) & (axis <= high))
    return slice(inside[0], inside[-1] + 1) if inside.size else slice(0, 0)


def _tube_distance(grid: _Grid, points: np.ndarray, radii: np.ndarray, reach: float) -> np.ndarray:
    """Distance (FOV units) from each voxel to the surface of a tapering tube, negative inside.

    The tube is the union of capsules round the polyline ``points`` ``(K, 3)`` whose
    radius ``radii`` ``(K,)`` varies linearly along each segment. Only voxels within
    ``reach`` of the surface are computed (one bounding box per segment); others are inf.
    """
    field = np.full((grid.size,) * 3, np.inf, dtype=np.float32)
    for a, b, ra, rb in zip(points[:-1], points[1:], radii[:-1], radii[1:]):
        margin = max(ra, rb) + reach
        window = tuple(_index_range(axis, lo, hi) for axis, lo, hi in
                       zip(grid.axes, np.minimum(a, b) - margin, np.maximum(a, b) + margin))
        if any(w.start == w.stop for w in window):
            continue
        x, y, z = (axis[w] - c for axis, w, c in zip(grid.axes, window, a))
        x, y, z = x[:, None, None], y[None, :, None], z[None, None, :]
        ab = b - a
        t = np.clip((x * ab[0] + y * ab[1] + z * ab[2]) / max(float(ab @ ab), 1e-12), 0.0, 1.0)
        distance = np.sqrt((x - t * ab[0]) ** 2 + (y - t * ab[1]) ** 2 + (z - t * ab[2]) ** 2) - (ra + t * (rb - ra))
        np.minimum(field[window], distance, out=field[window])
    return field


def _ellipsoid(coords: tuple[np.ndarray, ...], centre: tuple[float, ...], semi: tuple[float, ...],
               grow: float = 0.0) -> np.ndarray:
    """Inside an ellipsoid aligned with the axes of ``coords``, its semi-axes lengthened by ``grow``."""
    return sum(((c - m) / (a + grow)) ** 2 for c, m, a in zip(coords, centre, semi)) <= 1.0


class _Heart:
    """The subject's heart surfaces as analytic functions, for the masks and the coronary paths."""

    def __init__(self, params: CoronaryParams):
        self.p = params
        self.base = np.asarray(params.heart_base)
        self.frame = _heart_frame(params)
        self.epi = (params.lv_length + params.wall, params.lv_radius + params.wall)  # LV epicardium semi-axes (l, radial)
        self.rv_outer = tuple(a + params.rv_wall for a in params.rv_size)

    def to_patient(self, local: np.ndarray) -> np.ndarray:
        """Heart-frame points ``(..., 3)`` to patient FOV coordinates."""
        return self.base + local @ self.frame

    def epicardium(self, l: np.ndarray, phi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Points on the LV epicardium at long-axis position ``l`` and azimuth ``phi`` (from ``e_s``
        towards ``e_t``), with their unit outward normals; both ``(K, 3)`` in the heart frame."""
        length, radius = self.epi
        rho = radius * np.sqrt(np.clip(1.0 - (l / length) ** 2, 0.0, None))
        radial = np.stack([np.zeros_like(phi), np.cos(phi), np.sin(phi)], axis=-1)
        points = np.stack([l, rho * np.cos(phi), rho * np.sin(phi)], axis=-1)
        normals = (l / length**2)[:, None] * np.array([1.0, 0.0, 0.0]) + (rho / radius**2)[:, None] * radial
        return points, normals / np.linalg.norm(normals, axis=-1, keepdims=True)

    def in_rv(self, local: np.ndarray) -> np.ndarray:
        """Whether heart-frame points ``(..., 3)`` lie inside the RV including its free wall."""
        return (((local - np.asarray(self.p.rv_centre)) / np.asarray(self.rv_outer)) ** 2).sum(-1) <= 1.0

    def grooves(self, l: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Azimuths of the anterior and posterior interventricular grooves at heights ``l`` ``(K,)``.

        The grooves are where the RV stops covering the LV epicardium: the ends of the
        run of azimuths round ``phi = 0`` (towards the RV) whose epicardial points lie in
        the RV. Heights the RV does not reach take the nearest height's grooves.
        """
        phi = np.linspace(-math.pi, math.pi, 721)
        ll, pp = np.meshgrid(l, phi, indexing="ij")
        points, normals = self.epicardium(ll.ravel(), pp.ravel())
        covered = self.in_rv(points + 0.02 * normals).reshape(ll.shape)
        centre = len(phi) // 2
        # Walk outwards from phi = 0: the first uncovered azimuth on each side.
        anterior = centre - np.argmin(covered[:, centre::-1], axis=1)
        posterior = centre + np.argmin(covered[:, centre:], axis=1)
        reached = covered[:, centre]
        if not reached.any():
            raise ValueError("the RV does not touch the LV epicardium: inconsistent parameters")
        nearest = np.flatnonzero(reached)[np.abs(np.flatnonzero(reached)[None] - np.arange(len(l))[:, None]).argmin(1)]
        return phi[anterior[nearest]], phi[posterior[nearest]]


def _coronary_paths(heart: _Heart) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Each branch's surface points and outward normals (patient FOV coordinates) and calibres.

    A branch's centreline is ``points + normals * radius``: a tube resting on the surface.
    Normals shrink to 0 at the ostia, where the vessel starts in the aortic wall.
    Returns ``{name: (points (K, 3), normals (K, 3), calibre (K,))}``.
    """
    p, frame = heart.p, heart.frame
    length = heart.epi[0]
    groove_margin = 0.06  # radians: the artery runs beside the RV edge, on the LV
    root = np.asarray(p.aortic_root)
    root_radius = 1.25 * p.aorta_radius
    paths = {}

    def from_ostium(target: np.ndarray, target_normal: np.ndarray, facing: tuple[float, float, float], n: int = 10):
        """A proximal segment from the ostium on the aortic root that faces ``facing`` (l, s, t) to ``target``."""
        facing = np.asarray(facing) / np.linalg.norm(facing)
        ostium = root + root_radius * facing
        control = ostium + 0.3 * np.linalg.norm(target - ostium) * facing
        k = np.linspace(0.0, 1.0, n)[:, None]
        points = (1 - k) ** 2 * ostium + 2 * k * (1 - k) * control + k**2 * target  # quadratic Bezier
        return points, k * target_normal

    # Left tree: LM to the bifurcation on the anterior base, then LAD, LCx and side branches.
    l_av = 0.04 * length
    lad_l = np.linspace(l_av, 0.92 * length, 40)
    anterior, posterior = heart.grooves(lad_l)
    lad_phi = anterior - groove_margin
    lad_points, lad_normals = heart.epicardium(lad_l, lad_phi)
    bifurcation, bif_normal = lad_points[0], lad_normals[0]
    paths["lm"] = from_ostium(bifurcation, bif_normal, _LEFT_OSTIUM)
    paths["lad"] = (lad_points, lad_normals)

    gap = 2 * math.pi - (posterior[0] - anterior[0])  # azimuths of the LV not covered by the RV
    lcx_phi = lad_phi[0] - np.linspace(0.0, p.lcx_reach * gap, 40)
    lcx_l = l_av + np.linspace(0.0, 0.05 * length, 40)  # the AV groove dips slightly posteriorly
    paths["lcx"] = heart.epicardium(lcx_l, lcx_phi)

    start = 12  # the diagonal leaves the LAD a third of the way down, towards the lateral wall
    d1_l = np.linspace(lad_l[start], min(lad_l[start] + 0.45 * length, 0.85 * length), 25)
    paths["d1"] = heart.epicardium(d1_l, lad_phi[start] - np.linspace(0.0, 0.9, 25))
    start = 20
    om_l = np.linspace(lcx_l[start], 0.7 * length, 25)
    paths["om1"] = heart.epicardium(om_l, lcx_phi[start] - np.linspace(0.0, 0.2, 25))

    # Right tree: RCA round the RV base (right AV groove) to the crux, then the PDA.
    rv_c, rv_a = np.asarray(p.rv_centre), np.asarray(heart.rv_outer)
    shrink = math.sqrt(max(1.0 - ((l_av - rv_c[0]) / rv_a[0]) ** 2, 0.0))
    psi = np.linspace(-0.6, math.pi, 200)
    ring = np.stack([np.full_like(psi, l_av), rv_c[1] + rv_a[1] * shrink * np.cos(psi),
                     rv_c[2] + rv_a[2] * shrink * np.sin(psi)], axis=-1)
    ring_normals = np.stack([np.zeros_like(psi), np.cos(psi) / rv_a[1], np.sin(psi) / rv_a[2]], axis=-1)
    ring_normals /= np.linalg.norm(ring_normals, axis=-1, keepdims=True)
    # Follow the ring until it comes within 0.05 of the LV epicardium posteriorly, then join the crux.
    near_lv = (ring[:, 0] / (length + 0.05)) ** 2 + (ring[:, 1] ** 2 + ring[:, 2] ** 2) / (heart.epi[1] + 0.05) ** 2 < 1.0
    crux_index = int(np.argmax(near_lv & (psi > 0))) or len(psi)
    keep = np.linspace(0, crux_index - 1, 30).round().astype(int)
    pda_l = np.linspace(l_av, 0.7 * length, 30)
    _, pda_posterior = heart.grooves(pda_l)
    pda_points, pda_normals = heart.epicardium(pda_l, pda_posterior + groove_margin)
    rca_points = np.concatenate([ring[keep], pda_points[:1]])
    rca_normals = np.concatenate([ring_normals[keep], pda_normals[:1]])
    proximal = from_ostium(rca_points[0], rca_normals[0], _RIGHT_OSTIUM)
    paths["rca"] = (np.concatenate([proximal[0][:-1], rca_points]), np.concatenate([proximal[1][:-1], rca_normals]))
    paths["pda"] = (pda_points, pda_normals)

    result = {}
    for name, (points, normals) in paths.items():
        first, last = _CALIBRES[name]
        calibre = p.vessel_scale * np.linspace(first, last, len(points))
        result[name] = (heart.to_patient(points), normals @ frame, calibre)
    return result


def coronary_centrelines(params: CoronaryParams, size: int,
                         spacing: tuple[float, float, float] | None = None) -> dict[str, Centreline]:
    """The coronary branches exactly as :func:`render_coronary` draws them.

    Args:
        params: The subject.
        size: Output edge length (voxels).
        spacing: Voxel spacing (mm); ``params.spacing`` if None.

    Returns:
        ``{"lm", "lad", "d1", "lcx", "om1", "rca", "pda": Centreline}`` in voxel indices.
    """
    grid = _Grid(size, spacing or params.spacing, params.centre_mm)
    return {name: Centreline(grid.to_voxels(points), radius / grid.voxel)
            for name, (points, radius) in _centrelines(params, grid).items()}


def _centrelines(params: CoronaryParams, grid: _Grid) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Branch centrelines (FOV units) and render radii for ``grid``."""
    paths = _coronary_paths(_Heart(params))
    floor = MIN_VESSEL_VOXELS * grid.voxel
    result = {}
    for name, (points, normals, calibre) in paths.items():
        radius = np.maximum(calibre, floor * (calibre / _THINNEST) ** _TAPER_KEEP)
        result[name] = (points + normals * radius[:, None], radius)
    return result


# -- rendering --------------------------------------------------------------------------


def render_coronary(params: CoronaryParams, size: int, spacing: tuple[float, float, float] | None = None
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Render one subject: CTCA-like image, label map and affine.

    Args:
        params: From :func:`sample_coronary_params`.
        size: Edge length of the cubic volume (voxels).
        spacing: Voxel spacing (mm) along the array axes; ``params.spacing`` if None.
            The anatomy is drawn isotropically in millimetres scaled to the field of view.

    Returns:
        ``(image, labels, affine)``: image ``(X, Y, Z)`` float32 in HU, labels ``(X, Y, Z)``
        int16 with the indices of :data:`CORONARY_LABELS`, and the 4x4 voxel-to-world
        (RAS, mm) affine, LPS-ordered like CT converted from DICOM.
    """
    grid = _Grid(size, spacing or params.spacing, params.centre_mm)
    heart = _Heart(params)
    shape = (size,) * 3
    labels = np.zeros(shape, dtype=np.int16)
    hu = np.full(shape, -1000.0, dtype=np.float32)
    blood_left, blood_right = params.contrast_hu, params.contrast_hu * params.right_contrast
    pad = params.fat_pad

    def paint(mask: np.ndarray, label: int, value: float) -> None:
        mask = np.broadcast_to(mask, shape)
        labels[mask] = label
        hu[mask] = value

    # Thorax, in patient coordinates.
    x, y, z = grid.axes[0][:, None, None], grid.axes[1][None, :, None], grid.axes[2][None, None, :]
    bx, by = params.body_size
    body_y = -0.25

    def body_ellipse(inset: float) -> np.ndarray:
        return (x / (bx - inset)) ** 2 + ((y - body_y) / (by - inset)) ** 2 <= 1.0

    paint(body_ellipse(0.0), BACKGROUND, params.fat_hu)
    paint(body_ellipse(0.08), BACKGROUND, 40.0)  # chest-wall muscle
    thorax = body_ellipse(0.16)
    paint(thorax, BACKGROUND, params.fat_hu)
    abdomen = thorax & (z < params.diaphragm - 0.5 * ((x - 0.2) ** 2 + (y - body_y) ** 2))
    paint(abdomen, BACKGROUND, 60.0)
    paint(abdomen & (x > -0.15), BACKGROUND, 70.0)  # liver, under the right dome
    spine_y = body_y - by + 0.4

    def spine(grow: float) -> np.ndarray:
        return (x / (0.19 + grow)) ** 2 + ((y - spine_y) / (0.17 + grow)) ** 2 <= 1.0

    paint(spine(0.0), BACKGROUND, 650.0)  # cortical shell round cancellous bone
    paint(spine(-0.03), BACKGROUND, 230.0)

    # Great vessels: distances to tube surfaces, kept up to the fat pad for the mediastinum.
    root = heart.to_patient(np.asarray(params.aortic_root))
    up = np.array([0.12, 0.08, 1.0]) / np.linalg.norm([0.12, 0.08, 1.0])
    rvot = heart.to_patient(np.array([-0.02, params.rv_centre[1] + 0.02, params.rv_centre[2] - 0.6 * params.rv_size[2]]))
    pa_top = rvot + np.array([-0.2, -0.08, 0.42])
    hila = (pa_top + np.array([-0.3, -0.3, 0.1]), pa_top + np.array([0.6, -0.28, 0.06]))  # left, right
    aorta = np.minimum(
        _tube_distance(grid, np.stack([root, root + 0.3 * up, root + 0.3 * up + np.array([0.03, -0.03, 1.5])]),
                       np.full(3, params.aorta_radius), pad),
        _tube_distance(grid, np.stack([root, root]), np.full(2, 1.25 * params.aorta_radius), pad))
    descending = _tube_distance(grid, np.array([[-0.25, spine_y + 0.3, -2.0], [-0.25, spine_y + 0.3, 2.0]]),
                                np.full(2, 0.85 * params.aorta_radius), pad)
    pulmonary = np.minimum(
        _tube_distance(grid, np.stack([rvot, pa_top, hila[0]]), params.pa_radius * np.array([1.0, 1.0, 0.75]), pad),
        _tube_distance(grid, np.stack([pa_top, hila[1]]), params.pa_radius * np.array([0.8, 0.7]), pad))
    paint(descending <= 0, AORTA, blood_left)

    # Chambers, in the heart frame; ``grow`` offsets a surface outwards (for the fat pad).
    l, s, t = grid.local(heart.base, heart.frame)
    rho2 = s**2 + t**2
    length, radius = heart.epi

    def epicardium(grow: float) -> np.ndarray:
        return ((l / (length + grow)) ** 2 + rho2 / (radius + grow) ** 2 <= 1.0) & (l >= -0.3 * params.wall - grow)

    def rv(semi: tuple[float, ...], grow: float = 0.0) -> np.ndarray:
        return _ellipsoid((l, s, t), params.rv_centre, semi, grow) & (l >= params.rv_size[0] - semi[0] - grow)

    def atrium(centre: tuple[float, ...], semi: tuple[float, ...], grow: float = 0.0) -> np.ndarray:
        return _ellipsoid((l, s, t), centre, semi, grow)

    lv_wall = epicardium(0.0)
    paint(atrium(params.la_centre, params.la_size), LA, blood_left)
    paint(atrium(params.ra_centre, params.ra_size), RA, blood_right)
    paint(lv_wall, MYOCARDIUM, params.myocardium_hu)
    paint(((l / params.lv_length) ** 2 + rho2 / params.lv_radius**2 <= 1.0) & (l >= 0.0), LV, blood_left)
    paint(rv(heart.rv_outer) & ~lv_wall, BACKGROUND, params.myocardium_hu)  # RV free wall: the label is the LV's
    paint(rv(params.rv_size) & ~lv_wall, RV, blood_right)
    paint(pulmonary <= 0, PULMONARY_ARTERY, blood_right)
    paint(aorta <= 0, AORTA, blood_left)

    # Lungs fill the thorax outside the mediastinal fat round the heart, vessels and spine.
    mediastinum = (epicardium(pad) | rv(heart.rv_outer, pad) | atrium(params.la_centre, params.la_size, pad)
                   | atrium(params.ra_centre, params.ra_size, pad) | (aorta <= pad) | (descending <= pad)
                   | (pulmonary <= pad) | spine(pad))
    lungs = thorax & ~abdomen & ~mediastinum
    paint(lungs, BACKGROUND, params.lung_hu)
    for end in params.lung_vessels:  # pulmonary arteries fanning out from the hilum on the vessel's side
        hilum = hila[int(end[0] > 0)]
        branch = np.stack([hilum, 0.5 * (hilum + np.asarray(end)) + np.array([0.0, 0.0, 0.1]), end])
        paint(lungs & (_tube_distance(grid, branch, np.array([0.035, 0.022, 0.01]), 0.0) <= 0), BACKGROUND, blood_right)

    # Coronaries last, in a sleeve of epicardial fat that leaves the LV and aorta intact.
    sleeve = max(0.012, 1.2 * grid.voxel)  # covers every voxel touching a coronary
    vessel = np.full(shape, np.inf, dtype=np.float32)
    for points, radius in _centrelines(params, grid).values():
        np.minimum(vessel, _tube_distance(grid, points, radius, sleeve), out=vessel)
    paint((vessel <= sleeve) & ~np.isin(labels, (LV, MYOCARDIUM, AORTA)), BACKGROUND, params.fat_hu)
    paint(vessel <= 0, CORONARY, 0.95 * blood_left)

    image = ndimage.gaussian_filter(hu, _BLUR_VOXELS)
    noise = ndimage.gaussian_filter(np.random.default_rng(params.noise_seed).standard_normal(shape, dtype=np.float32),
                                    _NOISE_GRAIN_VOXELS)
    image += params.noise_hu / float(noise.std()) * noise
    return image, labels, grid.affine


def make_coronary_dataset(out: str | Path, n: int = 10, size: int = 32, seed: int = 0,
                          spacing: tuple[float, float, float] | None = None, progress: bool = False) -> Path:
    """Write ``n`` subjects as an nnU-Net v2 raw dataset.

    Layout: ``imagesTr/coronary_XXX_0000.nii.gz`` (HU, float32), ``labelsTr/coronary_XXX.nii.gz``
    (uint8, :data:`CORONARY_LABELS`) sharing one affine, and ``dataset.json``. Subject
    ``k`` comes from ``np.random.default_rng([seed, k])``, so a seed gives the same
    arrays and any subject can be remade alone.

    Args:
        out: Output folder (created).
        n: Number of subjects, >= 1.
        size: Edge length of the cubic volumes (voxels), >= 16.
        seed: Dataset seed.
        spacing: Voxel spacing (mm) for every subject; each subject's own (0.8-1.2 mm
            per axis) if None.
        progress: Show a progress bar on stderr.

    Returns:
        ``out`` as a ``Path``.

    Raises:
        MedsynthError: ``n`` < 1 or ``size`` < 16.
    """
    from tqdm import tqdm

    from medsynth.data.io import save_image

    if n < 1:
        raise MedsynthError(f"coronary phantom needs at least 1 subject, got {n}")
    if size < 16:
        raise MedsynthError(f"coronary phantom size must be at least 16 voxels, got {size}")
    out = Path(out)
    for k in tqdm(range(n), desc="coronary phantom", disable=not progress):
        image, labels, affine = render_coronary(sample_coronary_params(np.random.default_rng([seed, k])), size, spacing)
        save_image(image[None], out / "imagesTr" / f"coronary_{k:03d}_0000.nii.gz", affine)
        save_image(labels[None].astype(np.uint8), out / "labelsTr" / f"coronary_{k:03d}.nii.gz", affine)
    description = {
        "channel_names": {"0": "CT"},
        "labels": {name: index for index, name in CORONARY_LABELS.items()},
        "numTraining": n,
        "file_ending": ".nii.gz",
        "name": "medsynth-coronary",
    }
    atomic_write_json(out / "dataset.json", description, indent=2)
    return out
