"""Seeds: the one way to derive the seed of a generated item from a request's seed, and to seed a network's
initialisation without touching the caller's random state.

Every generated item owns its seed (``item_seed``) and, from it, its own generator: its initial
noise and every later random draw (DDPM's per-step noise, DDIM with eta > 0) come from that
generator alone, so an item is the same whether it is sampled alone or inside a batch of any size.
An item addressed by several indices (condition c, sample k, phase p) gets one seed from all of them
(``item_seed(seed, c, k, p, sizes=...)``); a class's stream of draws starts from ``class_seed``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch

from medsynth.errors import MedsynthError

DEFAULT_STRIDE = 100_003  # a prime above a request's item count: seeds of two requests never meet (while flat < stride)
CLASS_STRIDE = 1000  # class_seed: more classes than any dataset has; kept at 1000, so the seeds stay those of earlier runs


def item_seed(seed: int, *index: int, sizes: Sequence[int] = (), stride: int = DEFAULT_STRIDE) -> int:
    """The seed of the item at ``index`` of a request made with ``seed``: ``seed * stride + flat``.

    One index is its own ``flat``. Several, as ``(c, k, p)`` (condition, sample, phase), are flattened in
    mixed radix, ``sizes`` giving how many values every index after the first takes: ``(c * sizes[0] + k) *
    sizes[1] + p`` (``c * 100_000 + k * 1000 + p`` for sizes ``(100, 1000)``). An index outside ``0 .. size - 1``
    would give another item's seed and is refused. Requests of different seeds stay apart while ``flat`` is
    below ``stride``.

    Raises:
        MedsynthError: ``sizes`` does not fit the indices, or an index is outside its size.
    """
    if not index or len(sizes) != len(index) - 1:
        raise MedsynthError(f"item seed: {len(index)} indices need {max(len(index) - 1, 0)} sizes, got {len(sizes)}")
    flat = int(index[0])
    for position, (i, size) in enumerate(zip(index[1:], sizes), start=1):
        if not 0 <= int(i) < size:
            raise MedsynthError(f"item seed: index {position} is {i}, outside 0..{size - 1}: its seed would repeat another "
                                f"item's (ask for fewer than {size})")
        flat = flat * size + int(i)
    return int(seed) * stride + flat


def class_seed(seed: int, class_index: int) -> int:
    """The seed of class ``class_index``'s draws in a request made with ``seed``: ``seed * CLASS_STRIDE + class_index``
    (its items take :func:`item_seed` of it, or one generator draws them in turn).

    Raises:
        MedsynthError: a class index outside ``0 .. CLASS_STRIDE - 1``.
    """
    if not 0 <= int(class_index) < CLASS_STRIDE:
        raise MedsynthError(f"class seed: class index {class_index} is outside 0..{CLASS_STRIDE - 1}")
    return int(seed) * CLASS_STRIDE + int(class_index)


def item_seeds(seed: int, indices: Sequence[int] | int, stride: int = DEFAULT_STRIDE) -> list[int]:
    """:func:`item_seed` of each index (an int n means indices 0 .. n-1)."""
    indices = range(indices) if isinstance(indices, int) else indices
    return [item_seed(seed, i, stride=stride) for i in indices]


def item_generators(seeds: Sequence[int], device: torch.device | str = "cpu") -> list[torch.Generator]:
    """One freshly seeded generator per item, on ``device``."""
    return [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]


def item_noise(shape: Sequence[int], generators: Sequence[torch.Generator], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard normal noise ``(len(generators), *shape)``, item i drawn from ``generators[i]``.

    Each draw is made on its generator's device; the result lies there too (move it with ``.to``).
    """
    return torch.stack([torch.randn(tuple(shape), generator=g, dtype=dtype, device=g.device) for g in generators])


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Inside the block, torch's global CPU generator starts from ``seed`` (a network built there is initialised the
    same every time, and the block's other global draws, such as dropout, follow); after it, the caller's generator
    is as it was (``torch.random.fork_rng``)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield
