"""Deformation-field arithmetic and file io.

Convention (see DESIGN.md, :mod:`medsynth.data.fields`): inside the code a deformation field ``u`` is a channel-first
displacement in **voxel** units, MONAI's DDF: :class:`monai.networks.blocks.Warp` samples
the moving image at ``x + u(x)``, so ``warp_image(moving, u)(x) = moving(x + u(x))``
("pull" or backward field). On disk a field is a NIfTI vector image ``(X, Y, Z, 1, 3)``
in **millimetres** with the image's affine: the world (RAS) vector of a voxel
displacement is ``affine[:3, :3] @ u``. :func:`voxel_to_mm` and :func:`mm_to_voxel` are
the one conversion each way.

Every function takes a batched field ``(B, n, *spatial)`` or an unbatched one
``(n, *spatial)`` (``n`` = number of spatial dims, 2 or 3) and returns the same layout.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
from monai.data import MetaTensor
from monai.losses.deform import spatial_gradient_squared
from monai.networks.blocks import DVF2DDF, Warp

# The unit conversion and field files live in data/ (one place); re-exported here.
from medsynth.data.fields import batched_field, load_field, mm_to_voxel, save_field, unbatch_field, voxel_to_mm

__all__ = [
    "bending_energy",
    "compose",
    "end_point_error",
    "epe_map_mm",
    "folding_share",
    "integrate_velocity",
    "invert",
    "jacobian_determinant",
    "load_field",
    "mm_to_voxel",
    "resample_field",
    "save_field",
    "voxel_to_mm",
    "warp_image",
    "warp_labels",
]


@lru_cache(maxsize=16)
def _warp_layer(mode: str, padding_mode: str, dtype: torch.dtype, device: torch.device) -> Warp:
    # Keyed by dtype and device too: a Warp caches its reference grid by shape only.
    return Warp(mode=mode, padding_mode=padding_mode)


def warp_image(image: torch.Tensor, ddf: torch.Tensor, mode: str = "bilinear", padding_mode: str = "border") -> torch.Tensor:
    """Sample ``image`` at ``x + ddf(x)`` with MONAI's ``Warp``.

    Args:
        image: ``(B, C, *S)`` with a batched ``ddf``, or ``(C, *S)`` with an unbatched one.
        ddf: displacement in voxels, ``(B, n, *S)`` or ``(n, *S)``.
        mode: ``"bilinear"`` (trilinear in 3D), ``"bicubic"`` or ``"nearest"``.
        padding_mode: value outside the image: ``"border"``, ``"zeros"`` or ``"reflection"``.

    Returns:
        The warped image, same shape and dtype as ``image``.
    """
    field, unbatched = batched_field(ddf)
    moving = image[None] if unbatched else image
    warped = _warp_layer(mode, padding_mode, field.dtype, field.device)(moving.to(field.dtype), field)
    return unbatch_field(warped, unbatched).to(image.dtype)


def warp_labels(labels: torch.Tensor, ddf: torch.Tensor) -> torch.Tensor:
    """Warp an integer label map with nearest-neighbour sampling (labels are never blended)."""
    return warp_image(labels, ddf, mode="nearest", padding_mode="border")


def compose(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Field of warping by ``first`` and then by ``second``.

    ``warp_image(warp_image(I, first), second) == warp_image(I, compose(first, second))``:
    ``w(x) = second(x) + first(x + second(x))``. Fields of successive phases are composed
    this way, never added (adding is only right to first order).
    """
    return second + warp_image(first, second)


def invert(ddf: torch.Tensor, iterations: int = 30) -> torch.Tensor:
    """Inverse field by fixed-point iteration ``v <- -u(x + v(x))`` (Chen et al., Med. Phys. 2008).

    Converges where the field is invertible with ``|grad u| < 1``; ``compose(ddf, invert(ddf))``
    is then the identity (zero field) up to interpolation error.
    """
    inverse = -ddf
    for _ in range(iterations):
        inverse = -warp_image(ddf, inverse)
    return inverse


def integrate_velocity(velocity: torch.Tensor, steps: int = 7) -> torch.Tensor:
    """Displacement ``exp(v) - id`` of a stationary velocity field by scaling and squaring (MONAI ``DVF2DDF``).

    Arsigny et al., MICCAI 2006: ``exp(v) = (exp(v / 2^N))^(2^N)``, each squaring a composition.

    Args:
        velocity: velocity in voxels, ``(B, n, *S)`` or ``(n, *S)``.
        steps: number of squarings ``N``.
    """
    field, unbatched = batched_field(velocity)
    return unbatch_field(_integrator(steps, field.dtype, field.device)(field), unbatched)


@lru_cache(maxsize=16)
def _integrator(steps: int, dtype: torch.dtype, device: torch.device) -> DVF2DDF:
    return DVF2DDF(num_steps=steps, mode="bilinear", padding_mode="border")


def jacobian_determinant(ddf: torch.Tensor) -> torch.Tensor:
    """``det(I + grad u)`` at every voxel (central differences, one-sided at the border).

    The determinant of the map ``x -> x + u(x)`` is the same in voxel and world coordinates.

    Returns:
        ``(B, *S)`` or ``(*S)`` for an unbatched field.
    """
    field, unbatched = batched_field(ddf)
    n = field.shape[1]
    rows = [torch.stack(torch.gradient(field[:, i], dim=list(range(1, n + 1))), dim=-1) for i in range(n)]
    j = torch.stack(rows, dim=-2) + torch.eye(n, dtype=field.dtype, device=field.device)
    if n == 3:  # the cofactor expansion written out: 2.5x faster than torch.linalg.det's batched LU at CT size
        det = (j[..., 0, 0] * (j[..., 1, 1] * j[..., 2, 2] - j[..., 1, 2] * j[..., 2, 1])
               - j[..., 0, 1] * (j[..., 1, 0] * j[..., 2, 2] - j[..., 1, 2] * j[..., 2, 0])
               + j[..., 0, 2] * (j[..., 1, 0] * j[..., 2, 1] - j[..., 1, 1] * j[..., 2, 0]))
    else:
        det = torch.linalg.det(j)
    return unbatch_field(det, unbatched)


def folding_share(ddf: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """Share of voxels (within ``mask``, shaped like the field's spatial part) whose Jacobian determinant is <= 0."""
    folded = jacobian_determinant(ddf) <= 0
    if mask is not None:
        folded = folded[mask.expand_as(folded).bool()]
    return float(folded.float().mean()) if folded.numel() else 0.0


def bending_energy(ddf: torch.Tensor, spacing: tuple[float, ...] | np.ndarray | None = None) -> torch.Tensor:
    """Mean bending energy of a displacement field (Rueckert et al., IEEE TMI 1999, eq. 6).

    ``sum_ij (d^2 u / dx_i dx_j)^2`` averaged over voxels and components, with MONAI's
    compact second-difference stencils. MONAI's ``BendingEnergyLoss`` assumes unit
    isotropic spacing; with ``spacing`` the field is taken in mm and derivatives per mm.

    Args:
        ddf: displacement in voxels, ``(B, n, *S)`` or ``(n, *S)``; every spatial size > 2.
        spacing: voxel spacing in mm along each axis; ``None`` for voxel units (equal to
            ``monai.losses.BendingEnergyLoss()``).

    Returns:
        Scalar tensor (mm^-2 with ``spacing``, voxel^-2 without), differentiable.
    """
    field, _ = batched_field(ddf)
    n = field.shape[1]
    h = torch.ones(n, dtype=field.dtype, device=field.device) if spacing is None else torch.as_tensor(np.asarray(spacing, dtype=np.float64)).to(field)
    field = field * h.reshape(1, n, *([1] * n))  # displacement in mm
    energy = torch.zeros((), dtype=field.dtype, device=field.device)
    for i in range(n):
        for j in range(i, n):
            d2 = spatial_gradient_squared(field, i + 2, j + 2) / (h[i] * h[j])
            energy = energy + (1.0 if i == j else 2.0) * (d2**2).mean()
    return energy


def epe_map_mm(u: torch.Tensor, v: torch.Tensor, affine: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Per-voxel end-point error ``|A (u - v)|`` in mm (``A`` = the affine's linear part); differentiable.

    Args:
        u, v: voxel fields ``(B, n, *S)`` or ``(n, *S)`` (broadcastable to each other).
        affine: ``(4, 4)``, or ``(B, 4, 4)`` with one affine per field.

    Returns:
        ``(B, *S)`` (``(*S)`` for unbatched input) in mm.
    """
    difference = torch.as_tensor(u) - torch.as_tensor(v)
    field, unbatched = batched_field(difference if difference.is_floating_point() else difference.float())
    return unbatch_field(torch.linalg.vector_norm(voxel_to_mm(field, affine), dim=1), unbatched)


def end_point_error(ddf: torch.Tensor, reference: torch.Tensor, affine: np.ndarray | torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """Mean Euclidean distance in mm between two voxel fields (within ``mask``, shaped like the spatial part)."""
    error = epe_map_mm(ddf, reference, affine)  # (B, *S) or (*S) mm
    if mask is not None:
        error = error[mask.to(error.device).expand_as(error).bool()]
    return float(error.mean())


def resample_field(ddf: torch.Tensor, affine: np.ndarray | torch.Tensor, shape: tuple[int, ...] | list[int],
                   target_affine: np.ndarray | torch.Tensor) -> torch.Tensor:
    """A voxel field moved onto another grid of the same world: the map ``p -> p + d(p)`` is kept.

    The world (mm) vectors are resampled trilinearly at the target grid's voxel centres (MONAI
    ``SpatialResample``, border padding) and expressed in the target's voxels.

    Args:
        ddf: ``(3, *S)`` (or ``(B, 3, *S)``) displacement in voxels of the grid with ``affine``.
        affine: its 4x4 voxel-to-world affine.
        shape: the target grid's spatial shape.
        target_affine: the target grid's 4x4 affine.

    Returns:
        ``(3, *shape)`` (or ``(B, 3, *shape)``) in voxels of the target grid.
    """
    from monai.transforms import SpatialResample

    field, unbatched = batched_field(torch.as_tensor(ddf))
    source, target = (torch.as_tensor(np.asarray(torch.as_tensor(a).detach().cpu(), dtype=np.float64)) for a in (affine, target_affine))
    if tuple(field.shape[2:]) == tuple(shape) and torch.allclose(source, target, atol=1e-6):
        return unbatch_field(field, unbatched)
    resample = SpatialResample(mode="bilinear", padding_mode="border", dtype=torch.float64)
    moved = [resample(MetaTensor(voxel_to_mm(item.double(), source), affine=source), dst_affine=target, spatial_size=tuple(shape)).as_tensor()
             for item in field]
    return unbatch_field(mm_to_voxel(torch.stack(moved), target).to(field.dtype), unbatched)
