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
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback, EMAWeightAveraging, LearningRateMonitor, ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import TensorBoardLogger
from safetensors.torch import load_file, save

from medsynth.config import RecipeConfig, TrainConfig
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


def build_trainer(train: TrainConfig, run: Run, monitor: str | None = "val/loss", progress: bool = True,
                  extra_callbacks: list[Callback] | None = None) -> L.Trainer:
    """A Trainer writing into the run directory (checkpoints, TensorBoard)."""
    checkpoint = ModelCheckpoint(
        dirpath=run.checkpoints, filename="best", monitor=monitor, mode="min",
        save_top_k=1 if monitor else 0, save_last=True, every_n_epochs=1, enable_version_counter=False,
    )
    callbacks: list[Callback] = [checkpoint, RNGStateCallback(), LearningRateMonitor(logging_interval="epoch")]
    if progress:
        callbacks.append(TQDMProgressBar(refresh_rate=10))
    if train.ema_decay is not None:
        callbacks.append(EMAWeightAveraging(decay=train.ema_decay))
    callbacks.extend(extra_callbacks or [])
    return L.Trainer(
        default_root_dir=run.path,
        max_epochs=train.max_epochs,
        accelerator=train.accelerator,
        devices=train.devices,
        num_nodes=train.num_nodes,
        strategy=train.strategy,
        precision=train.precision,
        gradient_clip_val=train.grad_clip,
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


def load_weights(module: torch.nn.Module, run: Run) -> torch.nn.Module:
    """Load ``model.safetensors`` (or, if training never finished, ``last.ckpt`` safely)."""
    if run.weights_path.exists():
        state = load_file(str(run.weights_path))
    elif run.last_checkpoint.exists():
        state = torch.load(run.last_checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    else:
        raise BadInputError(run.path, "run has no weights yet (no model.safetensors or checkpoints/last.ckpt)")
    try:
        module.load_state_dict(state)
    except RuntimeError as exc:
        raise BadInputError(run.path, f"weights do not match the run's config ({str(exc).splitlines()[0]})") from None
    return module.eval()
