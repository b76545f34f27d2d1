from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from medsynth.runs import atomic_write_bytes
from medsynth.training import AtomicCheckpointIO, RNGStateCallback


def test_atomic_checkpoint_survives_a_failed_save(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "epoch": 1}, path)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("medsynth.runs.os.replace", crash)
    with pytest.raises(OSError):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}, "epoch": 2}, path)
    loaded = io.load_checkpoint(path)
    assert loaded["epoch"] == 1 and torch.equal(loaded["state_dict"]["w"], torch.ones(3))


def test_checkpoints_load_without_unpickling_code(tmp_path):
    path = tmp_path / "evil.ckpt"
    atomic_write_bytes(path, __import__("pickle").dumps({"x": np.random.RandomState(0)}))
    with pytest.raises(Exception):
        AtomicCheckpointIO().load_checkpoint(path)


def test_rng_state_round_trip():
    callback = RNGStateCallback()
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    state = callback.state_dict()
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(99), np.random.seed(99), random.seed(99)
    callback.load_state_dict(state)
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1])
    assert random.random() == expected[2]
