"""nets/flow_cvae: shapes at 16^3 and anisotropic 16x16x12, the pyramid changes the output, bounded output."""

from __future__ import annotations

import pytest
import torch

from medsynth.nets.flow_cvae import FlowCVAE, ImagePyramid, LearnedPyramid, RegistrationNet


def build(kind: str, bound=(2.0, 2.0, 1.5), seed: int = 0) -> FlowCVAE:
    torch.manual_seed(seed)
    pyramid = ImagePyramid(2) if kind == "image" else LearnedPyramid([4, 6, 8])
    return FlowCVAE(pyramid, channels=[4, 8, 8], latent_channels=3, max_displacement=bound).eval()


@pytest.mark.parametrize("shape", [(16, 16, 16), (16, 16, 12)])
@pytest.mark.parametrize("kind", ["image", "learned"])
def test_shapes(kind, shape):
    net = build(kind)
    frame, flow = torch.rand(2, 1, *shape), torch.randn(2, 3, *shape)
    features = net.pyramid(frame)
    assert [f.shape[2:] for f in features] == [torch.Size([s // 2**level for s in shape]) for level in range(3)]
    out, mu, logvar = net(flow, frame, torch.Generator().manual_seed(0))
    assert out.shape == flow.shape
    assert mu.shape == logvar.shape == (2, *net.latent_shape(shape)) == (2, 3, *(s // 4 for s in shape))
    assert net.decode(torch.randn(2, *net.latent_shape(shape)), features).shape == flow.shape


def test_the_pyramid_changes_the_output():
    frame, z = torch.rand(1, 1, 16, 16, 12), torch.randn(1, 3, 4, 4, 3)
    image, learned = build("image"), build("learned")
    for net in (image, learned):
        torch.nn.init.normal_(net.decoder.out.conv.weight, std=0.3)
    out_image = image.decode(z, image.pyramid(frame))
    out_learned = learned.decode(z, learned.pyramid(frame))
    assert not torch.allclose(out_image, out_learned)
    # and the frame changes it: the decoder is conditioned on it
    assert not torch.allclose(out_image, image.decode(z, image.pyramid(torch.rand(1, 1, 16, 16, 12))))


def test_output_is_bounded_per_axis():
    net = build("learned", bound=(2.0, 1.0, 0.5))
    torch.nn.init.normal_(net.decoder.out.conv.weight, std=50.0)
    out = net.decode(10 * torch.randn(2, 3, 4, 4, 4), net.pyramid(torch.rand(2, 1, 16, 16, 16)))
    peak = out.abs().amax(dim=(0, 2, 3, 4))
    assert torch.all(peak <= torch.tensor([2.0, 1.0, 0.5]) + 1e-6) and torch.all(peak > torch.tensor([1.5, 0.75, 0.35]))


def test_registration_net_encoder_is_a_pyramid():
    torch.manual_seed(0)
    reg = RegistrationNet([4, 6, 8], [4, 8, 8], (2.0, 2.0, 2.0))
    fixed, moving = torch.rand(1, 1, 16, 16, 12), torch.rand(1, 1, 16, 16, 12)
    assert reg(fixed, moving).shape == (1, 3, 16, 16, 12)
    net = FlowCVAE(reg.encoder, channels=[4, 8, 8], latent_channels=3, max_displacement=(2.0, 2.0, 2.0))
    assert net.pyramid is reg.encoder and [f.shape[1] for f in net.pyramid(fixed)] == [4, 6, 8]


def test_an_offset_centres_the_output_and_keeps_it_bounded():
    torch.manual_seed(0)
    net = FlowCVAE(LearnedPyramid([4, 4]), channels=[4, 8], latent_channels=2, max_displacement=(2.0, 2.0, 2.0), offset_shape=(8, 8, 8))
    assert "decoder.offset" in net.state_dict()
    mean = torch.randn(3, 8, 8, 8).clamp(-1.5, 1.5)
    net.decoder.set_offset(mean)
    torch.nn.init.zeros_(net.decoder.out.conv.weight)
    out = net.decode(torch.randn(1, 2, 4, 4, 4), net.pyramid(torch.rand(1, 1, 8, 8, 8)))
    assert torch.allclose(out[0], mean, atol=1e-5)
    with pytest.raises(ValueError):
        build("image").decoder.set_offset(mean)
