"""Per-item seeds: one way to derive the seed of the i-th generated item from a request's seed.

Every generated item owns its seed (``item_seed``) and, from it, its own generator: its initial
noise and every later random draw (DDPM's per-step noise, DDIM with eta > 0) come from that
generator alone, so an item is the same whether it is sampled alone or inside a batch of any size.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

DEFAULT_STRIDE = 100_003  # a prime larger than any request's item count: seeds of two requests never meet


def item_seed(seed: int, index: int, stride: int = DEFAULT_STRIDE) -> int:
    """The seed of item ``index`` of a request made with ``seed``: ``seed * stride + index``."""
    return int(seed) * stride + int(index)


def item_seeds(seed: int, indices: Sequence[int] | int, stride: int = DEFAULT_STRIDE) -> list[int]:
    """:func:`item_seed` of each index (an int n means indices 0 .. n-1)."""
    indices = range(indices) if isinstance(indices, int) else indices
    return [item_seed(seed, i, stride) for i in indices]


def item_generators(seeds: Sequence[int], device: torch.device | str = "cpu") -> list[torch.Generator]:
    """One freshly seeded generator per item, on ``device``."""
    return [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]


def item_noise(shape: Sequence[int], generators: Sequence[torch.Generator], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard normal noise ``(len(generators), *shape)``, item i drawn from ``generators[i]``.

    Each draw is made on its generator's device; the result lies there too (move it with ``.to``).
    """
    return torch.stack([torch.randn(tuple(shape), generator=g, dtype=dtype, device=g.device) for g in generators])
