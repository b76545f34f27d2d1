"""Training-step overhead of medsynth's ``cvae`` recipe against a bare PyTorch loop.

Both train the same network (``ConditionalVAE``) with the same loss, optimiser, gradient
clipping, batch size and data (the prepared cilia phantom at 64 px) in one process, in
alternating rounds so machine noise hits both alike. medsynth runs through
``api.train``'s Lightning Trainer (logging, progress bar, LR schedule, RNG/EMA callbacks);
its epochs are timed by a callback from the first to the last training batch of each
epoch, the bare loop's the same way. Validation and checkpoint writing are outside
both timings and reported apart.

Both wall time and process CPU time are recorded; the overhead is judged on CPU time with
one torch thread, which other processes on a shared machine disturb far less than wall time.

    .venv/bin/python benchmarks/bench_cvae_step.py [--epochs 4] [--rounds 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import lightning as L
import torch

from medsynth import api
from medsynth.config import load_config
from medsynth.recipes import get_recipe
from medsynth.runs import Run
from medsynth.training import build_trainer, seed_everything


class EpochTimer(L.Callback):
    """Wall time from the first batch start to the last batch end of every training epoch."""

    def __init__(self) -> None:
        self.epochs: list[tuple[float, float]] = []  # (wall, cpu) seconds
        self.steps = 0

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.start = (time.perf_counter(), time.process_time())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.end = (time.perf_counter(), time.process_time())
        self.steps += 1

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.epochs.append((self.end[0] - self.start[0], self.end[1] - self.start[1]))


def medsynth_epochs(prepared: Path, epochs: int, run: Path) -> tuple[list[tuple[float, float]], int, float]:
    timer = EpochTimer()
    recipe = get_recipe("cvae")
    config = recipe.resolve_config(load_config(recipe.config_class, "cvae-tiny", [f"train.max_epochs={epochs}"],
                                                   base={"recipe": "cvae", "data_dir": str(prepared)}))
    seed_everything(config.train)
    module = recipe.build_module(config)
    trainer = build_trainer(config.train, Run.create(run, force=True), monitor=recipe.monitor, progress=True, extra_callbacks=[timer])
    start = time.perf_counter()
    trainer.fit(module, recipe.build_datamodule(config))
    total = time.perf_counter() - start
    return timer.epochs, timer.steps // epochs, total


def bare_epochs(prepared: Path, epochs: int) -> list[tuple[float, float]]:
    """The loop a user would write by hand: same model, loss, optimiser, clipping, data."""
    recipe = get_recipe("cvae")
    config = recipe.resolve_config(load_config(recipe.config_class, "cvae-tiny", [], base={"recipe": "cvae", "data_dir": str(prepared)}))
    torch.manual_seed(0)
    module = recipe.build_module(config)
    data = recipe.build_datamodule(config)  # the same loader settings (in-memory cache, augmentation)
    data.setup("fit")
    optimizer = torch.optim.AdamW(module.parameters(), lr=config.train.lr)
    beta = config.model.kl_weight
    times = []
    module.train()
    for _ in range(epochs):
        start = (time.perf_counter(), time.process_time())
        for batch in data.train_dataloader():
            loss = module._losses(batch, beta)["loss"]
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(module.parameters(), config.train.grad_clip)
            optimizer.step()
        times.append((time.perf_counter() - start[0], time.process_time() - start[1]))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--n-per-class", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="bench-cvae-"))
    api.phantom("cilia", work / "raw", n=args.n_per_class, size=64, seed=0)
    prepared = api.prepare(work / "raw", work / "prepared", size=64, normalize="none", progress=False)

    medsynth_times, bare_times, totals = [], [], []
    steps = 0
    for round_index in range(args.rounds):
        if round_index % 2:  # alternate who goes first, so drifting machine load hits both alike
            bare_times += bare_epochs(prepared, args.epochs)[1:]
        epochs, steps, total = medsynth_epochs(prepared, args.epochs, work / f"run{round_index}")
        medsynth_times += epochs[1:]  # the first epoch warms caches and allocators
        totals.append(total)
        if round_index % 2 == 0:
            bare_times += bare_epochs(prepared, args.epochs)[1:]
    def per_step(times: list[tuple[float, float]], index: int) -> float:
        return statistics.median(t[index] for t in times) / steps

    result = {
        "threads": args.threads, "images": args.n_per_class * 5, "steps_per_epoch": steps, "batch_size": 32, "size": 64,
        "medsynth_step_cpu_s": round(per_step(medsynth_times, 1), 4), "bare_step_cpu_s": round(per_step(bare_times, 1), 4),
        "overhead_cpu": round(per_step(medsynth_times, 1) / per_step(bare_times, 1) - 1.0, 4),
        "medsynth_step_wall_s": round(per_step(medsynth_times, 0), 4), "bare_step_wall_s": round(per_step(bare_times, 0), 4),
        "overhead_wall": round(per_step(medsynth_times, 0) / per_step(bare_times, 0) - 1.0, 4),
        "medsynth_fit_total_s_incl_validation_and_checkpoints": [round(t, 2) for t in totals],
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
