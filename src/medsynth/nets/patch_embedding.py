"""Position of a patch in its volume, as input channels of a patch-wise network.

A patch-wise high-resolution model must know where its patch lies (a coronary near the
aortic root looks different from one at the apex). Every voxel gets its normalised
coordinate in the *whole* volume, ``-1`` at the first voxel centre and ``+1`` at the last,
one channel per axis; cropping these maps with the patch gives the patch's position
(its centre is the mean) and keeps it continuous across overlapping patches, so
neighbouring patches agree on the voxels they share.

MONAI's ``PatchEmbeddingBlock`` embeds token positions of a ViT, not a voxel's place in a
volume that is processed patch by patch, hence these few lines.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def coordinate_channels(shape: Sequence[int], dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> Tensor:
    """Normalised voxel coordinates of a whole volume.

    Args:
        shape: spatial shape of the volume ``(X, Y[, Z])``, in voxels.
        dtype: dtype of the result.
        device: device of the result.

    Returns:
        ``(D, *shape)``: channel ``d`` is the coordinate along axis ``d``, linear from -1 (first
        voxel) to +1 (last voxel); an axis of one voxel gets 0.
    """
    axes = [torch.linspace(-1.0, 1.0, n, dtype=dtype, device=device) if n > 1 else torch.zeros(1, dtype=dtype, device=device)
            for n in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"))


def patch_coordinates(volume_shape: Sequence[int], start: Sequence[int], patch_size: Sequence[int],
                      dtype: torch.dtype = torch.float32) -> Tensor:
    """The coordinate channels of one patch: ``coordinate_channels(volume_shape)`` cropped at ``start``.

    Args:
        volume_shape: spatial shape of the whole volume.
        start: the patch's first voxel, per axis.
        patch_size: the patch's size, per axis.

    Returns:
        ``(D, *patch_size)``.
    """
    window = tuple(slice(s, s + p) for s, p in zip(start, patch_size))
    return coordinate_channels(volume_shape, dtype)[(slice(None), *window)]
