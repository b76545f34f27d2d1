"""inverse/latent.py: the data terms against their definition, the start codes, Adam's early stop, the codes'
optimisation and the settings' bounds."""

from __future__ import annotations

import pytest
import torch

from medsynth.config import validate_config
from medsynth.errors import MedsynthError
from medsynth.inverse.latent import (
    ReconstructionHistory,
    ReconstructSettings,
    data_terms,
    initial_codes,
    optimise_codes,
    render,
    run_adam,
)
from medsynth.inverse.prior import resize_slices
from medsynth.latent_space import slerp
from slice_cases import FACTOR, FINE, N, ShiftPrior, measurements, truth_volume


def test_the_data_terms_of_the_truth_are_zero_and_of_a_shift_its_square():
    truth = truth_volume()
    data, _ = measurements(truth)
    terms = data_terms(truth, data)
    assert set(terms) == {"lax", "sax"} and float(terms["lax"]) < 1e-20 and float(terms["sax"]) < 1e-20
    shifted = data_terms(truth + 0.3, data)  # the profiles' weights sum to 1: a constant passes through every sample
    assert float(shifted["sax"]) == pytest.approx(0.09, rel=1e-9) and float(shifted["lax"]) == pytest.approx(0.09, rel=1e-9)
    # a standardised view is blind to an affine change of intensity, the SAX term is not
    data_std, _ = measurements(truth, standardise=True)
    scaled = data_terms(2.0 * truth + 0.3, data_std)
    assert float(scaled["lax"]) < 1e-10 and float(scaled["sax"]) > 0.01


def test_the_sax_term_is_the_mean_squared_difference_of_the_thick_slices():
    truth = truth_volume()
    data, _ = measurements(truth)
    other = truth.flip(2)
    expected = torch.mean((data.sax_operator(other) - data.sax) ** 2)
    assert torch.equal(data_terms(other, data)["sax"], expected) and expected > 0


def test_slerp_start_codes_hold_the_observed_slices_and_interpolate_between():
    prior, truth = ShiftPrior(), truth_volume().float()
    observed = truth[0].permute(3, 0, 1, 2)[::FACTOR]  # (SLICES, 1, N, N): the fine slices the stack sits on
    z, x_t = initial_codes(prior, observed, FACTOR, steps=3)
    assert z.shape == (FINE, 1) and x_t.shape == (FINE, 1, N, N)
    torch.testing.assert_close(prior.decode(z[::FACTOR], x_t[::FACTOR], 3), observed)  # observed slice k on fine k * factor
    x_obs = prior.invert(observed, prior.encode_semantic(observed), 3)
    torch.testing.assert_close(x_t[1], slerp(x_obs[:1], x_obs[1:2], 0.5)[0])
    torch.testing.assert_close(z[1], 0.5 * (z[0] + z[2]))


def test_interpolation_start_codes_decode_to_the_interpolated_slices():
    prior, truth = ShiftPrior(), truth_volume().float()
    fine = truth[0].permute(3, 0, 1, 2)
    z, x_t = initial_codes(prior, fine[::FACTOR], FACTOR, steps=3, interpolated=fine)
    torch.testing.assert_close(prior.decode(z, x_t, 3), fine)
    volume = render(prior, z, x_t, 3, (N, N), batch=2)  # batches of 2 slices: the same volume
    assert volume.shape == (1, 1, N, N, FINE)
    torch.testing.assert_close(volume, truth)


def test_run_adam_minimises_and_stops_when_the_loss_is_calm():
    target = torch.tensor([3.0, -1.0])
    p = torch.zeros(2, requires_grad=True)
    history, after = ReconstructionHistory(method="toy"), []
    settings = ReconstructSettings(tolerance=1e-3, patience=3)
    run_adam([p], 0.1, 2000, settings, history, lambda: {"total": torch.sum((p - target) ** 2)},
             after_step=lambda: after.append(1))
    assert torch.allclose(p.detach(), target, atol=0.05)
    assert 10 < history.iterations < 2000 and len(history.losses["total"]) == history.iterations == len(after)
    tail = history.losses["total"][-4:]  # the last `patience` changes are each below the tolerance
    assert all(abs(a - b) <= 1e-3 * max(abs(a), 1e-12) for a, b in zip(tail, tail[1:]))
    history = ReconstructionHistory(method="toy")
    run_adam([p], 0.1, 5, settings.model_copy(update={"tolerance": 0.0}), history, lambda: {"total": torch.sum((p - 7.0) ** 2)})
    assert history.iterations == 5  # no tolerance: every iteration runs


def test_optimise_codes_without_iterations_renders_the_start_and_with_them_lowers_the_loss():
    truth = truth_volume().float()
    data, _ = measurements(truth)
    prior = ShiftPrior()
    start = truth + 0.2 * torch.cos(torch.arange(FINE, dtype=torch.float32) * 2.0)  # wrong between the observed slices
    fine = resize_slices(start[0].permute(3, 0, 1, 2), (N, N))
    z0, x0 = initial_codes(prior, fine[::FACTOR], FACTOR, 2, interpolated=fine)
    volume, history = optimise_codes(prior, z0, x0, data, ReconstructSettings(iterations=0, steps=2))
    torch.testing.assert_close(volume, start)
    assert history.iterations == 0 and history.losses == {}
    settings = ReconstructSettings(iterations=30, steps=2, lr=0.01, tolerance=0.0)
    volume, history = optimise_codes(prior, z0, x0, data, settings)
    assert history.method == "latent" and history.iterations == 30 and history.seconds > 0
    assert set(history.losses) == {"total", "lax", "sax", "drift", "smooth"}
    assert history.losses["total"][-1] < 0.5 * history.losses["total"][0]  # measured 0.09
    assert torch.mean((volume - truth) ** 2) < 0.5 * torch.mean((start - truth) ** 2)  # measured 0.14


@pytest.mark.parametrize(("values", "key"), [({"lr": 0}, "lr"), ({"percentiles": (60, 40)}, "percentiles"),
                                             ({"pnp_weight": float("inf")}, "pnp_weight"), ({"batch": 0}, "batch")])
def test_settings_out_of_bounds_are_refused_naming_the_setting(values, key):
    with pytest.raises(MedsynthError, match=key) as info:
        validate_config(ReconstructSettings, values, "reconstruct --set")
    assert "\n" not in str(info.value)
