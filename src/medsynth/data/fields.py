"""Deformation fields on disk and the one mm <-> voxel conversion.

Inside the code a field is a channel-first displacement in **voxels** (MONAI's DDF,
``(B, n, *S)`` or ``(n, *S)``); on disk it is a NIfTI vector image in **millimetres** with the
image's affine, whose world (RAS) vector of a voxel displacement ``u`` is ``affine[:n, :n] @ u``.
:func:`voxel_to_mm` / :func:`mm_to_voxel` are the one conversion each way and
:func:`save_field` / :func:`load_field` the one file format; the phantoms, ``prepare``,
registration and the recipes all go through them (:mod:`medsynth.motion.fields` re-exports them).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from monai.data import MetaTensor

from medsynth.data.io import load_image, save_image
from medsynth.errors import BadInputError

__all__ = ["load_field", "mm_to_voxel", "save_field", "voxel_to_mm"]


def batched_field(field: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """``(B, n, *S)`` view of a field and whether the input was unbatched ``(n, *S)``."""
    if field.ndim >= 3 and field.shape[1] == field.ndim - 2 and field.shape[1] in (2, 3):
        return field, False
    if field.ndim >= 2 and field.shape[0] == field.ndim - 1 and field.shape[0] in (2, 3):
        return field[None], True
    raise ValueError(f"expected a displacement field (B, n, *spatial) or (n, *spatial) with n = 2 or 3 spatial dims, got shape {tuple(field.shape)}")


def unbatch_field(field: torch.Tensor, unbatched: bool) -> torch.Tensor:
    return field[0] if unbatched else field


def _linear_part(affine: np.ndarray | torch.Tensor, n: int, like: torch.Tensor) -> torch.Tensor:
    """``affine[:n, :n]`` as ``(n, n)``, or ``(B, n, n)`` for one affine per field of the batch ``like``."""
    matrix = torch.as_tensor(np.asarray(torch.as_tensor(affine).detach().cpu(), dtype=np.float64)[..., :n, :n])
    if matrix.ndim == 3 and len(matrix) != len(like):
        raise ValueError(f"expected one affine or one per field ({len(like)}), got {len(matrix)}")
    return matrix.to(device=like.device, dtype=like.dtype if like.is_floating_point() else torch.float32)


def _apply(matrix: torch.Tensor, field: torch.Tensor) -> torch.Tensor:
    """``matrix @ u`` at every voxel of ``field`` ``(B, n, *S)``, one matrix for all or one per field."""
    return torch.einsum("ij,bj...->bi..." if matrix.ndim == 2 else "bij,bj...->bi...", matrix, field)


def voxel_to_mm(ddf: torch.Tensor, affine: np.ndarray | torch.Tensor) -> torch.Tensor:
    """World (RAS, mm) vectors of voxel displacements: ``affine[:n, :n] @ u``.

    Args:
        ddf: displacement in voxels, ``(B, n, *S)`` or ``(n, *S)``.
        affine: the image's 4x4 voxel-to-world affine (its linear part carries spacing,
            direction and any obliquity), or ``(B, 4, 4)``: one per field of a batch.

    Returns:
        The displacement in mm, same shape.
    """
    field, unbatched = batched_field(torch.as_tensor(ddf))
    return unbatch_field(_apply(_linear_part(affine, field.shape[1], field), field), unbatched)


def mm_to_voxel(ddf_mm: torch.Tensor, affine: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Voxel displacements of world (RAS, mm) vectors: ``inv(affine[:n, :n]) @ u_mm``; inverse of :func:`voxel_to_mm`."""
    field, unbatched = batched_field(torch.as_tensor(ddf_mm))
    return unbatch_field(_apply(torch.linalg.inv(_linear_part(affine, field.shape[1], field)), field), unbatched)


def save_field(ddf: torch.Tensor | np.ndarray, path: str | Path, affine: np.ndarray | torch.Tensor | None = None) -> Path:
    """Write a voxel field as a NIfTI vector image in mm with the image's affine.

    Args:
        ddf: displacement in voxels, ``(n, *S)`` (a batch of one is accepted); a ``MetaTensor`` carries its affine.
        path: ``.nii.gz`` / ``.nii`` file; nibabel reads it back as ``(X, Y, Z, 1, n)``
            with intent ``vector``.
        affine: the 4x4 affine of the image the field lives on (None: the ``MetaTensor``'s own).
    """
    if affine is None:
        if not isinstance(ddf, MetaTensor):
            raise TypeError("save_field: a field without an affine (give affine= or a MetaTensor)")
        affine = ddf.affine
    field = ddf.as_tensor() if isinstance(ddf, MetaTensor) else torch.as_tensor(ddf)
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
    meta = {key: value for key, value in field.meta.items() if key != "affine"}  # the affine is given once
    return MetaTensor(voxels.float(), affine=field.affine, meta=meta)
