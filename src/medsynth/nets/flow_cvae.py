"""Image-conditioned 3D conditional VAE of displacement fields, on MONAI blocks (MONAI has none).

The frame's **feature pyramid** (one map per resolution level: level ``l`` at ``S / 2^l``) is
concatenated at every level of both the encoder q(z | u, F) and the decoder p(u | z, F). The
latent is spatial: ``(C_z, *S / 2^L)`` for ``L`` levels. Output is a displacement in voxels of the
input grid, bounded per axis: ``u = max_displacement * tanh(.)``.

Pyramids (``pyramid(frame) -> [level 0, ..., level L]``):

- :class:`ImagePyramid`: the frame itself average-pooled to each scale (the baseline);
- :class:`LearnedPyramid`: a small strided conv encoder trained with the CVAE; also the siamese
  encoder of :class:`RegistrationNet`, whose trained encoder is the ``registration`` pyramid
  (frozen; the cardiac flow system's choice of a frozen flow-network encoder).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution, ResidualUnit
from torch import Tensor, nn


def _block(cin: int, cout: int, stride: int = 1, residual: bool = True) -> nn.Module:
    if residual:
        return ResidualUnit(3, cin, cout, strides=stride, kernel_size=3, subunits=2, act="PRELU", norm="INSTANCE")
    return Convolution(3, cin, cout, strides=stride, kernel_size=3, act="PRELU", norm="INSTANCE")


def _up(cin: int, cout: int) -> nn.Module:
    return Convolution(3, cin, cout, strides=2, kernel_size=3, is_transposed=True, act="PRELU", norm="INSTANCE")


class ImagePyramid(nn.Module):
    """The frame ``(B, 1, *S)`` average-pooled by ``2^l`` for ``l = 0 .. levels`` (no weights)."""

    def __init__(self, levels: int):
        super().__init__()
        self.levels, self.channels = levels, [1] * (levels + 1)

    def forward(self, frame: Tensor) -> list[Tensor]:
        return [frame] + [F.avg_pool3d(frame, 2**level) for level in range(1, self.levels + 1)]


class LearnedPyramid(nn.Module):
    """A conv encoder: level 0 keeps the grid, each further level halves it; ``channels[l]`` maps at level ``l``."""

    def __init__(self, channels: Sequence[int], residual: bool = True):
        super().__init__()
        self.levels, self.channels = len(channels) - 1, list(channels)
        ins = [1, *channels[:-1]]
        self.stages = nn.ModuleList(_block(i, o, 1 if k == 0 else 2, residual) for k, (i, o) in enumerate(zip(ins, channels)))

    def forward(self, frame: Tensor) -> list[Tensor]:
        maps, h = [], frame
        for stage in self.stages:
            h = stage(h)
            maps.append(h)
        return maps


class PyramidDecoder(nn.Module):
    """Coarse-to-fine decoder: at each level the upsampled state is concatenated with that level's features.

    Args:
        top_channels: channels of the coarsest input (the latent; 0 for none).
        feature_channels: channels of the per-level features, level 0 first.
        channels: decoder channels per level, level 0 first.
        max_displacement: bound per axis, in voxels (3 values).
        offset_shape: the spatial shape of an output offset (see :meth:`set_offset`); None for none.
    """

    def __init__(self, top_channels: int, feature_channels: Sequence[int], channels: Sequence[int],
                 max_displacement: Sequence[float], residual: bool = True, offset_shape: Sequence[int] | None = None):
        super().__init__()
        levels = len(channels) - 1
        self.top = _block(top_channels + feature_channels[levels], channels[levels], residual=residual)
        self.ups = nn.ModuleList(_up(channels[level + 1], channels[level]) for level in range(levels))
        self.merges = nn.ModuleList(_block(channels[level] + feature_channels[level], channels[level], residual=residual)
                                    for level in range(levels))
        self.out = Convolution(3, channels[0], 3, kernel_size=3, conv_only=True)
        nn.init.normal_(self.out.conv.weight, std=1e-3)  # start near the zero field
        nn.init.zeros_(self.out.conv.bias)
        self.register_buffer("bound", torch.as_tensor(list(max_displacement), dtype=torch.float32).view(1, 3, 1, 1, 1))
        # with ``offset_shape`` the output is centred on a field set by ``set_offset`` (zero until then)
        self.offset = None if offset_shape is None else nn.Buffer(torch.zeros(1, 3, *offset_shape))

    def set_offset(self, flow: Tensor) -> None:
        """Centre the output on a field ``(3, *S)`` in voxels (e.g. the mean training flow): the network then
        predicts the deviation from it, in tanh's pre-activation space, so the output stays bounded."""
        if self.offset is None:
            raise ValueError("this decoder was built without offset_shape")
        self.offset.copy_(torch.atanh((flow[None].to(self.bound) / self.bound).clamp(-0.95, 0.95)))

    def forward(self, top: Tensor | None, features: Sequence[Tensor]) -> Tensor:
        """``top`` ``(B, C_top, *S/2^L)`` or None; ``features[l]`` ``(B, C_l, *S/2^l)`` -> ``(B, 3, *S)`` voxels."""
        h = self.top(features[-1] if top is None else torch.cat([top, features[-1]], dim=1))
        for level in reversed(range(len(self.ups))):
            h = self.merges[level](torch.cat([self.ups[level](h), features[level]], dim=1))
        out = self.out(h)
        return self.bound * torch.tanh(out if self.offset is None else out + self.offset)


class FlowCVAE(nn.Module):
    """q(z | u, F) and p(u | z, F), both given ``pyramid(F)`` at every level.

    Args:
        pyramid: a pyramid module with ``levels`` and ``channels`` (see module doc).
        channels: encoder/decoder channels per level, level 0 first (``levels + 1`` values).
        latent_channels: ``C_z``; the latent is ``(C_z, *S / 2^levels)``.
        max_displacement: output bound per axis in voxels (3 values).
        offset_shape: ``S``, to centre the output on a field (``decoder.set_offset``, e.g. the mean training flow).
    """

    def __init__(self, pyramid: nn.Module, channels: Sequence[int], latent_channels: int,
                 max_displacement: Sequence[float], residual: bool = True, offset_shape: Sequence[int] | None = None):
        super().__init__()
        if len(channels) != pyramid.levels + 1:
            raise ValueError(f"channels needs {pyramid.levels + 1} values (one per level), got {list(channels)}")
        self.pyramid, self.levels, self.latent_channels = pyramid, pyramid.levels, latent_channels
        p = pyramid.channels
        # level 0: the flow with the level-0 features; level l: the state halved, then merged with level l's features
        self.downs = nn.ModuleList(_block(channels[level - 1], channels[level - 1], 2, residual) for level in range(1, self.levels + 1))
        self.merges = nn.ModuleList(_block((3 if level == 0 else channels[level - 1]) + p[level], channels[level], residual=residual)
                                    for level in range(self.levels + 1))
        self.stats = Convolution(3, channels[-1], 2 * latent_channels, kernel_size=1, conv_only=True)
        self.decoder = PyramidDecoder(latent_channels, p, channels, max_displacement, residual, offset_shape)

    def latent_shape(self, spatial: Sequence[int]) -> tuple[int, ...]:
        return (self.latent_channels, *(s // 2**self.levels for s in spatial))

    def encode(self, flow: Tensor, features: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        """``mu``, ``logvar`` ``(B, C_z, *S/2^L)`` of q(z | u, F); ``flow`` in voxels ``(B, 3, *S)``."""
        h = self.merges[0](torch.cat([flow, features[0]], 1))
        for level in range(1, self.levels + 1):
            h = self.merges[level](torch.cat([self.downs[level - 1](h), features[level]], 1))
        mu, logvar = self.stats(h).chunk(2, dim=1)
        return mu, logvar.clamp(-12.0, 8.0)

    def decode(self, z: Tensor, features: Sequence[Tensor]) -> Tensor:
        """Displacement in voxels ``(B, 3, *S)`` of p(u | z, F)."""
        return self.decoder(z, features)

    def forward(self, flow: Tensor, frame: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Reconstruction (voxels), ``mu`` and ``logvar`` of a flow ``(B, 3, *S)`` given its frame ``(B, 1, *S)``."""
        features = self.pyramid(frame)
        mu, logvar = self.encode(flow, features)
        noise = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
        return self.decode(mu + noise * (0.5 * logvar).exp(), features), mu, logvar


class RegistrationNet(nn.Module):
    """Unsupervised registration with a siamese encoder (PWC-Net-like): ``u`` with ``warp(moving, u) ~ fixed``.

    Both frames go through the same :class:`LearnedPyramid`; the decoder sees both pyramids at
    every level. The trained ``encoder`` is the ``registration`` pyramid of :class:`FlowCVAE`.
    """

    def __init__(self, pyramid_channels: Sequence[int], channels: Sequence[int], max_displacement: Sequence[float],
                 residual: bool = True):
        super().__init__()
        self.encoder = LearnedPyramid(pyramid_channels, residual)
        self.decoder = PyramidDecoder(0, [2 * c for c in pyramid_channels], channels, max_displacement, residual)

    def forward(self, fixed: Tensor, moving: Tensor) -> Tensor:
        """Displacement in voxels ``(B, 3, *S)`` from frames ``(B, 1, *S)``."""
        features = [torch.cat(pair, 1) for pair in zip(self.encoder(fixed), self.encoder(moving))]
        return self.decoder(None, features)
