"""Noise and flow schedules against references: diffusers' timesteps and betas, MONAI's noising, velocity and flow
convention, and exact prediction conversions."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler
from diffusers.schedulers.scheduling_ddpm import betas_for_alpha_bar
from monai.networks.schedulers import DDPMScheduler as MonaiDDPMScheduler
from monai.networks.schedulers import RFlowScheduler

from diffusion_toys import PREDICTIONS, T, noise
from medsynth.diffusion import make_schedule, spaced_timesteps


@pytest.mark.parametrize("steps", [1, 7, 20, 30, 50, T])
def test_trailing_timesteps_equal_diffusers(steps):
    ddim = DDIMScheduler(num_train_timesteps=T, timestep_spacing="trailing")
    ddim.set_timesteps(steps)
    dpm = DPMSolverMultistepScheduler(num_train_timesteps=T, timestep_spacing="trailing")
    dpm.set_timesteps(steps)
    ours = spaced_timesteps(T, steps)
    assert torch.equal(ours, ddim.timesteps) and torch.equal(ours, dpm.timesteps)
    assert ours[0] == T - 1


def test_betas_equal_diffusers():
    linear = DDPMScheduler(num_train_timesteps=T, beta_schedule="linear")
    assert torch.equal(make_schedule("linear").betas.float(), linear.betas)
    # MONAI computes the cosine betas in float32 (about 1e-3 relative error at small t, from
    # 1 - abar_t / abar_{t-1}); diffusers in float64. The resulting abar agree to 1e-4.
    abar_diffusers = torch.cumprod(1 - betas_for_alpha_bar(T).double(), dim=0)
    torch.testing.assert_close(make_schedule("cosine").alphas_cumprod, abar_diffusers, rtol=1e-4, atol=0)


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_prediction_conversions_round_trip(prediction):
    schedule = make_schedule("cosine", prediction=prediction)
    x0, eps = noise(seed=2).double(), noise(seed=3).double()
    t = torch.tensor([0, 250, 999])
    x_t = schedule.q_sample(x0, t, eps)
    x0_hat, eps_hat = schedule.predict_x0_eps(schedule.target(x0, eps, t), x_t, t)
    torch.testing.assert_close(x0_hat, x0, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(eps_hat, eps, rtol=1e-9, atol=1e-9)


def test_noising_and_velocity_equal_monai():
    monai = MonaiDDPMScheduler(num_train_timesteps=T, schedule="linear_beta", clip_sample=False)
    schedule = make_schedule("linear", prediction="v_prediction")
    x0, eps, t = noise(seed=2), noise(seed=3), torch.tensor([0, 500, 999])
    torch.testing.assert_close(schedule.q_sample(x0, t, eps), monai.add_noise(x0, eps, t), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(schedule.target(x0, eps, t), monai.get_velocity(x0, eps, t), rtol=1e-5, atol=1e-5)


def test_flow_loss_uses_monai_convention():
    schedule, x0, eps = make_schedule("rflow"), noise(seed=2), noise(seed=3)
    t = torch.tensor([0, 500, 999])
    torch.testing.assert_close(schedule.q_sample(x0, t, eps), RFlowScheduler(T).add_noise(x0, eps, t))
    torch.testing.assert_close(schedule.predict_x0(schedule.target(x0, eps, t), schedule.q_sample(x0, t, eps), t), x0)
