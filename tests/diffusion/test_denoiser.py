"""Denoisers around MONAI's UNets: training and sampling in bf16, flash attention, SPADE, every condition part routed."""

from __future__ import annotations

import pytest
import torch

from diffusion_toys import noise
from medsynth.diffusion import (
    Condition,
    ConditionedDenoiser,
    DiffusionLoss,
    build_unet,
    classifier_free_guidance,
    make_schedule,
    sample_ddim,
    sample_dpmpp_2m,
)

_TINY_UNET = dict(channels=(8, 8), attention_levels=(False, False), num_res_blocks=1, norm_num_groups=4)


def _randomise(unet: torch.nn.Module) -> torch.nn.Module:
    """Every parameter drawn from N(0, 0.2^2) (MONAI zero-initialises output layers): every path has a weight."""
    for parameter in unet.parameters():
        torch.nn.init.normal_(parameter, std=0.2)
    return unet


def test_monai_unet_denoiser_trains_and_samples_in_bf16():
    torch.manual_seed(0)
    unet = build_unet(2, 1, 1, learn_sigma=True, num_class_embeds=3, **_TINY_UNET)
    assert unet.out_channels == 2
    model, x, y = ConditionedDenoiser(unet, tensor_as="class_labels"), noise((2, 1, 8, 8)), torch.tensor([0, 1])
    schedule = make_schedule("linear", learn_sigma=True)
    loss, _ = DiffusionLoss(schedule, cond_drop_prob=0.5, null_cond=torch.tensor(2))(model, x.clamp(-1, 1), y)
    loss.backward()
    assert loss > 0 and all(p.grad is not None for p in unet.parameters())
    _randomise(unet)  # MONAI zero-initialises the output layer: without this every sample is the noise's alone
    guided = classifier_free_guidance(model, 2.0, torch.tensor(2), learn_sigma=True)
    with torch.no_grad():
        reference = sample_ddim(guided, x, schedule, y, steps=3)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            sample = sample_ddim(guided, x, schedule, y, steps=3)
    # bf16 changes the precision (8 bits of mantissa), not the maths: the float32 sample within a few per cent
    assert sample.dtype == torch.float32
    assert float((sample - reference).abs().max() / reference.abs().max()) < 0.05


def test_flash_attention_changes_the_kernel_not_the_maths():
    args = {**_TINY_UNET, "attention_levels": (False, True), "num_head_channels": 4}
    torch.manual_seed(0)
    flash, plain = build_unet(2, 1, 1, **args), build_unet(2, 1, 1, use_flash_attention=False, **args)
    plain.load_state_dict(flash.state_dict())
    x, t = noise((2, 1, 8, 8)), torch.tensor([10, 900])
    with torch.no_grad():
        torch.testing.assert_close(ConditionedDenoiser(flash)(x, t), ConditionedDenoiser(plain)(x, t), rtol=1e-4, atol=1e-5)


def test_spade_unet_denoiser():
    torch.manual_seed(0)
    model = ConditionedDenoiser(_randomise(build_unet(2, 1, 1, label_nc=3, **_TINY_UNET)), tensor_as="seg")
    seg = torch.nn.functional.one_hot(torch.randint(0, 3, (2, 8, 8)), 3).permute(0, 3, 1, 2).float()

    def sample(label_map):
        with torch.no_grad():
            return sample_dpmpp_2m(classifier_free_guidance(model, 1.5, torch.zeros_like), noise((2, 1, 8, 8)),
                                   make_schedule("cosine"), label_map, steps=2)

    out = sample(seg)
    assert out.shape == (2, 1, 8, 8) and torch.equal(sample(seg), out)  # deterministic
    assert not torch.allclose(sample(seg.roll(3, dims=-1)), out)  # the label map steers the sample (SPADE)


def test_conditioned_denoiser_routes_every_part():
    torch.manual_seed(0)
    unet = build_unet(2, 1 + 2, 1, label_nc=3, num_class_embeds=4, with_conditioning=True, cross_attention_dim=5,
                      **{**_TINY_UNET, "attention_levels": (False, True), "num_head_channels": 4})
    model = ConditionedDenoiser(_randomise(unet))
    cond = Condition(concat=torch.randn(2, 2, 8, 8), seg=torch.ones(2, 3, 8, 8) / 3, class_labels=torch.tensor([1, 2]),
                     vector=torch.randn(2, 5))
    x, t = noise((2, 1, 8, 8)), torch.tensor([10, 900])
    with torch.no_grad():
        out = model(x, t, cond)
        assert out.shape == (2, 1, 8, 8)
        for part, other in [("concat", torch.zeros(2, 2, 8, 8)), ("seg", torch.zeros(2, 3, 8, 8)),
                            ("class_labels", torch.tensor([3, 3])), ("vector", torch.zeros(2, 5))]:
            assert not torch.allclose(model(x, t, cond.replace(**{part: other})), out), part
    with pytest.raises(TypeError, match="tensor_as"):
        model(x, t, torch.zeros(2, 3, 8, 8))
