"""Samplers: pure functions with one signature (k-diffusion style).

    sample_*(model, x, schedule, cond=None, *, steps=.., generator=None, callback=None) -> x_0

- ``model(x_t, t, cond) -> output`` (:class:`Denoiser`) answers in the schedule's prediction space
  (``schedule.prediction``, plus variance channels with ``schedule.learn_sigma``). Guidance is a
  wrapped model (:func:`medsynth.diffusion.guidance.classifier_free_guidance`), not a flag here.
- ``x`` is the initial noise x_T, shape (B, C, *S): draw it from the same ``generator``.
- ``generator`` supplies every noise draw inside (DDPM, DDIM with eta > 0): the same generator
  state gives bit-identical samples on the same machine and library versions. A list of
  generators, one per batch item, makes each item's draws its own (the same volume alone or in a
  batch; :func:`medsynth.seeds.item_generators`).
- ``callback(i, t, x, x0)`` runs after step i with the timestep the model saw (0-dim), the new
  sample and the model's estimate of x_0; it observes and returns nothing.
- The return value is always the final sample, shape (B, C, *S).

Timesteps (noise schedules): "trailing" spacing, t_i = round(T - i T / N) - 1 for i = 0 .. N-1,
then the clean data (t = -1, abar = 1). It starts at the noisiest trained timestep T-1 and ends
at x_0 (Lin et al. 2024, "Common diffusion noise schedules and sample steps are flawed", Table 2).
It equals diffusers' ``timestep_spacing="trailing"``; with ``steps = T`` it is the full chain
T-1 .. 0. Each step goes from t_i to t_{i+1} exactly (diffusers' DDIM uses t - T // N instead,
which differs when N does not divide T).

Model outputs are cast to the sample's dtype: run the model under ``torch.autocast`` (bf16/fp16)
and keep x in float32; the update maths then stays in float32 with float64 coefficients.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import torch
from torch import Tensor

from medsynth.diffusion.schedule import FlowSchedule, NoiseSchedule, broadcast
from medsynth.seeds import item_noise

Callback = Callable[[int, Tensor, Tensor, Tensor], None]
# One generator for the batch, or one per item (batch-independent samples, see medsynth.seeds).
Generators = torch.Generator | Sequence[torch.Generator] | None


class Denoiser(Protocol):
    """The model signature of every sampler and loss: ``model(x_t, t, cond) -> output``.

    ``x_t`` (B, C, *S); ``t`` (B,) timesteps in the schedule's units; ``cond`` the condition
    (B, ..) or None; output (B, C, *S), or (B, 2C, *S) with a learned variance.
    """

    def __call__(self, x_t: Tensor, t: Tensor, cond: Any) -> Tensor: ...


def spaced_timesteps(num_train_timesteps: int, steps: int) -> Tensor:
    """The "trailing" timesteps t_i = round(T - i T / N) - 1, i = 0 .. N-1, shape (N,), int64."""
    if not 1 <= steps <= num_train_timesteps:
        raise ValueError(f"steps must be in [1, {num_train_timesteps}], got {steps}")
    i = torch.arange(steps, dtype=torch.float64)
    return (num_train_timesteps - i * (num_train_timesteps / steps)).round().long() - 1


def _transitions(schedule: Any, steps: int, x: Tensor, sampler: str) -> Iterator[tuple[int, Tensor, Tensor]]:
    """(i, t_i, t_{i+1}) for a noise schedule, 0-dim tensors on x's device; the last t_{i+1} is -1."""
    if not isinstance(schedule, NoiseSchedule):
        raise TypeError(f"{sampler} needs a NoiseSchedule, got {type(schedule).__name__} (use sample_rflow for flows)")
    ts = spaced_timesteps(schedule.num_train_timesteps, steps).to(x.device)
    targets = torch.cat([ts[1:], ts.new_full((1,), -1)])
    yield from zip(range(len(ts)), ts, targets)


def _predict(
    model: Denoiser, x: Tensor, t: Tensor, cond: Any, schedule: NoiseSchedule
) -> tuple[Tensor, Tensor, Tensor | None]:
    """One model evaluation read as (x_0, eps, variance values or None), each (B, C, *S)."""
    output = model(x, t.expand(x.shape[0]), cond).to(x.dtype)
    prediction, var_values = schedule.split(output)
    x0, eps = schedule.predict_x0_eps(prediction, x, t)
    return x0, eps, var_values


def _noise(x: Tensor, generator: Generators) -> Tensor:
    """Standard normal noise shaped like x: from one generator, or item i from ``generator[i]``."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    if len(generator) != x.shape[0]:
        raise ValueError(f"{len(generator)} generators for a batch of {x.shape[0]}: give one per item")
    return item_noise(x.shape[1:], generator, x.dtype).to(x.device)


def sample_ddpm(
    model: Denoiser,
    x: Tensor,
    schedule: NoiseSchedule,
    cond: Any = None,
    *,
    steps: int | None = None,
    generator: Generators = None,
    callback: Callback | None = None,
) -> Tensor:
    """Ancestral sampling (Ho et al. 2020, Alg. 2), strided as in improved DDPM (sec. 4).

    Variance: beta-tilde (DDPM's sigma_t^2 = beta-tilde_t), or the learned one with
    ``schedule.learn_sigma`` (improved DDPM eq. 15).

    Args:
        model: the denoiser.
        x: initial noise x_T ~ N(0, I), shape (B, C, *S).
        schedule: the noise schedule the model was trained with.
        cond: the condition passed to the model.
        steps: number of steps; None runs all T.
        generator: source of the per-step noise.
        callback: ``callback(i, t, x, x0)`` after each step.

    Returns:
        The sample, shape (B, C, *S).
    """
    steps = schedule.num_train_timesteps if steps is None else steps
    for i, t, t_prev in _transitions(schedule, steps, x, "sample_ddpm"):
        # 1. predict x_0 (and the variance values with learn_sigma)
        x0, _, var_values = _predict(model, x, t, cond, schedule)
        # 2. posterior mean mu~_t(x_t, x_0), DDPM eq. 7
        mean = schedule.posterior_mean(x0, x, t, t_prev)
        # 3. x_{t_prev} = mu~ + sigma z; the last step (to x_0) adds no noise
        if t_prev >= 0:
            log_var = schedule.posterior_log_variance(x, t, t_prev, var_values)
            mean = mean + (0.5 * log_var).exp() * _noise(x, generator)
        x = mean
        if callback is not None:
            callback(i, t, x, x0)
    return x


def sample_ddim(
    model: Denoiser,
    x: Tensor,
    schedule: NoiseSchedule,
    cond: Any = None,
    *,
    steps: int = 50,
    eta: float = 0.0,
    generator: Generators = None,
    callback: Callback | None = None,
) -> Tensor:
    """DDIM (Song et al. 2021): deterministic for ``eta = 0``, DDPM-like for ``eta = 1``.

    Notation: abar_t -> alpha_t of the DDIM paper; sigma -> sigma_t(eta) of DDIM eq. 16.

    Args:
        model: the denoiser.
        x: initial noise x_T ~ N(0, I), shape (B, C, *S).
        schedule: the noise schedule the model was trained with.
        cond: the condition passed to the model.
        steps: number of steps N.
        eta: stochasticity in [0, 1].
        generator: source of the per-step noise (used when eta > 0, at every step).
        callback: ``callback(i, t, x, x0)`` after each step.

    Returns:
        The sample, shape (B, C, *S).
    """
    if not 0 <= eta <= 1:
        raise ValueError(f"eta must be in [0, 1], got {eta}")
    for i, t, t_prev in _transitions(schedule, steps, x, "sample_ddim"):
        # 1. predicted x_0 and eps, DDIM eq. 12
        x0, eps, _ = _predict(model, x, t, cond, schedule)
        # 2. sigma_t(eta) = eta sqrt((1 - abar_prev) / (1 - abar_t)) sqrt(1 - abar_t / abar_prev), DDIM eq. 16
        abar_t, abar_prev = schedule.abar(t), schedule.abar(t_prev)
        sigma = eta * ((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)).sqrt()
        # 3. x_prev = sqrt(abar_prev) x_0 + sqrt(1 - abar_prev - sigma^2) eps + sigma z, DDIM eq. 12
        x = broadcast(abar_prev.sqrt(), x) * x0 + broadcast((1 - abar_prev - sigma**2).sqrt(), x) * eps
        if eta > 0:
            x = x + broadcast(sigma, x) * _noise(x, generator)
        if callback is not None:
            callback(i, t, x, x0)
    return x


def sample_dpmpp_2m(
    model: Denoiser,
    x: Tensor,
    schedule: NoiseSchedule,
    cond: Any = None,
    *,
    steps: int = 20,
    generator: Generators = None,
    callback: Callback | None = None,
) -> Tensor:
    """DPM-Solver++(2M): multistep second-order solver of the diffusion ODE in data prediction.

    Lu et al. 2022, "DPM-Solver++", Alg. 2. Notation: alpha_t = sqrt(abar_t),
    sigma_t = sqrt(1 - abar_t), lambda_t = log(alpha_t / sigma_t), h = lambda_next - lambda_t.
    The first step is first order (no history) and the last goes to sigma = 0, where the exact
    solution is the data prediction: diffusers' ``DPMSolverMultistepScheduler`` with
    ``algorithm_type="dpmsolver++", solver_order=2, lower_order_final=True,
    final_sigmas_type="zero"``. 15-25 steps are typical.

    Args:
        model: the denoiser.
        x: initial noise x_T ~ N(0, I), shape (B, C, *S).
        schedule: the noise schedule the model was trained with.
        cond: the condition passed to the model.
        steps: number of steps N (model evaluations).
        generator: unused (the solver is deterministic); kept for the common signature.
        callback: ``callback(i, t, x, x0)`` after each step.

    Returns:
        The sample, shape (B, C, *S).
    """
    x0_prev, h_prev = None, None
    for i, t, t_next in _transitions(schedule, steps, x, "sample_dpmpp_2m"):
        x0, _, _ = _predict(model, x, t, cond, schedule)
        if t_next < 0:
            # 1. last step: lambda_next = +inf, so x_next = x_0 exactly
            x = x0
        else:
            abar_t, abar_next = schedule.abar(t), schedule.abar(t_next)
            sigma_t, sigma_next = (1 - abar_t).sqrt(), (1 - abar_next).sqrt()
            h = 0.5 * ((abar_next / (1 - abar_next)).log() - (abar_t / (1 - abar_t)).log())
            # 2. D = x_0 on the first step; then (1 + 1/(2r)) x_0 - 1/(2r) x_0_prev, r = h_prev / h (Alg. 2)
            d = x0
            if x0_prev is not None:
                half_inv_r = h / (2 * h_prev)
                d = broadcast(1 + half_inv_r, x) * x0 - broadcast(half_inv_r, x) * x0_prev
            # 3. x_next = (sigma_next / sigma_t) x_t - alpha_next (e^{-h} - 1) D
            x = broadcast(sigma_next / sigma_t, x) * x - broadcast(abar_next.sqrt() * torch.expm1(-h), x) * d
            x0_prev, h_prev = x0, h
        if callback is not None:
            callback(i, t, x, x0)
    return x


def sample_rflow(
    model: Denoiser,
    x: Tensor,
    schedule: FlowSchedule,
    cond: Any = None,
    *,
    steps: int = 30,
    generator: Generators = None,
    callback: Callback | None = None,
) -> Tensor:
    """Rectified flow: Euler steps on the predicted velocity v = x_0 - eps (Liu et al. 2022).

    Timesteps come from MONAI's ``RFlowScheduler.set_timesteps`` (T .. T/N, then 0, with its
    optional resolution-dependent shift); the step is ``RFlowScheduler.step``'s:
    x_next = x_t + (t - t_next) / T * v.

    Args:
        model: the velocity model ``model(x_t, t, cond)``.
        x: initial noise x_T ~ N(0, I), shape (B, C, *S).
        schedule: the flow schedule the model was trained with.
        cond: the condition passed to the model.
        steps: number of Euler steps N.
        generator: unused (the sampler is deterministic); kept for the common signature.
        callback: ``callback(i, t, x, x0)`` after each step.

    Returns:
        The sample, shape (B, C, *S).
    """
    if not isinstance(schedule, FlowSchedule):
        raise TypeError(f"sample_rflow needs a FlowSchedule, got {type(schedule).__name__}")
    ts = schedule.timesteps(steps, x)
    for i, (t, t_next) in enumerate(zip(ts[:-1], ts[1:])):
        velocity = model(x, t.expand(x.shape[0]), cond).to(x.dtype)
        x0 = schedule.predict_x0(velocity, x, t)
        # Euler step from s = t/T to s_next = t_next/T on dx/ds = eps - x_0 = -v
        x = x + broadcast((t - t_next).double() / schedule.num_train_timesteps, x) * velocity
        if callback is not None:
            callback(i, t, x, x0)
    return x
