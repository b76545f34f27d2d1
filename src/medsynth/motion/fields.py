"""Deformation-field arithmetic and file io.

Convention (see DESIGN.md): inside the code a deformation field ``u`` is a channel-first
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
from pathlib import Path

import numpy as np
import torch
from monai.data import MetaTensor
from monai.losses.deform import spatial_gradient_squared
from monai.networks.blocks import DVF2DDF, Warp

from medsynth.data.io import load_image, save_image
from medsynth.errors import BadInputError

__all__ = [
    "bending_energy",
    "compose",
    "end_point_error",
    "folding_share",
    "integrate_velocity",
    "invert",
    "jacobian_determinant",
    "load_field",
    "mm_to_voxel",
    "save_field",
    "voxel_to_mm",
    "warp_image",
    "warp_labels",
]


def _batched(field: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """``(B, n, *S)`` view of a field and whether the input was unbatched ``(n, *S)``."""
    if field.ndim >= 3 and field.shape[1] == field.ndim - 2 and field.shape[1] in (2, 3):
        return field, False
    if field.ndim >= 2 and field.shape[0] == field.ndim - 1 and field.shape[0] in (2, 3):
        return field[None], True
    raise ValueError(f"expected a displacement field (B, n, *spatial) or (n, *spatial) with n = 2 or 3 spatial dims, got shape {tuple(field.shape)}")


def _unbatch(field: torch.Tensor, unbatched: bool) -> torch.Tensor:
    return field[0] if unbatched else field


def _linear_part(affine: np.ndarray | torch.Tensor, n: int, like: torch.Tensor) -> torch.Tensor:
    matrix = torch.as_tensor(np.asarray(torch.as_tensor(affine).detach().cpu(), dtype=np.float64)[:n, :n])
    return matrix.to(device=like.device, dtype=like.dtype if like.is_floating_point() else torch.float32)


def voxel_to_mm(ddf: torch.Tensor, affine: np.ndarray | torch.Tensor) -> torch.Tensor:
    """World (RAS, mm) vectors of voxel displacements: ``affine[:n, :n] @ u``.

    Args:
        ddf: displacement in voxels, ``(B, n, *S)`` or ``(n, *S)``.
        affine: the image's 4x4 voxel-to-world affine (its linear part carries spacing,
            direction and any obliquity).

    Returns:
        The displacement in mm, same shape.
    """
    field, unbatched = _batched(torch.as_tensor(ddf))
    matrix = _linear_part(affine, field.shape[1], field)
    return _unbatch(torch.einsum("ij,bj...->bi...", matrix, field), unbatched)


def mm_to_voxel(ddf_mm: torch.Tensor, affine: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Voxel displacements of world (RAS, mm) vectors: ``inv(affine[:n, :n]) @ u_mm``; inverse of :func:`voxel_to_mm`."""
    field, unbatched = _batched(torch.as_tensor(ddf_mm))
    matrix = torch.linalg.inv(_linear_part(affine, field.shape[1], field))
    return _unbatch(torch.einsum("ij,bj...->bi...", matrix, field), unbatched)


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
    field, unbatched = _batched(ddf)
    moving = image[None] if unbatched else image
    warped = _warp_layer(mode, padding_mode, field.dtype, field.device)(moving.to(field.dtype), field)
    return _unbatch(warped, unbatched).to(image.dtype)


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
    field, unbatched = _batched(velocity)
    return _unbatch(_integrator(steps, field.dtype, field.device)(field), unbatched)


@lru_cache(maxsize=16)
def _integrator(steps: int, dtype: torch.dtype, device: torch.device) -> DVF2DDF:
    return DVF2DDF(num_steps=steps, mode="bilinear", padding_mode="border")


def jacobian_determinant(ddf: torch.Tensor) -> torch.Tensor:
    """``det(I + grad u)`` at every voxel (central differences, one-sided at the border).

    The determinant of the map ``x -> x + u(x)`` is the same in voxel and world coordinates.

    Returns:
        ``(B, *S)`` or ``(*S)`` for an unbatched field.
    """
    field, unbatched = _batched(ddf)
    n = field.shape[1]
    rows = [torch.stack(torch.gradient(field[:, i], dim=list(range(1, n + 1))), dim=-1) for i in range(n)]
    jacobian = torch.stack(rows, dim=-2) + torch.eye(n, dtype=field.dtype, device=field.device)
    return _unbatch(torch.linalg.det(jacobian), unbatched)


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
    field, _ = _batched(ddf)
    n = field.shape[1]
    h = torch.ones(n, dtype=field.dtype, device=field.device) if spacing is None else torch.as_tensor(np.asarray(spacing, dtype=np.float64)).to(field)
    field = field * h.reshape(1, n, *([1] * n))  # displacement in mm
    energy = torch.zeros((), dtype=field.dtype, device=field.device)
    for i in range(n):
        for j in range(i, n):
            d2 = spatial_gradient_squared(field, i + 2, j + 2) / (h[i] * h[j])
            energy = energy + (1.0 if i == j else 2.0) * (d2**2).mean()
    return energy


def end_point_error(ddf: torch.Tensor, reference: torch.Tensor, affine: np.ndarray | torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """Mean Euclidean distance in mm between two voxel fields (within ``mask``, shaped like the spatial part)."""
    difference, _ = _batched(torch.as_tensor(ddf) - torch.as_tensor(reference))
    error = torch.linalg.vector_norm(voxel_to_mm(difference, affine), dim=1)  # (B, *S) mm
    if mask is not None:
        error = error[mask.to(error.device).expand_as(error).bool()]
    return float(error.mean())


def save_field(ddf: torch.Tensor | np.ndarray, path: str | Path, affine: np.ndarray | torch.Tensor) -> Path:
    """Write a voxel field as a NIfTI vector image in mm with the image's affine.

    Args:
        ddf: displacement in voxels, ``(n, *S)`` (a batch of one is accepted).
        path: ``.nii.gz`` / ``.nii`` file; nibabel reads it back as ``(X, Y, Z, 1, n)``
            with intent ``vector``.
        affine: the 4x4 affine of the image the field lives on.
    """
    field = torch.as_tensor(ddf)
    if field.ndim >= 3 and field.shape[1] == field.ndim - 2 and field.shape[0] == 1:
        field = field[0]
    return save_image(voxel_to_mm(field.float(), affine).float(), path, affine=affine)


def load_field(path: str | Path) -> MetaTensor:
    """Read a mm vector NIfTI (or any image :func:`~medsynth.data.io.load_image` reads) as a voxel field.

    Returns:
        ``MetaTensor`` ``(n, *S)`` in voxels with the file's affine.

    Raises:
        BadInputError: unreadable file, NaN/Inf values, or a component count that is not
            the number of spatial dimensions.
    """
    field = load_image(path)
    spatial = field.ndim - 1
    if field.shape[0] != spatial:
        raise BadInputError(path, f"a displacement field needs {spatial} components (one per spatial dimension), this file has {field.shape[0]}")
    voxels = mm_to_voxel(field.as_tensor(), field.affine)
    return MetaTensor(voxels.float(), affine=field.affine, meta=field.meta)
