"""Optimising a fine SAX volume through a slice prior (DiffAE) against SAX and LAX measurements.

Every fine slice n of the refined stack has its own codes (z_sem_n, x_T,n), x_T by DDIM inversion in
``steps`` (the same number that renders them back: a code inverted in N steps decodes to its slice only
in N). Where the codes start (``init``): ``interpolation`` (default) encodes every fine slice of the
stack's cubic through-plane interpolation, so the optimisation starts where the best baseline ends;
``slerp`` (the original) encodes the observed slices only and fills the ``factor - 1`` slices between two
neighbours with slerp(x_T) / lerp(z_sem) (:mod:`.prior`), which decodes to the truth's slices only under a
prior that interpolates well (on a CPU-trained demo prior the start was a -3 dB volume; cubic: 39 dB). Then
the loss (weights in :class:`ReconstructSettings`)

    lax_weight    * mean over LAX views of || A_v V - y_v ||^2 inside the view's mask
    sax_weight    * || S V - y_sax ||^2                       (thick-slice fidelity, SliceStackOperator)
    drift_weight  * (|| x_T - x_T^0 ||^2 + || z - z^0 ||^2)   (stay near the initial codes)
    smooth_weight * || d_n+1 - d_n ||^2                       (neighbouring slices alike)

is minimised, where V is the fine volume and A_v samples it on LAX view v; d_n is x_T,n for ``slerp``
and its change x_T,n - x_T,n^0 for ``interpolation``, whose start codes come from separate inversions
and differ as their slices do. LAX and SAX intensities differ in scale and offset, so they are matched
inside the mask (``lax_intensity``): ``standardise`` (the original) standardises both A_v V and y_v
(mean 0, sd 1) at every iteration, which leaves the volume's contrast along the plane free, and the
smoothness term then shrinks it (measured: a quarter of the true contrast on the test case);
``intersections`` (default) maps y_v once, linearly, so that its mean and sd match the observed SAX
slices where the plane crosses them, and compares absolute intensities. All terms are means over
elements. Adam runs until ``iterations`` or until the total loss changes by less than ``tolerance``
(relative) ``patience`` times in a row (:func:`run_adam`).

Two methods:

- ``latent`` (the original algorithm): the codes are optimised; V renders every slice through ``steps``
  DDIM steps at every iteration, back-propagating through all of them; the decode is checkpointed per
  batch of slices (``torch.utils.checkpoint``) so the stored graph is one batch's, not the whole
  volume's. After each Adam step the codes move the fraction ``pull`` back toward their start.
- ``pnp`` (ours, faster; :mod:`.pnp`): V itself is optimised from the cubic interpolation, the data
  terms' gradient plus the prior's one-step denoising residual (regularisation by denoising), one network
  evaluation per slice per iteration and no back-propagation through the network.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from pydantic import Field, field_validator
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from medsynth.config import StrictModel
from medsynth.inverse.operators import PlaneOperator, SliceStackOperator
from medsynth.inverse.prior import SlicePrior, lerp, resize_slices
from medsynth.latent_space import slerp

__all__ = ["LaxView", "Measurements", "ReconstructSettings", "ReconstructionHistory", "data_terms", "initial_codes", "optimise_codes", "run_adam"]


MAX_LR = 10.0  # Adam's step is about lr per iteration in the prior's [-1, 1] units: above this it only throws the volume away
MAX_ITERATIONS = 100_000
MAX_WEIGHT = 1e6  # loss weights: above this one term drowns every other in float32
SEED_MAX = 2**32 - 1  # NumPy's and torch's seed range, as train.seed


class ReconstructSettings(StrictModel):
    """Settings of ``medsynth reconstruct`` (``--set key=value``); the defaults are the original's losses and weights.

    Every value is bounded (finite, learning rates in (0, 10], iterations <= 100000, weights in [0, 1e6], seed
    0 .. 2**32 - 1), so a typo is refused with the setting's name instead of overflowing inside torch. Which method
    reads which setting: :data:`medsynth.inverse.reconstruct.METHOD_SPECS`.
    """

    steps: int = Field(30, ge=1, le=1000, description="DDIM steps of the inversion to x_T and of every render, gradients flowing through "
                                             "all of them (a code inverted in N steps decodes back only in the same N)")
    init: Literal["interpolation", "slerp"] = Field(
        "interpolation", description="codes of the slices between observed ones: encoded from the stack's cubic "
                                     "interpolation, or slerp(x_T) / lerp(z_sem) of the neighbours' codes (the original)")
    iterations: int = Field(200, ge=0, le=MAX_ITERATIONS, description="`latent`: most Adam iterations (0: the start codes' volume)")
    lr: float = Field(5e-5, gt=0, le=MAX_LR, description="`latent`: Adam learning rate on x_T and z_sem (on the demo's CPU-trained prior "
                                              "the decoder amplifies x_T: 0.02 took the volume from 38 to 6 dB in 20 iterations, "
                                              "3e-4 lost 2 dB in 6, 5e-5 0.4 dB in 4)")
    pnp_iterations: int = Field(20, ge=0, le=MAX_ITERATIONS, description="`pnp`: most Adam iterations on the volume (0: the cubic start)")
    pnp_lr: float = Field(5e-4, gt=0, le=MAX_LR, description="`pnp`: Adam learning rate on the volume (the prior's [-1, 1] units)")
    pnp_weight: float = Field(2.0, ge=0, le=MAX_WEIGHT, description="`pnp`: weight of the prior's denoising residual V - D_t(V)")
    pnp_timestep: int = Field(10, ge=0, le=100_000, description="`pnp`: training timestep at which the prior denoises V (on the demo's "
                                                    "prior 100 cost 0.3-0.6 dB against 10: its one-step estimates are coarse)")
    seed: int = Field(0, ge=0, le=SEED_MAX, description="`pnp`, `diffpir`: seed of the noise the prior denoises at each iteration")
    diffpir_iterations: int = Field(10, ge=0, le=MAX_ITERATIONS, description="`diffpir`: timesteps of the schedule, each one "
                                                                    "denoising pass and one data step (0: the cubic start)")
    diffpir_t_start: int = Field(5, ge=0, le=100_000, description="`diffpir`: training timestep the schedule starts at (down to 0; "
                                                               "chosen on validation subjects of the 64 px benchmark from 5-40)")
    diffpir_dc_steps: int = Field(1, ge=1, le=MAX_ITERATIONS, description="`diffpir`: sweeps of the projection onto the SAX "
                                                                     "and LAX measurements in each data step")
    diffpir_relax: float = Field(0.05, gt=0, le=1, description="`diffpir`: share of the projection applied per sweep (1: DDNM's exact "
                                                              "projection; on the demo's phantom 1 cost 4 dB against 0.1, forcing the "
                                                              "acquisition's mismatch with the box slice model into the volume; 0.03-0.3 "
                                                              "tried on the benchmark's validation subjects)")
    diffpir_prior: bool = Field(True, description="`diffpir`: denoise with the prior at each timestep (false: the data steps alone, "
                                                  "the ablation the prior's contribution is measured against)")
    tolerance: float = Field(1e-4, ge=0, le=1, description="early stop when the relative change of the loss stays below this")
    patience: int = Field(5, ge=1, le=MAX_ITERATIONS, description="iterations in a row below `tolerance` before stopping")
    lax_weight: float = Field(5.0, ge=0, le=MAX_WEIGHT, description="weight of the LAX intensities (mean/std matched inside each view's mask)")
    sax_weight: float = Field(1.0, ge=0, le=MAX_WEIGHT, description="weight of the SAX fidelity (thick slices of the fine volume vs the observed stack)")
    drift_weight: float = Field(0.02, ge=0, le=MAX_WEIGHT, description="weight of the drift of the codes from their initial values")
    smooth_weight: float = Field(3.0, ge=0, le=MAX_WEIGHT, description="weight of the difference of x_T between neighbouring fine slices")
    pull: float = Field(0.01, ge=0, lt=1, description="after each step, move the codes this fraction back toward their start")
    batch: int = Field(16, ge=1, le=4096, description="slices decoded (and checkpointed) together")
    sax_thickness_mm: float | None = Field(None, gt=0, le=1000, description="SAX slice thickness (default: the slice spacing)")
    lax_intensity: Literal["intersections", "standardise"] = Field(
        "intersections", description="how LAX intensities are matched to the volume's (module docstring)")
    lax_profile_samples: int = Field(5, ge=1, le=101, description="points across a LAX plane's thickness (box profile)")
    percentiles: tuple[float, float] = Field((0.5, 99.5), description="SAX percentiles mapped to the prior's -1 and 1")

    @field_validator("percentiles")
    @classmethod
    def _ordered(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not 0 <= value[0] < value[1] <= 100:
            raise ValueError(f"needs 0 <= low < high <= 100, got {list(value)}")
        return value


@dataclass
class LaxView:
    """One long-axis view as the loss sees it: the operator on the fine grid, the mask (nu, nv), the image's
    pixels inside the mask (M,), and whether the loss standardises the volume's samples (``standardise``)."""

    operator: PlaneOperator
    image: Tensor
    mask: Tensor
    standardise: bool = True


@dataclass
class Measurements:
    """What one frame's reconstruction fits, on the fine grid with the slice axis last.

    Attributes:
        sax_operator: fine volume -> thick slices.
        sax: the observed stack in the prior's units, (1, 1, X, Y, S).
        lax: the long-axis views (empty: the SAX-only variant).
        in_plane: (X, Y) of the stack.
    """

    sax_operator: SliceStackOperator
    sax: Tensor
    lax: list[LaxView]
    in_plane: tuple[int, int]


@dataclass
class ReconstructionHistory:
    """What one reconstruction did: ``losses[name]`` per iteration (``total``, ``lax``, ``sax``, ``drift``,
    ``smooth``), the seconds it took, and with ``keep_steps`` the volume before each iteration and the
    final one, (X, Y, Z) in the stack's units and array layout (filled by the caller)."""

    method: str
    seconds: float = 0.0
    iterations: int = 0
    losses: dict[str, list[float]] = field(default_factory=dict)
    steps: list[np.ndarray] = field(default_factory=list)


def initial_codes(prior: SlicePrior, observed: Tensor, factor: int, steps: int,
                  interpolated: Tensor | None = None) -> tuple[Tensor | None, Tensor]:
    """Codes of every fine slice.

    Args:
        observed: SAX slices in [-1, 1] at the prior's size, (S, 1, s, s).
        interpolated: ``init: interpolation``: every fine slice of the stack's through-plane interpolation,
            ((S - 1) * factor + 1, 1, s, s), exact at the observed ones; each is encoded (z_sem, then x_T by
            inversion), so the codes start where the interpolation is. ``None`` (``init: slerp``, the
            original): the observed slices' codes and, between them, slerp(x_T) and lerp(z_sem).

    Returns:
        z_sem ((S - 1) * factor + 1, D) or ``None``, and x_T ((S - 1) * factor + 1, 1, s, s); fine slice
        k * factor holds observed slice k's codes.
    """
    if interpolated is not None:
        z = prior.encode_semantic(interpolated)
        return z, prior.invert(interpolated, z, steps)
    z = prior.encode_semantic(observed)
    x_t = prior.invert(observed, z, steps)
    xs, zs = [], []
    for j in range(factor):  # fine slice k * factor + j for every k < S - 1
        alpha = j / factor
        xs.append(slerp(x_t[:-1], x_t[1:], alpha))
        zs.append(lerp(z[:-1], z[1:], alpha) if z is not None else None)
    fine_x = torch.cat([torch.stack(xs, 1).flatten(0, 1), x_t[-1:]])
    fine_z = None if z is None else torch.cat([torch.stack(zs, 1).flatten(0, 1), z[-1:]])  # type: ignore[arg-type]
    return fine_z, fine_x


def render(prior: SlicePrior, z: Tensor | None, x_t: Tensor, steps: int, in_plane: tuple[int, int], batch: int) -> Tensor:
    """Decode every fine slice and resize it to the stack's grid: the fine volume (1, 1, X, Y, N) in [-1, 1] units.

    With gradients on, each batch of slices is checkpointed: its graph is rebuilt during backward.
    """
    def one(z_part: Tensor | None, x_part: Tensor) -> Tensor:
        return resize_slices(prior.decode(z_part, x_part, steps), in_plane)

    parts = []
    for start in range(0, x_t.shape[0], batch):
        z_part = None if z is None else z[start:start + batch]
        x_part = x_t[start:start + batch]
        if torch.is_grad_enabled():
            parts.append(checkpoint(one, z_part, x_part, use_reentrant=False))
        else:
            parts.append(one(z_part, x_part))
    slices = torch.cat(parts)  # (N, 1, X, Y)
    return slices.permute(1, 2, 3, 0).unsqueeze(0)


def _standardise(values: Tensor) -> Tensor:
    return (values - values.mean()) / (values.std(unbiased=False) + 1e-6)


def data_terms(volume: Tensor, data: Measurements) -> dict[str, Tensor]:
    """The fidelity terms of a fine volume (1, 1, X, Y, N): ``lax`` (mean over views of the mean squared difference
    inside each view's mask) and ``sax`` (thick slices against the observed stack)."""
    lax = volume.new_zeros(())
    for view in data.lax:
        seen = view.operator(volume)[0, 0][view.mask]
        seen = _standardise(seen) if view.standardise else seen
        lax = lax + torch.mean((seen - view.image) ** 2) / len(data.lax)
    return {"lax": lax, "sax": torch.mean((data.sax_operator(volume) - data.sax) ** 2)}


def _losses(volume: Tensor, z: Tensor | None, x_t: Tensor, z0: Tensor | None, x_t0: Tensor, data: Measurements,
            settings: ReconstructSettings) -> dict[str, Tensor]:
    terms = data_terms(volume, data)
    drift = torch.mean((x_t - x_t0) ** 2) + (torch.mean((z - z0) ** 2) if z is not None and z0 is not None else volume.new_zeros(()))
    # interpolation init: neighbouring start codes come from separate inversions and differ as their slices do,
    # so only the change from the start is smoothed; slerp init (the original): the codes themselves
    change = x_t - x_t0 if settings.init == "interpolation" else x_t
    smooth = torch.mean((change[1:] - change[:-1]) ** 2)
    total = (settings.lax_weight * terms["lax"] + settings.sax_weight * terms["sax"] + settings.drift_weight * drift
             + settings.smooth_weight * smooth)
    return {"total": total, **terms, "drift": drift, "smooth": smooth}


def run_adam(parameters: list[Tensor], lr: float, iterations: int, settings: ReconstructSettings, history: ReconstructionHistory,
             loss_terms: Callable[[], dict[str, Tensor]], after_step: Callable[[], None] | None = None,
             tick: Callable[[], None] | None = None) -> None:
    """Adam on ``parameters`` until ``iterations`` or the early stop (module docstring); ``loss_terms()`` computes the
    terms (``total`` is minimised; a parameter may also get gradient added by the caller inside it), each appended to
    ``history.losses`` per iteration; ``after_step()`` runs after every step, without gradients; ``tick()`` after every
    iteration (a progress bar)."""
    optimiser = torch.optim.Adam(parameters, lr=lr)
    previous, calm = None, 0
    for _ in range(iterations):
        optimiser.zero_grad(set_to_none=True)
        terms = loss_terms()
        terms["total"].backward()
        optimiser.step()
        if after_step is not None:
            with torch.no_grad():
                after_step()
        for name, value in terms.items():
            history.losses.setdefault(name, []).append(float(value.detach()))
        history.iterations += 1
        if tick is not None:
            tick()
        loss = history.losses["total"][-1]
        if previous is not None and abs(previous - loss) <= settings.tolerance * max(abs(previous), 1e-12):
            calm += 1
            if calm >= settings.patience:
                break
        else:
            calm = 0
        previous = loss


def optimise_codes(prior: SlicePrior, z0: Tensor | None, x_t0: Tensor, data: Measurements, settings: ReconstructSettings,
                   keep: Callable[[Tensor], None] | None = None,
                   tick: Callable[[], None] | None = None) -> tuple[Tensor, ReconstructionHistory]:
    """Optimise every fine slice's codes (``latent``, module docstring) and render the volume.

    Args:
        z0, x_t0: the initial codes (:func:`initial_codes`).
        data: the measurements, the LAX images matched (``reconstruct._match_lax``).
        keep: called with the volume (1, 1, X, Y, N) before each iteration and with the final one.
        tick: called after every iteration (a progress bar).

    Returns:
        The fine volume (1, 1, X, Y, N) in [-1, 1] units (no gradient) and the history (losses, seconds).
    """
    start = time.perf_counter()
    history = ReconstructionHistory(method="latent")
    z0 = None if z0 is None else z0.detach()
    x_t0 = x_t0.detach()
    z = None if z0 is None else z0.clone().requires_grad_(True)
    x_t = x_t0.clone().requires_grad_(True)

    def loss_terms() -> dict[str, Tensor]:
        volume = render(prior, z, x_t, settings.steps, data.in_plane, settings.batch)
        if keep is not None:
            keep(volume.detach())
        return _losses(volume, z, x_t, z0, x_t0, data, settings)

    def pull() -> None:  # toward the start
        x_t.lerp_(x_t0, settings.pull)
        if z is not None and z0 is not None:
            z.lerp_(z0, settings.pull)

    run_adam([x_t] + ([z] if z is not None else []), settings.lr, settings.iterations, settings, history, loss_terms, pull, tick)
    with torch.no_grad():
        volume = render(prior, z, x_t, settings.steps, data.in_plane, settings.batch)
    if keep is not None:
        keep(volume)
    history.seconds = time.perf_counter() - start
    return volume, history
