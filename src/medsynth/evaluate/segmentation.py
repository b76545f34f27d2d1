"""Judging label-conditioned 3D synthesis: a segmenter trained here, per-label intensities, patch seams.

- Dice of a segmenter trained on the real training split, run on generated volumes,
  against the label maps they were conditioned on: does the generator put each
  structure where it was asked? (The SDM papers' measure; no pretrained weights can be
  downloaded, so the segmenter is a small MONAI ``UNet`` trained here.)
- Per-label intensity statistics: are the generated HU of each structure those of the
  real ones?
- Seam score: does a patch-wise high-resolution stage leave steps at the patch borders?

For the memorisation audit use :func:`medsynth.evaluate.metrics.nearest_ssim`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from monai.inferers import SlidingWindowSplitter
from monai.losses import DiceCELoss
from monai.metrics import DiceMetric
from monai.networks.nets import UNet
from monai.transforms import Compose, RandFlipd, RandGaussianNoised, RandShiftIntensityd
from pydantic import Field
from torch import nn

from medsynth.config import StrictModel
from medsynth.evaluate.augmentation import classic_augmentation
from medsynth.seeds import seeded
from medsynth.training import fit_minibatches


class Segmenter(nn.Module):
    """MONAI ``UNet`` (3D volumes, or 2D slices with ``spatial_dims=2``) that takes images in their own units (e.g. HU).

    The intensity normalisation learnt from the training images is part of the model,
    so real and generated volumes go in unchanged. Inputs whose size is not a multiple
    of the UNet's total stride are padded (replicating the border) and the logits cropped back.
    """

    def __init__(self, num_classes: int, channels: Sequence[int] = (8, 16, 32), offset: float = 0.0, scale: float = 1.0,
                 spatial_dims: int = 3):
        super().__init__()
        # Plain conv blocks: residual units cost ~5x per step on CPU without helping this small task.
        self.unet = UNet(spatial_dims=spatial_dims, in_channels=1, out_channels=num_classes, channels=tuple(channels),
                         strides=(2,) * (len(channels) - 1), num_res_units=0)
        self.multiple = 2 ** (len(channels) - 1)
        self.register_buffer("offset", torch.tensor(float(offset)))
        self.register_buffer("scale", torch.tensor(float(scale)))

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        """Images ``(B, 1, *S)`` in their units to the network's zero-mean, unit-variance range."""
        return (images.float() - self.offset) / self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, num_classes, *S)`` for normalised images ``(B, 1, *S)``."""
        spatial = x.shape[2:]
        pad = [p for size in reversed(spatial) for p in (0, -size % self.multiple)]
        logits = self.unet(F.pad(x, pad, mode="replicate") if any(pad) else x)
        return logits[(..., *(slice(0, size) for size in spatial))]


def train_segmenter(
    images: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    epochs: int = 40,
    seed: int = 0,
    channels: Sequence[int] = (8, 16, 32),
    batch_size: int = 1,
    lr: float = 5e-2,
    flip_axes: Sequence[int] = (),
    augmentation: Literal["light", "classic", "none"] = "light",
) -> Segmenter:
    """Train a segmenter on real volumes with MONAI's Dice + cross-entropy loss.

    Augmentation is light (intensity shift and Gaussian noise on the normalised image,
    optional flips) so that the segmenter judges anatomy, not the texture that tells
    real from generated. Flips are off by default: mirroring swaps the sides of
    structures told apart mostly by side (left/right chambers), which a small network
    then learns far more slowly.

    Args:
        images: Real volumes ``(N, 1, X, Y, Z)``, any units (HU for CT).
        labels: Their label maps ``(N, X, Y, Z)``, class indices in ``[0, num_classes)``.
        num_classes: Number of classes, background included.
        epochs: Passes over the training volumes.
        seed: Seeds initialisation, batch order and augmentation; the global torch RNG
            is left as it was.
        channels: UNet channels per level (one stride-2 level between each).
        batch_size: Volumes per step.
        lr: Peak learning rate of the one-cycle schedule (AdamW).
        flip_axes: Spatial axes (0-2) to flip at random (probability 0.5 each), in the light
            and the classic augmentation.
        augmentation: ``"light"`` (the above), ``"classic"`` (nnU-Net's augmentation,
            :func:`~medsynth.evaluate.augmentation.classic_augmentation`: the free baseline of the
            utility test, mirrored along ``flip_axes`` only, as nnU-Net's authors advise for
            left/right labels) or ``"none"``.

    Returns:
        The trained :class:`Segmenter`, in eval mode.
    """
    with seeded(seed):
        generator = torch.Generator().manual_seed(seed)
        images = images.float()
        model = Segmenter(num_classes, channels, offset=float(images.mean()), scale=float(images.std().clamp_min(1e-6)))
        if augmentation == "classic":
            augment = classic_augmentation(images.ndim - 2, with_label=True, seed=seed, flip_axes=flip_axes)
        else:
            augment = Compose([
                *(RandFlipd(keys=("image", "label"), prob=0.5, spatial_axis=axis) for axis in flip_axes),
                RandShiftIntensityd(keys="image", offsets=0.1, prob=0.5),
                RandGaussianNoised(keys="image", std=0.05, prob=0.5),
            ] if augmentation == "light" else [])
            augment.set_random_state(seed=seed)
        loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
        steps_per_epoch = -(-len(images) // batch_size)
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=epochs * steps_per_epoch)
        normalised = model.normalise(images)

        def loss_of(index: torch.Tensor) -> torch.Tensor:
            samples = [augment({"image": normalised[i], "label": labels[i][None]}) for i in index]
            x = torch.stack([torch.as_tensor(s["image"]) for s in samples])
            y = torch.stack([torch.as_tensor(s["label"]) for s in samples]).long()
            return loss_fn(model(x), y)

        return fit_minibatches(model, loss_of, len(images), epochs=epochs, batch_size=batch_size, optimizer=optimizer,
                               scheduler=scheduler, generator=generator)


def _numpy(array: torch.Tensor | np.ndarray) -> np.ndarray:
    return torch.as_tensor(array).detach().cpu().numpy()


@torch.no_grad()
def segment(model: Segmenter, images: torch.Tensor, batch_size: int = 4) -> torch.Tensor:
    """Label maps ``(N, X, Y, Z)`` (long) for volumes ``(N, 1, X, Y, Z)`` in the training images' units."""
    return torch.cat([model(model.normalise(batch)).argmax(dim=1) for batch in images.split(batch_size)])


def dice_per_class(pred: torch.Tensor, target: torch.Tensor, num_classes: int, class_names: Sequence[str]) -> dict[str, float]:
    """Dice per foreground class (MONAI ``DiceMetric``), averaged over volumes, and their mean.

    A volume where a class is absent from both ``pred`` and ``target`` says nothing about
    that class and is left out of its average; a class absent everywhere gets NaN and
    is left out of ``"mean_foreground"``. A class predicted but absent from the target
    scores 0 in that volume.

    Args:
        pred: Predicted label maps ``(N, X, Y, Z)``.
        target: Reference label maps ``(N, X, Y, Z)`` (for generated volumes: the
            label maps they were conditioned on).
        num_classes: Number of classes, background (index 0) included.
        class_names: ``num_classes`` names, background first.

    Returns:
        ``{class_name: dice}`` for classes 1.. and ``"mean_foreground"``.
    """
    if len(class_names) != num_classes:
        raise ValueError(f"class_names has {len(class_names)} names for {num_classes} classes")
    pred, target = pred.long()[:, None], target.long()[:, None]
    metric = DiceMetric(include_background=False, reduction="none", ignore_empty=False, num_classes=num_classes)
    scores = metric(pred, target)  # (N, num_classes - 1); 1.0 where a class is absent from both
    classes = torch.arange(1, num_classes, device=pred.device).view(1, -1, *([1] * (pred.ndim - 2)))
    present = ((pred == classes) | (target == classes)).flatten(2).any(dim=2)
    scores = torch.where(present, scores, torch.nan).nanmean(dim=0)
    result = {name: float(score) for name, score in zip(class_names[1:], scores)}
    result["mean_foreground"] = float(scores.nanmean())
    return result


def intensity_stats_per_label(images: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray,
                              class_names: Sequence[str]) -> dict[str, dict[str, float]]:
    """Mean, standard deviation and 5th/95th percentiles of the voxels of each label.

    Args:
        images: Volumes ``(N, 1, X, Y, Z)`` or ``(N, X, Y, Z)``, in their units (HU for CT).
        labels: Label maps ``(N, X, Y, Z)``; index ``k`` is ``class_names[k]``.
        class_names: Names by label index.

    Returns:
        ``{class_name: {"mean", "std", "p5", "p95"}}`` over all volumes, in the images'
        units, for the labels present (absent ones are left out).
    """
    values = _numpy(images).astype(np.float64).reshape(-1)
    labels = _numpy(labels).reshape(-1)
    if values.shape != labels.shape:
        raise ValueError(f"images hold {values.size} voxels but labels {labels.size}")
    stats = {}
    for index, name in enumerate(class_names):
        selected = values[labels == index]
        if selected.size:
            p5, p95 = np.percentile(selected, [5, 95])
            stats[name] = {"mean": float(selected.mean()), "std": float(selected.std()), "p5": float(p5), "p95": float(p95)}
    return stats


def sliding_window_borders(shape: Sequence[int], patch_size: Sequence[int] | int,
                           overlap: Sequence[float] | float | Sequence[int] | int = 0.0) -> list[list[int]]:
    """Patch border planes, per axis, of MONAI's ``SlidingWindowSplitter`` (as ``PatchInferer`` uses it).

    MONAI's own splitter is run (with its default constant padding, which extends the
    last patches past the volume) on a stand-in volume of ``shape`` (one byte per voxel),
    so the grid is exactly MONAI's for this ``patch_size`` and ``overlap`` (a fraction of
    the patch in [0, 1) or a number of voxels).

    Returns:
        For each spatial axis, the sorted indices ``b`` (``0 < b < size``) such that a
        patch starts or ends between planes ``b - 1`` and ``b``.
    """
    splitter = SlidingWindowSplitter(patch_size=patch_size, overlap=overlap)
    stand_in = torch.zeros((), dtype=torch.uint8).expand(1, 1, *shape)
    starts = np.array([location for _, location in splitter(stand_in)]).reshape(-1, len(shape))
    sizes = np.broadcast_to(np.asarray(patch_size), (len(shape),))
    borders = []
    for axis, size in enumerate(shape):
        edges = np.union1d(starts[:, axis], starts[:, axis] + sizes[axis])
        borders.append([int(b) for b in edges if 0 < b < size])
    return borders


def seam_score(volume: torch.Tensor | np.ndarray, borders: Sequence[Sequence[int]]) -> dict[str, float]:
    """Mean absolute intensity step across patch borders against the same step elsewhere.

    Along each axis the step between neighbouring planes is ``|v[i] - v[i - 1]|`` at
    every voxel. ``step_at_borders`` is the mean over all voxels and axes of the steps
    whose plane pair straddles a border in ``borders`` (e.g. from
    :func:`sliding_window_borders`); ``step_inside`` the mean of all other steps. A
    seamless volume has ``ratio = step_at_borders / step_inside`` near 1 (the borders
    are then ordinary planes); visible seams give a ratio well above 1.

    Args:
        volume: One volume ``(X, Y, Z)`` or ``(1, X, Y, Z)``.
        borders: For each axis, plane indices ``b`` with ``0 < b < size``: a border lies
            between planes ``b - 1`` and ``b``.

    Returns:
        ``{"step_at_borders", "step_inside", "ratio"}`` in the volume's units (ratio
        unitless); NaN where there are no border (or no inside) steps.
    """
    volume = _numpy(volume).astype(np.float64)
    volume = volume[0] if volume.ndim == 4 and volume.shape[0] == 1 else volume
    if volume.ndim != 3 or len(borders) != 3:
        raise ValueError(f"expected one 3D volume and borders for 3 axes, got shape {volume.shape} and {len(borders)} axes")
    at, inside = [], []
    for axis, axis_borders in enumerate(borders):
        steps = np.moveaxis(np.abs(np.diff(volume, axis=axis)), axis, 0)  # steps[i] straddles planes i and i + 1
        marked = np.zeros(len(steps), dtype=bool)
        indices = np.asarray(axis_borders, dtype=int)
        if ((indices < 1) | (indices >= volume.shape[axis])).any():
            raise ValueError(f"borders on axis {axis} must lie in [1, {volume.shape[axis] - 1}], got {list(axis_borders)}")
        marked[indices - 1] = True
        at.append(steps[marked].ravel())
        inside.append(steps[~marked].ravel())
    at, inside = np.concatenate(at), np.concatenate(inside)
    step_at = float(at.mean()) if at.size else float("nan")
    step_inside = float(inside.mean()) if inside.size else float("nan")
    ratio = step_at / step_inside if step_inside > 0 else float("nan")
    return {"step_at_borders": step_at, "step_inside": step_inside, "ratio": ratio}


def mean_seam_score(volumes: torch.Tensor, patch_size: Sequence[int], overlap: float) -> dict[str, float]:
    """:func:`seam_score` of volumes ``(N, 1, X, Y, Z)`` at the borders of MONAI's patch grid, averaged over volumes.

    ``patch_size`` and ``overlap`` are those of the patch-wise sampling (:func:`sliding_window_borders`).
    """
    borders = sliding_window_borders(volumes.shape[2:], patch_size, overlap)
    scores = [seam_score(volume, borders) for volume in volumes]
    return {key: float(np.mean([s[key] for s in scores])) for key in ("step_at_borders", "step_inside", "ratio")}


class LabelMapFidelityConfig(StrictModel):
    """The ``evaluate`` section of a label-conditioned recipe (:func:`label_map_fidelity`)."""

    n_generated: int = Field(8, ge=1, description="volumes generated from held-out label maps")
    segmenter_epochs: int = Field(40, ge=1)
    segmenter_channels: list[int] = [8, 16, 32]
    seed: int = 0
    utility: bool = Field(True, description="train-on-synthetic and the augmentation test (medsynth.evaluate.image_utility)")
    n_synthetic: int | None = Field(None, ge=2, description="training subjects whose label maps are generated from for the utility "
                                    "tests (default all; fewer cost less sampling)")
    n_labelled: int | None = Field(None, ge=1, description="augmentation test: subjects of those in the labelled pool "
                                   "(default a quarter); the rest are the pool of which only the label maps are used")
    utility_seeds: list[int] = Field([0], min_length=1, description="seeds of the task network in the utility tests (>= 3 in benchmarks)")


def label_map_fidelity(train_images: torch.Tensor, train_labels: torch.Tensor, real_images: torch.Tensor,
                       real_labels: torch.Tensor, generated: torch.Tensor, generated_labels: torch.Tensor,
                       class_names: Sequence[str], units: str = "HU", epochs: int = 40, seed: int = 0,
                       channels: Sequence[int] = (8, 16, 32)) -> dict[str, object]:
    """Do volumes generated from label maps show each structure where, and with the intensities, it was asked?

    A segmenter is trained on the real training volumes (:func:`train_segmenter`); its Dice on
    the real held-out volumes is the reference for its Dice on the generated ones, both against
    their label maps (for generated volumes: the maps they were conditioned on). Per-label
    intensity statistics of real and generated volumes are compared by their mean.

    Args:
        train_images, train_labels: Real training volumes ``(N, 1, X, Y, Z)`` in their units and
            label maps ``(N, X, Y, Z)`` of class indices.
        real_images, real_labels: Real held-out volumes and label maps, the same layout.
        generated, generated_labels: Generated volumes and the label maps they were conditioned on.
        class_names: Names by class index, background first.
        units: The volumes' units, reported as ``intensity_units``.
        epochs, seed, channels: Of the segmenter (:func:`train_segmenter`).

    Returns:
        ``segmenter_dice_real``, ``segmenter_dice_generated`` (mean foreground Dice),
        ``segmenter_dice_ratio`` (generated / real; NaN when real is 0), the per-class Dice
        ``segmenter_dice_{real,generated}_per_class``, ``intensity_units``,
        ``intensity_{real,generated}_per_label`` (:func:`intensity_stats_per_label`) and
        ``intensity_mean_abs_difference`` (mean over the labels present in both of |real - generated| means).
    """
    num_classes = len(class_names)
    segmenter = train_segmenter(train_images, train_labels, num_classes, epochs=epochs, seed=seed, channels=channels)
    dice_real = dice_per_class(segment(segmenter, real_images), real_labels, num_classes, class_names)
    dice_generated = dice_per_class(segment(segmenter, generated), generated_labels, num_classes, class_names)
    stats_real = intensity_stats_per_label(real_images, real_labels, class_names)
    stats_generated = intensity_stats_per_label(generated, generated_labels, class_names)
    shared = [name for name in class_names if name in stats_real and name in stats_generated]
    real_mean, generated_mean = float(dice_real.pop("mean_foreground")), float(dice_generated.pop("mean_foreground"))
    return {
        "segmenter_dice_real": real_mean,
        "segmenter_dice_generated": generated_mean,
        "segmenter_dice_ratio": generated_mean / real_mean if real_mean > 0 else float("nan"),
        "segmenter_dice_real_per_class": dice_real,
        "segmenter_dice_generated_per_class": dice_generated,
        "intensity_units": units,
        "intensity_real_per_label": stats_real,
        "intensity_generated_per_label": stats_generated,
        "intensity_mean_abs_difference": float(np.mean([abs(stats_real[n]["mean"] - stats_generated[n]["mean"]) for n in shared])),
    }
