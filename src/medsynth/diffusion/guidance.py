"""Classifier-free guidance (Ho & Salimans 2022) in the convention of the SDM original.

``eps = eps(x | y) + s (eps(x | y) - eps(x | none))``: ``s = 0`` is the plain conditional model
and ``s = 1`` gives ``2 eps(x | y) - eps(x | none)`` (Ho & Salimans write the same as
``(1 + w) eps(x | y) - w eps(x | none)`` with w = s).

Guidance wraps a model into another model with the same signature, so samplers never branch on
it. Training needs the other half: :func:`drop_condition` replaces the condition by the null
condition for a random part of the batch (used by ``DiffusionLoss(cond_drop_prob=..)``).

The null condition is given either as a tensor broadcast to the condition's shape (a null class
index ``torch.tensor(num_classes)``) or as a function of the condition (``torch.zeros_like`` for
an empty SPADE label map). A structured :class:`~medsynth.diffusion.condition.Condition` takes a
mapping ``{part: null}``: the parts it names are nulled, the others kept.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from medsynth.diffusion.condition import Condition, NullPart, NullParts, check_null_parts, null_part
from medsynth.diffusion.samplers import Denoiser
from medsynth.errors import MedsynthError

# A tensor condition's null (tensor or function of it), or a Condition's {part: null} mapping.
NullCondition = NullPart | NullParts
AnyCondition = Tensor | Condition


def null_condition(cond: AnyCondition, null_cond: NullCondition) -> AnyCondition:
    """The null condition for a batch, same shape, dtype and device as ``cond`` (part by part)."""
    if isinstance(cond, Condition):
        check_null_parts(cond, null_cond)
        return cond.replace(**{name: null_part(value, null_cond[name]) for name, value in cond.parts().items() if name in null_cond})
    return null_part(cond, null_cond)


def drop_condition(cond: AnyCondition, null_cond: NullCondition, drop: Tensor) -> AnyCondition:
    """Replaces the condition of the samples where ``drop`` is True by the null condition.

    Args:
        cond: the batch's conditions, a tensor (B, ..) or a :class:`Condition`.
        null_cond: the null condition (tensor or function of ``cond``; ``{part: null}`` for a Condition).
        drop: shape (B,), bool.

    Returns:
        The conditions, same type and shapes as ``cond``.
    """
    if isinstance(cond, Condition):
        check_null_parts(cond, null_cond)
        return cond.replace(**{name: drop_condition(value, null_cond[name], drop)
                               for name, value in cond.parts().items() if name in null_cond})
    mask = drop.to(cond.device).reshape(drop.shape + (1,) * (cond.ndim - 1))
    return torch.where(mask, null_part(cond, null_cond), cond)


def cat_conditions(first: AnyCondition, second: AnyCondition) -> AnyCondition:
    """Two batches' conditions joined along the batch (tensors or Conditions)."""
    return Condition.cat([first, second]) if isinstance(first, Condition) else torch.cat([first, second])


def classifier_free_guidance(
    model: Denoiser, scale: float, null_cond: NullCondition, *, learn_sigma: bool = False
) -> Denoiser:
    """Wraps a conditional model into its guided version, in the model's own output space.

    Guidance is linear, so it applies alike to eps, x_0, v and flow outputs. Conditional and
    unconditional passes run as ONE batched forward (condition and null condition concatenated).

    Args:
        model: ``model(x_t, t, cond)``, trained with condition dropout.
        scale: the guidance scale s >= 0; 0 returns ``model`` itself (no unconditional pass).
        null_cond: the null condition the model was trained with.
        learn_sigma: the output's second half of channels is a variance: it is not guided and
            the conditional one is kept.

    Returns:
        The guided model, same signature.

    Raises:
        MedsynthError: if ``scale`` is negative (or NaN).
    """
    if not scale >= 0:
        raise MedsynthError(f"guidance scale must be >= 0 (0 is the plain conditional model), got {scale}")
    if scale == 0:
        return model

    def guided(x_t: Tensor, t: Tensor, cond: Any) -> Tensor:
        if cond is None:
            raise ValueError("classifier-free guidance needs a condition, got None")
        out = model(torch.cat([x_t, x_t]), torch.cat([t, t]), cat_conditions(cond, null_condition(cond, null_cond)))
        out_cond, out_null = out.chunk(2)
        c = x_t.shape[1] if learn_sigma else out_cond.shape[1]  # channels to guide
        # eps = eps(x | y) + s (eps(x | y) - eps(x | none))
        mean = out_cond[:, :c] + scale * (out_cond[:, :c] - out_null[:, :c])
        return torch.cat([mean, out_cond[:, c:]], dim=1)

    return guided
