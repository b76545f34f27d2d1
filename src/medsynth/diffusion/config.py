"""The ``model`` settings every diffusion recipe shares: MONAI's diffusion UNet, the schedule, condition drop-out.

A recipe's model config extends :class:`DenoiserConfig` with its own keys (grid, classes, stages)
and builds its network and schedule through it, so the same key means the same thing everywhere.
"""

from __future__ import annotations

from typing import Any, Literal

from monai.networks.nets import DiffusionModelUNet, SPADEDiffusionModelUNet
from pydantic import Field

from medsynth.config import StrictModel
from medsynth.diffusion.schedule import FlowSchedule, NoiseSchedule, make_schedule
from medsynth.diffusion.unet import build_unet


class DenoiserConfig(StrictModel):
    """The UNet (MONAI ``DiffusionModelUNet`` arguments), the noise schedule and classifier-free guidance training."""

    channels: list[int] = [16, 32, 32]
    attention_levels: list[bool] = [False, False, False]
    num_res_blocks: int = Field(1, ge=1)
    norm_num_groups: int = Field(8, ge=1)
    num_head_channels: int = Field(8, ge=1)
    use_flash_attention: bool = True
    schedule: Literal["linear", "scaled_linear", "sigmoid", "cosine", "rflow"] = "linear"
    num_train_timesteps: int = Field(1000, ge=2)
    prediction: Literal["epsilon", "sample", "v_prediction"] = "epsilon"
    cond_drop_prob: float = Field(0.15, ge=0, lt=1, description="share of training samples without their condition (CFG)")

    def build_unet(self, spatial_dims: int, in_channels: int, out_channels: int,
                   **extra: Any) -> DiffusionModelUNet | SPADEDiffusionModelUNet:
        """The UNet of these settings (:func:`~medsynth.diffusion.unet.build_unet`); ``extra``: e.g. ``label_nc``."""
        return build_unet(spatial_dims, in_channels, out_channels, channels=tuple(self.channels),
                          attention_levels=tuple(self.attention_levels), num_res_blocks=self.num_res_blocks,
                          norm_num_groups=self.norm_num_groups, num_head_channels=self.num_head_channels,
                          use_flash_attention=self.use_flash_attention, **extra)

    def make_schedule(self) -> NoiseSchedule | FlowSchedule:
        """The schedule of these settings (``rflow`` predicts the flow; the others ``prediction``)."""
        return make_schedule(self.schedule, self.num_train_timesteps,
                             prediction="flow" if self.schedule == "rflow" else self.prediction)
