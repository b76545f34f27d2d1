"""Distribution and memorisation metrics against known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from medsynth.evaluate.metrics import (
    feature_mmd,
    memorisation_audit,
    ms_ssim_diversity,
    nearest_ssim,
    real_reference,
    split_halves,
)


def images(n: int, seed: int, size: int = 32) -> torch.Tensor:
    """Smooth random images ``(n, 1, size, size)`` in [0, 1] (upsampled noise: SSIM is meaningful on them)."""
    x = torch.rand(n, 1, size // 4, size // 4, generator=torch.Generator().manual_seed(seed))
    return torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


def test_a_copied_training_image_scores_ssim_1_at_its_index():
    train = images(10, seed=0)
    generated = torch.cat([images(2, seed=1), train[7:8], images(1, seed=2)])
    scores, index = nearest_ssim(generated, train)
    assert scores.shape == index.shape == (4,)
    assert scores[2] == pytest.approx(1.0, abs=1e-5) and index[2] == 7
    assert (scores[[0, 1, 3]] < 0.9).all()
    audit = memorisation_audit(generated, train, held_out=images(3, seed=3))
    assert audit["memorisation_max_ssim"] == pytest.approx(1.0, abs=1e-5)
    assert audit["memorisation_mean_ssim"] < 1.0
    assert audit["memorisation_max_ssim_real_reference"] < 0.9


def test_ms_ssim_diversity_of_identical_images_is_1_and_lower_for_different_ones():
    same = images(1, seed=0, size=64).repeat(4, 1, 1, 1)
    assert ms_ssim_diversity(same) == pytest.approx(1.0, abs=1e-4)
    assert ms_ssim_diversity(images(4, seed=1, size=64)) < 0.9


def test_feature_mmd_is_zero_for_one_set_and_grows_with_a_shift():
    n, d = 256, 8
    features = torch.randn(n, d, generator=torch.Generator().manual_seed(0))
    # MONAI's MMD is the unbiased estimate of MMD^2 (diagonal terms left out): for one set given twice it is
    # -2 mean|x|^2 / n, about -2 d / n for standardised features, not exactly 0.
    same = feature_mmd(features, features.clone())
    assert abs(same) <= 2 * d / n * 1.05
    near, far = feature_mmd(features, features + 0.5), feature_mmd(features, features + 2.0)
    assert abs(same) < near < far


def test_split_halves_are_disjoint_equal_and_seeded():
    first, second = split_halves(11, seed=3)
    assert len(first) == len(second) == 5
    assert not set(first.tolist()) & set(second.tolist())
    assert set(first.tolist()) | set(second.tolist()) <= set(range(11))
    again = split_halves(11, seed=3)
    assert torch.equal(first, again[0]) and torch.equal(second, again[1])
    assert not torch.equal(first, split_halves(11, seed=4)[0])


def test_real_reference_applies_the_metric_to_the_two_halves():
    real = torch.arange(10.0)[:, None]
    first, second = split_halves(10, seed=0)
    assert real_reference(lambda a, b: float(a.sum() - b.sum()), real, seed=0) == float(real[first].sum() - real[second].sum())
    assert math.isnan(real_reference(feature_mmd, real[:3]))


def test_mmd_reference_is_small_for_one_distribution_and_generated_far_is_larger():
    generator = torch.Generator().manual_seed(0)
    real = torch.randn(200, 8, generator=generator)
    far = torch.randn(200, 8, generator=generator) + 3.0
    reference = real_reference(feature_mmd, real, seed=0)
    assert abs(reference) < 0.2 * feature_mmd(real, far)  # MMD (unbiased) can dip below 0 for one distribution


def test_the_one_ssim_is_monais_ssim_metric_and_its_mask_keeps_the_windows_centred_inside():
    from monai.metrics import SSIMMetric

    from medsynth.evaluate.metrics import ssim

    generator = torch.Generator().manual_seed(0)
    a, b = torch.rand(3, 1, 20, 24, 9, generator=generator), torch.rand(3, 1, 20, 24, 9, generator=generator)
    window = [7, 7, 5]
    assert torch.equal(ssim(a, b, window), SSIMMetric(spatial_dims=3, data_range=1.0, win_size=window)(a, b)[:, 0])
    assert torch.allclose(ssim(a, a, window), torch.ones(3))
    # a mask over the left half: the same as the SSIM of the left half's windows alone
    mask = torch.zeros(20, 24, 9, dtype=torch.bool)
    mask[:10] = True
    left = ssim(a[:, :, :13], b[:, :, :13], window)  # the windows centred in rows 3..9 span rows 0..12
    assert torch.allclose(ssim(a, b, window, mask), left, atol=1e-6)
    assert torch.isnan(ssim(a, b, window, torch.zeros(20, 24, 9, dtype=torch.bool))).all()


def test_the_ssim_window_rule_is_a_parameter():
    from medsynth.evaluate.metrics import ssim

    generator = torch.Generator().manual_seed(1)
    a, b = torch.rand(2, 1, 20, 24, 4, generator=generator), torch.rand(2, 1, 20, 24, 4, generator=generator)
    assert torch.equal(ssim(a, b, 7, fit="per_axis"), ssim(a, b, [7, 7, 3]))  # each axis: the largest odd window it holds
    assert torch.equal(ssim(a, b, 7, fit="isotropic"), ssim(a, b, 3))  # one window, fitted to the thinnest axis
    assert torch.equal(ssim(a[..., :1], b[..., :1], 7, fit="isotropic"), ssim(a[..., :1], b[..., :1], 1))
    with pytest.raises(RuntimeError, match="Kernel size"):  # no rule: a 7-voxel window does not fit 4 slices
        ssim(a, b, 7)


def test_mmd_draws_real_at_random_and_its_reference_at_the_generated_count():
    """Real features stored by subject (here two groups, one after the other) and a perfect generator (a random draw
    of the same mixture, fewer items): the MMD and its reference at that count agree; cutting the real set to its
    first rows (one group) made even the perfect generator look far."""
    generator = torch.Generator().manual_seed(0)
    groups = torch.randn(400, 8, generator=generator)
    groups[200:] += 2.0  # the second subject's features
    perfect = groups[torch.randperm(400, generator=generator)[:64]] + 0.01 * torch.randn(64, 8, generator=generator)
    scores = [feature_mmd(groups, perfect, seed=s) for s in range(20)]
    references = [real_reference(feature_mmd, groups, seed=s, size=64) for s in range(20)]
    first_rows = feature_mmd(groups[:64], perfect)  # what the first 64 stored rows gave
    spread = float(torch.tensor(references).std())
    assert abs(float(np.mean(scores)) - float(np.mean(references))) < 2 * spread
    assert first_rows > float(np.mean(references)) + 5 * spread
    assert real_reference(lambda a, b: float(len(a) + 1000 * len(b)), groups, size=64) == 64 + 1000 * 64
