"""Per-item seeds (medsynth.seeds): the formula, no two requests sharing a seed, and each item's noise its own."""

from __future__ import annotations

import torch

from medsynth.seeds import DEFAULT_STRIDE, item_generators, item_noise, item_seed, item_seeds


def test_item_seed_helper():
    assert item_seed(3, 4) == 3 * 100_003 + 4 and item_seed(3, 4, stride=1000) == 3004
    noise = item_noise((2, 3), item_generators([7, 8]))
    assert torch.equal(noise[1], torch.randn(2, 3, generator=torch.Generator().manual_seed(8)))


def test_item_seeds_of_a_count_and_of_indices_agree_with_item_seed():
    assert item_seeds(2, 3) == [2 * DEFAULT_STRIDE, 2 * DEFAULT_STRIDE + 1, 2 * DEFAULT_STRIDE + 2]
    assert item_seeds(2, [5, 0]) == [item_seed(2, 5), item_seed(2, 0)]
    assert item_seeds(2, 0) == []


def test_two_requests_never_share_a_seed_below_the_stride():
    # every index a request can have (< stride) of seeds 0 .. 3: all distinct
    indices = [0, 1, DEFAULT_STRIDE - 2, DEFAULT_STRIDE - 1]
    seeds = [s for seed in range(4) for s in item_seeds(seed, indices)]
    assert len(set(seeds)) == len(seeds)
    assert item_seed(0, DEFAULT_STRIDE - 1) < item_seed(1, 0)


def test_an_items_noise_does_not_depend_on_its_batch():
    seeds = item_seeds(9, 4)
    batch = item_noise((1, 3, 3), item_generators(seeds))
    alone = [item_noise((1, 3, 3), item_generators([s]))[0] for s in seeds]
    reversed_batch = item_noise((1, 3, 3), item_generators(seeds[::-1]))
    assert batch.shape == (4, 1, 3, 3)
    for k in range(4):
        assert torch.equal(batch[k], alone[k]) and torch.equal(batch[k], reversed_batch[3 - k])
    assert not torch.equal(batch[0], batch[1])  # different items, different noise
    assert item_noise((2,), item_generators([1]), dtype=torch.float64).dtype == torch.float64
