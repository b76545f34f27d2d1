"""Label maps of a trained model: label values to contiguous class indices, and label-map files checked against them.

A dataset's label values need not be contiguous (e.g. 0, 1, 2, 5); networks take class indices
0..K-1 (``one_hot``, Dice). A model records its ``label_values`` (class index -> value) from the
prepared data, and everything it reads goes through one lookup table.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from medsynth.data.datasets import load_split, stack_items
from medsynth.data.io import load_image, save_image
from medsynth.errors import BadInputError


def value_lookup(label_values: Sequence[int]) -> Tensor:
    """Lookup table ``(max value + 1,)`` long: ``table[value]`` is the class index of ``value``, -1 for others."""
    table = torch.full((max(label_values) + 1,), -1, dtype=torch.long)
    table[torch.tensor(label_values)] = torch.arange(len(label_values))
    return table


def read_label_map(path: str | Path, label_values: Sequence[int], class_names: Sequence[str]) -> tuple[Tensor, np.ndarray]:
    """A 3D label-map file as class indices ``(1, 1, X, Y, Z)`` long and its 4x4 affine (world mm).

    Args:
        path: Any file :func:`~medsynth.data.io.load_image` reads.
        label_values: The label value of each class index (the model's classes).
        class_names: The name of each class index, for the error message.

    Raises:
        BadInputError: the file is unreadable, not one 3D map, or holds values outside
            ``label_values`` (one line naming the file, the values and the known classes).
    """
    image = load_image(path, dtype=np.int64)
    if image.ndim != 4 or image.shape[0] != 1:
        shape = list(image.shape[1:]) if image.shape[0] == 1 else [*image.shape[1:], image.shape[0]]
        raise BadInputError(path, f"label map has {len(shape)} dimension(s) {shape}; a 3D label map (X, Y, Z) is needed")
    unknown = [int(v) for v in torch.unique(image.as_tensor()) if int(v) not in label_values]
    if unknown:
        names = ", ".join(f"{v} {n}" for v, n in zip(label_values, class_names))
        raise BadInputError(path, f"label value(s) {', '.join(map(str, unknown))} not among the classes this model was trained on ({names})")
    return value_lookup(label_values)[image.as_tensor()[None].long()], np.asarray(image.affine, dtype=np.float64)


def values_of(classes: Tensor, label_values: Sequence[int]) -> Tensor:
    """Class indices (any shape) back to their label values, int16 (the dtype prepared label maps are written in)."""
    return torch.tensor(label_values)[classes.long()].to(torch.int16)


def load_labelled_split(root: str | Path, split: str, label_values: Sequence[int]) -> tuple[Tensor, Tensor] | None:
    """Images ``(N, C, *S)`` float32 and class indices ``(N, 1, *S)`` long of one split of a prepared dataset.

    Returns ``None`` for an empty split. Raises :class:`BadInputError` naming ``root`` when a
    label map holds a value outside ``label_values``.
    """
    items = load_split(root, split)
    if not items:
        return None
    values, table = stack_items(items, "label").long(), value_lookup(label_values)
    known = (values >= 0) & (values < len(table))
    classes = torch.where(known, table[values.clamp(0, len(table) - 1)], -1)
    if (classes < 0).any():
        raise BadInputError(root, "holds label values this model was not trained on")
    return stack_items(items, "image"), classes


def save_labelled(folder: str | Path, volumes: Tensor, label_maps: Tensor, affine: np.ndarray, kind: str = "generated") -> list[Path]:
    """Volumes ``(N, 1, *S)`` as ``<kind>_<k>.nii.gz`` beside their label maps ``(N, 1, *S)`` (label values) as ``labels_<k>.nii.gz``.

    One grid for all (``affine``, 4x4 world mm); :func:`load_labelled` reads the pairs back.
    """
    folder = Path(folder)
    written = []
    for k, (volume, labels) in enumerate(zip(volumes, label_maps)):
        written.append(save_image(volume, folder / f"{kind}_{k:03d}.nii.gz", affine=affine))
        save_image(labels, folder / f"labels_{k:03d}.nii.gz", affine=affine)
    return written


def load_labelled(folder: str | Path, kind: str = "generated", limit: int | None = None) -> list[tuple[str, Tensor, Tensor]]:
    """The first ``limit`` pairs :func:`save_labelled` wrote: ``(k as "000", label values (1, *S) long, volume (1, *S) float32)``."""
    volumes = sorted(Path(folder).glob(f"{kind}_*.nii.gz"))[:limit]
    return [(path.name[len(kind) + 1:-len(".nii.gz")],
             load_image(path.parent / path.name.replace(f"{kind}_", "labels_"), dtype=np.int64).as_tensor(),
             load_image(path).as_tensor()) for path in volumes]
