"""One training loop for every recipe: a Lightning Trainer configured from :class:`TrainConfig`.

Lightning gives the loop, precision, DDP, TensorBoard, the progress bar, EMA
(``EMAWeightAveraging``) and resume; medsynth adds what it lacks:

- :class:`AtomicCheckpointIO`: checkpoints written to a temporary file, fsynced and renamed,
  so a kill during a save never leaves a corrupt ``last.ckpt`` (Lightning writes in place).
- :class:`RNGStateCallback`: Python, NumPy and torch RNG states saved in every checkpoint and
  restored on resume (Lightning does not save them).
- :func:`export_weights`: ``model.safetensors`` with the resolved config in its metadata.
"""

from __future__ import annotations

import io
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import lightning as L
import numpy as np
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback, EMAWeightAveraging, LearningRateMonitor, ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import TensorBoardLogger
from safetensors.torch import load_file, save

from medsynth.config import RecipeConfig, TrainConfig, apply_overrides, read_yaml, validate_config
from medsynth.errors import BadInputError
from medsynth.runs import Run, atomic_write_bytes


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's torch checkpoint IO, made atomic: temp file in the same folder, fsync, rename."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        atomic_write_bytes(Path(path), buffer.getvalue())

    def load_checkpoint(self, path: str | Path, map_location: Any = None, weights_only: bool | None = True) -> dict[str, Any]:
        # Never unpickle arbitrary objects: checkpoints hold tensors and plain containers only.
        return super().load_checkpoint(path, map_location=map_location, weights_only=True)


class RNGStateCallback(Callback):
    """Saves and restores the Python, NumPy and torch RNG states with each checkpoint."""

    def state_dict(self) -> dict[str, Any]:
        np_state = np.random.get_state()
        return {
            "python": random.getstate(),
            "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                      "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
            "torch": torch.get_rng_state(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        version, internal, gauss = state_dict["python"]
        random.setstate((version, tuple(internal), gauss))
        np_state = state_dict["numpy"]
        np.random.set_state(("MT19937", np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                             np_state["has_gauss"], np_state["cached_gaussian"]))
        torch.set_rng_state(state_dict["torch"])


class MedsynthModule(L.LightningModule):
    """Base LightningModule: holds the recipe config and builds the optimiser from ``config.train``."""

    def __init__(self, config: RecipeConfig):
        super().__init__()
        self.config = config

    def configure_optimizers(self) -> Any:
        train = self.config.train
        optimizer = torch.optim.AdamW(self.parameters(), lr=train.lr, weight_decay=train.weight_decay)
        if train.lr_schedule == "constant":
            return optimizer
        steps = self.trainer.estimated_stepping_batches
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, int(steps)), eta_min=train.lr * 0.05)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def build_trainer(train: TrainConfig, run: Run, monitor: str | None = "val/loss", monitor_mode: str = "min",
                  progress: bool = True, extra_callbacks: Sequence[Callback] = ()) -> L.Trainer:
    """A Trainer writing into the run directory (checkpoints, TensorBoard).

    Args:
        train: the loop settings (epochs, precision, devices, accumulation, step checkpoints).
        run: the run directory.
        monitor: the logged metric that picks ``best.ckpt`` (None: no best checkpoint).
        monitor_mode: ``"min"`` or ``"max"`` (the recipe's ``monitor_mode``).
        progress: show a progress bar.
        extra_callbacks: the recipe's own callbacks (``Recipe.callbacks(config)``).
    """
    if monitor_mode not in ("min", "max"):
        raise ValueError(f"monitor_mode must be 'min' or 'max', got {monitor_mode!r}")
    checkpoint = ModelCheckpoint(
        dirpath=run.checkpoints, filename="best", monitor=monitor, mode=monitor_mode,
        save_top_k=1 if monitor else 0, save_last=True, every_n_epochs=1, enable_version_counter=False,
    )
    callbacks: list[Callback] = [checkpoint, RNGStateCallback(), LearningRateMonitor(logging_interval="epoch")]
    if train.checkpoint_every_n_steps is not None:
        # A second checkpoint callback that only refreshes last.ckpt, every N optimiser steps.
        callbacks.append(ModelCheckpoint(dirpath=run.checkpoints, save_top_k=0, save_last=True,
                                         every_n_train_steps=train.checkpoint_every_n_steps, enable_version_counter=False))
    if progress:
        callbacks.append(TQDMProgressBar(refresh_rate=10))
    if train.ema_decay is not None:
        callbacks.append(EMAWeightAveraging(decay=train.ema_decay))
    callbacks.extend(extra_callbacks)
    return L.Trainer(
        default_root_dir=run.path,
        max_epochs=train.max_epochs,
        accelerator=train.accelerator,
        devices=train.devices,
        num_nodes=train.num_nodes,
        strategy=train.strategy,
        precision=train.precision,
        gradient_clip_val=train.grad_clip,
        accumulate_grad_batches=train.accumulate_grad_batches,
        logger=TensorBoardLogger(save_dir=str(run.path), name="tb", version="", default_hp_metric=False),
        callbacks=callbacks,
        plugins=[AtomicCheckpointIO()],
        log_every_n_steps=train.log_every_n_steps,
        enable_progress_bar=progress,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )


def seed_everything(train: TrainConfig) -> None:
    if train.num_threads is not None:
        torch.set_num_threads(train.num_threads)
    L.seed_everything(train.seed, workers=True, verbose=False)


def export_weights(module: torch.nn.Module, config: RecipeConfig, path: Path) -> Path:
    """Write the module's weights as safetensors; the resolved config rides in the metadata."""
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in module.state_dict().items()}
    atomic_write_bytes(path, save(state, metadata={"config": config.model_dump_json()}))
    return path


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from ``model.safetensors`` or a Lightning ``.ckpt``, read safely (never unpickled).

    A truncated, corrupt or foreign file is refused with one line naming it.
    """
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    except Exception as exc:  # truncated, corrupt or foreign files fail in many ways
        raise BadInputError(path, f"cannot read weights ({type(exc).__name__})") from None


def load_state(module: torch.nn.Module, path: Path) -> torch.nn.Module:
    """Load a weights file into ``module``; weights of another architecture get one line."""
    try:
        module.load_state_dict(read_weights(path))
    except RuntimeError as exc:
        raise BadInputError(path, f"weights do not fit this model ({str(exc).splitlines()[0]})") from None
    return module


def weights_of(run: Run) -> Path:
    """The run's weights file: ``model.safetensors``, or ``last.ckpt`` when training never finished."""
    for path in (run.weights_path, run.last_checkpoint):
        if path.exists():
            return path
    raise BadInputError(run.path, "run has no weights yet (no model.safetensors or checkpoints/last.ckpt)")


class RecipeLike(Protocol):
    """What :func:`load_module` needs of a recipe (the ground floor does not import ``recipes/``)."""

    name: str
    config_class: type[RecipeConfig]

    def build_module(self, config: Any) -> MedsynthModule: ...


def load_module(run: str | Path | Run, recipe: RecipeLike, overrides: Sequence[str] = ()) -> MedsynthModule:
    """The trained module of a run, built by the recipe passed in, weights loaded safely, eval mode.

    Used by the API and by any recipe that loads another run (sdm's high stage loads its low-res
    run). ``overrides`` (``sample.guidance=2``) change the loaded config for this use only.
    """
    opened = run if isinstance(run, Run) else Run.open(run)
    saved = read_yaml(opened.config_path)
    if saved.get("recipe") != recipe.name:
        raise BadInputError(opened.path, f"is a '{saved.get('recipe')}' run, not a '{recipe.name}' run")
    config = validate_config(recipe.config_class, apply_overrides(saved, list(overrides)), str(opened.config_path))
    if config.train.num_threads is not None:
        torch.set_num_threads(config.train.num_threads)
    return load_state(recipe.build_module(config), weights_of(opened)).eval()
