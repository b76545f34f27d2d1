"""``diffpir``: diffusion posterior sampling with the slice prior, data consistency at every step (DiffPIR).

The standard recipe for diffusion inverse problems (DiffPIR, Zhu et al. 2023; DDNM, Wang et al. 2023, for the
projection form) alternates the prior's denoising with a data-consistency step along a decreasing noise schedule.
Here, on the fine volume V (1, 1, X, Y, N) in the prior's [-1, 1] units, started from the stack's cubic
through-plane interpolation (a warm start, as DiffPIR's for restoration tasks, since the slices observed fix most
of the volume):

    for t in diffpir_t_start ... 0 (``diffpir_iterations`` timesteps, evenly spaced):
        x0 = D_t(V)                 every slice noised to t with fresh seeded noise and denoised in one step
                                    under its z_sem (DiffPIR with zeta = 1: the noise of the next step is new)
        V  = P(x0)                  the data step: ``diffpir_dc_steps`` sweeps of the projection onto the
                                    measurements, DDNM's range-space correction x + A^+ (y - A x) scaled by
                                    ``diffpir_relax``, for the SAX stack and then each LAX view (:func:`project`)

so the result moves towards the measurements (onto them with ``diffpir_relax = 1`` and the SAX slabs of the box
profile, which do not overlap) and carries the prior's estimate wherever they say nothing: within a slab, away
from the LAX planes.
A LAX view whose intensities could not be matched to the stack's (``standardise``: too few crossings) has no
linear relation to the volume and is left out of the projection. With
``diffpir_prior = false`` the denoiser is skipped (x0 = V): the same schedule of data steps from the same start,
without the prior, which is what the prior's contribution is measured against.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from medsynth.inverse.latent import Measurements, ReconstructionHistory, ReconstructSettings, data_terms
from medsynth.inverse.operators import PlaneOperator, SliceStackOperator
from medsynth.inverse.pnp import denoise_volume
from medsynth.inverse.prior import SlicePrior, resize_slices

__all__ = ["diffpir_timesteps", "project", "sample_posterior"]

Operator = PlaneOperator | SliceStackOperator


def project(volume: Tensor, operator: Operator, observed: Tensor, weight: Tensor | None = None, relax: float = 1.0) -> Tensor:
    """One sweep of the range-space correction ``x + relax A^T D^-1 (y - A x)``, with D the row sums of ``A A^T``.

    For rows that do not overlap (the box-profile SAX slabs) ``A^T D^-1`` is A's pseudo-inverse and one sweep makes
    ``A x = y`` exactly (DDNM's ``A^+``); for overlapping rows (a LAX plane's pixels share voxels) it is the
    simultaneous projection of SART/Cimmino, which converges to a solution over sweeps. ``relax`` < 1 applies that
    share of the correction, as DDNM+ scales it for noisy measurements: measurement noise and the operator's
    mismatch with the acquisition are not forced into the volume. ``weight`` (the operator's output shape, 0 or 1)
    leaves out the pixels without a measurement. Our own: MONAI has no projection onto a linear operator's
    measurements.

    Args:
        volume: (1, 1, X, Y, N); operator: its measurement operator, with ``adjoint``; observed: (1, 1, *out_shape).
    """
    ones = torch.ones_like(observed) if weight is None else weight
    rows = operator(operator.adjoint(ones))  # (A A^T 1): each measurement's squared weight, and its overlaps
    residual = (observed - operator(volume)) * ones / rows.clamp_min(1e-12)
    return volume + relax * operator.adjoint(residual)


def _measurements(data: Measurements) -> list[tuple[Operator, Tensor, Tensor | None]]:
    """(operator, observed image, pixel weight) of the SAX stack and of every LAX view matched to the stack's units."""
    found: list[tuple[Operator, Tensor, Tensor | None]] = [(data.sax_operator, data.sax, None)]
    for view in data.lax:
        if view.standardise:
            continue
        image = torch.zeros(view.mask.shape, dtype=view.image.dtype, device=view.image.device)
        image[view.mask] = view.image
        found.append((view.operator, image[None, None], view.mask.to(image.dtype)[None, None]))
    return found


def diffpir_timesteps(start: int, iterations: int) -> list[int]:
    """The training timesteps of the schedule: ``iterations`` evenly spaced from ``start`` down to 0 (distinct, descending)."""
    if iterations <= 0:
        return []
    return sorted({int(round(t)) for t in np.linspace(start, 0, iterations)}, reverse=True)


def sample_posterior(prior: SlicePrior, start: Tensor, data: Measurements, settings: ReconstructSettings,
                     keep: Callable[[Tensor], None] | None = None,
                     tick: Callable[[], None] | None = None) -> tuple[Tensor, ReconstructionHistory]:
    """Run the schedule (module docstring) from ``start`` (1, 1, X, Y, N) in [-1, 1]; ``keep(volume)`` before every
    timestep and with the result; ``tick()`` after every timestep (a progress bar).

    Returns:
        The volume (1, 1, X, Y, N) in [-1, 1] (no gradient) and the history: per timestep ``total`` (the weighted
        data terms after the data step), ``lax``, ``sax`` and ``prior`` (the mean squared change the denoiser made).
    """
    began = time.perf_counter()
    history = ReconstructionHistory(method="diffpir")
    volume = start.detach().clone()
    generator = torch.Generator().manual_seed(settings.seed)
    measurements = _measurements(data)
    z_sem = None
    if settings.diffpir_prior:
        with torch.no_grad():
            z_sem = prior.encode_semantic(resize_slices(start[0].permute(3, 0, 1, 2), (int(prior.image_size),) * 2))
    for timestep in diffpir_timesteps(settings.diffpir_t_start, settings.diffpir_iterations):
        if keep is not None:
            keep(volume)
        with torch.no_grad():
            x0 = denoise_volume(prior, volume, z_sem, timestep, generator, settings.batch) if settings.diffpir_prior else volume
        with torch.no_grad():
            estimate = x0
            for _ in range(settings.diffpir_dc_steps):
                for operator, observed, weight in measurements:
                    estimate = project(estimate, operator, observed, weight, settings.diffpir_relax)
            terms = data_terms(estimate, data)
            values = {"total": settings.lax_weight * terms["lax"] + settings.sax_weight * terms["sax"], **terms,
                      "prior": torch.mean((x0 - volume) ** 2)}
        for name, value in values.items():
            history.losses.setdefault(name, []).append(float(value))
        history.iterations += 1
        volume = estimate
        if tick is not None:
            tick()
    if keep is not None:
        keep(volume)
    history.seconds = time.perf_counter() - began
    return volume, history
