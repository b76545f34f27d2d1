from __future__ import annotations

import pytest
import torch

from medsynth.errors import MedsynthError
from medsynth.latent_space import (
    channel_directions,
    direction_grid,
    grid_latents,
    interpolate_latents,
    plane_basis,
    plane_latents,
    random_latents,
)


def test_random_latents_reproducible():
    a = random_latents(5, 8, torch.Generator().manual_seed(3))
    b = random_latents(5, 8, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.shape == (5, 8)


def test_grid_spans_two_axes_only():
    z = grid_latents(6, axes=(1, 4), steps=5, span=2.0)
    assert z.shape == (25, 6)
    assert torch.count_nonzero(z[:, [0, 2, 3, 5]]) == 0
    assert z[:, 1].min() == -2.0 and z[:, 4].max() == 2.0
    with pytest.raises(MedsynthError):
        grid_latents(6, axes=(2, 2))


def test_plane_latents_lie_in_a_plane():
    z = plane_latents(50, 16, torch.Generator().manual_seed(0))
    assert torch.linalg.matrix_rank(z) == 2
    basis = plane_basis(16, torch.Generator().manual_seed(0))
    assert torch.allclose(basis @ basis.T, torch.eye(2), atol=1e-6)


@pytest.mark.parametrize("spherical", [True, False])
def test_interpolation_hits_both_ends(spherical):
    z0, z1 = torch.randn(8, generator=torch.Generator().manual_seed(1)), torch.randn(8, generator=torch.Generator().manual_seed(2))
    path = interpolate_latents(z0, z1, steps=6, spherical=spherical)
    assert path.shape == (6, 8)
    assert torch.allclose(path[0], z0, atol=1e-5) and torch.allclose(path[-1], z1, atol=1e-5)


def test_direction_grid_spans_two_directions():
    directions = channel_directions((4, 2, 2), ([0, 1], [3]))
    assert directions.shape == (2, 16) and directions[0].sum() == 8 and directions[1].sum() == 4
    z = direction_grid(directions, steps=3, span=2.0).view(9, 4, 2, 2)
    assert torch.equal(z[0, 0], torch.full((2, 2), -2.0)) and torch.equal(z[0, 3], torch.full((2, 2), -2.0))
    assert torch.equal(z[5, 1], torch.zeros(2, 2)) and torch.equal(z[5, 3], torch.full((2, 2), 2.0)) and not z[:, 2].any()
    with pytest.raises(MedsynthError):
        channel_directions((4, 2, 2), ([0], [0]))


def test_the_one_kl_is_the_closed_form_kl_to_the_standard_normal():
    from torch.distributions import Normal, kl_divergence

    from medsynth.latent_space import gaussian_kl

    generator = torch.Generator().manual_seed(0)
    mu, logvar = torch.randn(4, 3, 5, 5, generator=generator), torch.randn(4, 3, 5, 5, generator=generator)
    reference = kl_divergence(Normal(mu, (0.5 * logvar).exp()), Normal(torch.zeros_like(mu), torch.ones_like(mu)))
    torch.testing.assert_close(gaussian_kl(mu, logvar), reference.flatten(1).sum(1).mean())
    assert float(gaussian_kl(torch.zeros(2, 8), torch.zeros(2, 8))) == 0.0
