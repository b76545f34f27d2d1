"""Diffusion services shared by every diffusion recipe (sdm, diffae, motion-ldm).

- :mod:`.schedule`: noise schedules (linear, cosine, .. from MONAI) and rectified flow; how a
  model's output (eps, x_0, v, flow velocity; learned variance) is read.
- :mod:`.objectives`: :class:`DiffusionLoss` (MSE on the target, improved DDPM's hybrid loss,
  condition dropout for classifier-free guidance).
- :mod:`.samplers`: DDPM, DDIM, DPM-Solver++(2M), rectified flow; one signature.
- :mod:`.guidance`: classifier-free guidance as a model wrapper.
- :mod:`.unet`: MONAI's diffusion UNets as denoisers ``model(x_t, t, cond)``.

EMA weights: Lightning's ``EMAWeightAveraging`` callback. Precision: Lightning's ``precision``
flag (bf16-mixed); samplers and the loss keep their arithmetic in float32 or wider.
"""

from medsynth.diffusion.guidance import classifier_free_guidance, drop_condition, null_condition
from medsynth.diffusion.objectives import DiffusionLoss, vlb_terms
from medsynth.diffusion.samplers import (
    Denoiser,
    sample_ddim,
    sample_ddpm,
    sample_dpmpp_2m,
    sample_rflow,
    spaced_timesteps,
)
from medsynth.diffusion.schedule import FlowSchedule, NoiseSchedule, make_schedule
from medsynth.diffusion.unet import MonaiDenoiser, build_unet

__all__ = [
    "Denoiser",
    "DiffusionLoss",
    "FlowSchedule",
    "MonaiDenoiser",
    "NoiseSchedule",
    "build_unet",
    "classifier_free_guidance",
    "drop_condition",
    "make_schedule",
    "null_condition",
    "sample_ddim",
    "sample_ddpm",
    "sample_dpmpp_2m",
    "sample_rflow",
    "spaced_timesteps",
    "vlb_terms",
]
