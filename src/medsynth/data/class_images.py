"""Prepared class-per-folder images as every class-conditional image recipe reads them (``cvae``, ``class-diffusion``):
the shape and classes a model is built for, the training data with its augmentation, real images by class, and
``--class`` names resolved to indices.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from pydantic import Field

from medsynth.config import StrictModel, TrainConfig
from medsynth.data.datasets import PreparedDataModule, load_prepared_info, load_split, prepared_affine
from medsynth.errors import MedsynthError


class ClassImageDataConfig(StrictModel):
    augment: bool = Field(True, description="random flips and 90-degree turns (for rotation-invariant data)")


def class_image_info(data_dir: str | Path, who: str) -> dict[str, Any]:
    """What a class-conditional model is built for, read from a prepared dataset: ``spatial_dims`` (2 or 3),
    ``in_shape`` ``[C, *spatial]``, ``classes`` (names, in index order) and ``reference_affine`` (4 x 4 list, or None).

    Raises:
        MedsynthError: the images are not of one shape, or the dataset has no classes (names ``who``, the recipe).
    """
    info = load_prepared_info(Path(data_dir))
    if info["image_shape"] is None:
        raise MedsynthError(f"{data_dir}: {who} needs images of one shape; prepare with --size")
    if not info["classes"]:
        raise MedsynthError(f"{data_dir}: {who} needs a dataset with classes (class-per-folder images)")
    return {"spatial_dims": info["spatial_dims"], "in_shape": [info["in_channels"], *info["image_shape"]],
            "classes": list(info["classes"]),
            "reference_affine": prepared_affine(info)}


def class_image_size(model: Any) -> list[int] | None:
    """The spatial size a class-image model config states (``in_shape`` less its channels: H W or D H W), or None."""
    return list(model.in_shape[1:]) if model.in_shape else None


def class_image_fields(model: Any, size: list[int]) -> dict[str, Any]:
    """The data-filled model fields for images of ``size`` (H W or D H W) where no data is at hand (``medsynth plan``):
    its channels (1 when unset) and classes (five placeholders when unset)."""
    channels = model.in_shape[0] if model.in_shape else 1
    return {"spatial_dims": len(size), "in_shape": [channels, *size], "classes": model.classes or [f"class_{i}" for i in range(5)]}


def flips_and_turns(sample: dict[str, Any]) -> dict[str, Any]:
    """A random flip and quarter turn of a 2D item's ``image`` (C, H, W).

    Flips and 90-degree turns only: they keep cross-sections realistic and need no interpolation.
    """
    image = sample["image"]
    axes = (1, 2)
    if torch.rand(()) < 0.5:
        image = image.flip(1)
    image = torch.rot90(image, int(torch.randint(0, 4, ())), dims=axes)
    return {**sample, "image": image.contiguous()}


def class_image_datamodule(data_dir: str | Path, train: TrainConfig, augment: bool, spatial_dims: int | None) -> PreparedDataModule:
    """The prepared images in memory, batched by ``train``; flips and quarter turns on training items when ``augment`` (2D only)."""
    return PreparedDataModule(Path(data_dir), batch_size=train.batch_size, num_workers=train.num_workers, seed=train.seed,
                              in_memory=True, train_transform=flips_and_turns if augment and spatial_dims == 2 else None)


def class_indices(classes: list[str], class_name: str | None) -> list[int]:
    """``--class``: every index (None), or the one of a class name or index.

    Raises:
        MedsynthError: an unknown class, with the known ones.
    """
    if class_name is None:
        return list(range(len(classes)))
    if class_name in classes:
        return [classes.index(class_name)]
    if class_name.isdigit() and int(class_name) < len(classes):
        return [int(class_name)]
    raise MedsynthError(f"unknown class '{class_name}' (this model knows: {', '.join(classes)})")


def real_images(data_dir: str | Path | None, split: str | None, class_index: int | None = None) -> list[torch.Tensor]:
    """The prepared images ``(C, *spatial)`` of a split (of one class index, or all); none if the data or the split are not at hand."""
    if data_dir is None or split is None or not Path(data_dir).exists():
        return []
    return [item["image"] for item in load_split(Path(data_dir), split) if class_index is None or item["class"] == class_index]
