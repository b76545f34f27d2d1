"""Per-item seeds (medsynth.seeds): the formula, no two requests sharing a seed, and each item's noise its own; items
addressed by several indices and class streams give the seeds the recipes used before they went through seeds.py (so
samples and demo metrics are unchanged), never two items one seed within the declared sizes; ``seeded`` initialises the
same every time and leaves the caller's generator alone."""

from __future__ import annotations

import itertools

import pytest
import torch

from medsynth.errors import MedsynthError
from medsynth.evaluate.classifier import train_classifier
from medsynth.seeds import DEFAULT_STRIDE, class_seed, item_generators, item_noise, item_seed, item_seeds, seeded


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


def test_motion_ldm_items_keep_the_seeds_of_c_100000_plus_k_1000_plus_p():
    # motion-ldm's sample wrote item_seed(seed, c * 100_000 + k * 1000 + p) by hand before
    for seed, c, k, p in itertools.product((0, 3), (0, 1, 7), (0, 1, 99), (0, 5, 999)):
        assert item_seed(seed, c, k, p, sizes=(100, 1000)) == seed * 100_003 + c * 100_000 + k * 1000 + p
    assert item_seed(2, 1, 3, 4, sizes=(100, 1000)) == 303_010  # 2 * 100003 + 100000 + 3000 + 4


def test_class_streams_keep_the_seeds_of_a_stride_of_1000():
    # cvae seeded a class's generator with, and class-diffusion took item_seeds of, item_seed(seed, k, stride=1000)
    for seed, k in itertools.product((0, 1, 42), (0, 4, 999)):
        assert class_seed(seed, k) == seed * 1000 + k == item_seed(seed, k, stride=1000)
    assert item_seeds(class_seed(1, 2), 2) == [1002 * 100_003, 1002 * 100_003 + 1]
    with pytest.raises(MedsynthError, match="class index 1000 is outside 0..999"):
        class_seed(0, 1000)


def test_items_of_several_indices_never_share_a_seed_within_their_sizes():
    sizes = (3, 4)
    seeds = [item_seed(5, c, k, p, sizes=sizes) for c, k, p in itertools.product(range(6), range(3), range(4))]
    assert len(set(seeds)) == len(seeds) == 72
    assert item_seed(5, 7) == item_seed(5, 7, sizes=())  # one index: as before
    for bad in ((0, 3, 0), (0, 0, 4), (0, -1, 0)):  # an index outside its size would repeat another item's seed
        with pytest.raises(MedsynthError, match="outside 0..[23]: its seed would repeat"):
            item_seed(5, *bad, sizes=sizes)
    with pytest.raises(MedsynthError, match="3 indices need 2 sizes, got 1"):
        item_seed(5, 0, 0, 0, sizes=(3,))


def test_seeded_initialises_the_same_and_leaves_the_callers_generator():
    torch.manual_seed(11)
    expected = torch.rand(3)
    torch.manual_seed(11)
    with seeded(3):
        first = torch.nn.Linear(4, 2)
    with seeded(3):
        again = torch.nn.Linear(4, 2)
    with seeded(4):
        other = torch.nn.Linear(4, 2)
    assert torch.equal(torch.rand(3), expected)  # the caller's draws go on as if nothing happened
    assert torch.equal(first.weight, again.weight) and not torch.equal(first.weight, other.weight)


def test_a_classifier_leaves_the_global_generator_as_it_was():
    images, labels = torch.rand(6, 1, 16, 16, generator=torch.Generator().manual_seed(0)), torch.arange(6) % 2
    torch.manual_seed(1)
    state = torch.get_rng_state()
    first = train_classifier(images, labels, 2, epochs=1, batch_size=4, seed=2, augmentation="none")
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(99)  # another caller state: the same weights (initialisation and dropout come from the seed)
    again = train_classifier(images, labels, 2, epochs=1, batch_size=4, seed=2, augmentation="none")
    for a, b in zip(first.parameters(), again.parameters()):
        assert torch.equal(a, b)
