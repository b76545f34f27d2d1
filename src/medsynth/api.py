"""The Python API: phantom -> prepare -> train -> sample -> evaluate -> report; register; render; reconstruct.

The CLI (`medsynth ...`) calls exactly these functions (and :mod:`medsynth.demo`, which sits
above this module). Lightning, torch and the recipes are imported inside the functions that
need them, so ``import medsynth.api`` and the commands that train nothing start fast.
One function per command; fold sets are orchestrated in :mod:`medsynth.folds`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medsynth.config import dump_config, load_config, read_yaml
from medsynth.console import note
from medsynth.data.phantoms import get_phantom
from medsynth.errors import BadInputError, MedsynthError
from medsynth.recipes import RECIPES, get_recipe
from medsynth.runs import (
    Run,
    atomic_write_bytes,
    check_output,
    is_rank_zero,
    remove_stale_temps,
    write_staged,
)

RUN_DIR_VARIABLE = "MEDSYNTH_RUN_DIR"  # the run folder rank 0 chose, for the ranks Lightning starts

if TYPE_CHECKING:  # imported inside the functions that train or load a model: Lightning costs seconds
    from medsynth.recipes.base import Recipe
    from medsynth.training import MedsynthModule


def phantom(kind: str, out: str | Path, n: int = 10, seed: int = 0, size: int | None = None, progress: bool = True,
            force: bool = False, **options: Any) -> Path:
    """Write a procedural phantom dataset (see DESIGN.md, Phantoms) and return its folder.

    ``n`` is the number of images per class for ``cilia`` and of subjects otherwise;
    ``options`` are the phantom's own (``frames``: cardiac frames or lung breathing phases per
    cycle; ``modality``, ``flow_pairs``: cardiac; ``spacing``: coronary), refused if unknown.
    ``out`` must be new or empty; ``force`` replaces an earlier phantom dataset there whole.
    """
    return get_phantom(kind).make(out, n=n, seed=seed, size=size, progress=progress, force=force, **options)


def prepare(src: str | Path, out: str | Path, recipe: str | None = None, **settings: Any) -> Path:
    """Import ``src`` (any supported layout) and prepare it for training into ``out``.

    ``recipe`` fills the settings not given with that recipe's ``prepare_defaults`` (sdm: CT
    window normalisation, crop/pad to ``size`` instead of resizing).
    """
    from medsynth.data.prepare import prepare_dataset

    if recipe is not None:
        settings = {**get_recipe(recipe).prepare_defaults, **settings}
    check_output(out, [src], None, folder=True)  # an existing prepared dataset: prepare_dataset's own rule (reuse, or --force)
    return prepare_dataset(src, out, **settings)


def train(
    recipe: str | None = None,
    data: str | Path | None = None,
    config: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    out: str | Path | None = None,
    resume: str | Path | None = None,
    force: bool = False,
    progress: bool = True,
    init: str | Path | None = None,
    folds: int | None = None,
    fold_seed: int | None = None,
    only_folds: Sequence[int] | None = None,
    stage: str | None = None,
) -> Run:
    """Train a recipe into a run directory, or continue one (``resume``) with its full state.

    ``init`` (a run, ``model.safetensors`` or a ``.ckpt``) starts a new run from those weights
    (fine-tuning); the optimiser, schedule and step start afresh. ``folds`` trains a
    cross-validation fold set instead (see :func:`medsynth.folds.train_folds`; ``fold_seed`` and
    ``only_folds`` are its); ``resume`` on a fold set continues it (:func:`medsynth.folds.resume_folds`).
    """
    from medsynth.training import build_trainer, export_weights, fit, read_checkpoint, seed_everything, with_effective_batch

    if stage is not None:  # `--stage S`: one of the recipe's declared stages (Recipe.stage_choices), trained as model.stage=S
        if recipe is None and (resume is None or Run.open(resume).is_fold_set):
            raise MedsynthError(f"train --stage {stage}: name the recipe it belongs to (medsynth train RECIPE ... --stage {stage})")
        named = recipe if recipe is not None else str(read_yaml(Run.open(resume).config_path).get("recipe"))
        overrides = [*overrides, get_recipe(named).stage_setting(stage)]
    if folds is not None:
        from medsynth.folds import train_folds

        if resume is not None:
            raise MedsynthError("train: --folds starts a fold set; --resume RUN continues one (use one)")
        return train_folds(train, recipe, data, folds, config=config, overrides=overrides, out=out, force=force, progress=progress,
                           init=init, seed=fold_seed, only=only_folds)
    if resume is not None and Run.open(resume).is_fold_set:
        from medsynth.folds import resume_folds

        return resume_folds(train, resume, config=config, overrides=overrides, progress=progress, only=only_folds)
    if init is not None and resume is not None:
        raise MedsynthError("train: --init starts a new run from weights; --resume continues a run (use one)")
    # Everything is checked before the first write: settings, data, checkpoint, weights, devices.
    # Only rank 0 writes; the ranks Lightning starts for --devices N find the run rank 0 made.
    rank_zero = is_rank_zero()
    if resume is not None:
        run = Run.open(resume)
        if rank_zero:
            run.check_free()
        saved = read_yaml(run.config_path)
        chosen = get_recipe(str(saved.get("recipe")))
        if recipe is not None and recipe != chosen.name:
            raise MedsynthError(f"{run.path}: this run trains '{chosen.name}', not '{recipe}'")
        if not run.last_checkpoint.exists():
            raise BadInputError(run.path, "no checkpoints/last.ckpt to resume from")
        read_checkpoint(run.last_checkpoint)  # a truncated or foreign checkpoint is refused before anything is written
        if data is not None:
            saved["data_dir"] = str(Path(data).resolve())
        saved_lr = (saved.get("train") or {}).get("lr")
        settings = load_config(chosen.config_class, config, overrides, base=saved)
        if rank_zero and saved_lr is not None and settings.train.lr != float(saved_lr):
            note(f"{run.path}: --resume restores the optimiser and its learning-rate schedule from the checkpoint, so "
                 f"train.lr={settings.train.lr:g} does not apply; use --init {run.last_checkpoint} --out NEW for a new learning rate")
        checkpoint: Path | None = run.last_checkpoint
    else:
        if recipe is None:
            raise MedsynthError("train: name a recipe, or --resume RUN")
        chosen = get_recipe(recipe)
        if data is None:
            raise MedsynthError("train: --data DIR (a prepared dataset) is required")
        settings = load_config(chosen.config_class, config, overrides, base={"recipe": chosen.name, "data_dir": str(Path(data).resolve())})
        if out is None and not rank_zero and RUN_DIR_VARIABLE in os.environ:
            out = os.environ[RUN_DIR_VARIABLE]  # the default folder rank 0 chose
        run = Run(Path(out or Path("runs") / f"{chosen.name}-{time.strftime('%Y%m%d-%H%M%S')}"))
        if rank_zero:
            run.check_new(force)
        checkpoint = None
    if not (Path(settings.data_dir) / "dataset.json").exists():
        raise BadInputError(settings.data_dir, "not a prepared dataset (no dataset.json); run `medsynth prepare` first")
    settings = chosen.resolve_config(settings)
    chosen.check_data(settings)  # every file training reads, before the first write
    seed_everything(settings.train)
    trainer = build_trainer(settings.train, run, monitor=chosen.monitor, monitor_mode=chosen.monitor_mode, progress=progress,
                            extra_callbacks=chosen.callbacks(settings), ema_first_epoch=chosen.ema_first_epoch(settings))
    settings = settings.model_copy(update={"train": with_effective_batch(settings.train, trainer)})
    module = chosen.build_module(settings)
    if init is not None:
        load_initial_weights(module, init)
    datamodule = chosen.build_datamodule(settings)
    with run.lock() if rank_zero else contextlib.nullcontext():
        if rank_zero:
            if checkpoint is None:
                run.check_new(force)  # again, now that the lock is ours
            for folder in (run.path, run.checkpoints):
                remove_stale_temps(folder)  # left by a killed writer: no one else writes here now
            if checkpoint is not None:
                atomic_write_bytes(run.prev_config_path, run.config_path.read_bytes())
            dump_config(settings, run.config_path)
        published = out is None and rank_zero
        if published:  # Lightning's launcher starts the other ranks with this process's environment
            os.environ[RUN_DIR_VARIABLE] = str(run.path.resolve())
        try:
            fit(trainer, module, datamodule, run, ckpt_path=checkpoint)
        finally:
            if published:
                os.environ.pop(RUN_DIR_VARIABLE, None)
        if trainer.is_global_zero:
            export_weights(module, settings, run.weights_path)
    return run


def estimate(recipe: str | None, data: str | Path | None = None, config: str | Path | None = None,
             overrides: list[str] | tuple[str, ...] = (), size: Sequence[int] | None = None) -> Any:
    """``train --dry-run``: the planner's estimate (:class:`medsynth.plan.Estimate`) of a training config, writing
    nothing. The input size is the data's (``data``), else the one the config states; ``size`` overrides both."""
    from medsynth.plan import estimate as estimate_config

    if recipe is None:
        raise MedsynthError("train --dry-run: name a recipe (--resume is not estimated)")
    chosen = get_recipe(recipe)
    if data is None and config is None and size is None:
        raise MedsynthError("train --dry-run: give --data, a --config that states its input size (e.g. sdm-low-64), or --size")
    base = {"recipe": chosen.name, "data_dir": str(Path(data).resolve()) if data is not None else None}
    settings = load_config(chosen.config_class, config, overrides, base=base)
    if data is not None:
        if not (Path(data) / "dataset.json").exists():
            raise BadInputError(data, "not a prepared dataset (no dataset.json); run `medsynth prepare` first")
        settings = chosen.resolve_config(settings.model_copy(update={"data_dir": base["data_dir"]}))
    return estimate_config(settings, size)


def plan(data: str | Path, recipe: str, out: str | Path, gpu: str | None = None, memory: str | None = None,
         hours: float | None = None, config: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
         force: bool = False) -> Any:
    """``medsynth plan``: a config for ``recipe`` that fits the prepared ``data`` on ``gpu`` (or within ``memory``),
    written to ``out`` (see :func:`medsynth.plan.plan`); an existing ``out`` is kept unless ``force``."""
    from medsynth.plan import plan as make_plan

    if Path(out).exists() and not force:
        raise BadInputError(out, "exists; give --force to replace it")
    return make_plan(data, recipe, gpu=gpu, memory=memory, hours=hours, config=config, overrides=overrides, out=out)


def load_initial_weights(module: MedsynthModule, source: str | Path) -> MedsynthModule:
    """Fine-tuning: load weights from a run folder, a ``.safetensors`` file or a ``.ckpt`` (safely)."""
    from medsynth.training import load_state, weights_of

    path = Path(source)
    if path.is_dir():
        path = weights_of(Run.open(path))
    if not path.is_file():
        raise BadInputError(path, "no such weights file (--init takes a run, model.safetensors or a .ckpt)")
    return load_state(module, path)


def load_run(run: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> tuple[Run, Recipe, MedsynthModule]:
    """An existing run, its recipe and its trained module (weights loaded safely, eval mode)."""
    from medsynth.training import load_module, use_threads

    opened, chosen = open_run(run)
    return opened, chosen, use_threads(load_module(opened, chosen, overrides))


def open_run(run: str | Path) -> tuple[Run, Recipe]:
    """An existing run and its recipe, without loading weights (a fold set is refused: name one of its folds)."""
    opened = Run.open(run)
    if opened.is_fold_set:
        raise MedsynthError(f"{opened.path}: a fold set of {opened.read_folds().get('folds')} runs; "
                            f"give one fold, e.g. {opened.fold(0).path}")
    return opened, get_recipe(str(read_yaml(opened.config_path).get("recipe")))


def sample(run: str | Path, n: int | None = None, mode: str = "random", class_name: str | None = None,
           condition: str | Path | None = None, out: str | Path | None = None, seed: int = 0, force: bool = False,
           overrides: list[str] | tuple[str, ...] = (), progress: bool = True, phases: Sequence[int] | None = None) -> list[Path]:
    """Generate ``n`` samples (per class, or per label map with ``condition``) into ``out`` (default RUN/samples).

    ``phases`` (recipes that generate motion over phases): the phases to generate (default all).

    ``n`` defaults to 16, or to 1 per conditioning file. ``mode`` is one of the run's recipe's
    ``sample_modes``. ``overrides`` (``sample.guidance=2``) change the run's sampling settings
    for this call only. ``progress`` is accepted for the CLI's ``--no-progress``; sampling
    shows no progress bar yet.
    """
    from medsynth.recipes.base import SampleRequest
    from medsynth.training import load_module, use_threads

    opened, chosen = open_run(run)
    if mode not in chosen.sample_modes:
        raise MedsynthError(f"sample: recipe '{chosen.name}' has no mode '{mode}' (its modes: {', '.join(chosen.sample_modes)})")
    if phases is not None and not chosen.takes_phases:
        raise MedsynthError(f"sample: recipe '{chosen.name}' generates no phases (--phases is for motion recipes)")
    if condition is not None and chosen.condition_refusal is not None:
        raise MedsynthError(f"sample: --condition is not used by recipe '{chosen.name}' ({chosen.condition_refusal})")
    n = n if n is not None else (1 if condition is not None else 16)
    if n < 1:
        raise MedsynthError(f"--n must be at least 1 (got {n})")
    target = check_output(out, [condition], None, folder=True) if out is not None else opened.samples  # TARGET/<mode>: below
    existing = target / mode
    if existing.exists() and any(existing.iterdir()) and not force:
        raise MedsynthError(f"{existing}: samples already exist; use --force to overwrite or --out for another folder")
    opened.check_free()
    module = use_threads(load_module(opened, chosen, overrides))
    request = SampleRequest(n=n, mode=mode, class_name=class_name, condition=Path(condition) if condition else None, seed=seed,
                            phases=tuple(phases) if phases is not None else None)
    with opened.lock():
        return write_staged(target, mode, lambda staging: chosen.sample(module, request, staging))


def evaluate(run: str | Path, data: str | Path | None = None, progress: bool = True, reconstruction: str | Path | None = None,
             overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """Evaluate a run against its (or another) prepared dataset; results merge into metrics.json.

    ``reconstruction``: also reconstruct the held-out subjects of this UK Biobank-layout folder (with thin-slice
    truth) with every method (recipes that declare ``reconstructs``: diffae). ``overrides`` change the run's
    settings for this evaluation (``evaluate.ddim_run=RUN2``). ``progress`` is accepted for the CLI's
    ``--no-progress``; evaluation shows no progress bar yet.
    """
    if Run.open(run).is_fold_set:
        if data is not None or reconstruction is not None:
            raise MedsynthError(f"{run}: each fold of a fold set is evaluated on its own held-out subjects; --data is not taken")
        from medsynth.folds import evaluate_folds

        return evaluate_folds(evaluate, run)
    Run.open(run).check_free()
    opened, chosen, module = load_run(run, overrides)
    data_dir = Path(data) if data is not None else Path(module.config.data_dir or "")
    if not (data_dir / "dataset.json").exists():
        raise BadInputError(data_dir, "not a prepared dataset (no dataset.json)")
    if reconstruction is not None and not chosen.reconstructs:
        raise MedsynthError(f"evaluate --reconstruction: recipe '{chosen.name}' reconstructs nothing (use a diffae run)")
    with opened.lock():
        metrics = chosen.evaluate(opened, module, data_dir)
        if reconstruction is not None:
            metrics |= chosen.evaluate_reconstruction(opened, module, Path(reconstruction))
        return opened.write_metrics(metrics)


def report(run: str | Path) -> Path:
    """Write RUN/report.html: the recipe's headline metrics beside their references, its figures,
    curves, every metric and the config (for a fold set: the mean ± sd over its folds)."""
    from medsynth.report.html import fold_table, settings_table, write_report

    opened = Run.open(run)
    opened.check_free()
    if opened.is_fold_set:
        spec = opened.read_folds()
        title = f"medsynth {spec['recipe']} — {opened.path.name} ({spec['folds']}-fold cross-validation)"
        with opened.lock():
            return write_report(opened, title, [("Cross-validation: mean ± sd over folds", fold_table(opened.read_metrics()))])
    opened, chosen, module = load_run(run)
    with opened.lock():
        sections = [("Data format", settings_table(dataclasses.asdict(chosen.data_format))),
                    *((section.title, section.html) for section in chosen.report_sections(opened, module))]
        return write_report(opened, f"medsynth {chosen.name} — {opened.path.name}", sections, headline=chosen.headline_metrics)


def register(fixed: str | Path | None = None, moving: str | Path | None = None, out: str | Path | None = None,
             data: str | Path | None = None, config: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
             reference_phase: int = 0, progress: bool = True, pairs: str = "reference", batch: int = 1,
             devices: list[str] | tuple[str, ...] | None = None, force: bool = False,
             landmarks: tuple[str | Path, str | Path] | None = None) -> list[Any]:
    """B-spline registration: a pair (``fixed``, ``moving`` -> ``out``) or a dataset (``data`` -> ``out`` folder).

    Dataset mode takes ``pairs`` (``"reference"`` or ``"consecutive"``), ``batch`` (pairs
    registered jointly), ``devices`` (one worker process per device) and ``force`` (start over
    in a folder registered with other settings), as
    :func:`~medsynth.motion.phase_series.register_dataset`. Pair mode takes ``landmarks``
    (fixed and moving landmark files: the TRE before and after, :mod:`medsynth.motion.landmarks`).
    Returns the :class:`~medsynth.motion.registration.RegistrationResult` of every pair.
    """
    from medsynth.motion.phase_series import register_dataset
    from medsynth.motion.registration import RegistrationConfig, register_pair

    if out is None:
        raise MedsynthError("register: --out is required")
    settings = load_config(RegistrationConfig, config, overrides, source="register")  # a refusal names the --set or the file
    if data is not None:
        if landmarks:
            raise MedsynthError("register: --landmarks is for a pair; with --data, landmark files sit beside the phases "
                                "(<phase file stem>.pts or .csv)")
        dataset = Path(data) if Path(data).is_dir() else Path(data).parent  # a dataset.json: its folder
        check_output(out, [dataset], None, folder=True)  # an existing folder: register_dataset resumes it (or --force)
        # With a progress bar, register_dataset prints each quality line under it; without, we do.
        return register_dataset(data, out, settings, reference_phase=reference_phase, progress=progress,
                                callback=None if progress else lambda result: note(result.line()),
                                pairs=pairs, batch=batch, devices=devices, force=force)
    if fixed is None or moving is None:
        raise MedsynthError("register: give FIXED MOVING --out FIELD, or --data DIR --out DIR")
    check_output(out, [fixed, moving, *(landmarks or ())], force)
    result = register_pair(fixed, moving, out, settings, landmarks=landmarks, progress=progress)
    note(result.line())
    return [result]


def render(frames: str | Path, out: str | Path, field: str | Path | None = None, still: bool = False, force: bool = False,
           **options: Any) -> Path:
    """A GIF of a 4D sequence (optionally with its fields), or a still figure of an image with a field;
    an existing ``out`` is replaced only with ``force``."""
    from medsynth.motion.render import render_movie, render_still

    check_output(out, [frames, *([field] if isinstance(field, (str, Path)) else field or [])], force)
    try:
        if still:
            options.pop("fps", None)
            return render_still(frames, out, field=field, **options)
        return render_movie(frames, out, field=field, **options)
    except ValueError as exc:  # render reports mismatched inputs as ValueError
        raise MedsynthError(f"{frames}: {exc}") from None




def reconstruct(run: str | Path | None, sax: str | Path, lax: Sequence[str | Path] = (), out: str | Path | None = None,
                factor: int = 8, method: str | None = None, prior_run: str | Path | None = None, keep_steps: bool = False,
                overrides: list[str] | tuple[str, ...] = (), force: bool = False, progress: bool = True) -> Path:
    """A fine SAX volume (every frame) from a SAX stack and LAX views: :func:`medsynth.inverse.reconstruct_files`.

    The prior is ``prior_run``'s if given (e.g. the DDIM baseline), else ``run``'s: a run of a recipe that declares
    ``reconstructs`` (diffae; its DDIM baseline is one with ``model.semantic: false``), whose module is a
    :class:`~medsynth.inverse.SlicePrior`. The baselines (``nearest``, ``linear``, ``cubic``) load none: ``run`` may then be ``None`` or
    ``"-"``; a run of another recipe is refused for every method. ``method`` defaults to
    :data:`~medsynth.inverse.reconstruct.DEFAULT_METHOD`. ``overrides`` set the method's
    :class:`~medsynth.inverse.ReconstructSettings` (``iterations=50``; a key the method does not read is refused,
    :func:`~medsynth.inverse.reconstruct.settings_for`). The memory is estimated before the prior is loaded.
    An existing ``out`` is replaced only with ``force``; an ``out`` that is an input is refused.
    """
    from medsynth.inverse import BASELINES, SlicePrior, reconstruct_files
    from medsynth.inverse.reconstruct import DEFAULT_METHOD, check_inputs, check_memory, check_output_name, settings_for

    method = method or DEFAULT_METHOD
    if out is None:
        raise MedsynthError("reconstruct: --out is required")
    check_output_name(out)  # a NIfTI, before any work
    settings = settings_for(method, overrides)
    check_inputs(sax, lax, factor)  # bad files fail before a prior is loaded
    check_output(out, [sax, *lax, *(source for source in (run, prior_run) if source is not None and str(source) != "-")], force)
    source, prior = prior_run if prior_run is not None else run, None
    opened, saved = None, {}
    if source is None or str(source) == "-":
        if method not in BASELINES:
            raise MedsynthError(f"reconstruct: method '{method}' needs a trained diffae run (or its DDIM baseline: RUN or --prior-run)")
    else:
        opened = open_run(source)[0]
        saved = read_yaml(opened.config_path)
        recipe = str(saved.get("recipe"))
        if recipe not in RECIPES or not get_recipe(recipe).reconstructs:
            if method in BASELINES:
                raise BadInputError(opened.path, f"a run of recipe '{recipe}' is no slice prior, and the interpolation baseline "
                                                 f"'{method}' uses none: give '-' or no run")
            raise BadInputError(opened.path, f"a run of recipe '{recipe}': reconstruct needs a diffae run (or its DDIM baseline, "
                                             "a diffae run with model.semantic: false)")
        if method in BASELINES:
            note(f"reconstruct: the interpolation baseline '{method}' uses no prior; {opened.path} is not loaded")
    prior_size = (saved.get("model") or {}).get("image_size") if method not in BASELINES else None
    check_memory(sax, factor, method, settings, prior_size, keep_steps)  # refused before the prior is loaded
    if method not in BASELINES:
        assert opened is not None
        module = load_run(opened.path)[2]
        prior = module
        if not isinstance(prior, SlicePrior):
            raise MedsynthError(f"{opened.path}: its module is not a slice prior (encode_semantic, invert, decode)")
    return reconstruct_files(prior, sax, lax, out, factor=factor, method=method, settings=settings, keep_steps=keep_steps,
                             progress=progress)[0]
