"""Procedural TEM-like cross-sections of motile cilia (axonemes) in five classes.

A cross-section is drawn in *axoneme units* (ciliary membrane radius = 1, y up, seen
from base to tip so dynein arms point clockwise): the membrane, 9 peripheral doublets
(A-tubule, B-tubule, outer and inner dynein arm, radial spoke) and the central pair
(two singlets with projections and a sheath). A pose (rotation, scale, ellipticity,
shift) maps it onto the frame, where it is rendered as a density map at 2-4x
supersampling, block-averaged, then turned into dark-on-light TEM contrast over a
smooth cytoplasm-like background, blurred and made noisy.

As in torchio, randomness lives only in :func:`sample_cilium_params`; the render
:func:`render_cilium` is a deterministic function of the parameters and the size, so
a test can change one field (e.g. drop the outer arms) and keep all the nuisance.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from medsynth.errors import MedsynthError
from medsynth.runs import atomic_write_json

CILIA_CLASSES = ("normal", "disarranged", "oda_defect", "ida_defect", "cp_defect")

# Geometry in axoneme units. Microtubules and arms are drawn larger than to scale so
# that the arms stay blobs of a few pixels at 64 px, where the classes must be told apart.
RING_RADIUS = 0.72  # centre of the peripheral doublets
A_RADIUS = 0.088  # A-tubule (complete) and B-tubule (partial) radii
B_RADIUS = 0.082
WALL = 0.03  # microtubule wall thickness
A_OFFSET = (-0.02, 0.06)  # (radial, clockwise) offsets from the doublet centre
B_OFFSET = (0.03, -0.07)
SPOKE_HEAD_RADIUS = 0.38  # distance of the spoke heads from the axoneme centre
CP_HALF_SPACING = 0.115  # central-pair singlets sit at +-this along the CP axis
CP_RADIUS = 0.085
SHEATH_RADIUS = 0.245
MEMBRANE_LEAFLET = 0.022  # the membrane is a trilaminar ring: two dense leaflets
MEMBRANE_GAP = 0.02

# Densities (0 = background, 1 = darkest structure).
D_WALL, D_A_LUMEN, D_B_LUMEN = 1.0, 0.45, 0.22
D_ODA, D_IDA = 0.95, 0.9
D_SPOKE, D_SPOKE_HEAD = 0.55, 0.75
D_CP_LUMEN, D_PROJECTION, D_SHEATH, D_BRIDGE = 0.3, 0.7, 0.28, 0.6
D_MEMBRANE, D_MEMBRANE_CORE, D_MATRIX = 0.85, 0.35, 0.16


@dataclass(frozen=True)
class Doublet:
    """One microtubule doublet with what it carries.

    Attributes:
        x: Centre x in axoneme units.
        y: Centre y in axoneme units.
        angle: Direction (radians) of the doublet's outward radial axis; the clockwise
            axis (where the arms point) is ``angle - pi/2``.
        oda: Whether the outer dynein arm is present.
        ida: Whether the inner dynein arm is present.
        spoke: Whether the radial spoke (stalk and head) is present.
    """

    x: float
    y: float
    angle: float
    oda: bool = True
    ida: bool = True
    spoke: bool = True


@dataclass(frozen=True)
class CiliumParams:
    """Everything :func:`render_cilium` needs; lengths in axoneme units unless noted.

    Attributes:
        cls: Class name, one of :data:`CILIA_CLASSES`.
        doublets: The doublets (peripheral ones and any translocated to the centre).
        central_pair: ``(x, y, projection length)`` of the central-pair singlets
            present (0-2); C1 has longer projections than C2, a bare singlet none.
        cp_centre: Centre of the central apparatus, where the sheath is drawn.
        rotation: Rotation of the whole section (radians).
        radius: Membrane radius as a fraction of the frame width.
        ellipticity: Stretch (>= 1) along ``ellipse_angle``, from an oblique cut.
        ellipse_angle: Direction of the stretch (radians).
        shift: Centre offset ``(x, y)`` as fractions of the frame width.
        background: Mean background grey level in [0, 1].
        texture: Amplitude of the smooth background texture (grey levels).
        contrast: Fraction of the local grey level that density 1 removes.
        blur: Gaussian blur sigma as a fraction of the frame width.
        noise: Standard deviation of the additive noise (grey levels).
        texture_seed: Seed of the background texture.
        noise_seed: Seed of the noise.
    """

    cls: str
    doublets: tuple[Doublet, ...]
    central_pair: tuple[tuple[float, float, float], ...]
    cp_centre: tuple[float, float]
    rotation: float
    radius: float
    ellipticity: float
    ellipse_angle: float
    shift: tuple[float, float]
    background: float
    texture: float
    contrast: float
    blur: float
    noise: float
    texture_seed: int
    noise_seed: int


def _ring_doublet(angle: float, radius: float = RING_RADIUS, tilt: float = 0.0, **parts: bool) -> Doublet:
    """A doublet at polar position (``angle``, ``radius``), facing outward (+ ``tilt``)."""
    return Doublet(float(radius * math.cos(angle)), float(radius * math.sin(angle)), float(angle + tilt),
                   **{k: bool(v) for k, v in parts.items()})


def sample_cilium_params(cls: str, rng: np.random.Generator, size: int) -> CiliumParams:
    """Draw the random parameters of one cross-section of class ``cls``.

    The pose and appearance are drawn first and the same way for every class, so one
    seed gives the same nuisance in all classes; for the ordered classes (all but
    ``disarranged``) it gives the same doublet layout too.

    Args:
        cls: One of :data:`CILIA_CLASSES`.
        rng: Source of all randomness.
        size: Output size in pixels the image is made for; keeps the blur at least
            a third of a pixel there.

    Returns:
        The parameters; :func:`render_cilium` turns them into an image.

    Raises:
        ValueError: ``cls`` is not a cilia class.
    """
    if cls not in CILIA_CLASSES:
        raise ValueError(f"unknown cilia class '{cls}' (valid: {', '.join(CILIA_CLASSES)})")
    ellipticity = float(rng.uniform(1.0, 1.15))
    nuisance = dict(
        rotation=float(rng.uniform(0, 2 * math.pi)),
        radius=float(min(rng.uniform(0.37, 0.42), 0.445 / ellipticity)),  # axoneme fills 75-85% of the width
        ellipticity=ellipticity,
        ellipse_angle=float(rng.uniform(0, math.pi)),
        shift=(float(rng.uniform(-0.03, 0.03)), float(rng.uniform(-0.03, 0.03))),
        background=float(rng.uniform(0.74, 0.88)),
        texture=float(rng.uniform(0.02, 0.06)),
        contrast=float(rng.uniform(0.7, 0.85)),
        blur=float(max(rng.uniform(0.003, 0.008), 1 / (3 * size))),
        noise=float(rng.uniform(0.01, 0.045)),
        texture_seed=int(rng.integers(2**62)),
        noise_seed=int(rng.integers(2**62)),
    )

    start = rng.uniform(0, 2 * math.pi)
    angles = start + 2 * math.pi * np.arange(9) / 9
    cp_angle = rng.uniform(0, 2 * math.pi)
    cp_centre = (0.0, 0.0)
    n_cp = 2
    if cls == "disarranged":
        # Irregular ring: strong angular/radial/orientation jitter, then either 1-3
        # doublets lost or one moved into the centre beside a displaced central pair.
        angles = angles + np.clip(rng.normal(0, 0.2, 9), -0.3, 0.3)
        radii = RING_RADIUS + np.clip(rng.normal(0, 0.08, 9), -0.18, 0.07)
        tilts = rng.normal(0, 0.4, 9)
        doublets = [
            _ring_doublet(a, r, t, oda=rng.random() < 0.8, ida=rng.random() < 0.8, spoke=rng.random() < 0.6)
            for a, r, t in zip(angles, radii, tilts)
        ]
        order = rng.permutation(9)
        if rng.random() < 0.5:
            doublets = [doublets[i] for i in sorted(order[int(rng.integers(1, 4)):])]
        else:
            moved = doublets[order[0]]
            doublets = [doublets[i] for i in sorted(order[1:])]
            side = rng.uniform(0, 2 * math.pi)
            facing = rng.uniform(0, 2 * math.pi)
            doublets.append(_ring_doublet(side, 0.3, facing, oda=moved.oda, ida=moved.ida, spoke=False))
            cp_centre = (float(-0.1 * math.cos(side)), float(-0.1 * math.sin(side)))
            cp_angle = side + math.pi / 2  # the pair lies along the side, clear of the doublet
    else:
        # Ordered classes: small biological variability only.
        angles = angles + rng.normal(0, 0.025, 9)
        radii = RING_RADIUS + rng.normal(0, 0.01, 9)
        oda, ida = cls != "oda_defect", cls != "ida_defect"
        doublets = [_ring_doublet(a, r, rng.normal(0, 0.05), oda=oda, ida=ida) for a, r in zip(angles, radii)]
        if cls == "cp_defect":
            mode = rng.choice(3, p=[0.55, 0.15, 0.3])  # 9+0, 9+1 (one bare singlet), 8+1 transposition
            n_cp = (0, 1, 0)[mode]
            if mode == 2:
                # Transposition: a peripheral doublet takes the place of the central pair
                # and the remaining 8 close the gap.
                angles = start + 2 * math.pi * np.arange(8) / 8 + rng.normal(0, 0.025, 8)
                doublets = [_ring_doublet(a, RING_RADIUS + rng.normal(0, 0.01), rng.normal(0, 0.05)) for a in angles]
                doublets.append(_ring_doublet(0.0, 0.0, rng.uniform(0, 2 * math.pi), oda=False, ida=False, spoke=False))

    axis = CP_HALF_SPACING * np.array([math.cos(cp_angle), math.sin(cp_angle)])
    singlets = [(float(cp_centre[0] + s * axis[0]), float(cp_centre[1] + s * axis[1]), length)
                for s, length in ((1, 0.11), (-1, 0.08))]
    if n_cp == 1:
        singlets = [(cp_centre[0], cp_centre[1], 0.0)]
    return CiliumParams(cls=cls, doublets=tuple(doublets), central_pair=tuple(singlets[:n_cp]), cp_centre=cp_centre,
                        **nuisance)


SDF = Callable[[np.ndarray, np.ndarray], np.ndarray]


def _circle(cx: float, cy: float, r: float) -> SDF:
    return lambda x, y: np.hypot(x - cx, y - cy) - r


def _annulus(cx: float, cy: float, r: float, width: float) -> SDF:
    return lambda x, y: np.abs(np.hypot(x - cx, y - cy) - r) - width / 2


def _capsule(p0: np.ndarray, p1: np.ndarray, width: float) -> SDF:
    """A segment ``p0``-``p1`` thickened to ``width`` with round caps."""
    d = p1 - p0
    length2 = float(d @ d)

    def sdf(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        t = np.clip(((x - p0[0]) * d[0] + (y - p0[1]) * d[1]) / length2, 0.0, 1.0)
        return np.hypot(x - p0[0] - t * d[0], y - p0[1] - t * d[1]) - width / 2

    return sdf


def _minus(a: SDF, b: SDF) -> SDF:
    """Shape ``a`` with shape ``b`` cut away."""
    return lambda x, y: np.maximum(a(x, y), -b(x, y))


class _Canvas:
    """A supersampled density map of the frame, painted in axoneme units.

    ``X``/``Y`` hold the axoneme coordinates of every subpixel (inverse pose), so a
    shape is a signed distance function of them, evaluated only inside its bounding box.
    """

    def __init__(self, params: CiliumParams, n: int):
        c, s = math.cos(params.ellipse_angle), math.sin(params.ellipse_angle)
        stretch = np.array([[c, -s], [s, c]]) @ np.diag([params.ellipticity, 1.0]) @ np.array([[c, s], [-s, c]])
        cr, sr = math.cos(params.rotation), math.sin(params.rotation)
        self.scale = params.radius * n  # subpixels per axoneme unit (before the stretch)
        self.forward = self.scale * stretch @ np.array([[cr, -sr], [sr, cr]])  # axoneme -> subpixel offsets
        self.reach = self.scale * params.ellipticity  # most subpixels one unit can span
        self.centre = (n / 2 + params.shift[0] * n, n / 2 - params.shift[1] * n)  # (col, row)
        self.h = 1.0 / self.scale  # one subpixel in axoneme units: width of the soft edges
        inverse = np.linalg.inv(self.forward)
        cols = (np.arange(n, dtype=np.float32) + 0.5 - self.centre[0])[None, :]
        rows = (self.centre[1] - np.arange(n, dtype=np.float32) - 0.5)[:, None]  # y up
        self.X = (inverse[0, 0] * cols + inverse[0, 1] * rows).astype(np.float32)
        self.Y = (inverse[1, 0] * cols + inverse[1, 1] * rows).astype(np.float32)
        self.D = np.zeros((n, n), np.float32)

    def paint(self, density: float, centre: np.ndarray | tuple[float, float], extent: float, sdf: SDF) -> None:
        """Set density ``density`` where ``sdf < 0`` (max with what is there).

        Args:
            density: Density of the shape.
            centre: A point ``(x, y)`` of the shape, axoneme units.
            extent: Distance from ``centre`` that contains the whole shape.
            sdf: Signed distance function of the shape, axoneme units.
        """
        col, row = self.forward @ np.asarray(centre, dtype=np.float64)
        col, row = self.centre[0] + col, self.centre[1] - row
        half = extent * self.reach + 2
        n = self.D.shape[0]
        r0, r1 = max(int(row - half), 0), min(int(row + half) + 1, n)
        c0, c1 = max(int(col - half), 0), min(int(col + half) + 1, n)
        if r0 >= r1 or c0 >= c1:
            return
        block = (slice(r0, r1), slice(c0, c1))
        mask = np.clip(0.5 - sdf(self.X[block], self.Y[block]) / self.h, 0.0, 1.0)
        np.maximum(self.D[block], density * mask, out=self.D[block])


def _paint_doublet(canvas: _Canvas, d: Doublet) -> None:
    out = np.array([math.cos(d.angle), math.sin(d.angle)])  # outward radial axis
    cw = np.array([out[1], -out[0]])  # clockwise axis, where the arms point
    centre = np.array([d.x, d.y])
    a = centre + A_OFFSET[0] * out + A_OFFSET[1] * cw
    b = centre + B_OFFSET[0] * out + B_OFFSET[1] * cw
    a_lumen = _circle(*a, A_RADIUS - WALL / 2)
    canvas.paint(D_A_LUMEN, a, A_RADIUS, a_lumen)
    canvas.paint(D_WALL, a, A_RADIUS + WALL, _annulus(*a, A_RADIUS, WALL))
    # The B-tubule is a C closing onto the A-tubule wall: its circle outside the A lumen.
    canvas.paint(D_B_LUMEN, b, B_RADIUS, _minus(_circle(*b, B_RADIUS - WALL / 2), _circle(*a, A_RADIUS + WALL / 2)))
    canvas.paint(D_WALL, b, B_RADIUS + WALL, _minus(_annulus(*b, B_RADIUS, WALL), a_lumen))

    def along(base_angle: float, *steps: tuple[float, float]) -> list[np.ndarray]:
        """Points from the A wall at ``base_angle`` (from cw toward out) by (cw, out) steps."""
        p = a + (A_RADIUS + WALL / 4) * (math.cos(base_angle) * cw + math.sin(base_angle) * out)
        points = [p]
        for step_cw, step_out in steps:
            points.append(points[-1] + step_cw * cw + step_out * out)
        return points

    if d.oda:
        # Outer arm: a stem leaving the outer-clockwise side, a thick head hooking inward.
        p = along(0.7, (0.05, 0.035), (0.07, -0.01), (0.01, -0.05))
        _paint_hook(canvas, D_ODA, p, (0.06, 0.09, 0.07))
    if d.ida:
        # Inner arm: shorter, from the inner-clockwise side, its head bent outward.
        p = along(-0.7, (0.045, -0.035), (0.06, 0.005), (0.005, 0.04))
        _paint_hook(canvas, D_IDA, p, (0.06, 0.085, 0.065))
    if d.spoke:
        # Radial spoke: a stalk from the A-tubule toward the centre and a dense head.
        start = a - (A_RADIUS + WALL / 2) * out
        depth = max(float(np.hypot(*start)) - SPOKE_HEAD_RADIUS, 0.12)
        head = start - depth * out
        canvas.paint(D_SPOKE, (start + head) / 2, depth / 2 + 0.03, _capsule(start, head, 0.032))
        canvas.paint(D_SPOKE_HEAD, head, 0.07, _capsule(head - 0.035 * cw, head + 0.035 * cw, 0.05))


def _paint_hook(canvas: _Canvas, density: float, points: list[np.ndarray], widths: tuple[float, ...]) -> None:
    """A dynein arm: a polyline of capsules, one width per segment."""
    for p0, p1, w in zip(points[:-1], points[1:], widths):
        mid = (p0 + p1) / 2
        canvas.paint(density, mid, float(np.hypot(*(p1 - p0))) / 2 + w, _capsule(p0, p1, w))


def _paint_central(canvas: _Canvas, params: CiliumParams) -> None:
    """The central pair: singlets, their bridge and projections, and the sheath."""
    centre = np.array(params.cp_centre)
    pair = [np.array(p[:2]) for p in params.central_pair]
    if len(pair) == 2:  # a lone singlet has lost the sheath and bridge with its partner
        canvas.paint(D_SHEATH, centre, SHEATH_RADIUS + 0.03, _annulus(*centre, SHEATH_RADIUS, 0.035))
        canvas.paint(D_BRIDGE, centre, CP_HALF_SPACING, _capsule(pair[0], pair[1], 0.05))
    for p, (*_, length) in zip(pair, params.central_pair):
        if length > 0:  # projections point away from the partner, on both flanks
            out = (p - centre) / CP_HALF_SPACING
            for turn in (-1.0, 1.0):
                direction = math.cos(0.9) * out + turn * math.sin(0.9) * np.array([-out[1], out[0]])
                p0 = p + CP_RADIUS * direction
                p1 = p0 + length * direction
                canvas.paint(D_PROJECTION, p0, length + 0.03, _capsule(p0, p1, 0.045))
        canvas.paint(D_CP_LUMEN, p, CP_RADIUS, _circle(*p, CP_RADIUS - WALL / 2))
        canvas.paint(D_WALL, p, CP_RADIUS + WALL, _annulus(*p, CP_RADIUS, WALL))


def _background(params: CiliumParams, size: int) -> np.ndarray:
    """Smooth cytoplasm-like grey field, ``(size, size)``, the same at every size."""
    rng = np.random.default_rng(params.texture_seed)
    field = np.zeros((size, size), np.float32)
    for cells, weight in ((6, 1.0), (20, 0.6)):  # coarse mottling plus finer granularity
        noise = ndimage.gaussian_filter(rng.standard_normal((cells, cells)), 1.0, mode="wrap")
        noise /= noise.std() + 1e-8
        field += weight * ndimage.zoom(noise, size / cells, order=3, mode="grid-wrap", grid_mode=True)[:size, :size]
    return params.background + params.texture * field / 1.6


def render_cilium(params: CiliumParams, size: int) -> np.ndarray:
    """Render one cross-section deterministically.

    Args:
        params: Parameters from :func:`sample_cilium_params`.
        size: Output width and height in pixels.

    Returns:
        Grey image, float32 ``(size, size)`` in [0, 1]: dense structures dark.
    """
    factor = int(np.clip(math.ceil(256 / size), 2, 4))  # >= 256 subpixels across
    canvas = _Canvas(params, size * factor)
    membrane_r = 1.0 - MEMBRANE_LEAFLET - MEMBRANE_GAP / 2
    canvas.paint(D_MATRIX, (0, 0), 1.0, _circle(0, 0, membrane_r))
    canvas.paint(D_MEMBRANE_CORE, (0, 0), 1.05, _annulus(0, 0, membrane_r, MEMBRANE_GAP + 2 * MEMBRANE_LEAFLET))
    for leaflet in (-1, 1):
        r = membrane_r + leaflet * (MEMBRANE_GAP + MEMBRANE_LEAFLET) / 2
        canvas.paint(D_MEMBRANE, (0, 0), 1.05, _annulus(0, 0, r, MEMBRANE_LEAFLET))
    for doublet in params.doublets:
        _paint_doublet(canvas, doublet)
    _paint_central(canvas, params)

    density = canvas.D.reshape(size, factor, size, factor).mean(axis=(1, 3))  # anti-aliased
    image = _background(params, size) * (1.0 - params.contrast * density)
    image = ndimage.gaussian_filter(image, params.blur * size, mode="reflect")
    noise = np.random.default_rng(params.noise_seed).standard_normal((size, size)).astype(np.float32)
    grain = 0.004 * size  # film/detector grain: correlated over a fixed fraction of the frame
    if grain >= 0.5:
        noise = ndimage.gaussian_filter(noise, grain, mode="wrap")
        noise /= noise.std() + 1e-8
    return np.clip(image + params.noise * noise, 0.0, 1.0).astype(np.float32)


def make_cilia_dataset(out: str | Path, n_per_class: int, size: int = 64, seed: int = 0,
                       progress: bool = False) -> Path:
    """Write ``n_per_class`` images per class as ``<out>/<class>/<class>_<k>.png``.

    Image ``k`` of class index ``ci`` comes from ``np.random.default_rng([seed, ci, k])``,
    so a seed gives byte-identical files and any image can be remade alone.

    Args:
        out: Output folder (created).
        n_per_class: Images per class, >= 1.
        size: Image width and height in pixels, >= 32.
        seed: Dataset seed.
        progress: Show a progress bar on stderr.

    Returns:
        ``out`` as a ``Path``.

    Raises:
        MedsynthError: ``n_per_class`` < 1 or ``size`` < 32.
    """
    from tqdm import tqdm

    from medsynth.data.io import save_image

    if n_per_class < 1:
        raise MedsynthError(f"cilia phantom needs at least 1 image per class, got {n_per_class}")
    if size < 32:
        raise MedsynthError(f"cilia phantom size must be at least 32 pixels, got {size}")
    out = Path(out)
    # The classes' clinical order (normal first, then the defects), which prepare keeps.
    atomic_write_json(out / "dataset.json", {"name": "phantom-cilia", "classes": list(CILIA_CLASSES)})
    jobs = [(ci, cls, k) for ci, cls in enumerate(CILIA_CLASSES) for k in range(n_per_class)]
    for ci, cls, k in tqdm(jobs, desc="cilia phantom", disable=not progress):
        params = sample_cilium_params(cls, np.random.default_rng([seed, ci, k]), size)
        save_image(render_cilium(params, size)[None], out / cls / f"{cls}_{k}.png")
    return out
