"""Resolutions of a cascaded (low-res, then high-res) diffusion model, for volumes and label maps.

The low-res grid is the prepared grid average-pooled by a factor (label maps by majority vote);
the high-res stage's reference is the low-res volume upsampled back (trilinear). Shapes are
``(B, C, X, Y, Z)``; the factor is the same on every axis.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.utils import one_hot as monai_one_hot
from torch import Tensor


def one_hot(labels: Tensor, num_classes: int) -> Tensor:
    """Class indices ``(B, 1, *S)`` to a one-hot map ``(B, num_classes, *S)`` (float32)."""
    return monai_one_hot(labels.long(), num_classes, dtype=torch.float32, dim=1)


def downsample_image(image: Tensor, factor: int) -> Tensor:
    """Average pooling ``(B, C, *S) -> (B, C, *S / factor)``: the low-res volume."""
    return image if factor == 1 else F.avg_pool3d(image, factor)


def downsample_labels(labels: Tensor, num_classes: int, factor: int) -> Tensor:
    """Majority vote in each ``factor^3`` block: class indices ``(B, 1, *S) -> (B, 1, *S / factor)``."""
    return labels if factor == 1 else F.avg_pool3d(one_hot(labels, num_classes), factor).argmax(dim=1, keepdim=True)


def upsample_image(image: Tensor, factor: int) -> Tensor:
    """Trilinear upsampling ``(B, C, *S) -> (B, C, *S * factor)`` (the high stage's reference)."""
    return image if factor == 1 else F.interpolate(image, scale_factor=factor, mode="trilinear", align_corners=False)


def low_res_affine(affine: np.ndarray, factor: int) -> np.ndarray:
    """Affine of the grid average-pooled by ``factor``: voxels ``factor`` times larger, centred on their blocks."""
    scale = np.diag([factor, factor, factor, 1.0])
    scale[:3, 3] = (factor - 1) / 2.0
    return np.asarray(affine, dtype=np.float64) @ scale


def low_res_reference(image: Tensor, factor: int) -> Tensor:
    """The cascade's reference for volumes ``(B, C, *S)`` in [0, 1]: average-pooled by ``factor`` and
    upsampled back (what a low-res stage can say about them), in the model range [-1, 1]."""
    return upsample_image(downsample_image(image, factor), factor) * 2 - 1
