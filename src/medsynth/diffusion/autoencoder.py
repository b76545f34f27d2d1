"""The latent autoencoder service of latent diffusion recipes (motion-ldm's image AE and field VAE).

- :class:`AutoencoderConfig`: the settings of MONAI's ``AutoencoderKL``, plus ``keep_axis``: a
  spatial axis that is never downsampled (the slice axis of a 4D-CT volume with few slices).
- :func:`build_autoencoder`: MONAI's ``AutoencoderKL``, made anisotropic when ``keep_axis`` is set.
- :class:`LatentAutoencoder`: encode / sample / decode with padding so no voxel is silently cropped
  (MONAI crops odd sizes: 50 slices come back as 48), the latent scale factor of latent diffusion
  (a buffer, saved in checkpoints) and the KL term.
- :class:`LatentCache`: the posterior (mu, sigma) of every training item, computed once with a frozen
  autoencoder, in memory and in ``latents.pt``; recomputed when the weights or the item ids change.

Latents are "unscaled" (the autoencoder's own) everywhere except between :meth:`to_diffusion` and
:meth:`from_diffusion`: the diffusion model sees ``z * scale_factor`` (Rombach et al. 2022, sec. 4.3
and appendix G: scale to unit variance).
"""

from __future__ import annotations

import hashlib
import io
import math
from collections.abc import Callable, Sequence
from functools import reduce
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from monai.networks.blocks import UpSample
from monai.networks.nets import AutoencoderKL
from monai.networks.nets.autoencoderkl import AEKLDownsample
from pydantic import Field, model_validator
from torch import Tensor, nn

from medsynth.config import StrictModel
from medsynth.latent_space import gaussian_kl
from medsynth.runs import atomic_write_bytes


class AutoencoderConfig(StrictModel):
    """A KL-regularised autoencoder (MONAI ``AutoencoderKL``) for latent diffusion."""

    spatial_dims: Literal[2, 3] = Field(3, description="2 for (X, Y) images, 3 for (X, Y, Z) volumes.")
    in_channels: int = Field(1, ge=1, description="Channels of the input (1 for CT, 3 for a displacement field).")
    out_channels: int | None = Field(None, ge=1, description="Channels of the reconstruction; default: in_channels.")
    channels: list[int] = Field([32, 64, 64], min_length=1,
                                description="Feature channels per level; the spatial size halves between levels.")
    latent_channels: int = Field(3, ge=1, description="Channels L of the latent.")
    num_res_blocks: int = Field(1, ge=1, description="Residual blocks per level.")
    attention: bool = Field(False, description="Self-attention at the deepest level and non-local attention blocks "
                                               "(costly on large volumes).")
    norm_num_groups: int | None = Field(None, ge=1, description="GroupNorm groups; default: the largest number "
                                                                "(<= 32) that divides every level's channels.")
    keep_axis: int | None = Field(None, ge=0, description="A spatial axis (0-based over X, Y, Z) kept at full size, "
                                                          "e.g. 2 for volumes with few slices; None: every axis halves.")
    use_checkpoint: bool = Field(False, description="Activation checkpointing in MONAI's encoder and decoder "
                                                    "(less memory, about one more forward pass of time).")
    kl_weight: float = Field(1e-6, ge=0, description="Weight of the KL term against the reconstruction loss.")

    @model_validator(mode="after")
    def _check(self) -> AutoencoderConfig:
        if self.keep_axis is not None and self.keep_axis >= self.spatial_dims:
            raise ValueError(f"keep_axis {self.keep_axis} is not a spatial axis of {self.spatial_dims}D data")
        if self.norm_num_groups is not None and any(c % self.norm_num_groups for c in self.channels):
            raise ValueError(f"norm_num_groups {self.norm_num_groups} does not divide channels {self.channels}")
        return self

    @property
    def groups(self) -> int:
        """GroupNorm groups: ``norm_num_groups`` or the largest divisor (<= 32) of every level's channels."""
        if self.norm_num_groups is not None:
            return self.norm_num_groups
        common = reduce(math.gcd, self.channels)
        return max(g for g in range(1, min(common, 32) + 1) if common % g == 0)

    @property
    def downsampling(self) -> tuple[int, ...]:
        """Downsampling factor per spatial axis: 2^(levels - 1), 1 on ``keep_axis``."""
        factor = 2 ** (len(self.channels) - 1)
        return tuple(1 if axis == self.keep_axis else factor for axis in range(self.spatial_dims))


class _KeepAxisDownsample(nn.Module):
    """MONAI's downsampling (pad 0/1 at the end, 3^d conv, stride 2) with stride 1 and padding 1/1 on
    one axis. Holds MONAI's convolution under the same name, so state-dict keys are unchanged."""

    def __init__(self, layer: AEKLDownsample, spatial_dims: int, keep_axis: int) -> None:
        super().__init__()
        self.conv = layer.conv
        self.conv.conv.stride = tuple(1 if axis == keep_axis else 2 for axis in range(spatial_dims))
        # F.pad lists (low, high) pairs from the last axis backwards.
        self.pad = tuple(v for axis in reversed(range(spatial_dims)) for v in ((1, 1) if axis == keep_axis else (0, 1)))

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, self.pad))


def build_autoencoder(config: AutoencoderConfig) -> AutoencoderKL:
    """MONAI's ``AutoencoderKL`` for ``config``; with ``keep_axis`` its down/upsampling skips that axis.

    Returns:
        The network: ``encode(x) -> (mu, sigma)`` maps (B, C, *S) to (B, L, *S / downsampling) for
        sizes S that are multiples of ``config.downsampling`` (others are cropped: pad them, or use
        :class:`LatentAutoencoder`).
    """
    levels = len(config.channels)
    network = AutoencoderKL(
        spatial_dims=config.spatial_dims, in_channels=config.in_channels,
        out_channels=config.out_channels or config.in_channels, num_res_blocks=config.num_res_blocks,
        channels=tuple(config.channels), latent_channels=config.latent_channels, norm_num_groups=config.groups,
        attention_levels=tuple(config.attention and level == levels - 1 for level in range(levels)),
        with_encoder_nonlocal_attn=config.attention, with_decoder_nonlocal_attn=config.attention,
        use_flash_attention=config.attention, use_checkpoint=config.use_checkpoint,
    )
    if config.keep_axis is None:
        return network
    # MONAI 1.6's AutoencoderKL halves every axis and has no option to keep one, so swap its layers.
    scale = tuple(1.0 if axis == config.keep_axis else 2.0 for axis in range(config.spatial_dims))
    for blocks in (network.encoder.blocks, network.decoder.blocks):
        for i, block in enumerate(blocks):
            if isinstance(block, AEKLDownsample):
                blocks[i] = _KeepAxisDownsample(block, config.spatial_dims, config.keep_axis)
            elif isinstance(block, UpSample):  # nearest x2, then a 3^d conv with padding 1 (already symmetric)
                block.upsample_non_trainable = nn.Upsample(scale_factor=scale, mode="nearest")
    return network


class LatentAutoencoder(nn.Module):
    """An :func:`build_autoencoder` network with padding, sampling, the KL term and the latent scale factor.

    Shapes: x is (B, C, *S) with S the spatial size (any size: each downsampled axis is padded at
    its end to a multiple of its factor and cropped back after decoding, so voxel indices and the
    affine are unchanged); latents are (B, L, *ceil(S / downsampling)).

    Attributes:
        config: the settings it was built from.
        network: MONAI's ``AutoencoderKL``.
        scale_factor: a 0-d buffer (saved in ``state_dict``), 1.0 until :meth:`fit_scale_factor`.
    """

    scale_factor: Tensor

    def __init__(self, config: AutoencoderConfig) -> None:
        super().__init__()
        self.config = config
        self.network = build_autoencoder(config)
        self.register_buffer("scale_factor", torch.tensor(1.0))

    @property
    def downsampling(self) -> tuple[int, ...]:
        """Factor per spatial axis between input and latent: 2^(levels - 1), 1 on ``keep_axis``."""
        return self.config.downsampling

    def latent_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        """The latent's spatial size for an input of spatial size ``shape``."""
        return tuple(-(-n // f) for n, f in zip(shape, self.downsampling))

    def pad(self, x: Tensor) -> Tensor:
        """(B, C, *S) -> (B, C, *S') with S' the next multiples of :attr:`downsampling`, padded at the end.

        Replicate, not zero padding: a zero block is an artificial edge in a CT (0 is not air after
        normalisation) that the autoencoder would spend capacity on and that bleeds into the voxels
        next to it; replicated voxels continue the image (and a field) smoothly.
        """
        extra = [-n % f for n, f in zip(x.shape[2:], self.downsampling)]
        if not any(extra):
            return x
        return F.pad(x, [v for e in reversed(extra) for v in (0, e)], mode="replicate")

    @staticmethod
    def crop(x: Tensor, shape: Sequence[int]) -> Tensor:
        """(B, C, *S') -> (B, C, *shape): the first ``shape`` voxels of each spatial axis (undoes :meth:`pad`)."""
        return x[(..., *(slice(0, n) for n in shape))]

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Posterior of x (B, C, *S): mean and standard deviation, each (B, L, *latent_shape(S))."""
        return self.network.encode(self.pad(x))

    @staticmethod
    def sample_latent(mu: Tensor, sigma: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """z = mu + sigma * eps, eps ~ N(0, I) drawn from ``generator`` (reparametrised: gradients flow)."""
        eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
        return mu + sigma * eps

    def decode(self, z: Tensor, shape: Sequence[int]) -> Tensor:
        """(B, L, *latent) -> (B, C_out, *shape): decoded and cropped to the input's spatial ``shape``."""
        return self.crop(self.network.decode(z), shape)

    def reconstruct(self, x: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Encode, sample the posterior, decode: (reconstruction (B, C_out, *S), mu, sigma).

        Use in training: loss = recon_loss(reconstruction, x) + config.kl_weight * kl_loss(mu, sigma).
        """
        mu, sigma = self.encode(x)
        return self.decode(self.sample_latent(mu, sigma, generator), x.shape[2:]), mu, sigma

    @staticmethod
    def kl_loss(mu: Tensor, sigma: Tensor) -> Tensor:
        """KL(N(mu, sigma^2) || N(0, I)) summed over the latent, averaged over the batch (MONAI's tutorials)."""
        return gaussian_kl(mu, 2 * sigma.clamp_min(1e-12).log())

    def to_diffusion(self, z: Tensor) -> Tensor:
        """The autoencoder's latent -> the diffusion model's (unit-variance) latent."""
        return z * self.scale_factor

    def from_diffusion(self, z: Tensor) -> Tensor:
        """The diffusion model's latent -> the autoencoder's latent (before :meth:`decode`)."""
        return z / self.scale_factor

    @torch.no_grad()
    def fit_scale_factor(self, latents: Tensor) -> float:
        """Sets ``scale_factor`` to 1 / std of ``latents`` (unscaled, e.g. every training item's mu) and returns it."""
        std = latents.detach().double().std()
        if not torch.isfinite(std) or std <= 0:
            raise ValueError("fit_scale_factor needs latents with a finite, non-zero standard deviation")
        self.scale_factor.fill_(1.0 / std.item())
        return float(self.scale_factor)


Inputs = Callable[[list[str]], Tensor]


class LatentCache:
    """Posterior mean and std of every training item under a frozen autoencoder, computed once.

    Usage in a recipe (after the autoencoder stage, before the diffusion stage)::

        cache = LatentCache(run_dir / "image-ae")          # or None: memory only
        posteriors = cache.get(autoencoder, ids, load, batch_size=4)
        mu, sigma = posteriors[ids[0]]                      # (L, *latent), on the CPU
        autoencoder.fit_scale_factor(torch.stack([posteriors[i][0] for i in ids]))

    ``load(batch_ids) -> (B, C, *S)`` reads the items of a batch (same size within a batch; use
    ``batch_size=1`` for items of different sizes). ``ids`` must name the content (e.g. a subject and
    phase, or a prepared file): the cache is keyed by a hash of the autoencoder (config and weights,
    not ``scale_factor``) and of the ids, and recomputed when either changes; a changed item under an
    unchanged id is not detected.
    """

    def __init__(self, folder: Path | None) -> None:
        self.path = None if folder is None else Path(folder) / "latents.pt"
        self._key: str | None = None
        self._latents: dict[str, tuple[Tensor, Tensor]] = {}

    @staticmethod
    def key(autoencoder: LatentAutoencoder, ids: Sequence[str]) -> str:
        """16 hex digits of sha256 over the config, every network tensor (name, dtype, shape, bytes) and the ids."""
        digest = hashlib.sha256(autoencoder.config.model_dump_json().encode())
        for name, tensor in sorted(autoencoder.network.state_dict().items()):
            digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        digest.update("\n".join(ids).encode())
        return digest.hexdigest()[:16]

    def get(self, autoencoder: LatentAutoencoder, ids: Sequence[str], load: Inputs,
            batch_size: int = 1) -> dict[str, tuple[Tensor, Tensor]]:
        """``{id: (mu, sigma)}`` for every id, each (L, *latent) float32 on the CPU: from memory, from the
        file, or encoded now (eval mode, no gradients; the autoencoder's mode is restored)."""
        ids = list(ids)
        if len(set(ids)) != len(ids):
            raise ValueError("LatentCache.get: ids must be unique")
        key = self.key(autoencoder, ids)
        if key != self._key:
            latents = self._read(key)
            if latents is None:
                latents = self._encode(autoencoder, ids, load, batch_size)
                if self.path is not None:
                    buffer = io.BytesIO()
                    torch.save({"key": key, "latents": latents}, buffer)
                    atomic_write_bytes(self.path, buffer.getvalue())
            self._key, self._latents = key, latents
        return dict(self._latents)

    def _read(self, key: str) -> dict[str, tuple[Tensor, Tensor]] | None:
        if self.path is None or not self.path.exists():
            return None
        try:
            saved = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception:  # an unreadable or foreign file is simply recomputed
            return None
        return {k: tuple(v) for k, v in saved["latents"].items()} if saved.get("key") == key else None

    @staticmethod
    def _encode(autoencoder: LatentAutoencoder, ids: list[str], load: Inputs,
                batch_size: int) -> dict[str, tuple[Tensor, Tensor]]:
        device = autoencoder.scale_factor.device
        was_training = autoencoder.training
        autoencoder.eval()
        latents: dict[str, tuple[Tensor, Tensor]] = {}
        try:
            with torch.no_grad():
                for start in range(0, len(ids), batch_size):
                    batch = ids[start:start + batch_size]
                    mu, sigma = autoencoder.encode(load(batch).to(device=device, dtype=torch.float32))
                    for i, item in enumerate(batch):
                        latents[item] = (mu[i].float().cpu(), sigma[i].float().cpu())
        finally:
            autoencoder.train(was_training)
        return latents
