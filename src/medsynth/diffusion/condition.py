"""Structured conditions: several conditioning tensors of one batch, routed by the denoiser.

A :class:`Condition` holds up to four parts, each optional, each with the batch first:

- ``concat`` (B, E, *S): channels concatenated to x_t at the UNet's input (a reference volume,
  patch coordinates, an image to register to);
- ``seg`` (B, label_nc, *S): a label map for SPADE normalisation;
- ``class_labels`` (B,) int64: class or phase indices (MONAI ``num_class_embeds``);
- ``vector`` (B, D): a continuous code (a semantic latent, a breathing amplitude).

Guidance and condition drop-out need a *null* condition. It is defined per part by a mapping
``{part: null}`` (:data:`NullParts`), each null a tensor broadcast to the part (a null class index
``torch.tensor(num_classes)``) or a function of the part (``torch.zeros_like`` for an empty label
map). Parts the mapping does not name are kept: sdm's high stage drops the label map but keeps the
reference and position channels.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

PART_NAMES = ("concat", "seg", "class_labels", "vector")
NullPart = Tensor | Callable[[Tensor], Tensor]
NullParts = Mapping[str, NullPart]


@dataclass(frozen=True)
class Condition:
    """The conditions of one batch (every part optional; see the module docstring for shapes)."""

    concat: Tensor | None = None
    seg: Tensor | None = None
    class_labels: Tensor | None = None
    vector: Tensor | None = None

    def parts(self) -> dict[str, Tensor]:
        """The parts that are set, by name."""
        return {name: value for name in PART_NAMES if (value := getattr(self, name)) is not None}

    def replace(self, **parts: Tensor | None) -> Condition:
        return dataclasses.replace(self, **parts)

    def map(self, fn: Callable[[Tensor], Tensor]) -> Condition:
        """``fn`` applied to every part that is set (``.to(device)``, indexing along the batch)."""
        return self.replace(**{name: fn(value) for name, value in self.parts().items()})

    def __len__(self) -> int:
        parts = list(self.parts().values())
        return len(parts[0]) if parts else 0

    @staticmethod
    def cat(conditions: list[Condition]) -> Condition:
        """Conditions of several batches joined along the batch (every batch sets the same parts)."""
        names = conditions[0].parts().keys()
        return Condition(**{name: torch.cat([getattr(c, name) for c in conditions]) for name in names})


def null_part(value: Tensor, null: NullPart) -> Tensor:
    """The null of one tensor, same shape, dtype and device."""
    if callable(null):
        return null(value)
    return null.to(device=value.device, dtype=value.dtype).expand_as(value)


def check_null_parts(cond: Condition, null: NullParts) -> None:
    unknown = set(null) - set(PART_NAMES)
    if unknown:
        raise ValueError(f"null condition names unknown parts {sorted(unknown)} (parts: {', '.join(PART_NAMES)})")
    if not any(getattr(cond, name) is not None for name in null):
        raise ValueError(f"null condition names {sorted(null)}, but the condition sets only {sorted(cond.parts())}")
