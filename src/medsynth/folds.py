"""Cross-validation fold sets: K full runs of a recipe, one per subject-wise fold, under one folder.

``api.train(folds=K)`` starts a fold set (:func:`train_folds`), ``api.train(resume=SET)``
continues it (:func:`resume_folds`) and ``api.evaluate(SET)`` evaluates every fold
(:func:`evaluate_folds`). Each fold is one ordinary run: the API hands in its own ``train`` and
``evaluate`` (:data:`TrainRun`, :data:`EvaluateRun`), so this module sits beside :mod:`medsynth.api`
without importing it (no import circle) and only orchestrates the folds (the layout and summary
helpers live in :mod:`medsynth.runs`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from medsynth.console import note
from medsynth.errors import BadInputError, MedsynthError
from medsynth.recipes import get_recipe
from medsynth.runs import Run, atomic_write_json, fold_summary

TrainRun = Callable[..., Run]  # medsynth.api.train
EvaluateRun = Callable[[Path], dict[str, Any]]  # medsynth.api.evaluate of one run


def train_folds(train: TrainRun, recipe: str | None, data: str | Path | None, folds: int, config: str | Path | None = None,
                overrides: list[str] | tuple[str, ...] = (), out: str | Path | None = None, force: bool = False,
                progress: bool = True, init: str | Path | None = None, seed: int | None = None,
                only: Sequence[int] | None = None) -> Run:
    """K-fold cross-validation by subject: ``folds`` full runs ``OUT/fold-<i>/`` of ``recipe`` on ``data``.

    Fold ``i`` holds out the subjects :func:`~medsynth.data.splits.fold_assignments` gives it
    (its test split; classes spread evenly over the folds); the others are split into train/val by the prepared dataset's
    ``val_fraction``. Its data is a view, ``OUT/fold-<i>/data/dataset.json`` naming the prepared
    files (:func:`~medsynth.data.splits.fold_view`). ``folds`` = the number of subjects is
    leave-one-out. ``OUT/folds.json`` records the set::

        {"recipe": "cvae", "folds": K, "seed": S, "data_dir": "/abs/prepared",
         "config": "/abs/config.yaml" | null, "overrides": ["train.max_epochs=5", ...],
         "init": "/abs/weights" | null, "subjects": [[held-out subjects of fold 0], ...]}

    Folds run in sequence, each as ``train`` (:func:`medsynth.api.train`) runs it (its own devices setting). With
    several devices they could run in parallel, one process per device (``CUDA_VISIBLE_DEVICES=i
    medsynth train --resume OUT`` claiming unstarted folds); that dispatcher is not written yet,
    so several devices serve each fold in turn.

    Args:
        train: :func:`medsynth.api.train`, which trains each fold.
        seed: of the fold assignment (default: the prepared dataset's split seed).
        only: train only these folds now (the others start on ``train(resume=OUT)``).

    Raises:
        BadInputError: ``folds`` larger than the number of subjects (names ``data``), or ``data``
            not a prepared dataset.
        MedsynthError: ``OUT`` already holds a run or fold set (without ``force``).
    """
    from medsynth.config import resolve_config_path
    from medsynth.data.datasets import load_prepared_manifest
    from medsynth.data.splits import fold_assignments, subject_strata

    if recipe is None or data is None:
        raise MedsynthError("train --folds: name a recipe and --data DIR (a prepared dataset)")
    chosen = get_recipe(recipe)
    manifest = load_prepared_manifest(data)
    subjects = manifest.subjects()
    if folds > len(subjects):
        raise BadInputError(data, f"--folds {folds} is larger than the number of subjects ({len(subjects)})")
    seed = int((manifest.prepare or {}).get("settings", {}).get("seed", 0)) if seed is None else seed
    fold_set = Run(Path(out or Path("runs") / f"{chosen.name}-folds-{time.strftime('%Y%m%d-%H%M%S')}"))
    fold_set.check_new(force)
    with fold_set.lock():
        atomic_write_json(fold_set.folds_path, {
            "recipe": chosen.name, "folds": folds, "seed": seed, "data_dir": str(Path(data).resolve()),
            "config": str(resolve_config_path(config).resolve()) if config is not None else None,
            "overrides": list(overrides), "init": str(Path(init).resolve()) if init is not None else None,
            "subjects": fold_assignments(subjects, folds, seed, strata=subject_strata(manifest.cases))})
        return resume_folds(train, fold_set.path, progress=progress, only=only, fresh=force)


def resume_folds(train: TrainRun, run: str | Path, config: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                 progress: bool = True, only: Sequence[int] | None = None, fresh: bool = False) -> Run:
    """Train the folds of a fold set that are not finished: a fold with ``model.safetensors`` is
    done (skipped), one with ``checkpoints/last.ckpt`` is resumed (``config``/``overrides`` as
    for a resumed run), any other starts from its ``folds.json`` settings plus ``overrides``."""
    fold_set = Run.open(run)
    with fold_set.lock():
        _train_folds_left(train, fold_set, config, overrides, progress, only, fresh)
    return fold_set


def _train_folds_left(train: TrainRun, fold_set: Run, config: str | Path | None, overrides: list[str] | tuple[str, ...], progress: bool,
                      only: Sequence[int] | None, fresh: bool) -> None:
    from medsynth.data.splits import fold_view

    spec = fold_set.read_folds()
    for index, held_out in enumerate(spec["subjects"]):
        fold = fold_set.fold(index)
        if only is not None and index not in only:
            continue
        if fold.weights_path.exists() and not fresh:
            note(f"{fold.path}: trained, skipped")
            continue
        if fold.last_checkpoint.exists() and not fresh:
            train(resume=fold.path, config=config, overrides=overrides, progress=progress)
            continue
        view = fold_view(spec["data_dir"], held_out, fold.path / "data", seed=int(spec["seed"]))
        train(spec["recipe"], data=view, config=spec.get("config") if config is None else config,
              overrides=[*spec.get("overrides", []), *overrides], out=fold.path, force=True, progress=progress,
              init=spec.get("init"))


def evaluate_folds(evaluate: EvaluateRun, run: str | Path) -> dict[str, Any]:
    """Evaluate every fold of a fold set on its held-out subjects (each fold's metrics.json stays) and
    write ``RUN/metrics.json``: ``folds`` and every numeric metric as ``<key>_per_fold``, ``<key>_mean``
    and ``<key>_sd`` (:func:`~medsynth.runs.fold_summary`)."""
    fold_set = Run.open(run)
    spec = fold_set.read_folds()
    with fold_set.lock():
        per_fold = []
        for index in range(int(spec["folds"])):
            fold = fold_set.fold(index)
            if not fold.weights_path.exists():
                raise MedsynthError(f"{fold.path}: fold {index} is not trained yet; run `medsynth train --resume {fold_set.path}`")
            per_fold.append(evaluate(fold.path))
        return fold_set.write_metrics({"folds": int(spec["folds"]), **fold_summary(per_fold)})
