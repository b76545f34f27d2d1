"""Downstream motion utility on synthetic pairs whose flow is a known function of the frame pair."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medsynth.evaluate.downstream import downstream_motion_utility, train_motion_network
from medsynth.motion.fields import warp_image

SHAPE = (12, 12, 8)
AFFINE = np.diag([1.5, 1.0, 2.0, 1.0])


def ramp_pairs(n: int, seed: int):
    """(fixed, moving, flow, affines): a linear intensity ramp along ``d`` translated by ``a d`` (a random per pair).

    ``fixed = warp_image(moving, flow)`` differs from ``moving`` by ``a |d|^2``, so the flow is a simple
    (local) function of the frame pair that a small network learns in a few hundred steps.
    """
    g = torch.Generator().manual_seed(seed)
    grid = torch.stack(torch.meshgrid(*[torch.arange(s, dtype=torch.float32) for s in SHAPE], indexing="ij"))
    direction = torch.tensor([1.0, 1.0, 1.0]) / 3**0.5
    amplitude = (torch.rand(n, generator=g) - 0.5) * 4  # voxels
    moving = torch.einsum("i,i...->...", direction, grid).expand(n, 1, *SHAPE).clone()
    flow = (amplitude[:, None] * direction[None]).reshape(n, 3, 1, 1, 1).expand(n, 3, *SHAPE).clone()
    return warp_image(moving, flow), moving, flow, np.repeat(AFFINE[None], n, axis=0)


def test_trained_network_beats_the_zero_field_and_generated_triples_do_not_spoil_it():
    metrics = downstream_motion_utility(ramp_pairs(8, 0), ramp_pairs(32, 1), ramp_pairs(8, 2), steps=150, seed=0)
    assert metrics["downstream_n_real"] == 8 and metrics["downstream_n_generated"] == 32 and metrics["downstream_steps"] == 150
    zero = metrics["downstream_epe_zero_mm"]
    assert metrics["downstream_epe_real_only_mm"] < 0.8 * zero
    assert metrics["downstream_epe_with_generated_mm"] < 0.8 * zero
    # Exact triples from the same distribution: at the same budget not (meaningfully) worse than real only.
    assert metrics["downstream_epe_ratio"] == pytest.approx(metrics["downstream_epe_with_generated_mm"] / metrics["downstream_epe_real_only_mm"])
    assert metrics["downstream_epe_ratio"] < 1.2


def test_training_is_deterministic_and_leaves_the_callers_rng_alone():
    pairs = ramp_pairs(4, 0)
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    first = train_motion_network(pairs, steps=3, seed=7)
    after = torch.rand(1)
    second = train_motion_network(pairs, steps=3, seed=7)
    assert torch.equal(before, after)
    for a, b in zip(first.state_dict().values(), second.state_dict().values()):
        assert torch.equal(a, b)


def test_bad_shapes_are_refused():
    fixed, moving, flow, affines = ramp_pairs(2, 0)
    with pytest.raises(ValueError, match="flow"):
        train_motion_network((fixed, moving, flow[:, :2], affines), steps=1, seed=0)
