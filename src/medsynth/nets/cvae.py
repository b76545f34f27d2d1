"""Class-conditional variational autoencoder, 2D and 3D through ``spatial_dims``."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.nets import VarAutoEncoder
from torch import nn


class ConditionalVAE(VarAutoEncoder):
    """MONAI's ``VarAutoEncoder`` conditioned on a class (MONAI has no conditional VAE).

    The encoder q(z | x, c) sees the image with one-hot class maps as extra channels; the
    decoder p(x | z, c) sees z concatenated with a learned class embedding.

    Args:
        spatial_dims: 2 or 3.
        in_shape: ``(C, *spatial)`` of the images.
        num_classes: number of classes K.
        latent_size: size of z.
        channels: encoder channels, top block first (the decoder mirrors them).
        strides: one stride per block.
        embed_dim: size of the class embedding given to the decoder.
        num_res_units: residual units per block.
        output_activation: ``"sigmoid"`` for images in [0, 1], ``"none"`` for unbounded outputs.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_shape: Sequence[int],
        num_classes: int,
        latent_size: int,
        channels: Sequence[int],
        strides: Sequence[int],
        embed_dim: int = 16,
        num_res_units: int = 1,
        output_activation: str = "sigmoid",
    ) -> None:
        channels_in, *spatial = in_shape
        super().__init__(
            spatial_dims=spatial_dims,
            in_shape=(channels_in + num_classes, *spatial),
            out_channels=channels_in,
            latent_size=latent_size,
            channels=channels,
            strides=strides,
            num_res_units=num_res_units,
            use_sigmoid=output_activation == "sigmoid",
            use_mean_at_inference=True,
        )
        self.num_classes = num_classes
        self.class_embedding = nn.Embedding(num_classes, embed_dim)
        self.decodeL = nn.Linear(latent_size + embed_dim, self.decodeL.out_features)

    def encode_posterior(self, x: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q(z | x, c): ``x`` (B, C, *spatial), ``c`` (B,) class indices -> ``mu``, ``logvar`` (B, latent)."""
        maps = F.one_hot(c, self.num_classes).to(x.dtype).view(*c.shape, self.num_classes, *([1] * (x.ndim - 2)))
        return super().encode_forward(torch.cat([x, maps.expand(-1, -1, *x.shape[2:])], dim=1))

    def decode_latent(self, z: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """p(x | z, c): ``z`` (B, latent), ``c`` (B,) -> images (B, C, *spatial)."""
        return super().decode_forward(torch.cat([z, self.class_embedding(c)], dim=1), self.use_sigmoid)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # type: ignore[override]
        """Reconstruction, ``mu``, ``logvar`` and the sampled ``z``."""
        mu, logvar = self.encode_posterior(x, c)
        z = self.reparameterize(mu, logvar)
        return self.decode_latent(z, c), mu, logvar, z
