"""Patch-wise denoising: exact for a voxel-wise model, structured conditions split per patch."""

from __future__ import annotations

import pytest
import torch

from medsynth.diffusion import Condition, PatchwiseDenoiser
from medsynth.errors import MedsynthError


def test_patchwise_denoiser_is_exact_for_a_pointwise_model():
    # A voxel-wise model gives the same answer in every patch: the blend must reproduce it exactly.
    def model(x, t, cond):
        return x * 2 + cond[:, :1] + t.view(-1, 1, 1, 1, 1)

    x, cond = torch.randn(2, 1, 12, 10, 16), torch.randn(2, 3, 12, 10, 16)
    t = torch.tensor([5, 5])
    patched = PatchwiseDenoiser(model, (8, 8, 8), overlap=0.5, batch_size=3)(x, t, cond)
    assert torch.allclose(patched, model(x, t, cond), atol=1e-5)
    with pytest.raises(MedsynthError, match="larger than the volume"):
        PatchwiseDenoiser(model, (16, 8, 8))(x, t, cond)


def test_patchwise_denoiser_splits_a_structured_condition():
    def model(x, t, cond):  # voxel-wise in the spatial parts, per item in the class label
        return x + cond.seg[:, :1] - cond.concat[:, 1:] + cond.class_labels.view(-1, 1, 1, 1, 1)

    x = torch.randn(2, 1, 12, 10, 16)
    cond = Condition(seg=torch.randn(2, 2, 12, 10, 16), concat=torch.randn(2, 2, 12, 10, 16), class_labels=torch.tensor([1, 4]))
    patched = PatchwiseDenoiser(model, (8, 8, 8), overlap=0.5, batch_size=2)(x, torch.tensor([5, 5]), cond)
    assert torch.allclose(patched, model(x, None, cond), atol=1e-5)
