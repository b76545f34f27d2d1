"""Choosing and running a sampler by name: the ``SAMPLERS`` registry and :class:`SamplerConfig`.

Imports only torch, pydantic and the sampler/schedule modules (no MONAI, no Lightning), so the CLI
can read the sampler names at parse time.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from pydantic import Field
from torch import Tensor

from medsynth.config import StrictModel
from medsynth.diffusion.samplers import Denoiser, sample_ddim, sample_ddpm, sample_dpmpp_2m, sample_rflow
from medsynth.diffusion.schedule import FlowSchedule, NoiseSchedule, broadcast
from medsynth.errors import MedsynthError

# name -> (sampler, default steps; None: all T training timesteps)
SAMPLERS: dict[str, tuple[Callable[..., Tensor], int | None]] = {
    "ddpm": (sample_ddpm, None),
    "ddim": (sample_ddim, 50),
    "dpmpp": (sample_dpmpp_2m, 20),
    "rflow": (sample_rflow, 30),
}
SamplerName = Literal["ddpm", "ddim", "dpmpp", "rflow"]  # the keys of SAMPLERS (a test keeps them equal)


class SamplerConfig(StrictModel):
    """The ``sample`` section every diffusion recipe shares (recipes extend it with their own keys)."""

    sampler: SamplerName = "dpmpp"
    steps: int | None = Field(None, ge=1, description="None: ddpm all T, ddim 50, dpmpp 20, rflow 30")
    guidance: float = Field(1.0, ge=0, allow_inf_nan=False,
                            description="classifier-free guidance scale s (0: plain conditional model)")
    eta: float = Field(0.0, ge=0, le=1, description="ddim only: 0 deterministic, 1 DDPM-like")
    batch_size: int = Field(4, ge=1, description="items per sampler call")
    clip_x0: float | None = Field(None, gt=0, description="clamp every step's x_0 estimate to [-c, c] (diffusers' clip_sample; "
                                                         "noise schedules only): keeps an undertrained model from diverging")

    def steps_for(self, schedule: NoiseSchedule | FlowSchedule) -> int:
        """The number of steps this config runs on ``schedule``."""
        default = SAMPLERS[self.sampler][1]
        return self.steps if self.steps is not None else default if default is not None else schedule.num_train_timesteps

    def describe(self, schedule: NoiseSchedule | FlowSchedule) -> str:
        """One line for reports: sampler, steps on ``schedule`` and guidance."""
        return f"{self.sampler} ({self.steps_for(schedule)} steps), guidance {self.guidance}"


def check_sampler(config: SamplerConfig, schedule: NoiseSchedule | FlowSchedule) -> None:
    """One line if the sampler does not fit the model's schedule or asks for too many steps."""
    if isinstance(schedule, FlowSchedule) != (config.sampler == "rflow"):
        raise MedsynthError(f"sampler '{config.sampler}' does not fit the model's '{type(schedule).__name__}' "
                            "(rectified flow takes 'rflow'; noise schedules 'ddpm', 'ddim' or 'dpmpp')")
    if isinstance(schedule, NoiseSchedule) and config.steps_for(schedule) > schedule.num_train_timesteps:
        raise MedsynthError(f"--steps {config.steps} exceeds the model's {schedule.num_train_timesteps} training timesteps")


class ClippedX0:
    """A denoiser whose x_0 estimate is clamped to [-limit, limit], its output given back in the model's own
    parametrisation (eps or v, variance channels kept), so every sampler clips without knowing it."""

    def __init__(self, model: Denoiser, schedule: NoiseSchedule, limit: float):
        self.model, self.schedule, self.limit = model, schedule, limit

    def __call__(self, x: Tensor, t: Tensor, cond: Any) -> Tensor:
        prediction, variance = self.schedule.split(self.model(x, t, cond))
        x0, _ = self.schedule.predict_x0_eps(prediction, x, t)
        x0 = x0.clamp(-self.limit, self.limit)
        abar = broadcast(self.schedule.abar(t), x).to(x.dtype)
        eps = (x - abar.sqrt() * x0) / (1 - abar).sqrt()
        prediction = self.schedule.target(x0, eps, t).to(x.dtype)
        return prediction if variance is None else torch.cat([prediction, variance], dim=1)


def run_sampler(model: Denoiser, noise: Tensor, schedule: NoiseSchedule | FlowSchedule, cond: Any, config: SamplerConfig,
                generators: Sequence[torch.Generator] | None = None) -> Tensor:
    """Runs the named sampler from ``noise`` (x_T, (B, C, *S)).

    Args:
        model: the (guided) denoiser ``model(x_t, t, cond)``.
        noise: the initial noise, one item per volume.
        schedule: the schedule the model was trained with.
        cond: the condition passed to the model.
        config: sampler, steps and eta (guidance is applied by the caller, as a wrapped model).
        generators: one per item, for per-step noise (ddpm, ddim with eta > 0): pass the
            generators the items' initial noise was drawn from, so every item's draws are its own.

    Returns:
        x_0, shape (B, C, *S).
    """
    check_sampler(config, schedule)
    sampler, _ = SAMPLERS[config.sampler]
    if config.clip_x0 is not None and isinstance(schedule, NoiseSchedule):
        model = ClippedX0(model, schedule, config.clip_x0)
    kwargs: dict[str, Any] = {"steps": config.steps_for(schedule)}
    if config.sampler == "ddim":
        kwargs["eta"] = config.eta
    return sampler(model, noise, schedule, cond, generator=generators, **kwargs)


def generate_by_shape(conditions: Sequence[Tensor], generate: Callable[[Tensor, list[int]], Tensor]) -> list[Tensor]:
    """Items of several shapes generated in one batch per shape, returned in their order.

    Args:
        conditions: One condition per item, ``(1, C, *S)``; ``S`` may differ between items.
        generate: ``generate(batch, indices)`` -> one output per row of ``batch`` (the conditions
            of ``indices`` concatenated), e.g. a sampler call with the items' seeds.

    Returns:
        The outputs of the items, in the order of ``conditions``.
    """
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for index, condition in enumerate(conditions):
        by_shape.setdefault(tuple(condition.shape[1:]), []).append(index)
    outputs: dict[int, Tensor] = {}
    for indices in by_shape.values():
        outputs.update(zip(indices, generate(torch.cat([conditions[i] for i in indices]), indices)))
    return [outputs[index] for index in range(len(conditions))]
