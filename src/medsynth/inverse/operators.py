"""Linear, differentiable measurement operators: a 3D volume seen through a plane or a thick-slice stack.

A volume is (B, C, X, Y, Z) with its 4x4 voxel-to-world affine. An operator samples it at world
points: trilinear interpolation (``torch.nn.functional.grid_sample``, ``align_corners=True`` on the voxel
coordinates that the inverse affine gives, so voxel centres are exact), averaged across the slice
thickness along the plane's normal with a slice profile (:func:`slice_profile`):

- ``"box"`` (default): the ideal rectangular profile of width ``thickness``, integrated with the
  trapezoid rule on ``samples`` points from -thickness/2 to +thickness/2. With contiguous slices
  (thickness = spacing) a boundary sample is shared half and half by the two neighbouring slices.
- ``"gaussian"``: a Gaussian of FWHM ``thickness`` (the usual model of a real excitation profile),
  sampled on ``samples`` points from -thickness to +thickness.

Profile samples outside the volume (voxel coordinates beyond [0, n-1]) are dropped and the others'
weights renormalised, so an edge slice averages what the volume has; a pixel with no sample inside
is 0. The weights depend only on geometry, so the operator stays linear; ``adjoint`` is the
vector-Jacobian product of ``forward`` (exact for a linear map, and grid_sample's backward is the
scatter that is its transpose). Written here because MONAI's resamplers map grid to grid
(``SpatialResample``) and have no arbitrary-point sampling with a slice profile or an adjoint.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from nibabel.affines import apply_affine
from torch import Tensor

from medsynth.inverse.planes import Plane, pixel_points, planes_of_stack

__all__ = ["PlaneOperator", "SliceStackOperator", "slice_profile"]

Profile = Literal["box", "gaussian"]
_FWHM_PER_SIGMA = 2.0 * np.sqrt(2.0 * np.log(2.0))
_INSIDE_TOL = 1e-6  # voxels: a sample exactly on the volume's first or last slice counts as inside


def slice_profile(thickness: float, samples: int, kind: Profile = "box") -> tuple[np.ndarray, np.ndarray]:
    """Offsets (mm, along the normal) and weights (sum 1) of a slice profile, each (samples,).

    One sample is the plane itself (offset 0). See the module docstring for the two profiles.
    """
    if samples < 1:
        raise ValueError(f"profile samples must be >= 1, got {samples}")
    if kind not in ("box", "gaussian"):
        raise ValueError(f"slice profile must be 'box' or 'gaussian', got {kind!r}")
    if samples == 1:
        return np.zeros(1), np.ones(1)
    if kind == "box":
        offsets = np.linspace(-thickness / 2, thickness / 2, samples)
        weights = np.ones(samples)
        weights[[0, -1]] = 0.5  # trapezoid rule
    else:
        offsets = np.linspace(-thickness, thickness, samples)
        weights = np.exp(-0.5 * (offsets / (thickness / _FWHM_PER_SIGMA)) ** 2)
    return offsets, weights / weights.sum()


class _PointSampler:
    """Samples a volume at world points ``centres + offset_s * normal`` and averages over s.

    Args:
        volume_affine: 4x4 voxel-to-world affine of the volume.
        volume_shape: (X, Y, Z), every axis >= 2.
        centres: world points (mm), (*out_shape, 3).
        normal: unit world direction of the profile, (3,).
        offsets: profile offsets (mm), (S,).
        weights: profile weights, (S,), sum 1.
    """

    def __init__(self, volume_affine: np.ndarray, volume_shape: Sequence[int], centres: np.ndarray, normal: np.ndarray,
                 offsets: np.ndarray, weights: np.ndarray):
        self.volume_shape = tuple(int(n) for n in volume_shape)
        if len(self.volume_shape) != 3 or min(self.volume_shape) < 2:
            raise ValueError(f"volume shape must be (X, Y, Z) with every axis >= 2, got {tuple(volume_shape)}")
        self.out_shape = tuple(centres.shape[:-1])
        points = centres.reshape(-1, 1, 3) + offsets[None, :, None] * np.asarray(normal)[None, None, :]  # (P, S, 3)
        to_voxel = np.linalg.inv(np.asarray(volume_affine, dtype=np.float64))
        index = apply_affine(to_voxel, points)  # (P, S, 3) voxel coordinates (i, j, k)
        upper = np.asarray(self.volume_shape, dtype=np.float64) - 1
        inside = np.all((index >= -_INSIDE_TOL) & (index <= upper + _INSIDE_TOL), axis=-1)  # (P, S)
        w = weights[None, :] * inside
        total = w.sum(axis=1, keepdims=True)
        self._coverage = total[:, 0]  # (P,) share of the profile inside the volume
        w = np.divide(w, total, out=np.zeros_like(w), where=total > 0)
        # grid_sample's last grid axis is (W, H, D) = (k, j, i) for a (B, C, X, Y, Z) input; [-1, 1] at the end voxels.
        grid = (2 * index / upper - 1)[..., ::-1]
        self._grid = torch.from_numpy(np.ascontiguousarray(grid)[None, :, :, None, :])  # (1, P, S, 1, 3)
        self._weights = torch.from_numpy(w)  # (P, S)
        centre_index = apply_affine(to_voxel, centres.reshape(-1, 3))
        self._centre_inside = np.all((centre_index >= -_INSIDE_TOL) & (centre_index <= upper + _INSIDE_TOL), axis=-1)
        self._cache: dict[tuple[torch.device, torch.dtype], tuple[Tensor, Tensor]] = {}  # the last device/dtype's tables

    def _tables(self, like: Tensor) -> tuple[Tensor, Tensor]:
        key = (like.device, like.dtype)
        if key not in self._cache:
            self._cache = {key: (self._grid.to(like.device, like.dtype), self._weights.to(like.device, like.dtype))}
        return self._cache[key]

    def forward(self, volume: Tensor) -> Tensor:
        """(B, C, X, Y, Z) -> (B, C, *out_shape): the volume seen through the operator, in the volume's dtype."""
        if volume.ndim != 5 or tuple(volume.shape[2:]) != self.volume_shape:
            raise ValueError(f"expected a volume (B, C, {', '.join(map(str, self.volume_shape))}), got {tuple(volume.shape)}")
        # 16-bit volumes are sampled in float32: grid_sample takes the grid in the input's dtype, and
        # bf16 coordinates would be off by up to a voxel on a 128-voxel axis.
        work = volume if volume.dtype in (torch.float32, torch.float64) else volume.float()
        grid, weights = self._tables(work)
        batch, channels = volume.shape[:2]
        sampled = F.grid_sample(work, grid.expand(batch, -1, -1, -1, -1), mode="bilinear", padding_mode="zeros",
                                align_corners=True)[..., 0]  # (B, C, P, S)
        return (sampled * weights).sum(-1).reshape(batch, channels, *self.out_shape).to(volume.dtype)

    __call__ = forward

    def adjoint(self, image: Tensor) -> Tensor:
        """(B, C, *out_shape) -> (B, C, X, Y, Z), the transpose: <A x, y> = <x, A^T y>.

        Differentiable in ``image`` when it requires grad (the graph is kept then).
        """
        if tuple(image.shape[2:]) != self.out_shape:
            raise ValueError(f"expected an image (B, C, {', '.join(map(str, self.out_shape))}), got {tuple(image.shape)}")
        with torch.enable_grad():
            x = torch.zeros((*image.shape[:2], *self.volume_shape), dtype=image.dtype, device=image.device, requires_grad=True)
            (result,) = torch.autograd.grad(self.forward(x), x, grad_outputs=image, create_graph=image.requires_grad)
        return result

    def mask(self) -> Tensor:
        """Pixels whose centre lies inside the volume, bool (*out_shape), on the CPU."""
        return torch.from_numpy(self._centre_inside.reshape(self.out_shape))

    def coverage(self) -> Tensor:
        """Share (0..1) of each pixel's slice profile inside the volume, float64 (*out_shape), on the CPU.

        Where it is 1 the pixel is the full profile average; where it is below 1 the average of the part inside.
        """
        return torch.from_numpy(self._coverage.reshape(self.out_shape))


class PlaneOperator(_PointSampler):
    """A volume sampled on a plane's pixel grid with a slice profile: (B, C, X, Y, Z) -> (B, C, nu, nv).

    Args:
        volume_affine: 4x4 voxel-to-world affine of the volume.
        volume_shape: (X, Y, Z).
        plane: the plane (pixel grid, thickness).
        profile_samples: points averaged along the normal (1: the plane itself, no thickness).
        profile: ``"box"`` or ``"gaussian"`` (module docstring).
    """

    def __init__(self, volume_affine: np.ndarray, volume_shape: Sequence[int], plane: Plane, profile_samples: int = 5,
                 profile: Profile = "box"):
        offsets, weights = slice_profile(plane.thickness, profile_samples, profile)
        super().__init__(volume_affine, volume_shape, pixel_points(plane), plane.normal, offsets, weights)
        self.plane = plane


class SliceStackOperator(_PointSampler):
    """A fine volume seen as a thick-slice stack: (B, C, *fine_shape) -> (B, C, *stack_shape[:3]).

    Each acquired slice is the profile-weighted average of the fine volume across its thickness,
    along the stack's normal (:func:`~medsynth.inverse.planes.planes_of_stack`), in the stack's own
    array layout. On the grid of :func:`~medsynth.inverse.planes.fine_stack_affine` with an even
    ``factor`` and the default box profile, the samples fall exactly on fine slices: acquired slice k
    is the trapezoid average of fine slices k f - f/2 .. k f + f/2.

    Args:
        fine_affine: 4x4 affine of the fine volume.
        fine_shape: (X, Y, Z) of the fine volume.
        stack_affine: 4x4 affine of the acquired stack.
        stack_shape: its shape (X, Y, Z[, T]).
        profile: ``"box"`` or ``"gaussian"``.
        thickness: slice thickness in mm; default the slice spacing.
        profile_samples: points along the normal; default one per fine voxel step along the normal
            across the profile's support.
    """

    def __init__(self, fine_affine: np.ndarray, fine_shape: Sequence[int], stack_affine: np.ndarray,
                 stack_shape: Sequence[int], profile: Profile = "box", *, thickness: float | None = None,
                 profile_samples: int | None = None):
        stack_affine = np.asarray(stack_affine, dtype=np.float64)
        spatial = tuple(int(n) for n in stack_shape[:3])
        first = planes_of_stack(stack_affine, spatial, thickness)[0]
        if profile_samples is None:
            # one fine voxel step along the normal, in mm: the normal's length in voxels is 1 / step
            step = 1.0 / np.abs(np.linalg.inv(np.asarray(fine_affine, dtype=np.float64)[:3, :3]) @ first.normal).max()
            steps = round(first.thickness / step)
            profile_samples = max(1, steps + 1 if profile == "box" else 2 * steps + 1)
        offsets, weights = slice_profile(first.thickness, profile_samples, profile)
        index = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in spatial], indexing="ij"), axis=-1)
        centres = apply_affine(stack_affine, index)  # (X, Y, Z, 3) world mm of the stack's voxels
        super().__init__(fine_affine, fine_shape, centres, first.normal, offsets, weights)
        self.thickness = first.thickness
