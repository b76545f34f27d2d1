"""Latent-space exploration shared by every recipe with a latent code (CVAE, flow-CVAE, DiffAE).

Each function returns latent codes ``(N, D)``; a recipe decodes them. All randomness comes
from the ``generator`` passed in, so the same seed gives the same codes bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any

import torch

from medsynth.errors import MedsynthError


class LatentMode(str, Enum):
    """How ``medsynth sample`` chooses latent codes."""

    RANDOM = "random"  # draws from the prior N(0, I)
    GRID = "grid"  # a regular grid over two latent axes, the others at 0
    PLANE = "plane"  # random draws restricted to a random 2D plane through the origin
    INTERPOLATE = "interpolate"  # a path between the latents of two real images


def random_latents(n: int, dim: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` draws from N(0, I_dim): ``(n, dim)``."""
    return torch.randn(n, dim, generator=generator)


def grid_latents(dim: int, axes: tuple[int, int] = (0, 1), steps: int = 7, span: float = 2.5) -> torch.Tensor:
    """A ``steps x steps`` grid over latent ``axes`` in [-span, span], row-major: ``(steps**2, dim)``."""
    if not (0 <= axes[0] < dim and 0 <= axes[1] < dim) or axes[0] == axes[1]:
        raise MedsynthError(f"grid axes {axes} must be two different latent axes in [0, {dim - 1}]")
    values = torch.linspace(-span, span, steps)
    rows, cols = torch.meshgrid(values, values, indexing="ij")
    z = torch.zeros(steps * steps, dim)
    z[:, axes[0]] = rows.reshape(-1)
    z[:, axes[1]] = cols.reshape(-1)
    return z


def plane_basis(dim: int, generator: torch.Generator) -> torch.Tensor:
    """Two orthonormal directions of a random plane through the origin: ``(2, dim)``."""
    q, _ = torch.linalg.qr(torch.randn(dim, 2, generator=generator))
    return q.T.contiguous()


def plane_latents(n: int, dim: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` prior draws projected onto a random 2D plane: z = a u + b v, (a, b) ~ N(0, I_2)."""
    basis = plane_basis(dim, generator)
    return torch.randn(n, 2, generator=generator) @ basis


def slerp(a: torch.Tensor, b: torch.Tensor, alpha: float) -> torch.Tensor:
    """Spherical interpolation per sample between ``a`` and ``b`` ``(B, ...)`` at ``alpha`` in [0, 1].

    Exact at the ends (``alpha = 0`` gives ``a``, 1 gives ``b``); falls back to a straight line where
    the two are (anti)parallel to within float precision.
    """
    flat_a, flat_b = a.flatten(1), b.flatten(1)
    cos = torch.nn.functional.cosine_similarity(flat_a, flat_b, dim=1, eps=1e-12).clamp(-1.0, 1.0)
    theta = torch.arccos(cos)
    sin = torch.sin(theta)
    straight = sin.abs() < 1e-6
    safe = torch.where(straight, torch.ones_like(sin), sin)
    wa = torch.where(straight, torch.full_like(sin, 1.0 - alpha), torch.sin((1.0 - alpha) * theta) / safe)
    wb = torch.where(straight, torch.full_like(sin, alpha), torch.sin(alpha * theta) / safe)
    shape = (-1,) + (1,) * (a.ndim - 1)
    return wa.view(shape) * a + wb.view(shape) * b


def interpolate_latents(z0: torch.Tensor, z1: torch.Tensor, steps: int = 8, spherical: bool = True) -> torch.Tensor:
    """A path from ``z0`` to ``z1`` (each ``(dim,)``): ``(steps, dim)``, ends included.

    Spherical interpolation (:func:`slerp`) keeps intermediate codes at the prior's typical radius;
    it falls back to linear when the codes are (anti)parallel.
    """
    t = torch.linspace(0.0, 1.0, steps)
    if spherical:
        return torch.cat([slerp(z0[None], z1[None], float(alpha)) for alpha in t])
    return (1 - t[:, None]) * z0 + t[:, None] * z1


def direction_grid(directions: torch.Tensor, steps: int = 7, span: float = 2.5) -> torch.Tensor:
    """A ``steps x steps`` grid ``a d0 + b d1``, ``a, b`` in [-span, span], row-major: ``(steps**2, dim)``.

    ``directions`` ``(2, dim)``: any two directions (e.g. :func:`channel_directions`, or a scaled :func:`plane_basis`).
    """
    values = torch.linspace(-span, span, steps)
    a, b = torch.meshgrid(values, values, indexing="ij")
    return a.reshape(-1, 1) * directions[0] + b.reshape(-1, 1) * directions[1]


def channel_directions(shape: tuple[int, ...], groups: tuple[list[int], list[int]]) -> torch.Tensor:
    """Two directions of a spatial latent ``shape = (C, *spatial)``: 1 on every element of the channels of each group.

    ``groups=([0], [1])`` moves whole channels 0 and 1; the two halves of the channels split them as the
    cardiac flow system's grid does. Returns ``(2, prod(shape))``.
    """
    if any(not 0 <= c < shape[0] for group in groups for c in group) or set(groups[0]) & set(groups[1]) or not all(groups):
        raise MedsynthError(f"latent channel groups {groups} must be two disjoint, non-empty sets of the {shape[0]} channels")
    directions = torch.zeros(2, *shape)
    for k, group in enumerate(groups):
        directions[k, list(group)] = 1.0
    return directions.flatten(1)


def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) in closed form, summed over every latent element, averaged over the batch:
    the one KL term of the VAEs (cvae, flow-cvae, the latent-diffusion autoencoders)."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).flatten(1).sum(1).mean()


@dataclass(frozen=True)
class KLTerm:
    """The KL term of a VAE's ELBO as a callable loss (as edm's ``loss.py`` writes its losses): ``term(mu, logvar)`` is
    :func:`gaussian_kl`; its weight beta is ``weight``, ramped linearly from 0 over the first ``warmup_epochs``
    epochs of training (:meth:`beta`; ``medsynth.training.warmed_up``). Validation weighs it by the full ``weight``."""

    weight: float
    warmup_epochs: float = 0.0

    def __call__(self, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        return gaussian_kl(mu, logvar)

    def beta(self, module: Any) -> float:
        """beta at the module's current training step (the full weight outside a Trainer)."""
        from medsynth.training import warmed_up

        return warmed_up(module, self.weight, self.warmup_epochs)
