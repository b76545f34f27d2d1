"""The slice prior that latent reconstruction works through, and the code arithmetic it needs.

A :class:`SlicePrior` is a diffusion autoencoder on 2D slices (DiffAE; with ``semantic = False``
a plain DDIM model): a semantic encoder gives z_sem, deterministic DDIM inversion gives the
stochastic code x_T, and a differentiable DDIM decoder renders (z_sem, x_T) back to a slice.
Slices are ``(B, 1, image_size, image_size)`` in [-1, 1]; the reconstruction maps a stack's
intensities there and back (:func:`to_unit`, :func:`from_unit`) and resizes slices in-plane
(:func:`resize_slices`), so the prior never sees world geometry.

Codes between two observed slices are interpolated as DiffAE does: spherical interpolation of
x_T (:func:`medsynth.latent_space.slerp`: x_T is Gaussian noise, whose norm concentrates, so a straight line would
leave the shell the decoder was trained on), linear interpolation of z_sem.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["SlicePrior", "from_unit", "lerp", "resize_slices", "to_unit", "unit_range"]


@runtime_checkable
class SlicePrior(Protocol):
    """A diffusion-autoencoder prior on single-channel slices (what the ``diffae`` recipe's module offers).

    Attributes:
        semantic: whether the prior has a semantic encoder (DiffAE) or not (the DDIM baseline,
            whose ``encode_semantic`` returns ``None``).
        image_size: the square slice size (pixels) the prior works on.
    """

    semantic: bool
    image_size: int

    def encode_semantic(self, x: Tensor) -> Tensor | None:
        """Slices ``(B, 1, H, W)`` in [-1, 1] -> z_sem ``(B, D)``, or ``None`` without a semantic encoder."""
        ...

    def invert(self, x: Tensor, z_sem: Tensor | None, steps: int) -> Tensor:
        """Deterministic DDIM inversion of slices ``(B, 1, H, W)`` to x_T ``(B, 1, H, W)`` in ``steps`` steps."""
        ...

    def decode(self, z_sem: Tensor | None, x_T: Tensor, steps: int) -> Tensor:
        """DDIM decoding (eta = 0) of x_T ``(B, 1, H, W)`` with z_sem ``(B, D)`` -> x0 ``(B, 1, H, W)``; differentiable."""
        ...

    def denoise(self, x: Tensor, z_sem: Tensor | None, timestep: int, noise: Tensor) -> Tensor:
        """One-step denoising: slices ``x`` ``(B, 1, H, W)`` noised to training timestep ``timestep`` with ``noise``
        (``sqrt(abar_t) x + sqrt(1 - abar_t) noise``) -> the prior's estimate of the clean slices ``(B, 1, H, W)``."""
        ...


def lerp(a: Tensor | None, b: Tensor | None, alpha: float) -> Tensor | None:
    """Linear interpolation ``(1 - alpha) a + alpha b`` (``None`` for a prior without z_sem)."""
    if a is None or b is None:
        return None
    return torch.lerp(a, b, alpha)


def unit_range(stack: np.ndarray, percentiles: tuple[float, float] = (0.5, 99.5)) -> tuple[float, float]:
    """The intensities (lo, hi) that map to -1 and 1: the stack's percentiles (hi > lo always)."""
    lo, hi = (float(v) for v in np.percentile(np.asarray(stack, dtype=np.float64), percentiles))
    return lo, (hi if hi > lo else lo + 1.0)


def to_unit(x: Tensor, lo: float, hi: float) -> Tensor:
    """Intensities -> the prior's range: lo -> -1, hi -> 1 (linear, not clipped, so exactly invertible)."""
    return (x - lo) * (2.0 / (hi - lo)) - 1.0


def from_unit(x: Tensor, lo: float, hi: float) -> Tensor:
    """The inverse of :func:`to_unit`: back to the stack's intensity units."""
    return (x + 1.0) * ((hi - lo) / 2.0) + lo


def resize_slices(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear in-plane resize of slices ``(B, C, H, W)`` to ``size`` (identity when equal).

    ``align_corners=True``: the first and last pixel centres stay where they are, so a slice resized
    to the prior's grid and back lies on the stack's own pixel grid (its affine is unchanged);
    anti-aliased when shrinking.
    """
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    shrink = size[0] < x.shape[-2] or size[1] < x.shape[-1]
    return F.interpolate(x, size=size, mode="bilinear", align_corners=True, antialias=shrink)
