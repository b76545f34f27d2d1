"""MONAI's diffusion UNets for medsynth's denoisers.

:func:`build_unet` makes a ``DiffusionModelUNet`` or, with a label map (``label_nc``), a
``SPADEDiffusionModelUNet``, with PyTorch's fused attention (``scaled_dot_product_attention``:
flash / memory-efficient kernels where the device has them) on by default. Wrap it in
:class:`medsynth.diffusion.denoiser.ConditionedDenoiser` for the samplers and the loss.

Gradient checkpointing: MONAI 1.6's diffusion UNets do not offer it (only ``AutoencoderKL`` and
its SPADE variant have ``use_checkpoint``), and wrapping their blocks from outside would change
the state-dict keys; save memory with bf16, flash attention, latents or patches instead.
"""

from __future__ import annotations

from typing import Any

from monai.networks.nets import DiffusionModelUNet, SPADEDiffusionModelUNet


def build_unet(
    spatial_dims: int,
    in_channels: int,
    out_channels: int,
    *,
    learn_sigma: bool = False,
    label_nc: int | None = None,
    use_flash_attention: bool = True,
    **unet_args: Any,
) -> DiffusionModelUNet | SPADEDiffusionModelUNet:
    """Builds MONAI's diffusion UNet for a schedule's output.

    Args:
        spatial_dims: 2 or 3.
        in_channels: the UNet's input channels: x_t's channels plus any concatenated condition.
        out_channels: channels C of the prediction (x_t's channels).
        learn_sigma: output 2C channels (prediction, variance values) instead of C.
        label_nc: number of label-map channels: a SPADE UNet conditioned on ``seg``.
        use_flash_attention: use PyTorch's fused attention (same weights and maths; at 64^3 on a
            CPU it was 2.4x faster per training step, see STACK-NOTES).
        **unet_args: other MONAI arguments (``channels``, ``attention_levels``,
            ``num_res_blocks``, ``num_class_embeds``, ``with_conditioning``, ...).

    Returns:
        The network.
    """
    common = dict(spatial_dims=spatial_dims, in_channels=in_channels,
                  out_channels=2 * out_channels if learn_sigma else out_channels,
                  use_flash_attention=use_flash_attention, **unet_args)
    if label_nc is None:
        return DiffusionModelUNet(**common)
    return SPADEDiffusionModelUNet(label_nc=label_nc, **common)
