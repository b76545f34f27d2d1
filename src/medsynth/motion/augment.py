"""Spatial augmentation of (frame, field) pairs that keeps the field true to the frames.

A random shift ``t`` (voxels) and per-axis zoom ``z`` resample every image of a pair with the
same map ``A(y) = c + (y - c) / z + t`` (``c`` the grid centre). If ``F(x) = G(x + u(x))``, then
``F' = F o A`` and ``G' = G o A`` satisfy ``F'(y) = G'(y + u'(y))`` with

    ``u'(y) = z * u(A(y))``

(the field resampled with the images and each vector component scaled by its axis' zoom), and
the voxel-to-world affine becomes ``affine @ A`` so that mm vectors stay the same physical
displacement. MONAI's random affine transforms resample fields as images without touching their
vectors, hence this one function.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor


def shift_zoom_matrix(shape: Sequence[int], shift: Sequence[float], zoom: Sequence[float]) -> Tensor:
    """The 4x4 voxel map ``A`` (output voxel -> input voxel) of a shift and zoom, float64."""
    centre = (torch.as_tensor(list(shape), dtype=torch.float64) - 1) / 2
    z, t = torch.as_tensor(list(zoom), dtype=torch.float64), torch.as_tensor(list(shift), dtype=torch.float64)
    matrix = torch.eye(4, dtype=torch.float64)
    matrix[:3, :3] = torch.diag(1 / z)
    matrix[:3, 3] = centre - centre / z + t
    return matrix


def _resample(volume: Tensor, matrix: Tensor) -> Tensor:
    """``volume`` ``(C, X, Y, Z)`` sampled at ``A(y)`` (trilinear, border values)."""
    shape = torch.as_tensor(volume.shape[1:], dtype=torch.float64)
    # align_corners=True: normalised n = 2 y / (N - 1) - 1; grid_sample's last grid axis indexes the last array axis.
    scale = 2 / (shape - 1)
    linear = matrix[:3, :3] * scale[:, None] / scale[None, :]
    offset = scale * matrix[:3, 3] + linear.sum(1) - 1
    theta = torch.cat([linear.flip(0, 1), offset.flip(0)[:, None]], 1)[None].to(volume.dtype)
    grid = F.affine_grid(theta, [1, volume.shape[0], *volume.shape[1:]], align_corners=True)
    return F.grid_sample(volume[None], grid, mode="bilinear", padding_mode="border", align_corners=True)[0]


def shift_zoom_pair(images: Sequence[Tensor], flow: Tensor, affine: Tensor, shift: Sequence[float],
                    zoom: Sequence[float]) -> tuple[list[Tensor], Tensor, Tensor]:
    """Shift and zoom images and their field consistently (see the module doc).

    Args:
        images: volumes ``(C, X, Y, Z)`` on one grid (e.g. the fixed and the moving frame).
        flow: displacement in voxels ``(3, X, Y, Z)``, pull convention on that grid.
        affine: 4x4 voxel-to-world affine of the grid.
        shift: ``t`` in voxels per axis (content moves by ``-t``).
        zoom: ``z`` per axis (> 1 magnifies).

    Returns:
        The resampled images, the field ``z * u(A(y))`` in voxels and the affine ``affine @ A``.
    """
    matrix = shift_zoom_matrix(flow.shape[1:], shift, zoom)
    zooms = torch.as_tensor(list(zoom), dtype=flow.dtype).view(3, 1, 1, 1)
    new_affine = torch.as_tensor(affine, dtype=torch.float64) @ matrix
    return [_resample(image, matrix) for image in images], _resample(flow, matrix) * zooms, new_affine


def augment_pair(sample: dict[str, Any], shift: float, zoom: float, noise_std: float = 0.0) -> dict[str, Any]:
    """A random shift in [-shift, shift] voxels and zoom in [1 - zoom, 1 + zoom] per axis of a prepared flow-pair item.

    ``image`` (and ``moving``, when present), ``flow`` and ``affine`` are transformed together with
    :func:`shift_zoom_pair`; Gaussian noise of ``noise_std`` is added to the frames (clipped to [0, 1]).
    A ``label`` is dropped (not resampled). Draws from torch's global RNG (restored on resume).
    """
    shifts = ((torch.rand(3) * 2 - 1) * shift).tolist()
    zooms = (1 + (torch.rand(3) * 2 - 1) * zoom).tolist()
    keys = [key for key in ("image", "moving") if key in sample]
    images, flow, affine = shift_zoom_pair([sample[key] for key in keys], sample["flow"], sample["affine"], shifts, zooms)
    out = {key: value for key, value in sample.items() if key != "label"}
    for key, image in zip(keys, images):
        out[key] = (image + noise_std * torch.randn(image.shape)).clamp(0, 1) if noise_std > 0 else image
    return {**out, "flow": flow, "affine": affine}
