"""Field metrics against analytic fields and the cardiac phantom's exact motion."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from medsynth.data.fields import mm_to_voxel
from medsynth.data.phantoms.cardiac import CARDIAC_LABELS, render_cardiac, sample_cardiac_params
from medsynth.evaluate.fields import (
    ejection_fraction,
    epe_map_mm,
    epe_of_samples,
    field_report,
    jacobian_stats,
    magnitude_wasserstein,
    mean_flow_baseline,
    nearest_training_field,
    pairwise_diversity,
    warped_volume_ml,
)

SHAPE = (12, 10, 8)


def oblique_affine(spacing=(0.8, 1.3, 2.5)) -> np.ndarray:
    """An anisotropic, oblique 4x4 affine (rotated axes, non-unit spacing)."""
    affine = np.eye(4)
    affine[:3, :3] = Rotation.from_euler("xyz", (20, -35, 50), degrees=True).as_matrix() @ np.diag(spacing)
    affine[:3, 3] = (-40.0, 12.0, 7.0)
    return affine


def smooth_field(seed: int, shape=SHAPE, amplitude: float = 1.0) -> torch.Tensor:
    """A smooth random voxel field (3, *shape): a few low-frequency sinusoids."""
    g = torch.Generator().manual_seed(seed)
    grids = torch.meshgrid(*[torch.linspace(0, math.pi, n) for n in shape], indexing="ij")
    components = []
    for _ in range(3):
        phase, freq = torch.rand(3, generator=g) * math.pi, 1 + torch.rand(3, generator=g)
        components.append(amplitude * torch.sin(sum(f * x + p for f, x, p in zip(freq, grids, phase))))
    return torch.stack(components)


def centred_grid(shape) -> torch.Tensor:
    """(3, *shape) voxel coordinates minus the grid centre."""
    axes = [torch.arange(n, dtype=torch.float64) - (n - 1) / 2 for n in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"))


def test_epe_of_zero_field_is_the_truth_magnitude_and_of_itself_zero():
    affine = oblique_affine()
    truth = smooth_field(0)
    magnitude = epe_map_mm(truth, torch.zeros_like(truth), affine)
    assert magnitude.shape == SHAPE
    expected = torch.linalg.vector_norm(torch.einsum("ij,j...->i...", torch.as_tensor(affine[:3, :3]).float(), truth), dim=0)
    torch.testing.assert_close(magnitude, expected, rtol=1e-5, atol=1e-5)
    assert float(epe_map_mm(truth, truth, affine).abs().max()) == 0.0
    result = epe_of_samples(torch.stack([truth, torch.zeros_like(truth)]), truth, affine)
    assert result["best"] == 0.0
    assert result["mean"] == pytest.approx(0.5 * float(expected.mean()), rel=1e-5)


def test_constant_translation_on_an_oblique_grid_has_its_mm_length():
    affine = oblique_affine()
    shift_mm = torch.tensor([3.0, -4.0, 12.0])  # 13 mm
    field = mm_to_voxel(shift_mm.reshape(3, 1, 1, 1).expand(3, *SHAPE).double(), affine)
    mask = torch.zeros(SHAPE, dtype=torch.bool)
    mask[2:6, 3:7, 1:5] = True
    result = epe_of_samples(field[None], torch.zeros_like(field), affine, mask)
    assert result["mean"] == pytest.approx(13.0, rel=1e-9)
    # Per-item affines: the same field on an identity grid is its voxel length.
    batched = torch.stack([field, field])
    errors = epe_map_mm(batched, torch.zeros_like(batched), np.stack([affine, np.eye(4)]))
    torch.testing.assert_close(errors[0], torch.full(SHAPE, 13.0, dtype=torch.float64))
    torch.testing.assert_close(errors[1], torch.linalg.vector_norm(field, dim=0))


def test_jacobian_of_a_uniform_scaling_and_of_a_folding_field():
    s = 0.2
    field = s * centred_grid(SHAPE)
    stats = jacobian_stats(field)
    assert stats["folding_share"] == 0.0
    assert stats["jacobian_min"] == pytest.approx((1 + s) ** 3, rel=1e-9)
    assert stats["jacobian_max"] == pytest.approx((1 + s) ** 3, rel=1e-9)
    assert stats["jacobian_std"] == pytest.approx(0.0, abs=1e-9)
    folding = -2.0 * centred_grid(SHAPE)  # x -> -x: det = -1 everywhere
    assert jacobian_stats(folding)["folding_share"] == 1.0
    mask = torch.zeros(SHAPE, dtype=torch.bool)
    mask[:3] = True
    partly = torch.where(mask, folding, field)
    assert 0.0 < jacobian_stats(partly)["folding_share"] < 1.0
    assert jacobian_stats(torch.stack([field, field]), mask)["folding_share"] == 0.0


def test_warped_volume_of_a_ball_under_uniform_dilation():
    shape, radius, s = (40, 40, 40), 8.0, 0.15
    affine = np.diag([1.5, 1.5, 1.5, 1.0])
    grid = centred_grid(shape)
    ball = torch.linalg.vector_norm(grid, dim=0) <= radius
    volume = warped_volume_ml(ball, s * grid, affine)
    analytic = (1 + s) ** 3 * 4 / 3 * math.pi * (radius * 1.5) ** 3 / 1000.0
    assert float(volume) == pytest.approx(analytic, rel=0.02)
    batched = warped_volume_ml(ball, torch.stack([s * grid, torch.zeros_like(grid)]), affine)
    assert batched.shape == (2,)
    assert float(batched[1]) == pytest.approx(float(ball.sum()) * 1.5**3 / 1000.0)
    assert float(ejection_fraction(ball, s * grid, affine)) == pytest.approx(1 - 1 / (1 + s) ** 3, rel=1e-9)


@pytest.mark.parametrize("seed", [0, 1])
def test_ejection_fraction_of_the_phantom_exact_field_matches_its_label_volumes(seed):
    lv = next(k for k, v in CARDIAC_LABELS.items() if v == "lv_blood_pool")
    params = sample_cardiac_params(seed)
    frames = 3
    sequence = render_cardiac(params, frames, "ct", (32, 32, 16))
    es = params.end_systole(frames)
    assert es != 0
    ed_mask, es_mask = sequence.labels[0] == lv, torch.from_numpy(sequence.labels[es] == lv)
    voxel_ml = abs(np.linalg.det(sequence.affine[:3, :3])) / 1000.0
    field = torch.from_numpy(sequence.fields[es])  # ES grid -> ED positions (pull field of frame ES)
    edv = float(warped_volume_ml(es_mask, field, sequence.affine))
    assert edv == pytest.approx(ed_mask.sum() * voxel_ml, rel=0.03)
    true_ef = 1 - float(es_mask.sum()) / float(ed_mask.sum())
    assert float(ejection_fraction(es_mask, field, sequence.affine)) == pytest.approx(true_ef, abs=0.02)


def test_nearest_training_field_finds_an_exact_copy_and_diversity_of_copies_is_zero():
    affine = oblique_affine()
    train = torch.stack([smooth_field(seed) for seed in range(5)])
    generated = torch.stack([train[3], train[1] + 0.3])
    epe, index = nearest_training_field(generated, train, affine)
    assert index.tolist() == [3, 1]
    assert float(epe[0]) == 0.0
    assert float(epe[1]) > 0.0
    assert pairwise_diversity(torch.stack([train[2]] * 4), affine) == 0.0
    assert pairwise_diversity(train, affine) > 0.0
    assert pairwise_diversity(train[:1], affine) is None


def test_magnitude_wasserstein_is_zero_for_the_same_fields_and_the_shift_for_scaled_ones():
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    shift = mm_to_voxel(torch.tensor([0.0, 0.0, 3.0]).reshape(3, 1, 1, 1).expand(3, *SHAPE), affine)
    assert magnitude_wasserstein(shift[None], shift[None], affine, None, None) == 0.0
    assert magnitude_wasserstein(2 * shift[None], shift[None], affine, None, None) == pytest.approx(3.0)


def test_mean_flow_baseline_averages_in_mm_and_refuses_other_grids():
    shift = torch.tensor([1.0, 0.0, 0.0]).reshape(3, 1, 1, 1).expand(3, *SHAPE)
    a, b = np.diag([1.0, 1.0, 1.0, 1.0]), np.diag([-1.0, 1.0, 1.0, 1.0])  # same spacing, x flipped
    mean = mean_flow_baseline(torch.stack([shift, -shift]), np.stack([a, b]), SHAPE, a)
    torch.testing.assert_close(mean, shift)  # both are +1 mm along world x
    with pytest.raises(ValueError, match="grid"):
        mean_flow_baseline(torch.stack([shift]), a, (4, 4, 4), a)
    with pytest.raises(ValueError, match="spacing"):
        mean_flow_baseline(torch.stack([shift]), np.diag([2.0, 1.0, 1.0, 1.0]), SHAPE, a)


def test_field_report_keys_and_values_on_exact_samples():
    affine = oblique_affine()
    train = torch.stack([smooth_field(seed) for seed in range(4)])
    truths = [smooth_field(10), smooth_field(11)]
    samples = [torch.stack([t, t, t]) for t in truths]  # perfect samples
    myo = torch.zeros(SHAPE, dtype=torch.bool)
    myo[3:8, 3:8, 2:6] = True
    heart = torch.ones(SHAPE, dtype=torch.bool)
    metrics = field_report(samples, truths, [affine, affine], {"myocardium": [myo, myo], "heart": [heart, heart]}, train, affine,
                           prefix="field", lv_masks=[myo, myo], train_lv_masks=[myo] * 4)
    for key in ("field_epe_mean_mm", "field_epe_best_of_n_mm", "field_epe_zero_mm", "field_epe_mean_flow_mm", "field_epe_mean_mm_heart",
                "field_epe_zero_mm_heart", "folding_share", "jacobian_min", "magnitude_w1_mm", "diversity_epe_mm", "memorisation_min_epe_mm",
                "memorisation_min_epe_mm_real_reference", "ejection_fraction_generated", "ejection_fraction_real", "ejection_fraction_train"):
        assert key in metrics, key
    assert metrics["field_epe_mean_mm"] == 0.0 and metrics["field_epe_best_of_n_mm"] == 0.0
    assert metrics["field_epe_zero_mm"] > 0.0 and metrics["field_epe_mean_flow_mm"] > 0.0
    assert metrics["diversity_epe_mm"] == 0.0 and metrics["magnitude_w1_mm"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["memorisation_min_epe_mm"] == pytest.approx(metrics["memorisation_min_epe_mm_real_reference"])
    assert metrics["ejection_fraction_generated"] == pytest.approx(metrics["ejection_fraction_real"])
    assert metrics["ejection_fraction_generated_in_real_range"] == 1.0
    assert len(metrics["ejection_fraction_generated_values"]) == 6
    zero_in_myo = np.mean([float(epe_map_mm(t, torch.zeros_like(t), affine)[myo].mean()) for t in truths])
    assert metrics["field_epe_zero_mm"] == pytest.approx(zero_in_myo, rel=1e-5)
