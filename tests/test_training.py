from __future__ import annotations

import math
import pickle
import random
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader

from medsynth.config import TrainConfig
from medsynth.errors import BadInputError, DivergedError, MedsynthError
from medsynth.runs import Run, atomic_write_bytes
from medsynth.training import (
    AtomicCheckpointIO,
    EpochEMA,
    MedsynthModule,
    RNGStateCallback,
    build_trainer,
    fit,
    read_checkpoint,
    scaled_lr,
    staged_optimizer,
    with_effective_batch,
)


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


@pytest.mark.parametrize("monitor", [None, "train_loss"])
def test_last_ckpt_is_written_after_every_epoch_with_or_without_a_monitor(tmp_path, monitor):
    """A killed run resumes from its last finished epoch: last.ckpt exists after epoch 0 (a recipe without a
    monitored metric, motion-ldm, once got it only at the end of training)."""

    class Logged(_Tiny):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            self.log("train_loss", loss, on_epoch=True, on_step=False)
            return loss

    run = Run.create(tmp_path / "run")
    spy = _LastCheckpointSpy(run.last_checkpoint)
    trainer = build_trainer(TrainConfig(max_epochs=2, grad_clip=None), run, monitor=monitor, progress=False, extra_callbacks=[spy])
    trainer.fit(Logged())
    assert spy.seen == [None] * 6 + [6] * 6  # the second epoch starts from the first one's checkpoint
    assert torch.load(run.last_checkpoint, weights_only=True)["epoch"] == 1
    assert (run.checkpoints / "best.ckpt").exists() == (monitor is not None)


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


class _Diverging(_Tiny):
    """The loss turns infinite at optimiser step ``at``."""

    def __init__(self, at: int):
        super().__init__()
        self.at = at

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * float("inf") if self.global_step >= self.at else loss


def test_a_non_finite_loss_stops_before_its_step_and_is_never_checkpointed(tmp_path):
    run = Run.create(tmp_path / "run")
    trainer = build_trainer(TrainConfig(max_epochs=1, checkpoint_every_n_steps=1, grad_clip=None, lr=0.5), run, monitor=None, progress=False)
    module = _Diverging(at=3)
    with pytest.raises(DivergedError, match=r"the loss is inf at step 3 \(epoch 0\); the learning rate is likely too high \(train.lr=0.5\)"):
        fit(trainer, module, None, run)
    assert all(torch.isfinite(p).all() for p in module.parameters())  # stopped before the backward pass
    assert torch.load(run.last_checkpoint, weights_only=True)["global_step"] == 3


def test_non_finite_weights_are_never_checkpointed(tmp_path):
    run = Run.create(tmp_path / "run")
    trainer = build_trainer(TrainConfig(max_epochs=1, checkpoint_every_n_steps=2, grad_clip=None), run, monitor=None, progress=False)
    module = _Tiny()

    class Poison(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 4:  # after the update, before the step-4 checkpoint
                pl_module.layer.weight.data.fill_(float("nan"))

    trainer.callbacks.insert(0, Poison())
    with pytest.raises(DivergedError, match="weight 'layer.weight' is not finite at step 4"):
        fit(trainer, module, None, run)
    assert torch.load(run.last_checkpoint, weights_only=True)["global_step"] == 2


def test_effective_batch_and_linear_lr_scaling(tmp_path):
    train = TrainConfig(batch_size=8, accumulate_grad_batches=3, lr=1e-3, num_nodes=2, devices=2, accelerator="cpu", strategy="ddp")
    trainer = build_trainer(train, Run(tmp_path / "run"), progress=False)
    resolved = with_effective_batch(train, trainer)
    assert resolved.effective_batch_size == 8 * 2 * 2 * 3 and scaled_lr(resolved) == 1e-3
    assert scaled_lr(resolved.model_copy(update={"lr_scaling": "linear"})) == pytest.approx(1e-3 * 12)


def test_lightning_refusals_are_one_line_naming_the_settings(tmp_path):
    with pytest.raises(MedsynthError, match=r"^train: cannot train with train.accelerator='auto', train.devices='abc'.*: `devices` selected"):
        build_trainer(TrainConfig(devices="abc"), Run(tmp_path / "run"), progress=False)
    assert not (tmp_path / "run").exists()


def test_read_checkpoint_refuses_truncated_and_pickled_files(tmp_path):
    path = tmp_path / "x.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "epoch": 0}, path)
    assert read_checkpoint(path)["epoch"] == 0
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(BadInputError, match="truncated or corrupt checkpoint"):
        read_checkpoint(path)
    path.write_bytes(pickle.dumps({"x": np.random.RandomState(0)}))
    with pytest.raises(BadInputError, match=r"holds objects other than tensors \(refused: never unpickled\)"):
        read_checkpoint(path)


def test_epoch_ema_updates_only_from_its_first_epoch():
    ema = EpochEMA(decay=0.9, first_epoch=2)
    for epoch, expected in [(0, False), (1, False), (2, True), (3, True)]:
        ema.on_train_epoch_start(SimpleNamespace(current_epoch=epoch), None)
        assert ema.should_update(step_idx=7) is expected
        assert ema.should_update(epoch_idx=epoch) is False  # per step only, never at epoch ends
    assert EpochEMA(decay=0.9).should_update(step_idx=0)  # from the start by default


class _Staged(MedsynthModule):
    """Two networks trained one after another: network ``stage_of_epoch(epoch)`` alone gets the loss's gradient
    (the second stage reads the first one's output without a gradient, as motion-ldm's later stages do)."""

    def __init__(self, train: TrainConfig):
        super().__init__(SimpleNamespace(train=train))
        torch.manual_seed(0)
        self.first, self.second = torch.nn.Linear(2, 2), torch.nn.Linear(2, 1)
        self.stage_of_epoch = lambda epoch: 0 if epoch < 1 else 1

    def training_step(self, batch, batch_idx):
        if self.stage_of_epoch(self.current_epoch) == 0:
            return (self.first(batch) - 1.0).pow(2).mean()
        with torch.no_grad():
            hidden = self.first(batch)
        return (self.second(hidden) - 1.0).pow(2).mean()

    def train_dataloader(self):
        return DataLoader(torch.randn(8, 2, generator=torch.Generator().manual_seed(1)), batch_size=2)  # 4 steps per epoch

    def configure_optimizers(self):
        return staged_optimizer(self, (self.first, self.second), self.stage_of_epoch)


class _StageSpy(Callback):
    """Records the weights of both networks at each epoch's start and end, and each group's lr before every step."""

    def __init__(self):
        self.weights, self.lrs = [], []

    def _record(self, module):
        self.weights.append([torch.cat([p.detach().clone().flatten() for p in net.parameters()]) for net in (module.first, module.second)])

    def on_train_epoch_start(self, trainer, pl_module):
        self._record(pl_module)

    def on_train_epoch_end(self, trainer, pl_module):
        self._record(pl_module)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.lrs.append([group["lr"] for group in trainer.optimizers[0].param_groups])


def test_staged_optimizer_trains_one_network_per_stage_each_on_its_own_cosine():
    lr = 0.05
    spy = _StageSpy()
    # Weight decay on: AdamW would shrink a frozen network's weights if it stepped them at all.
    module = _Staged(TrainConfig(max_epochs=2, lr=lr, weight_decay=0.1))
    trainer = L.Trainer(max_epochs=2, callbacks=[spy], logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu")
    trainer.fit(module)
    (first_0, second_0), (first_1, second_1), (first_2, second_2), (first_3, second_3) = spy.weights
    assert not torch.equal(first_0, first_1) and torch.equal(second_0, second_1)  # epoch 0: the first network alone
    assert torch.equal(first_2, first_3) and not torch.equal(second_2, second_3)  # epoch 1: the second alone
    assert len(trainer.optimizers[0].param_groups) == 2
    lrs = np.array(spy.lrs)  # (steps, groups): 4 steps per epoch
    assert lrs.shape == (8, 2)
    # Each group's cosine starts at the full lr at its own stage's first step and decays over that stage's 4 steps
    # to no lower than 5 % of it; the second group waits at the full lr until its stage, then repeats the first's curve.
    assert lrs[0, 0] == pytest.approx(lr) and lrs[4, 1] == pytest.approx(lr)
    assert np.all(np.diff(lrs[:4, 0]) < 0) and np.all(np.diff(lrs[4:, 1]) < 0)
    assert np.allclose(lrs[:4, 1], lr)
    assert np.allclose(lrs[4:, 1], lrs[:4, 0])
    cosine = [0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(4)]
    assert np.allclose(lrs[:4, 0], lr * np.array(cosine))
    assert np.allclose(lrs[4:, 0], 0.05 * lr)  # after its stage the first group rests at the floor


def test_staged_optimizer_with_a_constant_schedule_is_the_plain_optimiser():
    module = _Staged(TrainConfig(max_epochs=2, lr=0.01, lr_schedule="constant"))
    optimizer = staged_optimizer(module, (module.first, module.second), module.stage_of_epoch)
    assert isinstance(optimizer, torch.optim.AdamW) and [g["lr"] for g in optimizer.param_groups] == [0.01, 0.01]
