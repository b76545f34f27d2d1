"""Noise schedules: the forward process q(x_t | x_0) and how a model's output is read.

A schedule object is what the training loss and every sampler share, so a model can only be
sampled in the parametrisation it was trained in. Two families:

- :class:`NoiseSchedule`: discrete variance-preserving diffusion (DDPM), timesteps
  t = 0 .. T-1, ``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps``. The model predicts
  ``"epsilon"``, ``"sample"`` (x_0) or ``"v_prediction"``, optionally with a learned variance
  (``learn_sigma``: twice the channels, improved DDPM).
- :class:`FlowSchedule`: rectified flow, ``x_t = (1 - t/T) x_0 + (t/T) eps`` with t in [0, T]
  (T = pure noise); the model predicts the velocity ``v = x_0 - eps`` (``"flow"``), MONAI's
  ``RFlowScheduler`` convention, so models trained here also run with MONAI's scheduler.

Notation (Ho et al. 2020; Nichol & Dhariwal 2021): ``beta_t``, ``alpha_t = 1 - beta_t``,
``abar_t = prod_{s<=t} alpha_s`` (``alphas_cumprod``). A previous timestep ``t_prev = -1``
stands for the clean data (``abar = 1``): the last step of every sampler goes there.

From MONAI we take the beta tables (``monai.networks.schedulers.NoiseSchedules``) and the
rectified-flow timestep grid (``RFlowScheduler.set_timesteps``, ``timestep_transform``). The
per-step maths is written here as pure functions of ``(t, t_prev)`` because MONAI's scheduler
objects are stateful (``set_timesteps`` mutates them, ``add_noise`` recasts their tables) and
their ``step()`` cannot serve strided sampling: DDPM's step assumes ``t_prev = t - 1`` even
after ``set_timesteps``, DDIM's pairs its linspace timesteps with ``t - T // N``, and
``learned_range`` interpolates the variance linearly rather than in log space.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

Prediction = Literal["epsilon", "sample", "v_prediction", "flow"]
ScheduleKind = Literal["linear", "scaled_linear", "sigmoid", "cosine", "rflow"]

_MONAI_BETAS = {
    "linear": "linear_beta",
    "scaled_linear": "scaled_linear_beta",
    "sigmoid": "sigmoid_beta",
    "cosine": "cosine",
}
_VP_PREDICTIONS = ("epsilon", "sample", "v_prediction")


def broadcast(coef: Tensor, like: Tensor) -> Tensor:
    """Reshapes per-sample coefficients to broadcast over a batch.

    Args:
        coef: shape (B,) or () (one value for the whole batch).
        like: the tensor to broadcast against, shape (B, C, *spatial).

    Returns:
        ``coef`` in ``like``'s dtype and device, shape (B, 1, ..., 1) or (1, ..., 1).
    """
    coef = coef.to(device=like.device, dtype=like.dtype)
    return coef.reshape(coef.shape + (1,) * (like.ndim - coef.ndim))


class NoiseSchedule:
    """Discrete variance-preserving diffusion and the model's output parametrisation.

    Tables are kept in float64 (as the improved-DDPM reference code does); coefficients are cast
    to the data's dtype where they are applied.

    Args:
        betas: beta_t, shape (T,).
        prediction: what the model outputs: ``"epsilon"`` (eps), ``"sample"`` (x_0) or
            ``"v_prediction"`` (v = sqrt(abar) eps - sqrt(1 - abar) x_0, Salimans & Ho 2022).
        learn_sigma: the model also outputs a variance interpolation value v in [-1, 1] per
            element, as a second half of channels (Nichol & Dhariwal 2021, eq. 15).
    """

    def __init__(self, betas: Tensor, prediction: Prediction = "epsilon", learn_sigma: bool = False):
        if prediction not in _VP_PREDICTIONS:
            raise ValueError(f"prediction must be one of {_VP_PREDICTIONS} for a noise schedule, got {prediction!r}")
        self.betas = betas.detach().to(torch.float64).cpu()
        self.prediction = prediction
        self.learn_sigma = learn_sigma
        # abar_ext[t + 1] = abar_t for t = -1 .. T-1; abar_{-1} = 1 is the clean data.
        self._abar_ext = torch.cat([torch.ones(1, dtype=torch.float64), torch.cumprod(1.0 - self.betas, dim=0)])
        # improved DDPM's clipped log-variance at t = 0, where beta-tilde_0 = 0: use beta-tilde_1.
        self._beta_tilde_1 = float((1 - self._abar_ext[1]) / (1 - self._abar_ext[2]) * self.betas[1])

    @property
    def num_train_timesteps(self) -> int:
        """T, the number of training timesteps."""
        return self.betas.numel()

    @property
    def alphas_cumprod(self) -> Tensor:
        """abar_t for t = 0 .. T-1, shape (T,), float64."""
        return self._abar_ext[1:]

    def abar(self, t: Tensor) -> Tensor:
        """abar_t (float64, same shape and device as ``t``); ``t = -1`` gives 1 (clean data)."""
        return self._abar_ext.to(t.device)[t.long() + 1]

    def sample_t(self, x0: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Training timesteps t ~ U{0, .., T-1}, shape (B,), int64."""
        return torch.randint(0, self.num_train_timesteps, (x0.shape[0],), generator=generator, device=x0.device)

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps (DDPM eq. 4). Shapes (B, C, *S); t (B,)."""
        abar = self.abar(t)
        return broadcast(abar.sqrt(), x0) * x0 + broadcast((1 - abar).sqrt(), x0) * noise

    def target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """The regression target for ``prediction``: eps, x_0 or v (Salimans & Ho 2022, sec. 4)."""
        if self.prediction == "epsilon":
            return noise
        if self.prediction == "sample":
            return x0
        abar = self.abar(t)
        return broadcast(abar.sqrt(), x0) * noise - broadcast((1 - abar).sqrt(), x0) * x0

    def split(self, output: Tensor) -> tuple[Tensor, Tensor | None]:
        """Splits a model output (B, C or 2C, *S) into its prediction and its variance values.

        Returns:
            (prediction (B, C, *S), variance values v in [-1, 1] (B, C, *S) or None without
            ``learn_sigma``).
        """
        if not self.learn_sigma:
            return output, None
        prediction, var_values = output.chunk(2, dim=1)
        return prediction, var_values

    def predict_x0_eps(self, prediction: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Reads a model prediction as (x_0, eps): the one conversion every sampler uses.

        Args:
            prediction: model output without variance channels, shape (B, C, *S).
            x_t: the noisy sample, shape (B, C, *S).
            t: timesteps, shape (B,) or ().

        Returns:
            (x_0 estimate, eps estimate), each (B, C, *S).
        """
        abar = self.abar(t)
        a, s = broadcast(abar.sqrt(), x_t), broadcast((1 - abar).sqrt(), x_t)
        if self.prediction == "epsilon":
            return (x_t - s * prediction) / a, prediction  # DDPM eq. 15
        if self.prediction == "sample":
            return prediction, (x_t - a * prediction) / s
        return a * x_t - s * prediction, a * prediction + s * x_t  # v-parametrisation (Salimans & Ho 2022, sec. 4)

    def posterior_mean(self, x0: Tensor, x_t: Tensor, t: Tensor, t_prev: Tensor) -> Tensor:
        """Mean of q(x_{t_prev} | x_t, x_0) (DDPM eq. 7), also for strided steps t -> t_prev.

        A stride uses the respaced beta_t' = 1 - abar_t / abar_{t_prev} (improved DDPM, sec. 4).
        Shapes: x0, x_t (B, C, *S); t, t_prev (B,) or ().
        """
        abar_t, abar_prev = self.abar(t), self.abar(t_prev)
        beta = 1 - abar_t / abar_prev
        coef_x0 = abar_prev.sqrt() * beta / (1 - abar_t)
        coef_xt = (1 - beta).sqrt() * (1 - abar_prev) / (1 - abar_t)
        return broadcast(coef_x0, x_t) * x0 + broadcast(coef_xt, x_t) * x_t

    def posterior_log_variance(
        self, x_t: Tensor, t: Tensor, t_prev: Tensor, var_values: Tensor | None = None
    ) -> Tensor:
        """log variance of p(x_{t_prev} | x_t): fixed (beta-tilde) or learned.

        Without ``var_values`` this is log beta-tilde_t = log((1 - abar_prev) / (1 - abar_t) beta_t)
        (DDPM eq. 7). With them it is improved DDPM's eq. 15, interpolated in LOG space:
        log sigma^2 = frac log beta_t + (1 - frac) log beta-tilde_t, frac = (v + 1) / 2.
        At t_prev = -1 beta-tilde is 0; its log is clipped to log beta-tilde_1 as in improved DDPM.

        Args:
            x_t: the noisy sample (B, C, *S), for shape and dtype.
            t: timesteps, (B,) or ().
            t_prev: the step's target timesteps, (B,) or ().
            var_values: the model's variance half v, (B, C, *S), or None.

        Returns:
            (B, 1, .., 1) for the fixed variance, (B, C, *S) for a learned one.
        """
        abar_t, abar_prev = self.abar(t), self.abar(t_prev)
        beta = 1 - abar_t / abar_prev
        beta_tilde = torch.where(t_prev >= 0, (1 - abar_prev) / (1 - abar_t) * beta, self._beta_tilde_1)
        if var_values is None:
            return broadcast(beta_tilde.log(), x_t)
        frac = (var_values + 1) / 2
        return frac * broadcast(beta.log(), x_t) + (1 - frac) * broadcast(beta_tilde.log(), x_t)


class FlowSchedule:
    """Rectified flow (Liu et al. 2022) in MONAI's ``RFlowScheduler`` convention.

    ``x_t = (1 - t/T) x_0 + (t/T) eps`` for t in [0, T] (T = pure noise); the model predicts the
    velocity ``v = x_0 - eps`` (``prediction = "flow"``), so ``x_0 = x_t + (t/T) v``.

    Args:
        num_train_timesteps: T.
        sample_method: training timestep distribution, ``"uniform"`` or ``"logit-normal"``
            (t/T = sigmoid(loc + scale z), Esser et al. 2024).
        loc: logit-normal location.
        scale: logit-normal scale.
        use_discrete_timesteps: integer timesteps, as MONAI's default.
        use_timestep_transform: shift timesteps towards noise for volumes larger than
            ``base_img_size_numel`` (MONAI's ``timestep_transform``).
        base_img_size_numel: reference number of voxels for the transform.
        spatial_dims: 2 or 3.
    """

    prediction: Prediction = "flow"
    learn_sigma = False

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        *,
        sample_method: Literal["uniform", "logit-normal"] = "uniform",
        loc: float = 0.0,
        scale: float = 1.0,
        use_discrete_timesteps: bool = True,
        use_timestep_transform: bool = False,
        base_img_size_numel: int = 32 * 32 * 32,
        spatial_dims: int = 3,
    ):
        from monai.networks.schedulers import RFlowScheduler  # on use: `import medsynth.diffusion.sampling` stays MONAI-free

        self.scheduler = RFlowScheduler(
            num_train_timesteps=num_train_timesteps,
            use_discrete_timesteps=use_discrete_timesteps,
            sample_method=sample_method,
            loc=loc,
            scale=scale,
            use_timestep_transform=use_timestep_transform,
            base_img_size_numel=base_img_size_numel,
            spatial_dim=spatial_dims,
        )
        self.num_train_timesteps = num_train_timesteps
        self.loc, self.scale = loc, scale

    def sample_t(self, x0: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Training timesteps in [0, T), shape (B,).

        The same distribution as ``RFlowScheduler.sample_timesteps``, which draws from the global
        RNG only; this one takes a generator.
        """
        sched, batch = self.scheduler, x0.shape[0]
        if sched.sample_method == "uniform":
            u = torch.rand(batch, generator=generator, device=x0.device)
        else:  # logit-normal: MONAI's 1-D LogisticNormal(loc, scale)[:, 0] is sigmoid(loc + scale z)
            u = torch.sigmoid(self.loc + self.scale * torch.randn(batch, generator=generator, device=x0.device))
        t = u * self.num_train_timesteps
        if sched.use_discrete_timesteps:
            t = t.long()
        if sched.use_timestep_transform:
            from monai.networks.schedulers.rectified_flow import timestep_transform

            t = timestep_transform(
                t,
                input_img_size_numel=math.prod(x0.shape[2:]),
                base_img_size_numel=sched.base_img_size_numel,
                num_train_timesteps=self.num_train_timesteps,
                spatial_dim=x0.ndim - 2,
            )
        return t

    def _s(self, t: Tensor, like: Tensor) -> Tensor:
        """s = t / T in [0, 1], broadcast against ``like``."""
        return broadcast(t.to(torch.float64) / self.num_train_timesteps, like)

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """x_t = (1 - s) x_0 + s eps, s = t / T (any number of spatial dims, unlike MONAI's add_noise)."""
        s = self._s(t, x0)
        return (1 - s) * x0 + s * noise

    def target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """The velocity v = x_0 - eps (MONAI's RFlowScheduler target)."""
        return x0 - noise

    def split(self, output: Tensor) -> tuple[Tensor, None]:
        """A flow model has no variance channels: (output, None)."""
        return output, None

    def predict_x0(self, velocity: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """x_0 = x_t + s v."""
        return x_t + self._s(t, x_t) * velocity

    def timesteps(self, steps: int, x: Tensor) -> Tensor:
        """Sampling grid from MONAI's ``RFlowScheduler.set_timesteps``, with the final 0 appended.

        Args:
            steps: number of Euler steps N.
            x: the initial noise (B, C, *S); its size drives the optional timestep transform.

        Returns:
            t_0 = T > t_1 > .. > t_N = 0, shape (N + 1,): int64 with discrete timesteps, else float32.
        """
        self.scheduler.set_timesteps(steps, device=x.device, input_img_size_numel=math.prod(x.shape[2:]))
        ts = self.scheduler.timesteps
        if ts.is_floating_point():  # MONAI stores continuous timesteps as float16 (0.5 resolution near T)
            ts = ts.float()
        return torch.cat([ts, ts.new_zeros(1)])


def make_schedule(
    kind: ScheduleKind = "linear",
    num_train_timesteps: int = 1000,
    *,
    prediction: Prediction | None = None,
    learn_sigma: bool = False,
    **schedule_args: float | int | str | bool,
) -> NoiseSchedule | FlowSchedule:
    """Builds a schedule by name.

    Args:
        kind: ``"linear"`` (DDPM, betas 1e-4 .. 2e-2), ``"scaled_linear"`` (latent diffusion),
            ``"sigmoid"``, ``"cosine"`` (improved DDPM eq. 17), all from MONAI's
            ``NoiseSchedules``; or ``"rflow"`` (:class:`FlowSchedule`).
        num_train_timesteps: T.
        prediction: the model's output; default ``"epsilon"``, and ``"flow"`` for ``"rflow"``.
        learn_sigma: learned variance (noise schedules only).
        **schedule_args: passed to MONAI's beta function (``beta_start``, ``beta_end``, ``s``) or
            to :class:`FlowSchedule`.

    Returns:
        The schedule.
    """
    if kind == "rflow":
        if prediction not in (None, "flow") or learn_sigma:
            raise ValueError("a rectified-flow schedule predicts the velocity ('flow') and has no learned variance")
        return FlowSchedule(num_train_timesteps, **schedule_args)  # type: ignore[arg-type]
    if kind not in _MONAI_BETAS:
        raise ValueError(f"schedule kind must be one of {(*_MONAI_BETAS, 'rflow')}, got {kind!r}")
    from monai.networks.schedulers import NoiseSchedules  # on use, as in FlowSchedule

    betas = NoiseSchedules[_MONAI_BETAS[kind]](num_train_timesteps, **schedule_args)
    if isinstance(betas, tuple):  # MONAI's cosine returns (betas, alphas, alphas_cumprod)
        betas = betas[0]
    return NoiseSchedule(betas, prediction=prediction or "epsilon", learn_sigma=learn_sigma)
