"""Deterministic DDIM inversion: the stochastic code x_T of a clean sample (DiffAE's stochastic encoder).

DDIM with eta = 0 (:func:`medsynth.diffusion.samplers.sample_ddim`) steps t_i -> t_{i+1} on the
"trailing" timesteps T-1 = t_0 > .. > t_{N-1} > -1 (clean data) as

    x_{t_{i+1}} = sqrt(abar_{i+1}) x0(x_{t_i}, t_i) + sqrt(1 - abar_{i+1}) eps(x_{t_i}, t_i)     (DDIM eq. 12)

Inversion runs the same transitions backwards, -1 -> t_{N-1} -> .. -> t_0, solving each for the
noisier sample. Because x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps holds for every parametrisation
(eps, x_0, v), the step is

    x_{t_i} = sqrt(abar_i) (x_{t_{i+1}} - sqrt(1 - abar_{i+1}) eps) / sqrt(abar_{i+1}) + sqrt(1 - abar_i) eps,

with eps = eps(x_{t_i}, t_i), unknown. Plain DDIM inversion (Song et al. 2021, sec. 4.3; Dhariwal &
Nichol 2021, appendix F) evaluates the model at the target timestep t_i on the less noisy sample,
eps(x_{t_{i+1}}, t_i); ``fixed_point_iterations`` > 0 then re-evaluates it at the current estimate of
x_{t_i} (fixed-point iteration of the step equation, Pan et al. 2023 "AIDI"), which makes
``sample_ddim(model, ddim_invert(model, x0, ...), ...)`` return x0 to the accuracy the iteration reaches.
The approximation suits eps and v models (the DiffAE decoders); an x_0 model's eps read off the less
noisy sample is a poorer one (about 17 dB round trip for an arbitrary toy x_0 model, 25-47 dB for eps/v).

Written here rather than taken from MONAI: ``DDIMScheduler.reversed_step`` indexes past the table at
the top timestep (STACK-NOTES) and pairs timesteps as ``t - T // N``, not our trailing grid.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from medsynth.diffusion.samplers import Callback, Denoiser, spaced_timesteps
from medsynth.diffusion.schedule import NoiseSchedule, broadcast

__all__ = ["ddim_invert"]


def ddim_invert(
    model: Denoiser,
    x0: Tensor,
    schedule: NoiseSchedule,
    cond: Any = None,
    *,
    steps: int,
    fixed_point_iterations: int = 0,
    callback: Callback | None = None,
) -> Tensor:
    """Deterministic DDIM inversion of clean samples to their noise code x_T.

    Args:
        model: the denoiser ``model(x_t, t, cond)`` (:class:`~medsynth.diffusion.samplers.Denoiser`),
            answering in ``schedule.prediction`` (a learned-variance half is ignored).
        x0: clean samples, shape (B, C, *S); keep them in float32 or wider.
        schedule: the noise schedule the model was trained with.
        cond: the condition passed to the model (e.g. DiffAE's z_sem).
        steps: number of DDIM steps N; decode with ``sample_ddim(..., steps=N, eta=0)`` on the same
            timesteps (this runs them mirrored).
        fixed_point_iterations: extra model evaluations per step refining eps at the noisier sample
            (0: plain DDIM inversion, one evaluation per step).
        callback: ``callback(i, t, x, x0_hat)`` after inversion step i (i = 0 leaves the clean data) with
            the timestep reached, the new sample and the x_0 that the step used.

    Returns:
        x_T at t_0 = T - 1, shape (B, C, *S).
    """
    if not isinstance(schedule, NoiseSchedule):
        raise TypeError(f"ddim_invert needs a NoiseSchedule, got {type(schedule).__name__}")
    if fixed_point_iterations < 0:
        raise ValueError(f"fixed_point_iterations must be >= 0, got {fixed_point_iterations}")
    ts = spaced_timesteps(schedule.num_train_timesteps, steps).to(x0.device)
    sources = torch.cat([ts[1:], ts.new_full((1,), -1)])  # sampling's targets are inversion's sources
    x = x0
    for i, (t, t_prev) in enumerate(zip(ts.flip(0), sources.flip(0))):
        # 1. abar at the target (noisier) timestep t and at the current one t_prev
        abar_t, abar_prev = schedule.abar(t), schedule.abar(t_prev)
        a_t, s_t = broadcast(abar_t.sqrt(), x), broadcast((1 - abar_t).sqrt(), x)
        a_prev, s_prev = broadcast(abar_prev.sqrt(), x), broadcast((1 - abar_prev).sqrt(), x)
        guess = x
        for _ in range(fixed_point_iterations + 1):
            # 2. eps at timestep t: on x_{t_prev} first (plain inversion), then on the refined x_t
            output = model(guess, t.expand(x.shape[0]), cond).to(x.dtype)
            prediction, _ = schedule.split(output)
            _, eps = schedule.predict_x0_eps(prediction, guess, t)
            # 3. DDIM eq. 12 solved for the noisier sample
            x0_hat = (x - s_prev * eps) / a_prev
            guess = a_t * x0_hat + s_t * eps
        x = guess
        if callback is not None:
            callback(i, t, x, x0_hat)
    return x
