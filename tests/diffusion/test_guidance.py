"""Classifier-free guidance: the SDM convention eps = eps(x|y) + s (eps(x|y) - eps(x|none)), on tensors and on
structured conditions."""

from __future__ import annotations

import pytest
import torch

from diffusion_toys import NULL, noise, structured_condition, toy_model
from medsynth.diffusion import classifier_free_guidance, null_condition
from medsynth.errors import MedsynthError


def _class_model(calls):
    """eps(x | y) = 0.1 x + y (y = 0 is the null condition), counting forward passes."""

    def model(x, t, cond):
        calls.append(x.shape[0])
        out = 0.1 * x + cond.to(x.dtype).reshape(-1, 1, 1, 1)
        return torch.cat([out, -out], dim=1)  # a variance half, to check it is not guided

    return model


def test_guidance_convention():
    calls = []
    model, x, t, y = _class_model(calls), noise(), torch.full((3,), 500), torch.tensor([1, 2, 3])
    eps_cond, eps_null = model(x, t, y), model(x, t, torch.zeros(3))
    assert torch.equal(classifier_free_guidance(model, 0.0, torch.tensor(0))(x, t, y), eps_cond)  # s = 0: conditional
    calls.clear()
    guided = classifier_free_guidance(model, 1.0, torch.tensor(0), learn_sigma=True)(x, t, y)
    torch.testing.assert_close(guided[:, :2], 2 * eps_cond[:, :2] - eps_null[:, :2])  # s = 1: 2 eps_c - eps_u
    assert torch.equal(guided[:, 2:], eps_cond[:, 2:])
    assert calls == [6]  # one batched forward for both passes
    s = 3.5
    guided = classifier_free_guidance(model, s, torch.zeros_like)(x, t, y)  # no learn_sigma: all channels
    torch.testing.assert_close(guided, eps_cond + s * (eps_cond - eps_null))


@pytest.mark.parametrize("scale", [-1.0, float("nan")])
def test_negative_guidance_scale_is_a_clear_error(scale):
    with pytest.raises(MedsynthError, match=r"guidance scale must be >= 0") as info:
        classifier_free_guidance(toy_model, scale, torch.tensor(0))
    assert "\n" not in str(info.value)


def test_guidance_on_a_structured_condition():
    def model(x, t, cond):  # eps(x | c) = x + class + seg mean + concat
        return x + cond.class_labels.view(-1, 1, 1, 1) + cond.seg.mean(1, keepdim=True) + cond.concat

    cond, x, t = structured_condition(), torch.zeros(4, 1, 2, 2), torch.full((4,), 10)
    eps_c, eps_u = model(x, t, cond), model(x, t, null_condition(cond, NULL))
    torch.testing.assert_close(classifier_free_guidance(model, 2.0, NULL)(x, t, cond), eps_c + 2 * (eps_c - eps_u))
