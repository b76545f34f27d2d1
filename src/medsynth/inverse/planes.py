"""Imaging planes read from NIfTI affines, and the geometry of a through-plane-refined SAX stack.

A NIfTI affine maps a voxel index (i, j, k) to world (RAS) millimetres: ``world = A[:3, :3] @ idx + A[:3, 3]``.
A single-plane image (a long-axis view, shape (X, Y, 1[, T])) is a :class:`Plane`: an origin (the world
position of pixel (0, 0)), two unit in-plane axes, a pixel size, a pixel count and a slice thickness.
A short-axis stack is one plane per slice (:func:`planes_of_stack`); its slice axis is the array axis
with the largest spacing, the third on ties (:func:`stack_slice_axis`).

The refined stack (:func:`fine_stack_affine`, :func:`fine_stack_shape`) keeps the in-plane grid and
the first slice and divides the slice spacing by ``factor``: acquired slice k is fine slice k * factor.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from medsynth.data.io import spacing_of
from medsynth.errors import MedsynthError

__all__ = ["Plane", "fine_stack_affine", "fine_stack_shape", "pixel_points", "planes_of_stack", "stack_slice_axis"]

Vec3 = tuple[float, float, float]


def _vec(values: np.ndarray | Sequence[float]) -> Vec3:
    x, y, z = (float(v) for v in np.asarray(values, dtype=np.float64).reshape(3))
    return (x, y, z)


@dataclass(frozen=True)
class Plane:
    """An imaging plane in world (RAS) millimetres.

    Attributes:
        origin: world position (mm) of pixel (0, 0), (3,).
        u: unit world direction of the first pixel axis, (3,).
        v: unit world direction of the second pixel axis, (3,).
        pixel_size: (du, dv) mm between pixel centres along u and v.
        size: (nu, nv) pixels.
        thickness: slice thickness (mm) across the plane, along :attr:`normal`.
    """

    origin: Vec3
    u: Vec3
    v: Vec3
    pixel_size: tuple[float, float]
    size: tuple[int, int]
    thickness: float

    @property
    def normal(self) -> np.ndarray:
        """Unit normal u x v, (3,)."""
        n = np.cross(self.u, self.v)
        return n / np.linalg.norm(n)

    @property
    def affine(self) -> np.ndarray:
        """The 4x4 NIfTI affine of this plane as an image of shape (nu, nv, 1): columns u du, v dv, normal thickness."""
        affine = np.eye(4)
        affine[:3, 0] = np.asarray(self.u) * self.pixel_size[0]
        affine[:3, 1] = np.asarray(self.v) * self.pixel_size[1]
        affine[:3, 2] = self.normal * self.thickness
        affine[:3, 3] = self.origin
        return affine

    @classmethod
    def from_affine(cls, affine: np.ndarray, shape: Sequence[int], thickness: float | None = None) -> Plane:
        """The plane of a single-slice image.

        Args:
            affine: the image's 4x4 voxel-to-world affine.
            shape: its array shape (X, Y, Z[, T]); exactly one of the first three axes has size 1
                (the slice axis; the last such axis if several have size 1).
            thickness: slice thickness in mm; default the slice axis' spacing (its affine column's norm).

        Returns:
            The plane: u, v along the two other axes in array order, pixel (0, 0) at voxel (0, 0, 0).
        """
        affine = np.asarray(affine, dtype=np.float64)
        spatial = tuple(int(n) for n in shape[:3])
        if len(spatial) != 3 or 1 not in spatial:
            raise MedsynthError(f"a single-plane image needs one spatial axis of size 1, got shape {tuple(shape)}")
        slice_axis = 2 - spatial[::-1].index(1)
        a, b = (axis for axis in range(3) if axis != slice_axis)
        spacing = spacing_of(affine)
        return cls(
            origin=_vec(affine[:3, 3]),
            u=_vec(affine[:3, a] / spacing[a]),
            v=_vec(affine[:3, b] / spacing[b]),
            pixel_size=(float(spacing[a]), float(spacing[b])),
            size=(spatial[a], spatial[b]),
            thickness=float(spacing[slice_axis] if thickness is None else thickness),
        )


def pixel_points(plane: Plane) -> np.ndarray:
    """World positions (mm) of the plane's pixel centres, (nu, nv, 3), float64."""
    i = np.arange(plane.size[0], dtype=np.float64)[:, None, None]
    j = np.arange(plane.size[1], dtype=np.float64)[None, :, None]
    du, dv = plane.pixel_size
    return np.asarray(plane.origin) + i * du * np.asarray(plane.u) + j * dv * np.asarray(plane.v)


def stack_slice_axis(affine: np.ndarray) -> int:
    """The slice axis of a stack: the array axis with the largest spacing; the third when spacings tie (within 1e-6 mm)."""
    spacing = spacing_of(affine)[:3]
    if spacing[2] >= spacing.max() - 1e-6:
        return 2
    return int(np.argmax(spacing))


def planes_of_stack(affine: np.ndarray, shape: Sequence[int], thickness: float | None = None) -> list[Plane]:
    """One plane per slice of a stack (e.g. short axis).

    Args:
        affine: the stack's 4x4 affine.
        shape: its array shape (X, Y, Z[, T]).
        thickness: slice thickness in mm; default the slice spacing (contiguous slices).

    Returns:
        ``shape[slice_axis]`` planes in slice order (:func:`stack_slice_axis`); u, v follow the two
        other axes in array order, and pixel (i, j) of plane k is the stack's voxel with those indices.
    """
    affine = np.asarray(affine, dtype=np.float64)
    axis = stack_slice_axis(affine)
    one = [int(n) for n in shape[:3]]
    one[axis] = 1
    first = Plane.from_affine(affine, one, thickness)
    step = affine[:3, axis]
    return [Plane(_vec(np.asarray(first.origin) + k * step), first.u, first.v, first.pixel_size, first.size, first.thickness)
            for k in range(int(shape[axis]))]


def fine_stack_affine(affine: np.ndarray, factor: int) -> np.ndarray:
    """Affine of the stack refined ``factor`` times through the plane.

    The first slice stays where the stack's first slice is, the slice spacing is divided by
    ``factor`` (the slice axis' column scaled by 1 / factor), the in-plane axes are unchanged: acquired
    slice k lies exactly on fine slice k * factor.
    """
    if int(factor) != factor or factor < 1:
        raise ValueError(f"factor must be an integer >= 1, got {factor}")
    fine = np.array(affine, dtype=np.float64)
    axis = stack_slice_axis(fine)
    fine[:3, axis] /= factor
    return fine


def fine_stack_shape(affine: np.ndarray, shape: Sequence[int], factor: int) -> tuple[int, ...]:
    """Array shape of the refined stack: (n - 1) * factor + 1 slices along the slice axis, other axes kept."""
    out = [int(n) for n in shape]
    axis = stack_slice_axis(affine)
    out[axis] = (out[axis] - 1) * int(factor) + 1
    return tuple(out)
