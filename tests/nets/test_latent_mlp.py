"""The latent DDIM's MLP: shapes, a zero start, and the timestep reaching the output."""

from __future__ import annotations

import torch

from medsynth.nets.latent_mlp import LatentMLP


def test_starts_at_zero_and_depends_on_the_timestep_after_training_a_step():
    torch.manual_seed(0)
    net = LatentMLP(6, hidden=16, layers=2)
    z = torch.randn(4, 6)
    assert torch.equal(net(z, torch.tensor([0, 10, 500, 999])), torch.zeros(4, 6))  # zero-initialised head
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    net(z, torch.tensor([0, 10, 500, 999])).sub(1).square().mean().backward()
    optimizer.step()
    out = net(z[:1].expand(2, 6), torch.tensor([0, 999]))
    assert out.shape == (2, 6) and not torch.allclose(out[0], out[1])
