from __future__ import annotations

import pickle
import random

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader

from medsynth.config import TrainConfig
from medsynth.runs import Run, atomic_write_bytes
from medsynth.training import AtomicCheckpointIO, RNGStateCallback, build_trainer


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
    atomic_write_bytes(path, pickle.dumps({"x": np.random.RandomState(0)}))
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
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


class _Tiny(L.LightningModule):
    """y = w x on random data: the smallest module a Trainer can fit."""

    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch).pow(2).mean()

    def train_dataloader(self):
        return DataLoader(torch.randn(6, 2), batch_size=1)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class _LastCheckpointSpy(Callback):
    """Records, before every batch, the global step saved in last.ckpt (None while there is none)."""

    def __init__(self, path):
        self.path, self.seen = path, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen.append(torch.load(self.path, weights_only=True)["global_step"] if self.path.exists() else None)


@pytest.mark.parametrize("every", [None, 2])
def test_step_checkpoints_write_last_ckpt_mid_epoch(tmp_path, every):
    run = Run.create(tmp_path / "run")
    spy = _LastCheckpointSpy(run.last_checkpoint)
    train = TrainConfig(max_epochs=1, checkpoint_every_n_steps=every, accumulate_grad_batches=2, grad_clip=None)
    trainer = build_trainer(train, run, monitor=None, progress=False, extra_callbacks=[spy])
    trainer.fit(_Tiny())
    assert trainer.global_step == 3  # 6 batches, gradients of 2 summed per optimiser step
    if every is None:  # per epoch only: nothing mid-epoch
        assert spy.seen == [None] * 6
    else:  # refreshed after optimiser steps 2 (batch 4); batches before see none
        assert spy.seen == [None, None, None, None, 2, 2]
    assert torch.load(run.last_checkpoint, weights_only=True)["global_step"] == 3


def test_build_trainer_takes_the_monitor_mode(tmp_path):
    trainer = build_trainer(TrainConfig(), Run.create(tmp_path / "run"), monitor="val/score", monitor_mode="max", progress=False)
    assert trainer.checkpoint_callback.mode == "max"
    with pytest.raises(ValueError, match="monitor_mode"):
        build_trainer(TrainConfig(), Run.create(tmp_path / "other"), monitor_mode="up", progress=False)
