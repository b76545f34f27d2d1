"""The latent autoencoder service: shapes against MONAI's AutoencoderKL (anisotropic and plain), padding
round trips, learning, the scale factor, the closed-form KL and the latent cache."""

from __future__ import annotations

import pytest
import torch
from monai.networks.nets import AutoencoderKL
from pydantic import ValidationError

from medsynth.diffusion.autoencoder import AutoencoderConfig, LatentAutoencoder, LatentCache, build_autoencoder


def _config(**overrides) -> AutoencoderConfig:
    settings = dict(spatial_dims=3, in_channels=1, channels=[4, 8, 8], latent_channels=2, keep_axis=2)
    return AutoencoderConfig(**(settings | overrides))


def _autoencoder(seed: int = 0, **overrides) -> LatentAutoencoder:
    torch.manual_seed(seed)
    return LatentAutoencoder(_config(**overrides))


def test_keep_axis_keeps_slices_in_network():
    network = build_autoencoder(_config(in_channels=2, latent_channels=3))
    mu, sigma = network.encode(torch.randn(1, 2, 20, 20, 7))
    assert mu.shape == sigma.shape == (1, 3, 5, 5, 7)
    assert network.decode(mu).shape == (1, 2, 20, 20, 7)


def test_keep_axis_in_2d_and_weights_shared_with_plain_monai():
    config = _config(spatial_dims=2, keep_axis=0)
    network = build_autoencoder(config)
    mu, _ = network.encode(torch.randn(2, 1, 5, 12))
    assert mu.shape == (2, 2, 5, 3) and network.decode(mu).shape == (2, 1, 5, 12)
    # Only strides, padding and scales change: a plain network's weights load as they are.
    network.load_state_dict(build_autoencoder(config.model_copy(update={"keep_axis": None})).state_dict())


def test_without_keep_axis_it_is_monai_autoencoderkl():
    torch.manual_seed(1)
    ours = build_autoencoder(_config(keep_axis=None))
    torch.manual_seed(1)
    plain = AutoencoderKL(spatial_dims=3, in_channels=1, out_channels=1, num_res_blocks=1, channels=(4, 8, 8),
                          attention_levels=(False, False, False), latent_channels=2, norm_num_groups=4,
                          with_encoder_nonlocal_attn=False, with_decoder_nonlocal_attn=False)
    x = torch.randn(1, 1, 16, 16, 8)
    assert torch.equal(ours.encode(x)[0], plain.encode(x)[0])
    assert ours.encode(x)[0].shape == (1, 2, 4, 4, 2)
    assert torch.equal(ours.reconstruct(x), plain.reconstruct(x))


@pytest.mark.parametrize("keep_axis", [2, None])
@pytest.mark.parametrize("shape", [(18, 20, 7), (20, 18, 13), (16, 16, 8)])
def test_any_size_round_trips(shape, keep_axis):
    autoencoder = _autoencoder(keep_axis=keep_axis)
    x = torch.randn(2, 1, *shape)
    recon, mu, sigma = autoencoder.reconstruct(x, torch.Generator().manual_seed(0))
    assert recon.shape == x.shape
    assert mu.shape == sigma.shape == (2, 2, *autoencoder.latent_shape(shape))
    expected = tuple(-(-n // 4) for n in shape[:2]) + ((shape[2],) if keep_axis == 2 else (-(-shape[2] // 4),))
    assert autoencoder.latent_shape(shape) == expected
    assert autoencoder.decode(mu, shape).shape == x.shape


def test_pad_replicates_at_the_end_and_crop_undoes_it():
    autoencoder = _autoencoder()
    assert autoencoder.downsampling == (4, 4, 1)
    x = torch.randn(1, 1, 5, 8, 3)
    padded = autoencoder.pad(x)
    assert padded.shape == (1, 1, 8, 8, 3)
    assert torch.equal(padded[:, :, 5:], x[:, :, 4:5].expand(-1, -1, 3, -1, -1))
    assert torch.equal(autoencoder.crop(padded, x.shape[2:]), x)
    assert autoencoder.pad(padded) is padded


def test_training_reduces_reconstruction_error():
    torch.manual_seed(0)
    autoencoder = LatentAutoencoder(_config(channels=[8, 8], latent_channels=2, kl_weight=1e-4))
    grid = torch.stack(torch.meshgrid(*(torch.linspace(-1, 1, n) for n in (16, 16, 6)), indexing="ij"))
    x = torch.exp(-(grid.pow(2) * torch.tensor([4.0, 2.0, 1.0]).view(3, 1, 1, 1)).sum(0))[None, None]
    optimiser = torch.optim.Adam(autoencoder.parameters(), lr=3e-3)

    def error() -> float:
        with torch.no_grad():
            mu, _ = autoencoder.encode(x)
            return float((autoencoder.decode(mu, x.shape[2:]) - x).abs().mean())

    before = error()
    generator = torch.Generator().manual_seed(0)
    for _ in range(40):
        recon, mu, sigma = autoencoder.reconstruct(x, generator)
        loss = (recon - x).abs().mean() + autoencoder.config.kl_weight * autoencoder.kl_loss(mu, sigma)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    assert error() < 0.3 * before


def test_kl_loss_matches_torch_distributions():
    mu, sigma = torch.randn(3, 2, 4, 4), torch.rand(3, 2, 4, 4) + 0.1
    q, p = torch.distributions.Normal(mu, sigma), torch.distributions.Normal(0.0, 1.0)
    expected = torch.distributions.kl_divergence(q, p).flatten(1).sum(1).mean()
    torch.testing.assert_close(LatentAutoencoder.kl_loss(mu, sigma), expected)
    assert LatentAutoencoder.kl_loss(torch.zeros(2, 3), torch.ones(2, 3)) == 0


def test_sample_latent_is_reproducible_and_centred():
    mu, sigma = torch.full((1, 2, 64, 64), 3.0), torch.full((1, 2, 64, 64), 0.5)
    a = LatentAutoencoder.sample_latent(mu, sigma, torch.Generator().manual_seed(4))
    assert torch.equal(a, LatentAutoencoder.sample_latent(mu, sigma, torch.Generator().manual_seed(4)))
    assert abs(float(a.mean()) - 3.0) < 0.02 and abs(float(a.std()) - 0.5) < 0.02


def test_scale_factor_makes_unit_std_and_is_saved():
    autoencoder = _autoencoder()
    assert float(autoencoder.scale_factor) == 1.0
    latents = 5.0 * torch.randn(8, 2, 4, 4, 3, generator=torch.Generator().manual_seed(0)) + 1.0
    factor = autoencoder.fit_scale_factor(latents)
    assert factor == pytest.approx(0.2, rel=0.05)
    assert float(autoencoder.to_diffusion(latents).std()) == pytest.approx(1.0, rel=1e-5)
    torch.testing.assert_close(autoencoder.from_diffusion(autoencoder.to_diffusion(latents)), latents)
    restored = _autoencoder(seed=1)
    restored.load_state_dict(autoencoder.state_dict())
    assert float(restored.scale_factor) == factor


def test_config_defaults_and_refusals():
    assert _config(channels=[16, 32, 32]).groups == 16
    assert _config(channels=[48, 96]).groups == 24
    assert _config(channels=[7]).groups == 7
    with pytest.raises(ValidationError, match="keep_axis"):
        _config(spatial_dims=2, keep_axis=2)
    with pytest.raises(ValidationError, match="norm_num_groups"):
        _config(norm_num_groups=3)
    with pytest.raises(ValidationError):
        _config(bogus=1)


class _Counted:
    """An autoencoder with a count of encoder passes and a dataset of smooth random volumes."""

    def __init__(self) -> None:
        self.autoencoder = _autoencoder()
        self.calls = 0
        self.autoencoder.network.encoder.register_forward_hook(lambda *_: setattr(self, "calls", self.calls + 1))
        generator = torch.Generator().manual_seed(0)
        self.data = {f"case{i}": torch.randn(1, 8, 8, 3, generator=generator) for i in range(5)}

    def load(self, ids: list[str]) -> torch.Tensor:
        return torch.stack([self.data[i] for i in ids])


def test_latent_cache_hits_and_recomputes(tmp_path):
    counted, cache = _Counted(), LatentCache(tmp_path)
    ids = sorted(counted.data)
    first = cache.get(counted.autoencoder, ids, counted.load, batch_size=2)
    assert counted.calls == 3 and list(first) == ids and counted.autoencoder.training
    with torch.no_grad():
        mu, sigma = counted.autoencoder.eval().encode(counted.data["case3"][None])
    counted.autoencoder.train()
    torch.testing.assert_close(first["case3"][0], mu[0])
    torch.testing.assert_close(first["case3"][1], sigma[0])

    counted.calls = 0
    cache.get(counted.autoencoder, ids, counted.load, batch_size=2)
    assert counted.calls == 0  # a hit
    counted.autoencoder.fit_scale_factor(torch.stack([first[i][0] for i in ids]))
    cache.get(counted.autoencoder, ids, counted.load, batch_size=2)
    assert counted.calls == 0  # the scale factor does not change the unscaled latents

    again = LatentCache(tmp_path).get(counted.autoencoder, ids, counted.load, batch_size=2)
    assert counted.calls == 0 and all(torch.equal(again[i][0], first[i][0]) for i in ids)  # the file reloads

    cache.get(counted.autoencoder, ids[:4], counted.load, batch_size=2)
    assert counted.calls == 2  # other ids
    with torch.no_grad():
        counted.autoencoder.network.quant_conv_mu.conv.bias.add_(0.5)
    changed = cache.get(counted.autoencoder, ids[:4], counted.load, batch_size=4)
    assert counted.calls == 3  # another weight
    torch.testing.assert_close(changed["case0"][0], first["case0"][0] + 0.5)
    assert LatentCache(tmp_path).get(counted.autoencoder, ids[:4], counted.load).keys() == changed.keys()
    assert counted.calls == 3


def test_latent_cache_in_memory_only():
    counted, cache = _Counted(), LatentCache(None)
    ids = ["case1", "case0"]
    latents = cache.get(counted.autoencoder, ids, counted.load)
    assert list(latents) == ids and latents["case0"][0].shape == (2, 2, 2, 3)
    cache.get(counted.autoencoder, ids, counted.load)
    assert counted.calls == 2
    with pytest.raises(ValueError, match="unique"):
        cache.get(counted.autoencoder, ["case0", "case0"], counted.load)
