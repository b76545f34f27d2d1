"""Landmarks and target registration error (TRE): how registration is judged on real lungs (DIR-Lab, POPI).

A landmark file lists corresponding points of the fixed and the moving image, one point per
line, in one of two formats:

- an elastix/transformix point set: first line ``point`` (physical coordinates in mm, ITK's
  **LPS** world) or ``index`` (0-based voxel indices of the file's image, continuous values
  allowed), second line the number of points, then ``x y z`` per line;
- a CSV (``.csv``): ``x,y,z`` in mm in **RAS** world (NIfTI's, as nibabel gives it), with an
  optional header line.

The field of a registration maps fixed-space points into the moving image (MONAI's DDF
convention, ``warp_image(moving, u) ~ fixed``): fixed point ``p`` corresponds to moving point
``p + u(p)``. So the TRE of landmark ``i`` is ``|p_i + u(p_i) - q_i|`` (``q_i`` the moving
point, ``u`` in mm interpolated trilinearly at ``p_i``), and ``|q_i - p_i|`` before registering.

``medsynth register FIXED MOVING --landmarks FIXED_PTS MOVING_PTS`` reads a pair;
``register --data`` finds them beside the phases (:func:`landmark_file`).
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from nibabel.affines import apply_affine
from scipy.ndimage import map_coordinates

from medsynth.data.fields import voxel_to_mm
from medsynth.data.io import LPS_TO_RAS, suffix_of
from medsynth.errors import BadInputError

__all__ = ["LANDMARK_SUFFIXES", "PointSet", "TargetError", "landmark_file", "read_pair", "read_points", "registration_error", "target_errors"]

LANDMARK_SUFFIXES = (".pts", ".csv")  # the landmark files `register --data` looks for beside a phase


@dataclass
class PointSet:
    """Points read from one landmark file.

    Attributes:
        path: the file.
        points: ``(N, 3)`` float64: RAS mm (``kind="world"``) or voxel indices of the file's image (``"index"``).
        kind: ``"world"`` or ``"index"``.
    """

    path: Path
    points: np.ndarray
    kind: Literal["world", "index"]

    def world(self, affine: np.ndarray | torch.Tensor) -> np.ndarray:
        """The points in RAS mm ``(N, 3)``; ``affine`` is the 4x4 voxel-to-RAS affine of the file's image (used for ``index``)."""
        if self.kind == "world":
            return self.points
        return apply_affine(np.asarray(affine, dtype=np.float64), self.points)

    def check_inside(self, affine: np.ndarray | torch.Tensor, shape: tuple[int, ...], image: str | Path) -> None:
        """Refuse points outside ``image`` (a half voxel beyond its border voxels' centres): most often a mixed-up convention."""
        index = apply_affine(np.linalg.inv(np.asarray(affine, dtype=np.float64)), self.world(affine))
        outside = np.flatnonzero(((index < -0.5) | (index > np.asarray(shape[-3:]) - 0.5)).any(axis=1))
        if len(outside):
            i = int(outside[0])
            where = ", ".join(f"{v:.1f}" for v in self.world(affine)[i])
            raise BadInputError(self.path, f"{len(outside)} point(s) lie outside {image}, the first is point {i + 1} at ({where}) mm RAS "
                                           "(conventions: 'point' files LPS mm, 'index' files voxels, CSV RAS mm)")


@dataclass
class TargetError:
    """Summary of the distances between corresponding points (mm): mean, sd (over the points, ddof 0), max, count."""

    mean: float
    sd: float
    max: float
    count: int

    @classmethod
    def of(cls, distances: np.ndarray) -> TargetError:
        return cls(float(np.mean(distances)), float(np.std(distances)), float(np.max(distances)), len(distances))

    def __str__(self) -> str:
        return f"{self.mean:.2f} ± {self.sd:.2f} (max {self.max:.2f})"


def _numbers(values: list[str], path: Path, line: int) -> list[float]:
    try:
        numbers = [float(v) for v in values]
    except ValueError:
        raise BadInputError(path, f"line {line}: expected three numbers x y z, got {' '.join(values)!r}") from None
    if len(numbers) != 3:
        raise BadInputError(path, f"line {line}: expected three numbers x y z (3D points), got {len(numbers)}")
    if not all(math.isfinite(v) for v in numbers):
        raise BadInputError(path, f"line {line}: point holds NaN or Inf")
    return numbers


def _read_elastix(path: Path, lines: list[str]) -> PointSet:
    # nibabel and SimpleITK read images, not point sets: the elastix format is read here.
    kind = lines[0].strip().lower()
    if len(lines) < 2 or not lines[1].strip().isdigit():
        raise BadInputError(path, "line 2: expected the number of points after the 'point'/'index' line")
    count = int(lines[1].strip())
    rows = [(n, line.split()) for n, line in enumerate(lines[2:], start=3) if line.strip()]
    if count != len(rows):
        raise BadInputError(path, f"line 2 says {count} point(s), the file lists {len(rows)}")
    points = np.asarray([_numbers(values, path, n) for n, values in rows], dtype=np.float64).reshape(-1, 3)
    if kind == "point":
        return PointSet(path, points * np.diag(LPS_TO_RAS)[:3], "world")  # ITK's physical points are LPS
    return PointSet(path, points, "index")


def _read_csv(path: Path, lines: list[str]) -> PointSet:
    rows = [(n, [v.strip() for v in row]) for n, row in enumerate(csv.reader(lines), start=1) if any(v.strip() for v in row)]
    if rows:
        try:
            [float(v) for v in rows[0][1]]
        except ValueError:
            rows = rows[1:]  # a header line
    points = np.asarray([_numbers(values, path, n) for n, values in rows], dtype=np.float64).reshape(-1, 3)
    return PointSet(path, points, "world")


def read_points(path: str | Path) -> PointSet:
    """Read a landmark file: an elastix point set (first line ``point``: LPS mm, or ``index``: voxels) or a CSV of RAS mm.

    Raises:
        BadInputError: a missing or unreadable file, a count that does not match the points,
            anything but three finite numbers on a point line, no points.
    """
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        raise BadInputError(path, "landmark file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise BadInputError(path, f"cannot read landmark file ({type(exc).__name__})") from None
    first = lines[0].strip().lower() if lines else ""
    if first in ("point", "index"):
        points = _read_elastix(path, lines)
    elif suffix_of(path) == ".csv":
        points = _read_csv(path, lines)
    else:
        raise BadInputError(path, "not a landmark file: expected an elastix point set (first line 'point' or 'index') or a .csv of x,y,z in RAS mm")
    if not len(points.points):
        raise BadInputError(path, "landmark file lists no points")
    return points


def read_pair(fixed: str | Path, moving: str | Path) -> tuple[PointSet, PointSet]:
    """The fixed and moving landmarks, refused unless they list the same number of points (point ``i`` corresponds to point ``i``)."""
    fixed_points, moving_points = read_points(fixed), read_points(moving)
    if len(fixed_points.points) != len(moving_points.points):
        raise BadInputError(moving, f"lists {len(moving_points.points)} point(s), the fixed landmarks {fixed} list {len(fixed_points.points)}: "
                                    "point i of one file must correspond to point i of the other")
    return fixed_points, moving_points


def landmark_file(image: str | Path, phase: int | None = None) -> Path | None:
    """The landmark file beside a phase, or ``None``: ``<stem>.pts`` or ``<stem>.csv`` next to a phase file
    ``<stem>.nii.gz``; ``<stem>_tNN.pts``/``.csv`` next to a 4D file (or series folder) ``<stem>`` for its phase ``NN``.

    Raises:
        BadInputError: both a ``.pts`` and a ``.csv`` for one phase.
    """
    image = Path(image)
    stem = image.name[: len(image.name) - len(suffix_of(image))] if image.is_file() else image.name
    name = stem if phase is None else f"{stem}_t{phase:02d}"
    found = [image.parent / f"{name}{suffix}" for suffix in LANDMARK_SUFFIXES if (image.parent / f"{name}{suffix}").is_file()]
    if len(found) > 1:
        raise BadInputError(found[0], f"two landmark files for one phase ({found[1].name} too): keep one")
    return found[0] if found else None


def displacement_at(ddf: torch.Tensor, affine: np.ndarray | torch.Tensor, points: np.ndarray) -> np.ndarray:
    """A field's displacement in mm ``(N, 3)`` at RAS mm points ``(N, 3)``, interpolated trilinearly.

    Args:
        ddf: ``(3, X, Y, Z)`` displacement in voxels (MONAI DDF) on the grid of ``affine``.
        affine: 4x4 voxel-to-RAS affine of that grid.
        points: ``(N, 3)`` RAS mm; beyond the border the border value is used (as ``warp_image`` pads).
    """
    field_mm = voxel_to_mm(torch.as_tensor(ddf).double(), affine).cpu().numpy()
    index = apply_affine(np.linalg.inv(np.asarray(affine, dtype=np.float64)), points).T
    return np.stack([map_coordinates(component, index, order=1, mode="nearest") for component in field_mm], axis=1)


def target_errors(fixed: np.ndarray, moving: np.ndarray, ddf: torch.Tensor | None = None,
                  affine: np.ndarray | torch.Tensor | None = None) -> np.ndarray:
    """Distances (mm) ``(N,)`` between moving points and where the field takes the fixed points.

    Args:
        fixed, moving: ``(N, 3)`` corresponding points, RAS mm.
        ddf: ``(3, X, Y, Z)`` voxel displacement on the fixed grid (fixed point ``p`` maps to
            ``p + u(p)`` in the moving image); ``None``: the identity (TRE before registering).
        affine: the fixed grid's 4x4 affine (with ``ddf``).
    """
    mapped = fixed if ddf is None else fixed + displacement_at(ddf, affine, fixed)
    return np.linalg.norm(mapped - moving, axis=1)


def registration_error(landmarks: tuple[PointSet, PointSet], ddf: torch.Tensor, fixed_affine: np.ndarray | torch.Tensor,
                       moving_affine: np.ndarray | torch.Tensor | None = None) -> tuple[TargetError, TargetError]:
    """TRE before (``|q - p|``) and after (``|p + u(p) - q|``) a registration, in mm.

    Args:
        landmarks: the fixed and the moving points (:func:`read_pair`).
        ddf: ``(3, X, Y, Z)`` the registration's voxel displacement on the fixed grid.
        fixed_affine: the fixed image's affine (the field's grid; ``index`` fixed points are its voxels).
        moving_affine: the moving file's own affine for ``index`` moving points (default: the fixed one).
    """
    fixed = landmarks[0].world(fixed_affine)
    moving = landmarks[1].world(fixed_affine if moving_affine is None else moving_affine)
    return TargetError.of(target_errors(fixed, moving)), TargetError.of(target_errors(fixed, moving, ddf, fixed_affine))
