"""Patch-wise denoising: a model trained on patches applied to a whole volume at every step.

MONAI's ``PatchInferer`` merges one forward pass; here the merge must happen inside every sampler
step (so neighbouring patches see one consistent x_t and cannot drift apart), with the condition
split alongside x_t, so the few lines are ours, built on MONAI's splitter and importance map.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.data.utils import compute_importance_map
from monai.inferers import SlidingWindowSplitter
from pydantic import Field
from torch import Tensor

from medsynth.config import StrictModel
from medsynth.diffusion.condition import Condition
from medsynth.diffusion.samplers import Denoiser
from medsynth.diffusion.sampling import SamplerConfig
from medsynth.errors import MedsynthError

SPATIAL_PARTS = ("seg", "concat")  # Condition parts split into patches; the others repeat per patch


class PatchTrainingConfig(StrictModel):
    """The ``data`` section of a patch-wise model (:func:`random_patches`)."""

    patches_per_volume: int = Field(4, ge=1, description="random patches drawn from each volume of a batch")


class PatchSamplerConfig(SamplerConfig):
    """A sampler's settings with those of :class:`PatchwiseDenoiser`."""

    patch_overlap: float = Field(0.5, ge=0, lt=1, description="overlap of neighbouring patches (share of the patch)")
    patch_batch: int = Field(8, ge=1, description="patch locations per forward pass")


class PatchwiseDenoiser:
    """A patch-wise denoiser applied to a whole volume, with the samplers' signature.

    Every call (one sampler step) splits ``x_t`` and the spatial condition into overlapping
    patches (MONAI ``SlidingWindowSplitter``, replicate padding where the grid overruns the
    volume), evaluates ``model`` on batches of patches and merges the outputs with Gaussian
    weights (MONAI ``compute_importance_map``), so the sampler's update is taken on one
    consistent whole-volume prediction.

    Args:
        model: ``model(x_t, t, cond)`` on patches (e.g. a guided ConditionedDenoiser). ``cond`` is
            a spatial tensor (B, K, *S), or a :class:`Condition` whose ``seg`` and ``concat`` are
            split into patches and whose ``class_labels``/``vector`` go with every patch.
        patch_size: the model's patch, per axis.
        overlap: overlap of neighbouring patches, a share of the patch in [0, 1).
        batch_size: patch locations per forward pass (each location holds the whole batch).
    """

    def __init__(self, model: Denoiser, patch_size: Sequence[int], overlap: float = 0.5, batch_size: int = 8):
        self.model = model
        self.patch_size = tuple(int(p) for p in patch_size)
        self.overlap = overlap
        self.batch_size = batch_size

    def __call__(self, x_t: Tensor, t: Tensor, cond: Condition | Tensor) -> Tensor:
        """x_t (B, C, *S), t (B,), cond (spatial parts (B, K, *S)) with S >= patch -> output (B, C_out, *S)."""
        shape = tuple(x_t.shape[2:])
        if any(s < p for s, p in zip(shape, self.patch_size)):
            raise MedsynthError(f"patch size {list(self.patch_size)} is larger than the volume {list(shape)}")
        # Every spatial tensor is split as channels of one input: (name, first channel, last channel).
        spatial = [(None, cond)] if isinstance(cond, Tensor) else \
            [(name, getattr(cond, name)) for name in SPATIAL_PARTS if getattr(cond, name) is not None]
        layout, start = [], x_t.shape[1]
        for name, value in spatial:
            layout.append((name, start, start + value.shape[1]))
            start += value.shape[1]
        splitter = SlidingWindowSplitter(patch_size=self.patch_size, overlap=self.overlap, pad_mode="replicate")
        inputs = torch.cat([x_t, *(value.to(x_t.dtype) for _, value in spatial)], dim=1)
        padded = splitter.get_padded_shape(inputs)
        weight = compute_importance_map(self.patch_size, mode="gaussian", device=x_t.device, dtype=torch.float32)
        total = torch.zeros(x_t.shape[0], 1, *padded, device=x_t.device)
        merged: Tensor | None = None
        batch = x_t.shape[0]
        pending: list[tuple[Tensor, Sequence[int]]] = []

        def patch_condition(patches: Tensor, repeats: int) -> Condition | Tensor:
            if isinstance(cond, Tensor):
                return patches[:, x_t.shape[1]:]
            per_item = {name: value.repeat(repeats, *[1] * (value.ndim - 1))
                        for name, value in cond.parts().items() if name not in SPATIAL_PARTS}
            return Condition(**per_item, **{name: patches[:, a:b] for name, a, b in layout})

        def flush() -> None:
            nonlocal merged
            patches = torch.cat([patch for patch, _ in pending])  # (k B, C + K, *P), location-major
            out = self.model(patches[:, :x_t.shape[1]], t.repeat(len(pending)), patch_condition(patches, len(pending))).float()
            if merged is None:
                merged = torch.zeros(batch, out.shape[1], *padded, device=x_t.device)
            for k, (_, location) in enumerate(pending):
                window = (slice(None), slice(None), *(slice(s, s + p) for s, p in zip(location, self.patch_size)))
                merged[window] += out[k * batch:(k + 1) * batch] * weight
                total[window] += weight
            pending.clear()

        for patch, location in splitter(inputs):
            pending.append((patch, location))
            if len(pending) == self.batch_size:
                flush()
        if pending:
            flush()
        assert merged is not None
        crop = (slice(None), slice(None), *(slice(0, s) for s in shape))
        return (merged / total)[crop].to(x_t.dtype)


def random_patches(x0: Tensor, cond: Condition, patch_size: Sequence[int], per_volume: int,
                   generator: torch.Generator | None = None) -> tuple[Tensor, Condition]:
    """Training pairs of a patch-wise model: ``per_volume`` random windows of each volume, the same in x_0 and condition.

    Args:
        x0: Volumes ``(B, C, *S)``.
        cond: Their condition; the spatial parts (``seg``, ``concat``: ``(B, C', *S)``) are cut at the
            same windows, the others repeated per patch.
        patch_size: Window size (voxels) per spatial axis, at most ``S``.
        per_volume: Windows drawn from each volume.
        generator: Draws the window starts (uniform over the volume), volume by volume.

    Returns:
        Patches ``(B * per_volume, C, *patch_size)`` and their condition.
    """
    windows = []
    for b in [b for b in range(len(x0)) for _ in range(per_volume)]:
        starts = [int(torch.randint(0, s - p + 1, (), generator=generator)) for s, p in zip(x0.shape[2:], patch_size)]
        windows.append((b, slice(None), *(slice(s, s + p) for s, p in zip(starts, patch_size))))
    parts = {name: torch.stack([value[w] if name in SPATIAL_PARTS else value[w[0]] for w in windows])
             for name, value in cond.parts().items()}
    return torch.stack([x0[w] for w in windows]), cond.replace(**parts)
