"""Diffusion services against references: diffusers' schedulers step for step, MONAI's schedulers,
closed-form Gaussian data, and a direct KL computation."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler
from diffusers.schedulers.scheduling_ddpm import betas_for_alpha_bar
from monai.networks.schedulers import DDPMScheduler as MonaiDDPMScheduler
from monai.networks.schedulers import RFlowScheduler

from medsynth.config import validate_config
from medsynth.diffusion import (
    SAMPLERS,
    Condition,
    ConditionedDenoiser,
    DiffusionLoss,
    PatchwiseDenoiser,
    SamplerConfig,
    build_unet,
    classifier_free_guidance,
    drop_condition,
    make_schedule,
    null_condition,
    run_sampler,
    sample_ddim,
    sample_ddpm,
    sample_dpmpp_2m,
    sample_rflow,
    spaced_timesteps,
    vlb_terms,
)
from medsynth.diffusion.sampling import ClippedX0, SamplerName
from medsynth.errors import MedsynthError
from medsynth.seeds import item_generators, item_noise, item_seed

T = 1000
PREDICTIONS = ["epsilon", "v_prediction", "sample"]
KINDS = ["linear", "cosine"]


def _toy_model(x, t, cond=None):
    """A fixed smooth map of (x, t), so that both implementations see the same outputs."""
    w = torch.tensor([[0.2, -0.1], [0.15, 0.25]], dtype=x.dtype)
    s = (t.to(x.dtype) / T).reshape(-1, 1, 1, 1)
    return torch.einsum("oc,bchw->bohw", w, x) * (0.5 + s) + 0.3 * torch.tanh(x)


def _toy_model_learned(x, t, cond=None):
    """The toy prediction plus variance values v in [-1, 1]."""
    return torch.cat([_toy_model(x, t), torch.tanh(2 * x)], dim=1)


def _noise(shape=(3, 2, 4, 4), seed=1):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _trajectory(sampler, model, x, schedule, seed=None, **kwargs):
    traj = []
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    final = sampler(model, x, schedule, None, generator=generator,
                    callback=lambda i, t, x, x0: traj.append(x), **kwargs)
    assert torch.equal(final, traj[-1])
    return traj


def _diffusers_trajectory(scheduler, model, x, steps, seed=None, **step_kwargs):
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    scheduler.set_timesteps(steps)
    traj = []
    for t in scheduler.timesteps:
        x = scheduler.step(model(x, t.expand(x.shape[0])), t, x, generator=generator, **step_kwargs).prev_sample
        traj.append(x)
    return traj


def _diffusers_args(schedule):
    return dict(num_train_timesteps=T, trained_betas=schedule.betas.float().tolist(),
                prediction_type=schedule.prediction, timestep_spacing="trailing")


def _assert_same_trajectory(ours, theirs, tol=1e-5):
    """Every step agrees to ``tol`` relative to the sample's scale (the toy model is not a good
    denoiser: on the cosine schedule its x_0 estimates and samples reach 1e3)."""
    assert len(ours) == len(theirs)
    for step, (a, b) in enumerate(zip(ours, theirs)):
        error = ((a - b).abs().max() / (1 + b.abs().max())).item()
        assert error < tol, f"step {step}: relative difference {error:.2e}"


# --- schedules and timesteps ---------------------------------------------------------------------


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
    x0, eps = _noise(seed=2).double(), _noise(seed=3).double()
    t = torch.tensor([0, 250, 999])
    x_t = schedule.q_sample(x0, t, eps)
    x0_hat, eps_hat = schedule.predict_x0_eps(schedule.target(x0, eps, t), x_t, t)
    torch.testing.assert_close(x0_hat, x0, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(eps_hat, eps, rtol=1e-9, atol=1e-9)


def test_noising_and_velocity_equal_monai():
    monai = MonaiDDPMScheduler(num_train_timesteps=T, schedule="linear_beta", clip_sample=False)
    schedule = make_schedule("linear", prediction="v_prediction")
    x0, eps, t = _noise(seed=2), _noise(seed=3), torch.tensor([0, 500, 999])
    torch.testing.assert_close(schedule.q_sample(x0, t, eps), monai.add_noise(x0, eps, t), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(schedule.target(x0, eps, t), monai.get_velocity(x0, eps, t), rtol=1e-5, atol=1e-5)


# --- samplers against diffusers ------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_ddim_matches_diffusers_step_for_step(kind, prediction):
    """eta = 0, and eta = 0.5 with the same generator (same noise draws)."""
    schedule, x = make_schedule(kind, prediction=prediction), _noise()
    diffusers = DDIMScheduler(clip_sample=False, set_alpha_to_one=True, **_diffusers_args(schedule))
    _assert_same_trajectory(_trajectory(sample_ddim, _toy_model, x, schedule, steps=50),
                            _diffusers_trajectory(diffusers, _toy_model, x, 50))
    _assert_same_trajectory(_trajectory(sample_ddim, _toy_model, x, schedule, seed=7, steps=50, eta=0.5),
                            _diffusers_trajectory(diffusers, _toy_model, x, 50, seed=7, eta=0.5))


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_clipped_x0_ddim_matches_diffusers_clip_sample(prediction):
    """SamplerConfig.clip_x0 = diffusers' clip_sample with the eps recomputed from the clipped x_0."""
    schedule, x = make_schedule("cosine", prediction=prediction), _noise()
    diffusers = DDIMScheduler(clip_sample=True, clip_sample_range=1.5, set_alpha_to_one=True, **_diffusers_args(schedule))
    clipped = ClippedX0(_toy_model, schedule, 1.5)
    ours = _trajectory(sample_ddim, clipped, x, schedule, steps=20)
    # float32 eps re-derived by dividing by sqrt(1 - abar) in diffusers, float64 abar here: 1e-5 relative at worst
    _assert_same_trajectory(ours, _diffusers_trajectory(diffusers, _toy_model, x, 20, use_clipped_model_output=True), tol=1e-4)
    assert ours[-1].abs().max() <= 1.5 + 1e-6  # the toy model's unclipped samples reach 1e3 on this schedule
    config = SamplerConfig(sampler="ddim", steps=20, clip_x0=1.5)
    torch.testing.assert_close(run_sampler(_toy_model, x, schedule, None, config), ours[-1])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_dpmpp_2m_matches_diffusers_step_for_step(kind, prediction):
    schedule, x = make_schedule(kind, prediction=prediction), _noise()
    for steps in (10, 20):  # below and above diffusers' lower_order_final threshold (15)
        diffusers = DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2, lower_order_final=True,
                                                final_sigmas_type="zero", **_diffusers_args(schedule))
        _assert_same_trajectory(_trajectory(sample_dpmpp_2m, _toy_model, x, schedule, steps=steps),
                                _diffusers_trajectory(diffusers, _toy_model, x, steps))


@pytest.mark.parametrize("kind", KINDS)
def test_strided_ddpm_matches_diffusers_step_for_step(kind):
    schedule, x = make_schedule(kind, prediction="v_prediction"), _noise()
    diffusers = DDPMScheduler(clip_sample=False, variance_type="fixed_small", **_diffusers_args(schedule))
    _assert_same_trajectory(_trajectory(sample_ddpm, _toy_model, x, schedule, seed=5, steps=50),
                            _diffusers_trajectory(diffusers, _toy_model, x, 50, seed=5))


def test_learned_variance_ddpm_matches_diffusers_full_chain():
    """Improved DDPM's log-space variance = diffusers' "learned_range" (MONAI's is linear).

    diffusers keeps abar in float32, medsynth in float64 (as improved DDPM): over 1000 chained
    steps that alone reaches 1e-4, so diffusers gets the same float64 table here.
    """
    schedule, x = make_schedule("linear", learn_sigma=True), _noise()
    diffusers = DDPMScheduler(clip_sample=False, variance_type="learned_range", **_diffusers_args(schedule))
    diffusers.alphas_cumprod = schedule.alphas_cumprod.clone()
    _assert_same_trajectory(_trajectory(sample_ddpm, _toy_model_learned, x, schedule, seed=5),
                            _diffusers_trajectory(diffusers, _toy_model_learned, x, T, seed=5))


def test_deterministic_samplers_ignore_the_variance_half():
    fixed, learned, x = make_schedule("cosine"), make_schedule("cosine", learn_sigma=True), _noise()
    for sampler in (sample_ddim, sample_dpmpp_2m):
        assert torch.equal(sampler(_toy_model_learned, x, learned, steps=10), sampler(_toy_model, x, fixed, steps=10))


def test_rflow_matches_monai_step_for_step():
    schedule, x = make_schedule("rflow"), _noise()
    monai = RFlowScheduler(num_train_timesteps=T)
    monai.set_timesteps(25)
    theirs, xm = [], x
    for t, t_next in zip(monai.timesteps, torch.cat([monai.timesteps[1:], torch.tensor([0])])):
        xm, _ = monai.step(_toy_model(xm, t.expand(3)), t, xm, t_next)
        theirs.append(xm)
    _assert_same_trajectory(_trajectory(sample_rflow, _toy_model, x, schedule, steps=25), theirs)


# --- samplers on Gaussian data with the exact model ----------------------------------------------

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
    schedule, x = make_schedule("cosine"), _noise((1024, 1, 4, 4), seed=0)
    sample = sampler(_exact_eps(schedule), x, schedule, generator=torch.Generator().manual_seed(1), **kwargs)
    assert abs(sample.mean().item() - MU) < 0.01
    assert abs(sample.std().item() / SIGMA - 1) < std_tol


def test_rflow_reproduces_gaussian_statistics():
    schedule, x = make_schedule("rflow"), _noise((1024, 1, 4, 4), seed=0)
    sample = sample_rflow(_exact_velocity(schedule), x, schedule, steps=50)
    assert abs(sample.mean().item() - MU) < 0.01
    assert abs(sample.std().item() / SIGMA - 1) < 0.04  # Euler's first-order error: -2.8 % at 50 steps


def test_same_generator_gives_bit_identical_samples():
    schedule, learned = make_schedule("linear"), make_schedule("linear", learn_sigma=True)
    for sampler, model, sched, kwargs in [(sample_ddpm, _toy_model_learned, learned, {"steps": 20}),
                                          (sample_ddim, _toy_model, schedule, {"steps": 10, "eta": 1.0})]:
        runs = [sampler(model, _noise(seed=0), sched, generator=torch.Generator().manual_seed(seed), **kwargs)
                for seed in (4, 4, 5)]
        assert torch.equal(runs[0], runs[1])
        assert not torch.allclose(runs[0], runs[2])


# --- classifier-free guidance --------------------------------------------------------------------


def _class_model(calls):
    """eps(x | y) = 0.1 x + y (y = 0 is the null condition), counting forward passes."""

    def model(x, t, cond):
        calls.append(x.shape[0])
        out = 0.1 * x + cond.to(x.dtype).reshape(-1, 1, 1, 1)
        return torch.cat([out, -out], dim=1)  # a variance half, to check it is not guided

    return model


def test_guidance_convention():
    calls = []
    model, x, t, y = _class_model(calls), _noise(), torch.full((3,), 500), torch.tensor([1, 2, 3])
    eps_cond, eps_null = model(x, t, y), model(x, t, torch.zeros(3))
    assert torch.equal(classifier_free_guidance(model, 0.0, torch.tensor(0))(x, t, y), eps_cond)  # s = 0: conditional
    calls.clear()
    guided = classifier_free_guidance(model, 1.0, torch.tensor(0), learn_sigma=True)(x, t, y)
    torch.testing.assert_close(guided[:, :2], 2 * eps_cond[:, :2] - eps_null[:, :2])  # s = 1: 2 eps_c - eps_u
    assert torch.equal(guided[:, 2:], eps_cond[:, 2:])
    assert calls == [6]  # one batched forward for both passes
    s = 3.5
    guided = classifier_free_guidance(model, s, torch.zeros_like)(x, t, y)  # no learn_sigma: all channels
    torch.testing.assert_close(guided, eps_cond + s * (eps_cond - eps_null))


@pytest.mark.parametrize("scale", [-1.0, float("nan")])
def test_negative_guidance_scale_is_a_clear_error(scale):
    with pytest.raises(MedsynthError, match=r"guidance scale must be >= 0") as info:
        classifier_free_guidance(_toy_model, scale, torch.tensor(0))
    assert "\n" not in str(info.value)


# --- training objective --------------------------------------------------------------------------


@pytest.mark.parametrize("t_value", [0, 1, 400])
def test_vlb_term_matches_direct_kl(t_value):
    """L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)), written out from DDPM eqs. 6-7 and
    improved DDPM eq. 15; L_0 = -log p(x_0 | x_1) with 256 bins."""
    schedule = make_schedule("linear", learn_sigma=True)
    x0 = torch.randint(0, 256, (3, 2, 4, 4), generator=torch.Generator().manual_seed(2)) / 127.5 - 1  # 8-bit data
    t, eps = torch.full((3,), t_value), _noise(seed=3)
    x_t, eps_pred, v = schedule.q_sample(x0, t, eps), eps + 0.2 * _noise(seed=4), torch.tanh(_noise(seed=5))
    got = vlb_terms(schedule, eps_pred, v, x0, x_t, t)

    betas, abar = schedule.betas, schedule.alphas_cumprod
    abar_prev = abar[t_value - 1] if t_value > 0 else torch.tensor(1.0, dtype=torch.float64)
    beta, a = betas[t_value], abar[t_value]
    beta_tilde = (1 - abar_prev) / (1 - a) * beta if t_value > 0 else (1 - abar[0]) / (1 - abar[1]) * betas[1]

    def mean(x0_):
        return (abar_prev.sqrt() * beta / (1 - a) * x0_ + (1 - beta).sqrt() * (1 - abar_prev) / (1 - a) * x_t).float()

    x0_pred = (x_t - (1 - a).sqrt() * eps_pred) / a.sqrt()
    frac = (v + 1) / 2
    model_std = (0.5 * (frac * beta.log() + (1 - frac) * beta_tilde.log())).exp().float()
    p = torch.distributions.Normal(mean(x0_pred), model_std)
    if t_value > 0:
        q = torch.distributions.Normal(mean(x0), beta_tilde.sqrt().float())
        expected = torch.distributions.kl_divergence(q, p).flatten(1).mean(1) / math.log(2)
    else:
        upper = torch.where(x0 > 0.999, torch.tensor(float("inf")), x0 + 1 / 255)
        lower = torch.where(x0 < -0.999, torch.tensor(float("-inf")), x0 - 1 / 255)
        expected = -(p.cdf(upper) - p.cdf(lower)).log().flatten(1).mean(1) / math.log(2)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_hybrid_loss_is_finite_and_stops_the_vlb_gradient_at_the_mean():
    schedule = make_schedule("cosine", learn_sigma=True)
    x0 = _noise(seed=2).clamp(-1, 1)
    output = torch.zeros(3, 4, 4, 4, requires_grad=True)
    loss, logs = DiffusionLoss(schedule)(lambda x, t, c: output + 0, x0, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(loss) and set(logs) == {"loss", "mse", "vlb"}
    loss.backward()
    # the same draws again, to get the MSE target: the mean half's gradient is the MSE's only
    g = torch.Generator().manual_seed(0)
    t = schedule.sample_t(x0, g)
    eps = torch.randn(x0.shape, generator=g)
    expected = 2 * (0 - eps) / eps[0].numel() / 3
    torch.testing.assert_close(output.grad[:, :2], expected)
    assert output.grad[:, 2:].abs().sum() > 0 and t.shape == (3,)


@pytest.mark.parametrize(("kind", "prediction"), [("linear", p) for p in PREDICTIONS] + [("rflow", None)])
def test_loss_regresses_the_schedule_target(kind, prediction):
    """The exact target gives zero loss; the toy model a positive one."""
    schedule, x0 = make_schedule(kind, prediction=prediction), _noise(seed=2)
    loss_fn = DiffusionLoss(schedule)

    def oracle(x_t, t, cond):
        g = torch.Generator().manual_seed(0)
        schedule.sample_t(x0, g)
        return schedule.target(x0, torch.randn(x0.shape, generator=g), t)

    assert loss_fn(oracle, x0, generator=torch.Generator().manual_seed(0))[0] == 0
    assert loss_fn(_toy_model, x0, generator=torch.Generator().manual_seed(0))[0] > 0


def test_flow_loss_uses_monai_convention():
    schedule, x0, eps = make_schedule("rflow"), _noise(seed=2), _noise(seed=3)
    t = torch.tensor([0, 500, 999])
    torch.testing.assert_close(schedule.q_sample(x0, t, eps), RFlowScheduler(T).add_noise(x0, eps, t))
    torch.testing.assert_close(schedule.predict_x0(schedule.target(x0, eps, t), schedule.q_sample(x0, t, eps), t), x0)


def test_condition_dropout():
    seen = []

    def model(x, t, cond):
        seen.append(cond)
        return x

    cond = torch.arange(1, 201)
    DiffusionLoss(make_schedule(), cond_drop_prob=0.3, null_cond=torch.tensor(0))(model, _noise((200, 2, 4, 4)), cond)
    dropped = seen[-1] == 0
    assert 0.2 < dropped.float().mean() < 0.4 and torch.equal(seen[-1][~dropped], cond[~dropped])
    label_maps = torch.ones(200, 3, 4, 4)
    loss_fn = DiffusionLoss(make_schedule(), cond_drop_prob=0.3, null_cond=torch.zeros_like)
    loss_fn(model, _noise((200, 2, 4, 4)), label_maps)
    per_sample = seen[-1].flatten(1)
    assert ((per_sample == 0).all(1) | (per_sample == 1).all(1)).all() and (per_sample == 0).any()
    with pytest.raises(ValueError, match="null condition"):
        DiffusionLoss(make_schedule(), cond_drop_prob=0.1)


# --- MONAI networks, precision, errors -----------------------------------------------------------

_TINY_UNET = dict(channels=(8, 8), attention_levels=(False, False), num_res_blocks=1, norm_num_groups=4)



def test_monai_unet_denoiser_trains_and_samples_in_bf16():
    torch.manual_seed(0)
    unet = build_unet(2, 1, 1, learn_sigma=True, num_class_embeds=3, **_TINY_UNET)
    assert unet.out_channels == 2
    model, x, y = ConditionedDenoiser(unet, tensor_as="class_labels"), _noise((2, 1, 8, 8)), torch.tensor([0, 1])
    schedule = make_schedule("linear", learn_sigma=True)
    loss, _ = DiffusionLoss(schedule, cond_drop_prob=0.5, null_cond=torch.tensor(2))(model, x.clamp(-1, 1), y)
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in unet.parameters())
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        guided = classifier_free_guidance(model, 2.0, torch.tensor(2), learn_sigma=True)
        sample = sample_ddim(guided, x, schedule, y, steps=3)
    assert sample.dtype == torch.float32 and torch.isfinite(sample).all()


def test_flash_attention_changes_the_kernel_not_the_maths():
    args = {**_TINY_UNET, "attention_levels": (False, True), "num_head_channels": 4}
    torch.manual_seed(0)
    flash, plain = build_unet(2, 1, 1, **args), build_unet(2, 1, 1, use_flash_attention=False, **args)
    plain.load_state_dict(flash.state_dict())
    x, t = _noise((2, 1, 8, 8)), torch.tensor([10, 900])
    with torch.no_grad():
        torch.testing.assert_close(ConditionedDenoiser(flash)(x, t), ConditionedDenoiser(plain)(x, t), rtol=1e-4, atol=1e-5)


def test_spade_unet_denoiser():
    model = ConditionedDenoiser(build_unet(2, 1, 1, label_nc=3, **_TINY_UNET), tensor_as="seg")
    seg = torch.nn.functional.one_hot(torch.randint(0, 3, (2, 8, 8)), 3).permute(0, 3, 1, 2).float()
    with torch.no_grad():
        out = sample_dpmpp_2m(classifier_free_guidance(model, 1.5, torch.zeros_like), _noise((2, 1, 8, 8)),
                              make_schedule("cosine"), seg, steps=2)
    assert out.shape == (2, 1, 8, 8) and torch.isfinite(out).all()


def test_bad_arguments():
    schedule, x = make_schedule("linear"), _noise()
    with pytest.raises(ValueError, match="steps"):
        sample_ddim(_toy_model, x, schedule, steps=T + 1)
    with pytest.raises(ValueError, match="eta"):
        sample_ddim(_toy_model, x, schedule, eta=-0.1)
    with pytest.raises(TypeError, match="sample_rflow"):
        sample_dpmpp_2m(_toy_model, x, make_schedule("rflow"))
    with pytest.raises(ValueError, match="kind"):
        make_schedule("quadratic")
    with pytest.raises(ValueError, match="prediction"):
        make_schedule("linear", prediction="flow")


# --- sampler registry, settings, per-item seeds ----------------------------------------------------


def test_sampler_registry_and_config():
    assert set(SAMPLERS) == set(SamplerName.__args__)  # the config's names are the registry's
    config = SamplerConfig()
    assert [SamplerConfig(sampler=name).steps_for(make_schedule()) for name in SAMPLERS] == [T, 50, 20, 30]
    assert config.model_copy(update={"steps": 7}).steps_for(make_schedule()) == 7
    for bad, word in [({"guidance": float("inf")}, "guidance"), ({"guidance": -1}, "guidance"), ({"eta": 2}, "eta"),
                      ({"sampler": "euler"}, "sampler"), ({"steps": 0}, "steps")]:
        with pytest.raises(MedsynthError, match=word) as info:
            validate_config(SamplerConfig, bad, "sample")
        assert "\n" not in str(info.value)


def test_run_sampler_checks_schedule_and_steps_in_one_line():
    x = _noise()
    with pytest.raises(MedsynthError, match="does not fit") as info:
        run_sampler(_toy_model, x, make_schedule("rflow"), None, SamplerConfig(sampler="ddim"))
    assert "\n" not in str(info.value)
    with pytest.raises(MedsynthError, match="exceeds"):
        run_sampler(_toy_model, x, make_schedule(), None, SamplerConfig(sampler="ddim", steps=T + 1))
    ours = run_sampler(_toy_model, x, make_schedule(), None, SamplerConfig(sampler="ddim", steps=5))
    assert torch.equal(ours, sample_ddim(_toy_model, x, make_schedule(), steps=5))


def test_importing_the_sampler_registry_is_cheap():
    import subprocess
    import sys

    code = ("import sys; from medsynth.diffusion.sampling import SAMPLERS; "
            "print(any(m.split('.')[0] in ('monai', 'lightning') for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_item_seed_helper():
    assert item_seed(3, 4) == 3 * 100_003 + 4 and item_seed(3, 4, stride=1000) == 3004
    noise = item_noise((2, 3), item_generators([7, 8]))
    assert torch.equal(noise[1], torch.randn(2, 3, generator=torch.Generator().manual_seed(8)))


@pytest.mark.parametrize("sampler, kwargs", [(sample_ddpm, {"steps": 6}), (sample_ddim, {"steps": 6, "eta": 1.0})])
def test_per_item_generators_make_a_sample_independent_of_its_batch(sampler, kwargs):
    seeds, schedule = [11, 12, 13], make_schedule("linear")
    generators = item_generators(seeds)
    batch = sampler(_toy_model, item_noise((2, 4, 4), generators), schedule, generator=generators, **kwargs)
    alone_gen = item_generators(seeds[1:2])
    alone = sampler(_toy_model, item_noise((2, 4, 4), alone_gen), schedule, generator=alone_gen, **kwargs)
    torch.testing.assert_close(alone[0], batch[1], rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="one per item"):
        sampler(_toy_model, _noise(), schedule, generator=item_generators([1]), **kwargs)


# --- structured conditions: guidance and drop-out ------------------------------------------------

NULL = {"seg": torch.zeros_like, "class_labels": torch.tensor(5)}


def _structured():
    return Condition(concat=torch.full((4, 1, 2, 2), 7.0), seg=torch.ones(4, 3, 2, 2), class_labels=torch.tensor([0, 1, 2, 3]),
                     vector=torch.ones(4, 2))


def test_null_and_drop_of_a_structured_condition():
    cond = _structured()
    null = null_condition(cond, NULL)
    assert (null.seg == 0).all() and (null.class_labels == 5).all()
    assert torch.equal(null.concat, cond.concat) and torch.equal(null.vector, cond.vector)  # parts not named are kept
    dropped = drop_condition(cond, NULL, torch.tensor([True, False, True, False]))
    assert dropped.class_labels.tolist() == [5, 1, 5, 3] and dropped.seg.flatten(1).amax(1).tolist() == [0, 1, 0, 1]
    assert torch.equal(dropped.concat, cond.concat)
    with pytest.raises(ValueError, match="unknown parts"):
        null_condition(cond, {"labels": torch.tensor(0)})


def test_guidance_on_a_structured_condition():
    def model(x, t, cond):  # eps(x | c) = x + class + seg mean + concat
        return x + cond.class_labels.view(-1, 1, 1, 1) + cond.seg.mean(1, keepdim=True) + cond.concat

    cond, x, t = _structured(), torch.zeros(4, 1, 2, 2), torch.full((4,), 10)
    eps_c, eps_u = model(x, t, cond), model(x, t, null_condition(cond, NULL))
    torch.testing.assert_close(classifier_free_guidance(model, 2.0, NULL)(x, t, cond), eps_c + 2 * (eps_c - eps_u))


def test_loss_drops_the_named_parts_of_a_structured_condition():
    seen = []
    cond = Condition(concat=torch.ones(200, 1, 4, 4), seg=torch.ones(200, 3, 4, 4))
    DiffusionLoss(make_schedule(), cond_drop_prob=0.3, null_cond={"seg": torch.zeros_like})(
        lambda x, t, c: seen.append(c) or x[:, :1], _noise((200, 1, 4, 4)), cond)
    dropped = (seen[-1].seg.flatten(1) == 0).all(1)
    assert 0.2 < dropped.float().mean() < 0.4 and (seen[-1].concat == 1).all()


def test_conditioned_denoiser_routes_every_part():
    torch.manual_seed(0)
    unet = build_unet(2, 1 + 2, 1, label_nc=3, num_class_embeds=4, with_conditioning=True, cross_attention_dim=5,
                      **{**_TINY_UNET, "attention_levels": (False, True), "num_head_channels": 4})
    for parameter in unet.parameters():  # MONAI zero-initialises output layers: give every path a weight
        torch.nn.init.normal_(parameter, std=0.2)
    model = ConditionedDenoiser(unet)
    cond = Condition(concat=torch.randn(2, 2, 8, 8), seg=torch.ones(2, 3, 8, 8) / 3, class_labels=torch.tensor([1, 2]),
                     vector=torch.randn(2, 5))
    x, t = _noise((2, 1, 8, 8)), torch.tensor([10, 900])
    with torch.no_grad():
        out = model(x, t, cond)
        assert out.shape == (2, 1, 8, 8)
        for part, other in [("concat", torch.zeros(2, 2, 8, 8)), ("seg", torch.zeros(2, 3, 8, 8)),
                            ("class_labels", torch.tensor([3, 3])), ("vector", torch.zeros(2, 5))]:
            assert not torch.allclose(model(x, t, cond.replace(**{part: other})), out), part
    with pytest.raises(TypeError, match="tensor_as"):
        model(x, t, torch.zeros(2, 3, 8, 8))


# --- patch-wise denoising ------------------------------------------------------------------------


def test_patchwise_denoiser_is_exact_for_a_pointwise_model():
    # A voxel-wise model gives the same answer in every patch: the blend must reproduce it exactly.
    def model(x, t, cond):
        return x * 2 + cond[:, :1] + t.view(-1, 1, 1, 1, 1)

    x, cond = torch.randn(2, 1, 12, 10, 16), torch.randn(2, 3, 12, 10, 16)
    t = torch.tensor([5, 5])
    patched = PatchwiseDenoiser(model, (8, 8, 8), overlap=0.5, batch_size=3)(x, t, cond)
    assert torch.allclose(patched, model(x, t, cond), atol=1e-5)
    with pytest.raises(MedsynthError, match="larger than the volume"):
        PatchwiseDenoiser(model, (16, 8, 8))(x, t, cond)


def test_patchwise_denoiser_splits_a_structured_condition():
    def model(x, t, cond):  # voxel-wise in the spatial parts, per item in the class label
        return x + cond.seg[:, :1] - cond.concat[:, 1:] + cond.class_labels.view(-1, 1, 1, 1, 1)

    x = torch.randn(2, 1, 12, 10, 16)
    cond = Condition(seg=torch.randn(2, 2, 12, 10, 16), concat=torch.randn(2, 2, 12, 10, 16), class_labels=torch.tensor([1, 4]))
    patched = PatchwiseDenoiser(model, (8, 8, 8), overlap=0.5, batch_size=2)(x, torch.tensor([5, 5]), cond)
    assert torch.allclose(patched, model(x, None, cond), atol=1e-5)
