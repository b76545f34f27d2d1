"""Real references of distribution metrics: two disjoint seeded halves of the real data."""

from __future__ import annotations

import math

import torch

from medsynth.evaluate.metrics import feature_mmd, real_reference, split_halves


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
