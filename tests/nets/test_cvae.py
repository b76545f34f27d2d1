"""nets/cvae.py: the class-conditional VAE in 2D and 3D."""

from __future__ import annotations

import pytest
import torch

from medsynth.nets.cvae import ConditionalVAE


@pytest.mark.parametrize("spatial", [(16, 16), (8, 8, 8)])
def test_shapes_and_class_conditioning(spatial):
    torch.manual_seed(0)
    net = ConditionalVAE(spatial_dims=len(spatial), in_shape=(2, *spatial), num_classes=3, latent_size=4, channels=(4, 8),
                         strides=(2, 2), embed_dim=3, num_res_units=0).eval()
    x, c = torch.rand(5, 2, *spatial), torch.tensor([0, 1, 2, 0, 1])
    mu, logvar = net.encode_posterior(x, c)
    assert mu.shape == logvar.shape == (5, 4)
    decoded = net.decode_latent(mu, c)
    assert decoded.shape == x.shape and 0 <= decoded.min() and decoded.max() <= 1  # sigmoid output
    out, mu2, _, z = net(x, c)
    assert out.shape == x.shape and torch.equal(z, mu2)  # eval mode decodes the posterior mean
    # The class changes both the decoder's output and the encoder's posterior.
    z = torch.randn(2, 4)
    assert not torch.allclose(net.decode_latent(z, torch.tensor([0, 0])), net.decode_latent(z, torch.tensor([1, 1])))
    assert not torch.allclose(net.encode_posterior(x[:1], c[:1] * 0)[0], net.encode_posterior(x[:1], c[:1] * 0 + 2)[0])


def test_reparameterisation_samples_the_posterior_in_training():
    net = ConditionalVAE(spatial_dims=2, in_shape=(1, 8, 8), num_classes=2, latent_size=4, channels=(4,), strides=(2,)).train()
    mu, logvar = torch.full((20000, 4), 3.0), torch.full((20000, 4), float(torch.log(torch.tensor(4.0))))
    torch.manual_seed(0)
    z = net.reparameterize(mu, logvar)
    assert z.mean().item() == pytest.approx(3.0, abs=0.05) and z.std().item() == pytest.approx(2.0, abs=0.05)
