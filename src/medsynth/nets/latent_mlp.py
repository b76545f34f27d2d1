"""A denoiser for vectors: the latent DDIM of DiffAE's semantic codes.

MONAI's diffusion networks are convolutional UNets; a code ``z`` (B, D) needs an MLP. Each block is
``z + Linear(SiLU(Linear(LayerNorm(h)) + emb(t)))`` with a skip of the input code concatenated to
every block's input, as DiffAE's latent DDIM (Preechakul et al. 2022, sec. 3.3: an MLP with skip
connections, 10-20 layers, time embedding added per layer). The timestep embedding is MONAI's
sinusoidal one (``get_timestep_embedding``) through two linear layers, as in its UNet.
"""

from __future__ import annotations

from typing import Any

import torch
from monai.networks.nets.diffusion_model_unet import get_timestep_embedding
from torch import Tensor, nn


class LatentBlock(nn.Module):
    """One residual block: (h (B, H), z_t (B, D), emb (B, H)) -> (B, H)."""

    def __init__(self, hidden: int, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden + dim)
        self.inner = nn.Linear(hidden + dim, hidden)
        self.outer = nn.Linear(hidden, hidden)

    def forward(self, h: Tensor, z_t: Tensor, emb: Tensor) -> Tensor:
        return h + self.outer(nn.functional.silu(self.inner(self.norm(torch.cat([h, z_t], dim=1))) + emb))


class LatentMLP(nn.Module):
    """``model(z_t, t, cond=None) -> output`` for codes ``z_t`` (B, D): the samplers' Denoiser signature.

    Args:
        dim: code size D.
        hidden: width of every block.
        layers: number of residual blocks.
    """

    def __init__(self, dim: int, hidden: int = 256, layers: int = 4):
        super().__init__()
        self.hidden = hidden
        self.time_embed = nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.inp = nn.Linear(dim, hidden)
        self.blocks = nn.ModuleList(LatentBlock(hidden, dim) for _ in range(layers))
        self.out = nn.Sequential(nn.LayerNorm(hidden), nn.SiLU(), nn.Linear(hidden, dim))
        nn.init.zeros_(self.out[-1].weight)  # starts at output 0 (the mean of eps or of v)
        nn.init.zeros_(self.out[-1].bias)

    def forward(self, z_t: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        """z_t (B, D), t (B,) timesteps -> (B, D) in the schedule's prediction space; ``cond`` is unused."""
        emb = self.time_embed(get_timestep_embedding(t, self.hidden).to(z_t.dtype))
        h = self.inp(z_t)
        for block in self.blocks:
            h = block(h, z_t, emb)
        return self.out(h)
