"""Diffusion services shared by every diffusion recipe (sdm, diffae, motion-ldm).

- :mod:`.schedule`: noise schedules (linear, cosine, .. from MONAI) and rectified flow; how a
  model's output (eps, x_0, v, flow velocity; learned variance) is read.
- :mod:`.objectives`: :class:`DiffusionLoss` (MSE on the target, improved DDPM's hybrid loss,
  condition dropout for classifier-free guidance).
- :mod:`.samplers`: DDPM, DDIM, DPM-Solver++(2M), rectified flow; one signature.
- :mod:`.sampling`: the ``SAMPLERS`` registry, :class:`SamplerConfig` (every diffusion recipe's
  ``sample`` section) and :func:`run_sampler`.
- :mod:`.condition`: :class:`Condition`, a structured condition (concat, seg, class labels, vector).
- :mod:`.guidance`: classifier-free guidance as a model wrapper; condition drop-out.
- :mod:`.unet` / :mod:`.denoiser`: MONAI's diffusion UNets (:func:`build_unet`) as the
  conditioned denoiser ``model(x_t, t, cond)``.
- :mod:`.patches`: patch-wise denoising of whole volumes.
- :mod:`.autoencoder`: the latent autoencoder service (MONAI ``AutoencoderKL``, optionally keeping one
  axis at full size; padding, latent scale factor, :class:`LatentCache`).
- :mod:`.module`: :class:`DiffusionModule`, the generic LightningModule.

EMA weights: Lightning's ``EMAWeightAveraging`` callback. Precision: Lightning's ``precision``
flag (bf16-mixed); samplers and the loss keep their arithmetic in float32 or wider.

Names are exported lazily (module ``__getattr__``): the CLI imports ``medsynth.diffusion.sampling``
at parse time, and that must not pull MONAI or Lightning in through this package.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "AutoencoderConfig": "autoencoder",
    "Condition": "condition",
    "ConditionedDenoiser": "denoiser",
    "Denoiser": "samplers",
    "DiffusionLoss": "objectives",
    "DiffusionModule": "module",
    "FlowSchedule": "schedule",
    "LatentAutoencoder": "autoencoder",
    "LatentCache": "autoencoder",
    "NoiseSchedule": "schedule",
    "PatchwiseDenoiser": "patches",
    "SAMPLERS": "sampling",
    "SamplerConfig": "sampling",
    "build_autoencoder": "autoencoder",
    "build_unet": "unet",
    "classifier_free_guidance": "guidance",
    "ddim_invert": "inversion",
    "drop_condition": "guidance",
    "make_schedule": "schedule",
    "null_condition": "guidance",
    "run_sampler": "sampling",
    "sample_ddim": "samplers",
    "sample_ddpm": "samplers",
    "sample_dpmpp_2m": "samplers",
    "sample_rflow": "samplers",
    "spaced_timesteps": "samplers",
    "vlb_terms": "objectives",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'medsynth.diffusion' has no attribute {name!r}")
    return getattr(importlib.import_module(f"medsynth.diffusion.{_EXPORTS[name]}"), name)


def __dir__() -> list[str]:
    return __all__
