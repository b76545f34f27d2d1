"""One training loop for every recipe: a Lightning Trainer configured from :class:`TrainConfig`.

Lightning gives the loop, precision, DDP, TensorBoard, the progress bar, EMA
(``EMAWeightAveraging``) and resume; medsynth adds what it lacks:

- :class:`AtomicCheckpointIO`: checkpoints written to a temporary file, fsynced and renamed,
  so a kill during a save never leaves a corrupt ``last.ckpt`` (Lightning writes in place).
- :class:`RNGStateCallback`: Python, NumPy and torch RNG states saved in every checkpoint and
  restored on resume (Lightning does not save them).
- :class:`FiniteGuard`: stops at the first non-finite loss (before its backward pass) and refuses to
  checkpoint non-finite weights, raising :class:`~medsynth.errors.DivergedError`.
- :func:`fit`: ``Trainer.fit`` with Ctrl-C as :class:`~medsynth.errors.TrainingInterrupted`
  (Lightning turns it into ``sys.exit(1)``).
- :func:`export_weights`: ``model.safetensors`` with the resolved config in its metadata.
"""

from __future__ import annotations

import io
import math
import pickle
import random
import signal
import threading
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import lightning as L
import numpy as np
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback, EMAWeightAveraging, LearningRateMonitor, ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import TensorBoardLogger
from safetensors.torch import load_file, save

from medsynth.config import RecipeConfig, TrainConfig, load_config, read_yaml
from medsynth.console import LOG_NAME, RunLog, lightning_to_log, note
from medsynth.errors import BadInputError, DivergedError, MedsynthError, TrainingInterrupted
from medsynth.runs import Run, atomic_write_bytes, atomic_write_json, read_structured


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

    def log_losses(self, split: str, losses: dict[str, torch.Tensor], batch_size: int) -> None:
        """Log a step's named losses as ``<split>/<name>``. ``train``: every ``train.log_every_n_steps`` steps, per step
        (aggregating over the epoch costs ~5 % of a CPU step); ``val``: averaged over the epoch and the devices, in the
        progress bar (``val/loss`` is what checkpoints monitor)."""
        if split != "train":
            self.log_dict({f"{split}/{k}": v for k, v in losses.items()}, prog_bar=True, on_epoch=True, batch_size=batch_size, sync_dist=True)
        elif self.global_step % self.config.train.log_every_n_steps == 0:
            self.log_dict({f"train/{k}": v.detach() for k, v in losses.items()}, on_step=True, on_epoch=False, batch_size=batch_size)

    def configure_optimizers(self) -> Any:
        train = self.config.train
        lr = scaled_lr(train)
        optimizer = torch.optim.AdamW(self.parameters(), lr=lr, weight_decay=train.weight_decay)
        if train.lr_schedule == "constant":
            return optimizer
        steps = self.trainer.estimated_stepping_batches
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, int(steps)), eta_min=lr * 0.05)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def warmed_up(module: L.LightningModule, weight: float, warmup_epochs: float) -> float:
    """``weight`` ramped linearly from 0 over the first ``warmup_epochs`` epochs of the module's training (a VAE's KL
    warm-up); the full weight outside a Trainer, when the epoch's batches are unknown, or with no warm-up."""
    trainer = module._trainer
    if warmup_epochs <= 0 or trainer is None or trainer.num_training_batches in (0, float("inf")):
        return weight
    return weight * min(1.0, trainer.global_step / (warmup_epochs * trainer.num_training_batches))


def staged_optimizer(module: MedsynthModule, networks: Sequence[torch.nn.Module], stage_of_epoch: Callable[[int], int]) -> Any:
    """The optimiser of a module whose networks train one after another (``stage_of_epoch(epoch)`` = the index
    of the network that trains then): AdamW with one parameter group per network, each on its own cosine
    schedule over its stage's steps (``train.lr_schedule``). A network outside its stage gets no gradient,
    and AdamW skips parameters without one: no momentum drift, no weight decay."""
    train = module.config.train
    optimizer = torch.optim.AdamW([{"params": n.parameters()} for n in networks], lr=scaled_lr(train), weight_decay=train.weight_decay)
    if train.lr_schedule == "constant":
        return optimizer
    epochs = max(1, module.trainer.max_epochs)
    per_epoch = max(1, int(module.trainer.estimated_stepping_batches) // epochs)
    windows = [[e for e in range(epochs) if stage_of_epoch(e) == index] or [0] for index in range(len(networks))]

    def cosine(window: list[int]) -> Callable[[int], float]:
        start, length = window[0] * per_epoch, len(window) * per_epoch
        return lambda step: 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, max(0, step - start) / length)))  # floats: checkpoints hold no numpy

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, [cosine(w) for w in windows])
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def fit_minibatches(model: torch.nn.Module, loss_of: Callable[[torch.Tensor], torch.Tensor], count: int, *, epochs: int,
                    batch_size: int, optimizer: torch.optim.Optimizer, scheduler: Any, generator: torch.Generator) -> Any:
    """The bare minibatch loop of the small networks evaluation trains (no Lightning: seconds-long fits on tensors
    in memory): per epoch a permutation of ``range(count)`` drawn from ``generator``, and per batch of indices
    ``loss_of(indices)``, one optimiser step and one scheduler step. Returns ``model`` in eval mode."""
    model.train()
    for _ in range(epochs):
        order = torch.randperm(count, generator=generator)
        for start in range(0, count, batch_size):
            loss = loss_of(order[start:start + batch_size])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
    return model.eval()


def scaled_lr(train: TrainConfig) -> float:
    """The optimiser's learning rate: ``train.lr``, times ``effective_batch_size / batch_size`` with
    ``lr_scaling: linear`` (Goyal et al. 2017); ``none`` (the default) uses ``train.lr`` as given."""
    if train.lr_scaling == "linear" and train.effective_batch_size:
        return train.lr * train.effective_batch_size / train.batch_size
    return train.lr


def with_effective_batch(train: TrainConfig, trainer: L.Trainer) -> TrainConfig:
    """``train`` with ``effective_batch_size`` = batch_size x devices x num_nodes x accumulate_grad_batches
    (the samples per optimiser step over all processes), as the Trainer resolved them."""
    effective = train.batch_size * trainer.num_devices * trainer.num_nodes * train.accumulate_grad_batches
    return train.model_copy(update={"effective_batch_size": effective})


class FiniteGuard(Callback):
    """Stops training at the first non-finite loss, before its backward pass changes the weights, and
    refuses to write a checkpoint with non-finite weights: both raise :class:`DivergedError` naming
    the step, so the last checkpoint on disk stays the last finite one and nothing is exported."""

    def __init__(self, lr: float):
        self.lr = lr

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        if not torch.isfinite(loss.detach()).all():
            value = loss.detach().float().flatten()[0].item()
            raise DivergedError(f"training diverged: the loss is {value} at step {trainer.global_step} (epoch {trainer.current_epoch}); "
                                f"the learning rate is likely too high (train.lr={self.lr:g}): lower it, or keep train.grad_clip")

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        bad = next((name for name, tensor in pl_module.state_dict().items()
                    if tensor.is_floating_point() and not torch.isfinite(tensor).all()), None)
        if bad is not None:
            raise DivergedError(f"training diverged: weight '{bad}' is not finite at step {trainer.global_step} "
                                f"(epoch {trainer.current_epoch}); the learning rate is likely too high (train.lr={self.lr:g})")


class EpochEMA(EMAWeightAveraging):
    """Lightning's EMA of the weights, updated only from epoch ``first_epoch`` on: a recipe that trains its
    networks one stage after another (motion-ldm) averages its last stage's network from the start of that
    stage, and the frozen earlier ones stay exactly what the last stage was trained with."""

    def __init__(self, decay: float, first_epoch: int = 0):
        super().__init__(decay=decay)
        self.first_epoch, self.epoch = first_epoch, 0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.epoch = trainer.current_epoch

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        return step_idx is not None and self.epoch >= self.first_epoch


def build_trainer(train: TrainConfig, run: Run, monitor: str | None = "val/loss", monitor_mode: str = "min",
                  progress: bool = True, extra_callbacks: Sequence[Callback] = (), ema_first_epoch: int = 0) -> L.Trainer:
    """A Trainer writing into the run directory (checkpoints, TensorBoard).

    Args:
        train: the loop settings (epochs, precision, devices, accumulation, step checkpoints).
        run: the run directory.
        monitor: the logged metric that picks ``best.ckpt`` (None: no best checkpoint).
        monitor_mode: ``"min"`` or ``"max"`` (the recipe's ``monitor_mode``).
        progress: show a progress bar.
        extra_callbacks: the recipe's own callbacks (``Recipe.callbacks(config)``).
        ema_first_epoch: with ``train.ema_decay``, the epoch the weight average starts (``Recipe.ema_first_epoch``).
    """
    if monitor_mode not in ("min", "max"):
        raise ValueError(f"monitor_mode must be 'min' or 'max', got {monitor_mode!r}")
    # Without a monitored metric the one kept checkpoint is the latest, written as last.ckpt every epoch
    # (Lightning's save_last alone only writes when a top-k checkpoint was saved: never, without a monitor).
    checkpoint = ModelCheckpoint(
        dirpath=run.checkpoints, filename="best" if monitor else "last", monitor=monitor, mode=monitor_mode,
        save_top_k=1, save_last=monitor is not None, every_n_epochs=1, enable_version_counter=False,
    )
    callbacks: list[Callback] = [FiniteGuard(train.lr), checkpoint, RNGStateCallback(), LearningRateMonitor(logging_interval="epoch")]
    if train.checkpoint_every_n_steps is not None:
        # A second checkpoint callback that only refreshes last.ckpt, every N optimiser steps.
        callbacks.append(ModelCheckpoint(dirpath=run.checkpoints, save_top_k=0, save_last=True,
                                         every_n_train_steps=train.checkpoint_every_n_steps, enable_version_counter=False))
    if progress:
        callbacks.append(TQDMProgressBar(refresh_rate=10))
    if train.ema_decay is not None:
        callbacks.append(EpochEMA(train.ema_decay, ema_first_epoch))
    callbacks.extend(extra_callbacks)
    log = RunLog()  # Lightning's banner and tips, held until fit() may write RUN/train.log
    try:
        with lightning_to_log(log):
            trainer = L.Trainer(
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
    except Exception as exc:  # Lightning refuses devices, accelerators, strategies in many types
        asked = ", ".join(f"train.{key}={getattr(train, key)!r}" for key in ("accelerator", "devices", "strategy", "num_nodes", "precision"))
        raise MedsynthError(f"train: cannot train with {asked}: {one_line(exc)}") from None
    trainer.medsynth_log = log  # fit() writes these held lines first, once the run folder may be written
    return trainer


def one_line(exc: BaseException, limit: int = 300) -> str:
    """An exception's message as one line (its first line, shortened), for the CLI's one-line errors."""
    text = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def fit(trainer: L.Trainer, module: L.LightningModule, datamodule: L.LightningDataModule, run: Run,
        ckpt_path: Path | None = None) -> None:
    """``trainer.fit``, resuming from ``ckpt_path``; Ctrl-C raises :class:`TrainingInterrupted`.

    Lightning catches Ctrl-C itself, ignores SIGINT from then on and calls ``sys.exit(1)``; here the
    handler is restored and the interruption raised as ``TrainingInterrupted(run)`` (exit 130 in
    the CLI). A :class:`DivergedError` gets the state of the run's last checkpoint added.
    """
    main_thread = threading.current_thread() is threading.main_thread()
    handler = signal.getsignal(signal.SIGINT) if main_thread else None
    log = getattr(trainer, "medsynth_log", None) or RunLog()
    if trainer.is_global_zero:  # Lightning's notices go to the run's log, not the console
        log.open(run.path / LOG_NAME)
    try:
        with lightning_to_log(log):
            trainer.fit(module, datamodule, ckpt_path=ckpt_path, weights_only=True)
    except SystemExit:
        if trainer.interrupted:
            raise TrainingInterrupted(run.path, resumable=run.last_checkpoint.exists()) from None
        raise
    except DivergedError as exc:
        kept = (f"kept the last finite checkpoint {run.last_checkpoint} (epoch {_epoch_of(run.last_checkpoint)})"
                if run.last_checkpoint.exists() else "no checkpoint was written")
        if trainer.is_global_zero:  # read by weights_of: sample/evaluate refuse the checkpoint of a diverged run
            atomic_write_json(run.path / DIVERGED_NAME, {"message": str(exc), "checkpoint_step": _step_of(run.last_checkpoint)})
        raise DivergedError(f"{exc}; {kept}; no weights exported") from None
    finally:
        if main_thread and handler is not None:
            signal.signal(signal.SIGINT, handler)
    if trainer.interrupted:  # a Ctrl-C that Lightning handled without exiting
        raise TrainingInterrupted(run.path, resumable=run.last_checkpoint.exists())


def _epoch_of(path: Path) -> int | str:
    try:
        return int(read_checkpoint(path)["epoch"])
    except (BadInputError, KeyError, TypeError, ValueError):
        return "?"


def _step_of(path: Path) -> int | None:
    """The global step a checkpoint was saved at (``None``: no checkpoint, or unreadable)."""
    try:
        return int(read_checkpoint(path)["global_step"]) if path.exists() else None
    except (BadInputError, KeyError, TypeError, ValueError):
        return None


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
    if path.suffix != ".safetensors":
        checkpoint = read_checkpoint(path)
        if not isinstance(checkpoint.get("state_dict"), dict):
            raise BadInputError(path, "not a Lightning checkpoint (no state_dict)")
        return checkpoint["state_dict"]
    try:
        return load_file(str(path))
    except Exception as exc:  # truncated, corrupt or foreign files fail in many ways
        raise BadInputError(path, f"cannot read weights ({type(exc).__name__}: {one_line(exc, 120)})") from None


def read_checkpoint(path: Path) -> dict[str, Any]:
    """A Lightning checkpoint read safely (``weights_only``: tensors and plain containers, never
    code from a pickle); a truncated, corrupt, foreign or pickled-object file is refused with one line."""
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols before refusing a foreign file
            warnings.simplefilter("ignore")
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        kind = "holds objects other than tensors (refused: never unpickled)" if isinstance(exc, pickle.UnpicklingError) \
            else f"truncated or corrupt checkpoint ({type(exc).__name__}: {one_line(exc, 120)})"
        raise BadInputError(path, kind) from None
    if not isinstance(checkpoint, dict):
        raise BadInputError(path, f"not a Lightning checkpoint (holds a {type(checkpoint).__name__})")
    return checkpoint


def load_state(module: torch.nn.Module, path: Path) -> torch.nn.Module:
    """Load a weights file into ``module``; weights of another architecture get one line."""
    try:
        module.load_state_dict(read_weights(path))
    except RuntimeError as exc:
        raise BadInputError(path, f"weights do not fit this model ({str(exc).splitlines()[0]})") from None
    return module


DIVERGED_NAME = "diverged.json"  # RUN/diverged.json: written by fit() when training diverged (message, step of last.ckpt)


def weights_of(run: Run) -> Path:
    """The run's weights file: ``model.safetensors``, or ``last.ckpt`` when training never finished (one line says
    so, with its epoch).

    Raises:
        BadInputError: no weights at all.
        DivergedError: no ``model.safetensors`` and ``last.ckpt`` is the last finite checkpoint of a training that
            diverged (``RUN/diverged.json`` names it): its weights are those of a model already failing.
    """
    if run.weights_path.exists():
        return run.weights_path
    if not run.last_checkpoint.exists():
        raise BadInputError(run.path, "run has no weights yet (no model.safetensors or checkpoints/last.ckpt)")
    marker = run.path / DIVERGED_NAME
    if marker.is_file():
        record = read_structured(marker, "divergence record")
        if record.get("checkpoint_step") == _step_of(run.last_checkpoint):  # a later resume wrote a newer checkpoint
            detail = str(record.get("message", "a non-finite loss")).removeprefix("training diverged: ")
            raise DivergedError(f"{run.path}: training diverged ({detail}); no model.safetensors, "
                                f"and {run.last_checkpoint} is its last finite checkpoint, not a trained model: lower train.lr "
                                f"and train again (or start from it: --init {run.last_checkpoint} --out NEW)")
    note(f"{run.path}: no model.safetensors (training did not finish); using {run.last_checkpoint} from epoch "
         f"{_epoch_of(run.last_checkpoint)}")
    return run.last_checkpoint


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
    config = load_config(recipe.config_class, None, overrides, base=saved, source=str(opened.config_path))
    return load_state(recipe.build_module(config), weights_of(opened)).eval()


def use_threads(module: MedsynthModule) -> MedsynthModule:
    """Apply the run's ``train.num_threads`` to this process (the commands that use a loaded run: sample, evaluate);
    not done by :func:`load_module`, which recipes also call to load another run."""
    threads = module.config.train.num_threads
    if threads is not None:
        torch.set_num_threads(threads)
    return module
