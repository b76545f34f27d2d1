"""The motion utility protocol on synthetic pairs whose flow is a known function of the frame pair."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medsynth.errors import MedsynthError
from medsynth.evaluate.downstream import PCAMotionModel, check_pools, motion_utility, pairs_from_frames, train_motion_network
from medsynth.motion.augment import mean_magnitude_mm, motion_envelope, random_smooth_fields
from medsynth.motion.fields import jacobian_determinant, warp_image

SHAPE = (12, 12, 8)
AFFINE = np.diag([1.5, 1.0, 2.0, 1.0])


def ramp_pairs(n: int, seed: int, low: float = -2.0, high: float = 2.0):
    """(fixed, moving, flow, affines): a linear intensity ramp along ``d`` translated by ``a d`` (``a`` uniform in [low, high] voxels per pair).

    ``fixed = warp_image(moving, flow)`` differs from ``moving`` by ``a |d|^2``, so the flow is a simple
    (local) function of the frame pair that a small network learns in a few hundred steps.
    """
    g = torch.Generator().manual_seed(seed)
    grid = torch.stack(torch.meshgrid(*[torch.arange(s, dtype=torch.float32) for s in SHAPE], indexing="ij"))
    direction = torch.tensor([1.0, 1.0, 1.0]) / 3**0.5
    amplitude = low + (high - low) * torch.rand(n, generator=g)  # voxels
    moving = torch.einsum("i,i...->...", direction, grid).expand(n, 1, *SHAPE).clone()
    flow = (amplitude[:, None] * direction[None]).reshape(n, 3, 1, 1, 1).expand(n, 3, *SHAPE).clone()
    return warp_image(moving, flow), moving, flow, torch.as_tensor(np.repeat(AFFINE[None], n, axis=0))


def protocol(generate, seeds=(0,), steps=100, pca_modes=1):
    """L: 2 labelled pairs whose motion covers only a ~ 1.8..2; U: 8 frames (the moving ramps) with one true field each
    and test: 8 pairs, both with a ~ 0.5..2. Labelling U (the oracle) teaches what L cannot: the whole range."""
    labelled, unlabelled, test = ramp_pairs(2, 0, 1.8, 2.0), ramp_pairs(8, 1, 0.5, 2.0), ramp_pairs(8, 2, 0.5, 2.0)
    _, frames, true, affines = unlabelled
    return motion_utility(labelled, frames, affines, [f[None] for f in true], test, lambda i: generate(i, true), per_frame=1,
                          pca_modes=pca_modes, seeds=list(seeds), steps=steps, frame_role="moving")


@pytest.fixture(scope="module")
def exact():
    """The generator returns each frame's true motion: arm (c) is the oracle's data, to the bit."""
    return protocol(lambda i, true: true[i][None], seeds=(0, 1))


def test_generated_true_motion_recovers_the_whole_gain(exact):
    assert exact["downstream_epe_oracle_mm"] < 0.5 * exact["downstream_epe_real_only_mm"]  # labelling U helps here
    assert exact["downstream_epe_with_generated_mm"] == exact["downstream_epe_oracle_mm"]
    assert exact["downstream_gain_share_generated"] == pytest.approx(1.0)
    assert exact["downstream_epe_ratio"] == pytest.approx(exact["downstream_epe_with_generated_mm"] / exact["downstream_epe_real_only_mm"])
    assert exact["downstream_epe_oracle_mm"] < 0.5 * exact["downstream_epe_zero_mm"]
    # two seeds: mean and sd per arm; counts of pairs per arm
    assert exact["downstream_seeds"] == [0, 1] and all(exact[f"downstream_epe_{arm}_mm_sd"] >= 0 for arm in ("real_only", "pca"))
    per_seed = exact["downstream_epe_pca_mm_per_seed"]
    assert len(per_seed) == 2 and exact["downstream_epe_pca_mm"] == pytest.approx(np.mean(per_seed))
    assert exact["downstream_epe_pca_mm_sd"] == pytest.approx(np.std(per_seed, ddof=1))
    assert (exact["downstream_n_real"], exact["downstream_n_unlabelled"], exact["downstream_n_classic"], exact["downstream_n_oracle"]) == (2, 8, 8, 8)
    # the classic fields' magnitude follows the labelled fields' (both are mean |u| in mm)
    assert exact["downstream_magnitude_classic_mm"] == pytest.approx(exact["downstream_magnitude_labelled_mm"], rel=0.5)


def test_generated_zero_motion_gains_no_more_than_classic_augmentation():
    zero = protocol(lambda i, true: torch.zeros(1, *true.shape[1:]))
    assert zero["downstream_magnitude_with_generated_mm"] == 0
    assert zero["downstream_gain_share_generated"] <= zero["downstream_gain_share_classic"]
    assert zero["downstream_gain_share_generated"] < 0  # teaching "no motion" undoes what L taught


def test_same_seed_same_figures():
    first, again = (protocol(lambda i, true: 0.5 * true[i][None], steps=3) for _ in range(2))
    assert first == again


def test_a_pca_with_more_modes_than_the_fields_allow_is_refused():
    with pytest.raises(MedsynthError, match=r"^evaluate.pca_modes=2: a PCA of 2 training field\(s\) has at most 1 mode"):
        PCAMotionModel(torch.zeros(2, 3, *SHAPE), 2, "evaluate.pca_modes")
    with pytest.raises(MedsynthError, match="pca_modes=2"):
        protocol(lambda i, true: true[i][None], pca_modes=2)


def test_pca_samples_lie_in_the_span_with_the_modes_sd():
    g = torch.Generator().manual_seed(0)
    basis = torch.randn(2, 3, *SHAPE, generator=g)
    coefficients = torch.randn(64, 2, generator=g) * torch.tensor([3.0, 1.0])
    fields = torch.einsum("nk,k...->n...", coefficients, basis) + 1.0
    model = PCAMotionModel(fields, 2)
    assert torch.allclose(model.mean.view(3, *SHAPE), fields.double().mean(0), atol=1e-6)
    samples = model.sample(4000, torch.Generator().manual_seed(1)).double() - model.mean.view(3, *SHAPE)
    solution = torch.linalg.lstsq(basis.flatten(1).T.double(), samples.flatten(1).T).solution.T  # coefficients in the true basis
    assert torch.allclose(torch.einsum("nk,k...->n...", solution, basis.double()), samples, atol=1e-3)  # in the span
    assert torch.allclose(solution.std(0), coefficients.double().std(0), rtol=0.1)


def test_pools_that_leave_one_empty_are_one_line_naming_the_setting():
    assert check_pools(10, 4, None, labelled_setting="evaluate.l", unlabelled_setting="evaluate.u") == (4, 6)
    assert check_pools(10, 4, 3, labelled_setting="evaluate.l", unlabelled_setting="evaluate.u") == (4, 3)
    with pytest.raises(MedsynthError, match=r"^evaluate.l=10 leaves no unlabelled subject"):
        check_pools(10, 10, None, labelled_setting="evaluate.l", unlabelled_setting="evaluate.u")
    with pytest.raises(MedsynthError, match=r"^evaluate.u=0"):
        check_pools(10, 4, 0, labelled_setting="evaluate.l", unlabelled_setting="evaluate.u")


def test_random_smooth_fields_are_folding_free_seeded_and_of_the_asked_magnitude():
    affine = torch.as_tensor(AFFINE)
    fields = random_smooth_fields(40, SHAPE, affine, (1.5, 0.3), torch.Generator().manual_seed(0))
    assert fields.shape == (40, 3, *SHAPE) and float(jacobian_determinant(fields).min()) > 0
    magnitude = mean_magnitude_mm(fields, affine.expand(40, 4, 4))
    assert float(magnitude.mean()) == pytest.approx(1.5, abs=0.15) and float(magnitude.std()) == pytest.approx(0.3, abs=0.15)
    assert torch.equal(fields[:3], random_smooth_fields(3, SHAPE, affine, (1.5, 0.3), torch.Generator().manual_seed(0)))
    # too large to stay folding-free: shrunk until it is
    large = random_smooth_fields(2, SHAPE, affine, (30.0, 0.0), torch.Generator().manual_seed(0))
    assert float(jacobian_determinant(large).min()) > 0


def test_the_envelope_keeps_classic_motion_where_the_training_fields_move():
    affine = torch.as_tensor(AFFINE)
    ramp = (1 - torch.arange(SHAPE[0]) / 6).clamp_min(0).view(-1, 1, 1)  # 1 at x = 0 down to 0 from x = 6 on
    training = torch.zeros(3, 3, *SHAPE)
    training[:, 2] = torch.tensor([1.0, 2.0, 3.0]).view(3, 1, 1, 1) * ramp  # only x < 6 moves, along z
    envelope = motion_envelope(training, affine.expand(3, 4, 4))
    # rms over the fields of 2, 4, 6 mm x ramp (z spacing 2 mm), over its maximum: the ramp itself
    assert envelope.shape == SHAPE and torch.allclose(envelope, ramp.expand(SHAPE).double())
    fields = random_smooth_fields(6, SHAPE, affine, (0.4, 0.0), torch.Generator().manual_seed(0), envelope=envelope)
    assert float(fields[:, :, 6:].abs().max()) == 0 and float(fields[:, :, :6].abs().max()) > 0  # still where nothing moved
    assert float(jacobian_determinant(fields).min()) > 0
    magnitude = mean_magnitude_mm(fields, affine.expand(6, 4, 4))  # the mean over the whole grid is still the asked one
    assert torch.allclose(magnitude, torch.full((6,), 0.4, dtype=torch.float64), rtol=1e-4)


def test_pairs_from_frames_follow_the_pull_convention():
    fixed, moving, flow, affines = ramp_pairs(2, 0)
    made = pairs_from_frames(moving, flow, affines, "moving")
    assert torch.equal(made[0], fixed) and torch.equal(made[1], moving)
    made = pairs_from_frames(fixed, flow, affines, "fixed")  # the synthetic moving frame warps back onto the fixed one
    assert torch.allclose(warp_image(made[1], flow)[..., 3:-3, 3:-3, 2:-2], fixed[..., 3:-3, 3:-3, 2:-2], atol=0.05)


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
