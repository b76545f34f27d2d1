"""A tiny sparse-slice case with exact measurements and an exactly invertible slice prior (shared by tests/inverse)."""

from __future__ import annotations

import numpy as np
import torch

from medsynth.inverse import Plane, PlaneOperator, SliceStackOperator, fine_stack_affine
from medsynth.inverse.latent import LaxView, Measurements
from oblique_geometry import oblique_affine

N, SLICES, FACTOR, PIXEL, SPACING = 8, 3, 2, 2.0, 6.0  # in-plane pixels, observed slices, refinement, mm, mm
FINE = (SLICES - 1) * FACTOR + 1  # fine slices


def truth_volume() -> torch.Tensor:
    """A smooth fine volume (1, 1, N, N, FINE) in [-1, 1], float64, with detail along every axis."""
    i, j, n = np.meshgrid(np.arange(N), np.arange(N), np.arange(FINE), indexing="ij")
    volume = 0.5 * np.sin(i / 2.0) * np.cos(j / 3.0) + 0.3 * np.cos(n / 1.5) + 0.1 * (i - j) / N
    return torch.from_numpy(volume)[None, None]


def measurements(truth: torch.Tensor, standardise: bool = False) -> tuple[Measurements, np.ndarray]:
    """The SAX stack (thick slices of ``truth``) and one LAX view (the plane through the stack's centre along its normal,
    sampled from ``truth``): exact measurements of ``truth``. Returns them and the fine affine."""
    affine = oblique_affine((PIXEL, PIXEL, SPACING))
    fine_affine = fine_stack_affine(affine, FACTOR)
    sax_operator = SliceStackOperator(fine_affine, (N, N, FINE), affine, (N, N, SLICES))
    u, v = affine[:3, 2] / SPACING, affine[:3, 0] / PIXEL  # the stack's normal and first in-plane axis
    lax_affine = np.eye(4)
    lax_affine[:3, 0], lax_affine[:3, 1], lax_affine[:3, 2] = u * 1.5, v * 1.5, np.cross(u, v) * 2.0
    lax_affine[:3, 3] = affine[:3, 3] + 3.5 * affine[:3, 1]  # half way across the second in-plane axis
    operator = PlaneOperator(fine_affine, (N, N, FINE), Plane.from_affine(lax_affine, (10, 10, 1)))
    mask = operator.mask()
    seen = operator(truth)[0, 0][mask]
    image = (seen - seen.mean()) / seen.std(unbiased=False) if standardise else seen
    data = Measurements(sax_operator, sax_operator(truth), [LaxView(operator, image, mask, standardise)], (N, N))
    return data, fine_affine


class ShiftPrior:
    """decode(z, x_T) = x_T + 0.5 z (z the slice's mean, broadcast), invert its exact inverse; ``denoise`` returns
    ``target`` (N, 1, s, s) when given, else its input: an exact, differentiable stand-in for a DiffAE prior."""

    semantic = True

    def __init__(self, image_size: int = N, target: torch.Tensor | None = None):
        self.image_size, self.target = image_size, target
        self.denoised: list[int] = []  # timesteps denoise was called with

    def encode_semantic(self, x):
        return x.mean(dim=(1, 2, 3))[:, None]

    def invert(self, x, z_sem, steps):
        return x - 0.5 * z_sem[:, :, None, None]

    def decode(self, z_sem, x_t, steps):
        return x_t + 0.5 * z_sem[:, :, None, None]

    def denoise(self, x, z_sem, timestep, noise):
        self.denoised.append(timestep)
        return x.clone() if self.target is None else self.target.to(x)
