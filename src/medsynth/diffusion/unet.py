"""MONAI's diffusion UNets as medsynth denoisers.

:func:`build_unet` makes a ``DiffusionModelUNet`` or, with a label map (``label_nc``), a
``SPADEDiffusionModelUNet``, with twice the output channels for a learned variance and PyTorch's
fused attention (``scaled_dot_product_attention``: flash / memory-efficient kernels where the
device has them) on by default. :class:`MonaiDenoiser` adapts either to the samplers' and loss's
signature ``model(x_t, t, cond)``.

Gradient checkpointing: MONAI 1.6's diffusion UNets do not offer it (only ``AutoencoderKL`` and
its SPADE variant have ``use_checkpoint``), and wrapping their blocks from outside would change
the state-dict keys; save memory with bf16, flash attention, latents or patches instead.
"""

from __future__ import annotations

from typing import Any, Literal

from monai.networks.nets import DiffusionModelUNet, SPADEDiffusionModelUNet
from torch import Tensor, nn

CondArg = Literal["class_labels", "seg", "context"]


def build_unet(
    spatial_dims: int,
    in_channels: int,
    *,
    learn_sigma: bool = False,
    label_nc: int | None = None,
    use_flash_attention: bool = True,
    **unet_args: Any,
) -> DiffusionModelUNet | SPADEDiffusionModelUNet:
    """Builds MONAI's diffusion UNet for a schedule's output.

    Args:
        spatial_dims: 2 or 3.
        in_channels: channels C of x_t.
        learn_sigma: output 2C channels (prediction, variance values) instead of C.
        label_nc: number of label-map channels: a SPADE UNet conditioned on ``seg``.
        use_flash_attention: use PyTorch's fused attention (same weights and maths; at 64^3 on a
            CPU it was 2.4x faster per training step, see STACK-NOTES).
        **unet_args: other MONAI arguments (``channels``, ``attention_levels``,
            ``num_res_blocks``, ``num_class_embeds``, ``with_conditioning``, ...).

    Returns:
        The network; wrap it in :class:`MonaiDenoiser` for the samplers.
    """
    out_channels = 2 * in_channels if learn_sigma else in_channels
    common = dict(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels,
                  use_flash_attention=use_flash_attention, **unet_args)
    if label_nc is None:
        return DiffusionModelUNet(**common)
    return SPADEDiffusionModelUNet(label_nc=label_nc, **common)


class MonaiDenoiser(nn.Module):
    """A MONAI diffusion UNet called as ``model(x_t, t, cond)``.

    An ``nn.Module`` (not a closure) so that copies made for EMA or DDP carry their own weights.

    Args:
        unet: a ``DiffusionModelUNet`` or ``SPADEDiffusionModelUNet``.
        cond_arg: the UNet argument the condition goes to: ``"class_labels"`` (class indices,
            (B,)), ``"seg"`` (SPADE label map, (B, label_nc, *S)), ``"context"`` (cross-attention,
            (B, N, D)); None for an unconditional UNet.
    """

    def __init__(self, unet: nn.Module, cond_arg: CondArg | None = None):
        super().__init__()
        self.unet = unet
        self.cond_arg = cond_arg

    def forward(self, x_t: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        """x_t (B, C, *S), t (B,), cond as ``cond_arg`` says -> output (B, C or 2C, *S)."""
        kwargs = {} if self.cond_arg is None else {self.cond_arg: cond}
        return self.unet(x_t, t, **kwargs)
