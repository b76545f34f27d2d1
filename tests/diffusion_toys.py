"""Toy models, noise and reference trajectories shared by the diffusion tests (tests/diffusion/), one definition each."""

from __future__ import annotations

import torch

from medsynth.diffusion import Condition

T = 1000


PREDICTIONS = ["epsilon", "v_prediction", "sample"]


KINDS = ["linear", "cosine"]


def toy_model(x, t, cond=None):
    """A fixed smooth map of (x, t), so that both implementations see the same outputs."""
    w = torch.tensor([[0.2, -0.1], [0.15, 0.25]], dtype=x.dtype)
    s = (t.to(x.dtype) / T).reshape(-1, 1, 1, 1)
    return torch.einsum("oc,bchw->bohw", w, x) * (0.5 + s) + 0.3 * torch.tanh(x)


def toy_model_learned(x, t, cond=None):
    """The toy prediction plus variance values v in [-1, 1]."""
    return torch.cat([toy_model(x, t), torch.tanh(2 * x)], dim=1)


def noise(shape=(3, 2, 4, 4), seed=1):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def trajectory(sampler, model, x, schedule, seed=None, **kwargs):
    traj = []
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    final = sampler(model, x, schedule, None, generator=generator,
                    callback=lambda i, t, x, x0: traj.append(x), **kwargs)
    assert torch.equal(final, traj[-1])
    return traj


def diffusers_trajectory(scheduler, model, x, steps, seed=None, **step_kwargs):
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    scheduler.set_timesteps(steps)
    traj = []
    for t in scheduler.timesteps:
        x = scheduler.step(model(x, t.expand(x.shape[0])), t, x, generator=generator, **step_kwargs).prev_sample
        traj.append(x)
    return traj


def diffusers_args(schedule):
    return dict(num_train_timesteps=T, trained_betas=schedule.betas.float().tolist(),
                prediction_type=schedule.prediction, timestep_spacing="trailing")


def assert_same_trajectory(ours, theirs, tol=1e-5):
    """Every step agrees to ``tol`` relative to the sample's scale (the toy model is not a good
    denoiser: on the cosine schedule its x_0 estimates and samples reach 1e3)."""
    assert len(ours) == len(theirs)
    for step, (a, b) in enumerate(zip(ours, theirs)):
        error = ((a - b).abs().max() / (1 + b.abs().max())).item()
        assert error < tol, f"step {step}: relative difference {error:.2e}"


NULL = {"seg": torch.zeros_like, "class_labels": torch.tensor(5)}


def structured_condition():
    return Condition(concat=torch.full((4, 1, 2, 2), 7.0), seg=torch.ones(4, 3, 2, 2), class_labels=torch.tensor([0, 1, 2, 3]),
                     vector=torch.ones(4, 2))
