"""SSIM (the package's one), distribution and memorisation metrics on MONAI's SSIM, MS-SSIM and MMD.

A distribution metric alone does not say whether a value is close or far, so every recipe also
reports it between two disjoint halves of the real data as ``<metric>_real_reference``
(:func:`split_halves`, :func:`real_reference`): the score two samples of the real distribution get.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np
import torch
from monai.metrics import MMDMetric, MultiScaleSSIMMetric
from monai.metrics.regression import compute_ssim_and_cs


def ssim(a: torch.Tensor, b: torch.Tensor, win_size: int | Sequence[int] = 7, mask: torch.Tensor | np.ndarray | None = None,
         fit: Literal["none", "per_axis", "isotropic"] = "none") -> torch.Tensor:
    """The package's SSIM: one value per item of images ``(B, C, *S)`` in [0, 1], ``(B,)``.

    MONAI's ``compute_ssim_and_cs`` with ``SSIMMetric``'s settings (Gaussian window, sigma 1.5, k1 0.01, k2 0.03,
    data range 1) and ``win_size`` (one odd size, or one per axis). ``fit`` is the window rule for images thinner than
    the window: ``none`` keeps it; ``per_axis`` shrinks it on each axis to the largest odd size that fits (thin CT
    volumes); ``isotropic`` shrinks it to the one odd size that fits the thinnest axis (reconstructed stacks). The mean
    is over the windows that fit (each axis loses ``win - 1``: what ``SSIMMetric`` averages), or, with ``mask``
    (``*S``, bool), over the windows centred in it (NaN where none is).
    """
    dims = a.ndim - 2
    window = [int(win_size)] * dims if isinstance(win_size, int) else [int(w) for w in win_size]
    odd = [n if n % 2 else n - 1 for n in a.shape[2:]]  # the largest odd window each axis holds
    if fit == "per_axis":
        window = [min(w, n) for w, n in zip(window, odd)]
    elif fit == "isotropic":
        window = [max(1, min(max(window), *odd))] * dims
    value, _ = compute_ssim_and_cs(a, b, spatial_dims=dims, kernel_size=window, kernel_sigma=[1.5] * dims, data_range=1.0)
    if mask is None:
        return value.view(value.shape[0], -1).mean(1)
    inner = torch.as_tensor(np.asarray(mask, dtype=bool))[tuple(slice(w // 2, n - w // 2) for w, n in zip(window, mask.shape))]
    if not inner.any():
        return torch.full((value.shape[0],), float("nan"))
    return value[:, :, inner].mean(dim=(1, 2))


def _ms_ssim_metric(images: torch.Tensor) -> MultiScaleSSIMMetric:
    # MONAI's default (5 scales, kernel 11) needs > 160 px; fit scales and kernel to the image.
    spatial_dims = images.ndim - 2
    smallest = min(images.shape[2:])
    kernel = 7 if smallest >= 64 else 3
    scales = max(1, min(5, int(torch.log2(torch.tensor(smallest / kernel)).floor()) + 1))
    weights = torch.tensor((0.0448, 0.2856, 0.3001, 0.2363, 0.1333)[:scales])
    return MultiScaleSSIMMetric(spatial_dims=spatial_dims, kernel_size=kernel, weights=tuple((weights / weights.sum()).tolist()))


def ms_ssim_diversity(images: torch.Tensor, max_pairs: int = 200, seed: int = 0) -> float:
    """Mean MS-SSIM over distinct pairs of ``images`` (N, C, *spatial) in [0, 1].

    Lower means more diverse; compare generated against real of the same class.
    """
    if len(images) < 2:
        return float("nan")
    pairs = list(itertools.combinations(range(len(images)), 2))
    if len(pairs) > max_pairs:
        order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(seed))[:max_pairs]
        pairs = [pairs[i] for i in order]
    first, second = (torch.tensor(side) for side in zip(*pairs))
    metric = _ms_ssim_metric(images)
    return float(metric(images[first].float(), images[second].float()).mean())


def feature_mmd(real: torch.Tensor, generated: torch.Tensor, seed: int = 0) -> float:
    """MMD (MONAI, linear kernel) between features ``(N, F)`` and ``(M, F)``, standardised by the real ones, at equal
    counts: the larger set is cut to the smaller's count by a seeded random draw (its first rows are often one
    subject's or one class's slices, which would score even real slices as far). Judge it against
    :func:`real_reference` at the same count (``size=``): the estimate's spread grows as the count falls."""
    n = min(len(real), len(generated))

    def drawn(x: torch.Tensor) -> torch.Tensor:
        return x if len(x) == n else x[torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:n]]

    mean, std = real.mean(dim=0), real.std(dim=0).clamp_min(1e-6)
    return float(MMDMetric()((drawn(real) - mean) / std, (drawn(generated) - mean) / std))


def nearest_ssim(generated: torch.Tensor, reference: torch.Tensor, candidates: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """For each generated image, the SSIM of its most similar reference image and that image's index.

    The memorisation audit: an SSIM near 1 means a generated image copies a training image.
    SSIM is computed against the ``candidates`` nearest references in Euclidean distance (one
    matrix product), not against all of them: a copy is also a Euclidean near neighbour,
    and all-pairs SSIM costs minutes on a CPU for a few hundred images.
    """
    distances = torch.cdist(generated.flatten(1).float(), reference.flatten(1).float())
    nearest = distances.topk(min(candidates, len(reference)), largest=False).indices  # (N, k)
    scores = ssim(generated[:, None].expand(-1, nearest.shape[1], *generated.shape[1:]).flatten(0, 1).float(),
                  reference[nearest.flatten()].float(), 7 if min(generated.shape[2:]) >= 32 else 3).view(nearest.shape)
    best_score, best_column = scores.max(dim=1)
    return best_score, nearest.gather(1, best_column[:, None])[:, 0]


def memorisation_audit(generated: torch.Tensor, train: torch.Tensor, held_out: torch.Tensor | None = None) -> dict[str, float]:
    """The memorisation audit of every recipe: how close each generated image is to a training image.

    Args:
        generated: ``(N, C, *S)`` generated images, same range as ``train``.
        train: ``(M, C, *S)`` the training images the model saw.
        held_out: ``(K, C, *S)`` real images the model never saw: their nearest-training SSIM is
            the reference (what a new real image scores), so a generated score is judged against it.

    Returns:
        ``memorisation_max_ssim``, ``memorisation_mean_ssim`` and, with ``held_out``,
        ``memorisation_max_ssim_real_reference`` / ``memorisation_mean_ssim_real_reference``.
    """
    nearest, _ = nearest_ssim(generated, train)
    metrics = {"memorisation_max_ssim": float(nearest.max()), "memorisation_mean_ssim": float(nearest.mean())}
    if held_out is not None and len(held_out):
        reference, _ = nearest_ssim(held_out, train)
        metrics.update({"memorisation_max_ssim_real_reference": float(reference.max()),
                        "memorisation_mean_ssim_real_reference": float(reference.mean())})
    return metrics


def split_halves(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two disjoint random halves of ``range(n)``, ``n // 2`` indices each (one left out for odd ``n``), seeded.

    Returns:
        Index tensors ``(n // 2,)`` and ``(n // 2,)``.
    """
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    half = n // 2
    return order[:half], order[half : 2 * half]


def real_reference(metric: Callable[[torch.Tensor, torch.Tensor], float], real: torch.Tensor, seed: int = 0,
                   min_per_half: int = 2, size: int | None = None) -> float:
    """``metric(real[a], real[b])`` for two disjoint seeded random subsets ``a``, ``b`` of ``real``: the reference
    a ``metric(real, generated)`` is judged against (``<metric>_real_reference`` in ``metrics.json``).

    Args:
        metric: a distance between two sets, e.g. :func:`feature_mmd`.
        real: ``(N, ...)`` real items (features or images).
        seed: seed of the split.
        min_per_half: fewer items per subset give ``nan`` (the metric would mean nothing).
        size: items per subset: the count the generated comparison is made at (a set-size-dependent estimate such as
            MMD's is only comparable at equal counts); None: halves of ``N // 2``. At most ``N // 2``.
    """
    first, second = split_halves(len(real), seed)
    if size is not None:
        first, second = first[:size], second[:size]
    if len(first) < min_per_half:
        return math.nan
    return float(metric(real[first], real[second]))


def high_frequency_share(images: torch.Tensor) -> float:
    """The share of spectral power in the upper half of spatial frequencies, averaged over images.

    The radially averaged power spectrum (squared magnitude of the FFT over the spatial axes, each
    image's mean removed) is split at half the Nyquist radius; blur moves power below it.

    Args:
        images: ``(N, C, *S)``, 2D or 3D.
    """
    x = images.float()
    x = x - x.mean(dim=tuple(range(2, x.ndim)), keepdim=True)
    power = torch.fft.fftn(x, dim=tuple(range(2, x.ndim))).abs().square().mean(dim=(0, 1))
    grids = torch.meshgrid(*[torch.fft.fftfreq(n) / 0.5 for n in power.shape], indexing="ij")  # 1 at Nyquist on each axis
    radius = torch.sqrt(sum(g.square() for g in grids))
    total = power[radius <= 1.0].sum()
    return float(power[(radius > 0.5) & (radius <= 1.0)].sum() / total) if total > 0 else math.nan


def spectrum_ratio_high(real: torch.Tensor, generated: torch.Tensor) -> float:
    """``high_frequency_share(generated) / high_frequency_share(real)``: about 1 for sharp images, far below for blurred
    ones (the order of a :func:`real_reference` metric: real first)."""
    return high_frequency_share(generated) / high_frequency_share(real)
