"""inverse/pnp.py: with its prior's weight at 0 pnp is the data-terms fit in voxels; an ideal denoiser adds nothing;
a denoiser that knows the truth pulls the volume to it; D_t keeps the stack's grid at any prior size."""

from __future__ import annotations

import pytest
import torch

from medsynth.inverse.latent import ReconstructionHistory, ReconstructSettings, data_terms, run_adam
from medsynth.inverse.pnp import denoise_volume, optimise_volume
from slice_cases import FINE, N, ShiftPrior, measurements, truth_volume

SETTINGS = ReconstructSettings(pnp_iterations=40, pnp_lr=0.02, tolerance=0.0, pnp_timestep=7)


def _start(truth: torch.Tensor) -> torch.Tensor:
    """The truth, wrong between the observed slices (what an interpolation misses)."""
    return truth + 0.3 * torch.sin(torch.arange(FINE, dtype=truth.dtype) * 1.7)


def _data_terms_fit(start, data, settings):
    """The reference: Adam on lax_weight * lax + sax_weight * sax over the voxels, nothing else."""
    volume = start.detach().clone().requires_grad_(True)

    def terms():
        t = data_terms(volume, data)
        return {"total": settings.lax_weight * t["lax"] + settings.sax_weight * t["sax"], **t}

    history = ReconstructionHistory(method="reference")
    run_adam([volume], settings.pnp_lr, settings.pnp_iterations, settings, history, terms)
    return volume.detach(), history


def test_pnp_without_its_prior_is_the_data_terms_fit_and_lowers_them():
    truth = truth_volume().float()
    data, _ = measurements(truth)
    settings = SETTINGS.model_copy(update={"pnp_weight": 0.0})
    prior = ShiftPrior(target=torch.zeros(FINE, 1, N, N))  # a denoiser that would pull everything to 0: weighted out
    volume, history = optimise_volume(prior, _start(truth), data, settings)
    reference, reference_history = _data_terms_fit(_start(truth), data, settings)
    torch.testing.assert_close(volume, reference, rtol=0, atol=1e-6)
    assert history.losses["total"] == reference_history.losses["total"]
    total = history.losses["total"]
    assert history.method == "pnp" and history.iterations == 40 and total[-1] < 0.2 * total[0]  # measured 0.002
    assert prior.denoised == [7] * 40  # one denoising pass of every slice (one batch) per iteration, at pnp_timestep


def test_an_ideal_denoiser_leaves_the_data_terms_fit_unchanged():
    truth = truth_volume().float()
    data, _ = measurements(truth)
    volume, history = optimise_volume(ShiftPrior(), _start(truth), data, SETTINGS)  # D_t(V) = V: residual 0
    reference, _ = _data_terms_fit(_start(truth), data, SETTINGS)
    torch.testing.assert_close(volume, reference, rtol=0, atol=1e-6)
    assert history.losses["prior"] == [0.0] * 40


def test_a_denoiser_that_knows_the_truth_pulls_the_volume_to_it():
    truth = truth_volume().float()
    data, _ = measurements(truth)
    knows = ShiftPrior(target=truth[0].permute(3, 0, 1, 2))  # (FINE, 1, N, N): the truth's slices
    with_prior, history = optimise_volume(knows, _start(truth), data, SETTINGS.model_copy(update={"pnp_weight": 1e4}))
    without, _ = optimise_volume(knows, _start(truth), data, SETTINGS.model_copy(update={"pnp_weight": 0.0}))
    error = torch.mean((with_prior - truth) ** 2), torch.mean((without - truth) ** 2)
    assert error[0] < 0.1 * error[1]  # measured: 0.003 of the error without the prior
    # the reported total is the data terms' alone (the prior's term enters through the gradient only); float32: the
    # surrogate's value (weight 1e4) is added and subtracted, which costs about 1e-3 of the total's precision
    data_total = SETTINGS.lax_weight * history.losses["lax"][-1] + SETTINGS.sax_weight * history.losses["sax"][-1]
    assert history.losses["total"][-1] == pytest.approx(data_total, rel=1e-2)


def test_denoise_volume_keeps_the_stacks_grid_at_any_prior_size():
    truth = truth_volume().float()
    for size in (N, 6, 12):
        denoised = denoise_volume(ShiftPrior(image_size=size), truth, None, 3, torch.Generator().manual_seed(0), batch=2)
        assert denoised.shape == truth.shape
        if size == N:
            assert torch.equal(denoised, truth)  # same size: no resize, the ideal denoiser's output is its input
        else:  # bilinear resize there and back: close, not exact
            assert torch.mean((denoised - truth) ** 2) < 0.1 * torch.var(truth)
