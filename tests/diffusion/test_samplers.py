"""Samplers against references: diffusers' and MONAI's schedulers step for step, closed-form Gaussian data, seeded and
per-item generators."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler
from monai.networks.schedulers import RFlowScheduler

from diffusion_toys import (
    KINDS,
    PREDICTIONS,
    T,
    assert_same_trajectory,
    diffusers_args,
    diffusers_trajectory,
    noise,
    toy_model,
    toy_model_learned,
    trajectory,
)
from medsynth.diffusion import make_schedule, sample_ddim, sample_ddpm, sample_dpmpp_2m, sample_rflow
from medsynth.seeds import item_generators, item_noise


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_ddim_matches_diffusers_step_for_step(kind, prediction):
    """eta = 0, and eta = 0.5 with the same generator (same noise draws)."""
    schedule, x = make_schedule(kind, prediction=prediction), noise()
    diffusers = DDIMScheduler(clip_sample=False, set_alpha_to_one=True, **diffusers_args(schedule))
    assert_same_trajectory(trajectory(sample_ddim, toy_model, x, schedule, steps=50),
                            diffusers_trajectory(diffusers, toy_model, x, 50))
    assert_same_trajectory(trajectory(sample_ddim, toy_model, x, schedule, seed=7, steps=50, eta=0.5),
                            diffusers_trajectory(diffusers, toy_model, x, 50, seed=7, eta=0.5))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_dpmpp_2m_matches_diffusers_step_for_step(kind, prediction):
    schedule, x = make_schedule(kind, prediction=prediction), noise()
    for steps in (10, 20):  # below and above diffusers' lower_order_final threshold (15)
        diffusers = DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2, lower_order_final=True,
                                                final_sigmas_type="zero", **diffusers_args(schedule))
        assert_same_trajectory(trajectory(sample_dpmpp_2m, toy_model, x, schedule, steps=steps),
                                diffusers_trajectory(diffusers, toy_model, x, steps))


@pytest.mark.parametrize("kind", KINDS)
def test_strided_ddpm_matches_diffusers_step_for_step(kind):
    schedule, x = make_schedule(kind, prediction="v_prediction"), noise()
    diffusers = DDPMScheduler(clip_sample=False, variance_type="fixed_small", **diffusers_args(schedule))
    assert_same_trajectory(trajectory(sample_ddpm, toy_model, x, schedule, seed=5, steps=50),
                            diffusers_trajectory(diffusers, toy_model, x, 50, seed=5))


def test_learned_variance_ddpm_matches_diffusers_full_chain():
    """Improved DDPM's log-space variance = diffusers' "learned_range" (MONAI's is linear).

    diffusers keeps abar in float32, medsynth in float64 (as improved DDPM): over 1000 chained
    steps that alone reaches 1e-4, so diffusers gets the same float64 table here.
    """
    schedule, x = make_schedule("linear", learn_sigma=True), noise()
    diffusers = DDPMScheduler(clip_sample=False, variance_type="learned_range", **diffusers_args(schedule))
    diffusers.alphas_cumprod = schedule.alphas_cumprod.clone()
    assert_same_trajectory(trajectory(sample_ddpm, toy_model_learned, x, schedule, seed=5),
                            diffusers_trajectory(diffusers, toy_model_learned, x, T, seed=5))


def test_deterministic_samplers_ignore_the_variance_half():
    fixed, learned, x = make_schedule("cosine"), make_schedule("cosine", learn_sigma=True), noise()
    for sampler in (sample_ddim, sample_dpmpp_2m):
        assert torch.equal(sampler(toy_model_learned, x, learned, steps=10), sampler(toy_model, x, fixed, steps=10))


def test_rflow_matches_monai_step_for_step():
    schedule, x = make_schedule("rflow"), noise()
    monai = RFlowScheduler(num_train_timesteps=T)
    monai.set_timesteps(25)
    theirs, xm = [], x
    for t, t_next in zip(monai.timesteps, torch.cat([monai.timesteps[1:], torch.tensor([0])])):
        xm, _ = monai.step(toy_model(xm, t.expand(3)), t, xm, t_next)
        theirs.append(xm)
    assert_same_trajectory(trajectory(sample_rflow, toy_model, x, schedule, steps=25), theirs)


MU, SIGMA = 0.5, 0.5  # data x_0 ~ N(MU, SIGMA^2 I)


def _exact_eps(schedule):
    """E[eps | x_t] for Gaussian data: sqrt(1 - abar) (x_t - sqrt(abar) mu) / (abar sigma^2 + 1 - abar)."""

    def model(x, t, cond=None):
        abar = schedule.abar(t[0])  # samplers evaluate the whole batch at one timestep
        return float((1 - abar).sqrt()) * (x - float(abar.sqrt()) * MU) / float(abar * SIGMA**2 + 1 - abar)

    return model


def _exact_velocity(schedule):
    """E[x_0 - eps | x_t] for Gaussian data and x_t = (1 - s) x_0 + s eps."""

    def model(x, t, cond=None):
        s = float(t[0]) / schedule.num_train_timesteps  # samplers evaluate the whole batch at one timestep
        var = (1 - s) ** 2 * SIGMA**2 + s**2
        return MU + ((1 - s) * SIGMA**2 - s) * (x - (1 - s) * MU) / var

    return model


@pytest.mark.parametrize(
    ("sampler", "kwargs", "std_tol"),
    [(sample_ddpm, {}, 0.02), (sample_ddim, {"steps": 50}, 0.04), (sample_dpmpp_2m, {"steps": 20}, 0.01)],
)
def test_samplers_reproduce_gaussian_statistics(sampler, kwargs, std_tol):
    """Deterministic first-order DDIM contracts the std: by 3 % at 50 steps on this schedule."""
    schedule, x = make_schedule("cosine"), noise((1024, 1, 4, 4), seed=0)
    sample = sampler(_exact_eps(schedule), x, schedule, generator=torch.Generator().manual_seed(1), **kwargs)
    assert abs(sample.mean().item() - MU) < 0.01
    assert abs(sample.std().item() / SIGMA - 1) < std_tol


def test_rflow_reproduces_gaussian_statistics():
    schedule, x = make_schedule("rflow"), noise((1024, 1, 4, 4), seed=0)
    sample = sample_rflow(_exact_velocity(schedule), x, schedule, steps=50)
    assert abs(sample.mean().item() - MU) < 0.01
    assert abs(sample.std().item() / SIGMA - 1) < 0.04  # Euler's first-order error: -2.8 % at 50 steps


def test_same_generator_gives_bit_identical_samples():
    schedule, learned = make_schedule("linear"), make_schedule("linear", learn_sigma=True)
    for sampler, model, sched, kwargs in [(sample_ddpm, toy_model_learned, learned, {"steps": 20}),
                                          (sample_ddim, toy_model, schedule, {"steps": 10, "eta": 1.0})]:
        runs = [sampler(model, noise(seed=0), sched, generator=torch.Generator().manual_seed(seed), **kwargs)
                for seed in (4, 4, 5)]
        assert torch.equal(runs[0], runs[1])
        assert not torch.allclose(runs[0], runs[2])


@pytest.mark.parametrize("sampler, kwargs", [(sample_ddpm, {"steps": 6}), (sample_ddim, {"steps": 6, "eta": 1.0})])
def test_per_item_generators_make_a_sample_independent_of_its_batch(sampler, kwargs):
    seeds, schedule = [11, 12, 13], make_schedule("linear")
    generators = item_generators(seeds)
    batch = sampler(toy_model, item_noise((2, 4, 4), generators), schedule, generator=generators, **kwargs)
    alone_gen = item_generators(seeds[1:2])
    alone = sampler(toy_model, item_noise((2, 4, 4), alone_gen), schedule, generator=alone_gen, **kwargs)
    torch.testing.assert_close(alone[0], batch[1], rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="one per item"):
        sampler(toy_model, noise(), schedule, generator=item_generators([1]), **kwargs)


def test_bad_arguments():
    schedule, x = make_schedule("linear"), noise()
    with pytest.raises(ValueError, match="steps"):
        sample_ddim(toy_model, x, schedule, steps=T + 1)
    with pytest.raises(ValueError, match="eta"):
        sample_ddim(toy_model, x, schedule, eta=-0.1)
    with pytest.raises(TypeError, match="sample_rflow"):
        sample_dpmpp_2m(toy_model, x, make_schedule("rflow"))
    with pytest.raises(ValueError, match="kind"):
        make_schedule("quadratic")
    with pytest.raises(ValueError, match="prediction"):
        make_schedule("linear", prediction="flow")
