"""The conditioned denoiser: a MONAI diffusion UNet called as ``model(x_t, t, cond)``.

One ``nn.Module`` routes each part of a :class:`~medsynth.diffusion.condition.Condition` to where
MONAI's ``DiffusionModelUNet`` / ``SPADEDiffusionModelUNet`` takes it:

- ``concat`` -> concatenated to x_t along the channels (the UNet's ``in_channels`` count them);
- ``seg`` -> SPADE's label map (a ``SPADEDiffusionModelUNet``, ``label_nc`` channels);
- ``class_labels`` -> MONAI's class embedding (``num_class_embeds``; add one for the null class);
- ``vector`` (B, D) -> cross-attention ``context`` of length 1, (B, 1, D) (``with_conditioning``,
  ``cross_attention_dim=D``). Chosen over a projection added to the class embedding because
  MONAI's UNet takes ``context`` natively, while adding to its time embedding would mean
  reaching into MONAI's ``forward``; attention over one token is a learned, per-block bias of
  the vector, which is what the embedding route gives too.

A plain tensor condition still works: ``tensor_as`` names the part it is (``"seg"`` for a SPADE
label map, ``"class_labels"`` for class indices).

An ``nn.Module`` (not a closure) so that copies made for EMA or DDP carry their own weights; the
UNet is the attribute ``unet`` (state-dict keys ``unet.*``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from medsynth.diffusion.condition import PART_NAMES, Condition


class ConditionedDenoiser(nn.Module):
    """A MONAI diffusion UNet with structured conditioning.

    Args:
        unet: a ``DiffusionModelUNet`` or ``SPADEDiffusionModelUNet`` (see
            :func:`medsynth.diffusion.unet.build_unet`).
        tensor_as: the part a plain tensor condition is (None: tensor conditions are refused).
    """

    def __init__(self, unet: nn.Module, tensor_as: str | None = None):
        super().__init__()
        if tensor_as is not None and tensor_as not in PART_NAMES:
            raise ValueError(f"tensor_as must be one of {', '.join(PART_NAMES)}, got {tensor_as!r}")
        self.unet = unet
        self.tensor_as = tensor_as

    def forward(self, x_t: Tensor, t: Tensor, cond: Condition | Tensor | None = None) -> Tensor:
        """x_t (B, C, *S), t (B,), cond (parts as in the module docstring) -> output (B, C_out, *S)."""
        if isinstance(cond, Tensor):
            if self.tensor_as is None:
                raise TypeError("this denoiser takes a Condition; give tensor_as to accept a plain tensor")
            cond = Condition(**{self.tensor_as: cond})
        cond = cond or Condition()
        kwargs: dict[str, Any] = {}
        if cond.concat is not None:
            x_t = torch.cat([x_t, cond.concat.to(x_t.dtype)], dim=1)
        if cond.seg is not None:
            kwargs["seg"] = cond.seg
        if cond.class_labels is not None:
            kwargs["class_labels"] = cond.class_labels
        if cond.vector is not None:
            kwargs["context"] = cond.vector[:, None].to(x_t.dtype)
        return self.unet(x_t, t, **kwargs)
