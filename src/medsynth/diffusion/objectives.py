"""The diffusion training objective: one callable for every parametrisation.

``DiffusionLoss(schedule)(model, x0, cond) -> (loss, logs)`` regresses the schedule's target
(eps, x_0, v or the flow velocity) with an MSE (DDPM's L_simple, eq. 14), drops the condition for
classifier-free guidance, and with ``schedule.learn_sigma`` adds improved DDPM's variational
term: L_hybrid = L_simple + lambda L_vlb (Nichol & Dhariwal 2021, sec. 3.1).

MONAI has no VLB/hybrid loss (and its ``learned_range`` variance is interpolated linearly), so the
few lines of :func:`vlb_terms`, :func:`normal_kl` and :func:`discretized_gaussian_log_likelihood`
are written here after the improved-DDPM reference code.

EMA weights are not here: use Lightning's ``EMAWeightAveraging`` callback (its checkpoint keeps
the averaged weights in ``state_dict``, the live ones in ``current_model_state`` and restores both
on resume).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from medsynth.diffusion.guidance import NullCondition, drop_condition
from medsynth.diffusion.samplers import Denoiser
from medsynth.diffusion.schedule import FlowSchedule, NoiseSchedule


def _mean_flat(x: Tensor) -> Tensor:
    """Mean over all but the batch dimension: (B, ..) -> (B,)."""
    return x.flatten(1).mean(dim=1)


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) per element, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + (logvar1 - logvar2).exp() + (mean1 - mean2) ** 2 * (-logvar2).exp())


def discretized_gaussian_log_likelihood(x: Tensor, mean: Tensor, log_scale: Tensor, bins: int = 256) -> Tensor:
    """log p(x) of data in [-1, 1] quantised to ``bins`` levels under N(mean, exp(log_scale)^2).

    DDPM's decoder L_0 (Ho et al. 2020, eq. 13): the Gaussian's mass on x's bin, the outermost bins
    extended to -inf / +inf. Per element, in nats.
    """
    half_bin = 1.0 / (bins - 1)
    inv_std = (-log_scale).exp()
    upper, lower = inv_std * (x - mean + half_bin), inv_std * (x - mean - half_bin)
    log_cdf_upper = torch.special.log_ndtr(upper)
    log_survival_lower = torch.special.log_ndtr(-lower)
    log_delta = (torch.special.ndtr(upper) - torch.special.ndtr(lower)).clamp(min=1e-12).log()
    edge = 1.0 - half_bin
    return torch.where(x < -edge, log_cdf_upper, torch.where(x > edge, log_survival_lower, log_delta))


def vlb_terms(
    schedule: NoiseSchedule, prediction: Tensor, var_values: Tensor, x0: Tensor, x_t: Tensor, t: Tensor
) -> Tensor:
    """The variational bound term L_t of each sample, in bits per dimension.

    L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) for t > 0 and the decoder NLL
    -log p(x_0 | x_1) for t = 0 (DDPM eq. 5; improved DDPM sec. 3.1).

    Args:
        schedule: the noise schedule (learned variance).
        prediction: the model's prediction half (B, C, *S); pass it detached for the hybrid loss.
        var_values: the model's variance half v in [-1, 1], (B, C, *S).
        x0: clean data in [-1, 1], (B, C, *S).
        x_t: the noisy input, (B, C, *S).
        t: timesteps, (B,).

    Returns:
        L_t per sample, shape (B,), in bits/dim.
    """
    t_prev = t - 1
    true_mean = schedule.posterior_mean(x0, x_t, t, t_prev)
    true_log_var = schedule.posterior_log_variance(x_t, t, t_prev)
    x0_pred, _ = schedule.predict_x0_eps(prediction, x_t, t)
    model_mean = schedule.posterior_mean(x0_pred, x_t, t, t_prev)
    model_log_var = schedule.posterior_log_variance(x_t, t, t_prev, var_values)
    kl = _mean_flat(normal_kl(true_mean, true_log_var, model_mean, model_log_var))
    nll = -_mean_flat(discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_var))
    return torch.where(t == 0, nll, kl) / math.log(2.0)


class DiffusionLoss:
    """Training loss for a denoiser ``model(x_t, t, cond)`` under a schedule.

    Args:
        schedule: what the model predicts and how data is noised (:class:`NoiseSchedule` or
            :class:`FlowSchedule`).
        cond_drop_prob: probability of replacing a sample's condition by the null condition
            (classifier-free guidance training, Ho & Salimans 2022, Alg. 1); 0.1-0.2 is usual.
        null_cond: the null condition, a tensor broadcast to the condition's shape or a function
            of it (``torch.zeros_like`` for an empty label map). Required when cond_drop_prob > 0.
        vlb_weight: lambda of the hybrid loss (improved DDPM: 0.001); used with learn_sigma.
    """

    def __init__(
        self,
        schedule: NoiseSchedule | FlowSchedule,
        *,
        cond_drop_prob: float = 0.0,
        null_cond: NullCondition | None = None,
        vlb_weight: float = 1e-3,
    ):
        if not 0 <= cond_drop_prob < 1:
            raise ValueError(f"cond_drop_prob must be in [0, 1), got {cond_drop_prob}")
        if cond_drop_prob > 0 and null_cond is None:
            raise ValueError("cond_drop_prob > 0 needs a null condition (null_cond)")
        self.schedule = schedule
        self.cond_drop_prob = cond_drop_prob
        self.null_cond = null_cond
        self.vlb_weight = vlb_weight

    def __call__(
        self, model: Denoiser, x0: Tensor, cond: Any = None, generator: torch.Generator | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """One Monte-Carlo estimate of the loss on a batch.

        Args:
            model: the denoiser.
            x0: clean data, shape (B, C, *S).
            cond: the batch's conditions (B, ..), or None.
            generator: source of t, the noise and the dropout mask (default: the global RNG).

        Returns:
            (scalar loss, logs): logs holds detached ``loss``, ``mse`` and, with learn_sigma, ``vlb``.
        """
        schedule = self.schedule
        dtype = torch.promote_types(x0.dtype, torch.float32)  # losses in >= float32 under bf16/fp16
        # 1. t ~ p(t), eps ~ N(0, I), x_t ~ q(x_t | x_0)
        t = schedule.sample_t(x0, generator)
        noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=x0.device)
        x_t = schedule.q_sample(x0, t, noise)
        # 2. classifier-free guidance training: a null condition for a random part of the batch
        if self.cond_drop_prob > 0:
            drop = torch.rand(x0.shape[0], generator=generator, device=x0.device) < self.cond_drop_prob
            cond = drop_condition(cond, self.null_cond, drop)
        # 3. L_simple: MSE between the prediction and its target (DDPM eq. 14 for eps)
        prediction, var_values = schedule.split(model(x_t, t, cond).to(dtype))
        target = schedule.target(x0, noise, t).to(dtype)
        loss = _mean_flat((prediction - target) ** 2)
        logs = {"mse": loss.mean().detach()}
        # 4. hybrid loss: + lambda L_vlb, L_vlb = sum_t L_t estimated by T L_t; stop-grad on the mean
        if var_values is not None:
            vlb = vlb_terms(schedule, prediction.detach(), var_values, x0.to(dtype), x_t.to(dtype), t)
            loss = loss + self.vlb_weight * schedule.num_train_timesteps * vlb
            logs["vlb"] = vlb.mean().detach()
        loss = loss.mean()
        logs["loss"] = loss.detach()
        return loss, logs
