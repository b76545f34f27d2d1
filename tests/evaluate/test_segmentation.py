"""Evaluation of label-conditioned 3D synthesis: Dice, the segmenter, per-label HU, seam score."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from monai.inferers import SlidingWindowSplitter

from medsynth.data.phantoms.coronary import CORONARY_LABELS, render_coronary, sample_coronary_params
from medsynth.evaluate.segmentation import (
    dice_per_class,
    intensity_stats_per_label,
    seam_score,
    segment,
    sliding_window_borders,
    train_segmenter,
)

NAMES = ["background", "a", "b", "c"]


def test_dice_perfect_partial_and_absent_classes():
    target = torch.zeros(2, 8, 8, 8, dtype=torch.long)
    target[:, :2, :2, :2] = 1  # 8 voxels of class 1 in both volumes
    target[0, 4:, 4:, 4:] = 2  # class 2 only in volume 0
    assert dice_per_class(target, target, 4, NAMES) == {"a": 1.0, "b": 1.0, "c": pytest.approx(math.nan, nan_ok=True),
                                                      "mean_foreground": 1.0}

    pred = target.clone()
    pred[0, :2, :2, :1] = 0  # volume 0: 4 of the 8 class-1 voxels ...
    pred[0, 6:, :2, :1] = 1  # ... plus 4 wrong ones: Dice 2 * 4 / (8 + 8)
    pred[1, 7, 7, 7] = 2  # class 2 predicted where absent: 0 in volume 1
    result = dice_per_class(pred, target, 4, NAMES)
    assert result["a"] == pytest.approx((0.5 + 1.0) / 2)
    assert result["b"] == pytest.approx((1.0 + 0.0) / 2)
    assert math.isnan(result["c"])  # absent from both everywhere: left out of the mean
    assert result["mean_foreground"] == pytest.approx((0.75 + 0.5) / 2)
    with pytest.raises(ValueError):
        dice_per_class(pred, target, 4, NAMES[:3])


def _phantoms(count: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    volumes = [render_coronary(sample_coronary_params(np.random.default_rng([7, k])), size) for k in range(count)]
    images = torch.stack([torch.from_numpy(image)[None] for image, _, _ in volumes])
    labels = torch.stack([torch.from_numpy(labels.astype(np.int64)) for _, labels, _ in volumes])
    return images, labels


def test_segmenter_trained_on_phantoms_segments_held_out_ones():
    torch.set_num_threads(1)  # tiny 3D convolutions run several times faster on one thread
    images, labels = _phantoms(8, 24)
    model = train_segmenter(images[:6], labels[:6], num_classes=9, epochs=20, lr=0.1)
    pred = segment(model, images[6:])
    assert pred.shape == labels[6:].shape and pred.dtype == torch.long
    assert dice_per_class(pred, labels[6:], 9, list(CORONARY_LABELS.values()))["mean_foreground"] > 0.5


def test_segmenter_is_deterministic_and_takes_any_size():
    torch.set_num_threads(1)
    images, labels = _phantoms(2, 18)  # 18 is no multiple of the UNet's stride 4
    state = torch.random.get_rng_state()
    first, second = (train_segmenter(images, labels, num_classes=9, epochs=1, seed=3) for _ in range(2))
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is left alone
    for a, b in zip(first.state_dict().values(), second.state_dict().values()):
        assert torch.equal(a, b)
    assert segment(first, images).shape == (2, 18, 18, 18)


def test_intensity_stats_match_numpy():
    rng = np.random.default_rng(0)
    images = rng.normal(size=(2, 1, 6, 6, 6))
    labels = rng.integers(0, 2, size=(2, 6, 6, 6))
    stats = intensity_stats_per_label(torch.from_numpy(images), torch.from_numpy(labels), ["bg", "fg", "absent"])
    assert set(stats) == {"bg", "fg"}
    values = images[:, 0][labels == 1]
    assert stats["fg"] == pytest.approx({"mean": values.mean(), "std": values.std(),
                                         "p5": np.percentile(values, 5), "p95": np.percentile(values, 95)})


@pytest.mark.parametrize("shape, patch_size, overlap", [
    ((64, 64, 64), 32, 0.0), ((70, 64, 50), (32, 32, 16), 0.25), ((40, 40, 40), 16, 4)])
def test_borders_match_monai_sliding_window_grid(shape, patch_size, overlap):
    starts = np.array([loc for _, loc in SlidingWindowSplitter(patch_size, overlap)(torch.zeros(1, 1, *shape))])
    sizes = np.broadcast_to(patch_size, (3,))
    for axis, borders in enumerate(sliding_window_borders(shape, patch_size, overlap)):
        edges = {int(b) for b in np.concatenate([starts[:, axis], starts[:, axis] + sizes[axis]]) if 0 < b < shape[axis]}
        assert borders == sorted(edges)
    assert sliding_window_borders((64, 64, 64), 32) == [[32]] * 3


def test_seam_score_sees_offsets_between_patches_but_not_smooth_volumes():
    shape, patch = (48, 48, 48), 16
    borders = sliding_window_borders(shape, patch)
    x, y, z = np.meshgrid(*(np.linspace(0, 3, n) for n in shape), indexing="ij")
    smooth = np.sin(x) * np.cos(1.3 * y) + 0.5 * np.sin(0.7 * z)
    assert seam_score(smooth, borders)["ratio"] == pytest.approx(1.0, abs=0.15)
    ramp = seam_score(torch.from_numpy((x + y + z)[None]), borders)  # channel-first and torch accepted
    assert ramp == pytest.approx({"step_at_borders": 3 / 47, "step_inside": 3 / 47, "ratio": 1.0})

    index = np.indices(shape) // patch
    seamed = smooth + 0.5 * (index.sum(axis=0) % 2)  # a constant offset on alternate patches
    score = seam_score(seamed, borders)
    assert score["ratio"] > 5 and score["step_at_borders"] > 0.4
    assert score["step_inside"] == pytest.approx(seam_score(smooth, borders)["step_inside"])
    with pytest.raises(ValueError):
        seam_score(smooth, [[0], [], []])
