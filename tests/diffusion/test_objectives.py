"""Training objectives: the VLB term against a direct KL, the hybrid loss, the regression target, condition drop-out."""

from __future__ import annotations

import math

import pytest
import torch

from diffusion_toys import PREDICTIONS, noise, toy_model
from medsynth.diffusion import Condition, DiffusionLoss, make_schedule, vlb_terms


@pytest.mark.parametrize("t_value", [0, 1, 400])
def test_vlb_term_matches_direct_kl(t_value):
    """L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)), written out from DDPM eqs. 6-7 and
    improved DDPM eq. 15; L_0 = -log p(x_0 | x_1) with 256 bins."""
    schedule = make_schedule("linear", learn_sigma=True)
    x0 = torch.randint(0, 256, (3, 2, 4, 4), generator=torch.Generator().manual_seed(2)) / 127.5 - 1  # 8-bit data
    t, eps = torch.full((3,), t_value), noise(seed=3)
    x_t, eps_pred, v = schedule.q_sample(x0, t, eps), eps + 0.2 * noise(seed=4), torch.tanh(noise(seed=5))
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
    x0 = noise(seed=2).clamp(-1, 1)
    output = torch.zeros(3, 4, 4, 4, requires_grad=True)
    loss, logs = DiffusionLoss(schedule)(lambda x, t, c: output + 0, x0, generator=torch.Generator().manual_seed(0))
    assert set(logs) == {"loss", "mse", "vlb"} and logs["vlb"] > 0  # a KL in bits: positive for a zero prediction
    # improved DDPM's hybrid loss: L_simple + lambda T L_vlb (lambda = 0.001), means over the batch
    torch.testing.assert_close(logs["loss"], logs["mse"] + 1e-3 * schedule.num_train_timesteps * logs["vlb"])
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
    schedule, x0 = make_schedule(kind, prediction=prediction), noise(seed=2)
    loss_fn = DiffusionLoss(schedule)

    def oracle(x_t, t, cond):
        g = torch.Generator().manual_seed(0)
        schedule.sample_t(x0, g)
        return schedule.target(x0, torch.randn(x0.shape, generator=g), t)

    assert loss_fn(oracle, x0, generator=torch.Generator().manual_seed(0))[0] == 0
    assert loss_fn(toy_model, x0, generator=torch.Generator().manual_seed(0))[0] > 0


def test_condition_dropout():
    seen = []

    def model(x, t, cond):
        seen.append(cond)
        return x

    cond = torch.arange(1, 201)
    DiffusionLoss(make_schedule(), cond_drop_prob=0.3, null_cond=torch.tensor(0))(model, noise((200, 2, 4, 4)), cond)
    dropped = seen[-1] == 0
    assert 0.2 < dropped.float().mean() < 0.4 and torch.equal(seen[-1][~dropped], cond[~dropped])
    label_maps = torch.ones(200, 3, 4, 4)
    loss_fn = DiffusionLoss(make_schedule(), cond_drop_prob=0.3, null_cond=torch.zeros_like)
    loss_fn(model, noise((200, 2, 4, 4)), label_maps)
    per_sample = seen[-1].flatten(1)
    assert ((per_sample == 0).all(1) | (per_sample == 1).all(1)).all() and (per_sample == 0).any()
    with pytest.raises(ValueError, match="null condition"):
        DiffusionLoss(make_schedule(), cond_drop_prob=0.1)


def test_loss_drops_the_named_parts_of_a_structured_condition():
    seen = []
    cond = Condition(concat=torch.ones(200, 1, 4, 4), seg=torch.ones(200, 3, 4, 4))
    DiffusionLoss(make_schedule(), cond_drop_prob=0.3, null_cond={"seg": torch.zeros_like})(
        lambda x, t, c: seen.append(c) or x[:, :1], noise((200, 1, 4, 4)), cond)
    dropped = (seen[-1].seg.flatten(1) == 0).all(1)
    assert 0.2 < dropped.float().mean() < 0.4 and (seen[-1].concat == 1).all()
