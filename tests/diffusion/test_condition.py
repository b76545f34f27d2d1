"""Structured conditions: the null condition and drop-out of the named parts."""

from __future__ import annotations

import pytest
import torch

from diffusion_toys import NULL, structured_condition
from medsynth.diffusion import drop_condition, null_condition


def test_null_and_drop_of_a_structured_condition():
    cond = structured_condition()
    null = null_condition(cond, NULL)
    assert (null.seg == 0).all() and (null.class_labels == 5).all()
    assert torch.equal(null.concat, cond.concat) and torch.equal(null.vector, cond.vector)  # parts not named are kept
    dropped = drop_condition(cond, NULL, torch.tensor([True, False, True, False]))
    assert dropped.class_labels.tolist() == [5, 1, 5, 3] and dropped.seg.flatten(1).amax(1).tolist() == [0, 1, 0, 1]
    assert torch.equal(dropped.concat, cond.concat)
    with pytest.raises(ValueError, match="unknown parts"):
        null_condition(cond, {"labels": torch.tensor(0)})
