"""What every recipe provides to the pipeline (train -> sample -> evaluate -> report)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, get_args

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from monai.data import MetaTensor

from medsynth.config import RecipeConfig, parse_value
from medsynth.data.io import READABLE_SUFFIXES, suffix_of
from medsynth.errors import BadInputError, MedsynthError
from medsynth.report.sections import ReportSection
from medsynth.runs import Run
from medsynth.training import MedsynthModule, load_module, staged_optimizer


@dataclass(frozen=True)
class SampleRequest:
    """What ``medsynth sample`` asks of a recipe."""

    n: int = 16
    mode: str = "random"
    class_name: str | None = None  # None: every class
    condition: Path | None = None  # a conditioning file or folder (label map, image)
    seed: int = 0
    phases: tuple[int, ...] | None = None  # breathing/cardiac phases to generate (None: all); recipes with ``takes_phases``


@dataclass(frozen=True)
class TinyExample:
    """The smallest run of a recipe, as data: the contract tests (tests/recipes/test_contract.py) run
    every recipe of ``RECIPES`` through phantom -> prepare -> train -> sample -> evaluate -> report with it."""

    phantom: str  # a phantom kind (``api.phantom``)
    n: int  # images per class or subjects
    size: int  # phantom size in pixels/voxels
    phantom_options: dict[str, Any] = field(default_factory=dict)  # further ``api.phantom`` options
    prepare: dict[str, Any] = field(default_factory=dict)  # ``api.prepare`` settings (beside the recipe's defaults)
    config: str | None = None  # a shipped config name or a file
    overrides: tuple[str, ...] = ()  # ``key=value`` config overrides that make it tiny (epochs are set by the test)


@dataclass(frozen=True)
class DataFormat:
    """What a recipe takes and writes, declared as a MONAI bundle's ``network_data_format`` declares it: the report and
    ``Recipe.to_units`` read it, so no recipe converts its outputs' intensities by hand."""

    modality: str  # the images it is made for ("CT", "cine MRI", "electron microscopy")
    spatial_dims: int | None  # 2 or 3; None: the prepared data decides (cvae)
    condition: str  # what a sample is conditioned on ("class label", "label map", "CT frame", "none")
    output: str  # what ``sample`` writes, with its units
    model_range: tuple[float, float] = (0.0, 1.0)  # the network's intensities: the prepared [0, 1] mapped linearly to this range
    window: str | None = "model.ct_window"  # dotted config key of the HU window of ``--normalize ct`` (None: no CT units)


def model_affine(model: Any) -> np.ndarray:
    """``(4, 4)`` voxel -> world mm of a model's grid as its prepared data gave it (the model config's
    ``reference_affine``, filled by ``Recipe.data_settings``): the geometry of samples that no condition image
    carries (a class's images, a patch grid); the identity for data without one (PNG)."""
    affine = getattr(model, "reference_affine", None)
    return np.asarray(affine if affine is not None else np.eye(4), dtype=np.float64)


# -- stages -----------------------------------------------------------------------------------------

ALL_STAGES = "all"  # ``model.stage: all``: the run trains every stage of its recipe, one after another


@dataclass(frozen=True)
class Load:
    """An earlier run that a stage reads: a setting names it, and it must have trained a given stage."""

    key: str  # the dotted config key holding the run's folder ("model.image_ae_run")
    stage: str  # the stage that run must have trained (alone, or in turn with others)
    # module attributes copied from that run's module when training starts: "a.b" (the same in both), or "mine=theirs"
    # ("net.pyramid=net.encoder"); () where the recipe uses the run otherwise (sdm samples references from it)
    weights: tuple[str, ...] = ()
    when: str | None = None  # "key=value": the setting under which the stage reads it (None: always)


@dataclass(frozen=True)
class Stage:
    """One stage of a staged recipe, as data (``Recipe.stages``): the CLI offers its name to ``train --stage``, and
    the shared code below reads it (which stage trains at an epoch, the staged optimiser, the weight average's start,
    the runs it loads). A run picks its stages with ``model.stage``: one stage's name, or ``all`` (every stage, one
    after another); a recipe whose config has no ``model.stage`` trains all its stages in every run (diffae).

    Behaviour of its own lives on the stage object: a subclass with methods that take the module (diffae,
    motion-ldm), or, where the methods hold settings of the run (sdm's grids and patches), the class ``behaviour``
    that the module builds with the run's config.
    """

    name: str
    networks: tuple[str, ...] = ("net",)  # module attributes that train in it: its parameter group of the staged optimiser
    epochs: str | None = None  # dotted config key of its epochs when a later stage follows in the run; the last one trains the rest
    loads: tuple[Load, ...] = ()  # the earlier runs it reads
    averaged: bool = True  # False: train.ema_decay starts after it (its networks stay exactly what the later stages learnt on)
    behaviour: type | None = None  # the class of its methods built with the run's config (None: the methods are the stage's own)


@dataclass(frozen=True)
class Variant:
    """A declared variant of a recipe (diffae's DDIM baseline): the settings that select it and the stages it trains."""

    name: str
    settings: tuple[str, ...]  # "key=value" settings (as ``--set`` takes them) that all hold in its configs
    stages: tuple[Stage, ...] = ()  # its stages, instead of the recipe's


def setting(config: Any, key: str) -> Any:
    """The value of a dotted config key; a numeric part indexes a list (``model.stage_epochs.0``)."""
    value = config
    for part in key.split("."):
        value = value[int(part)] if part.isdigit() else getattr(value, part)
    return value


def holds(config: Any, item: str) -> bool:
    """Whether the ``key=value`` setting ``item`` (its value parsed as ``--set`` parses it) holds in ``config``."""
    key, _, raw = item.partition("=")
    return setting(config, key.strip()) == parse_value(raw)


def stages_trained(stages: Sequence[Stage], config: Any) -> tuple[Stage, ...]:
    """The stages a run of ``config`` trains, in order: the one ``model.stage`` names, else all of them."""
    chosen = getattr(getattr(config, "model", None), "stage", ALL_STAGES)
    return tuple(stages) if chosen == ALL_STAGES else tuple(s for s in stages if s.name == chosen)


def stage_object(stages: Sequence[Stage], config: Any) -> Any:
    """The stage object of a run that trains one stage whose methods hold the run's settings: its ``behaviour(config)``."""
    (only,) = stages_trained(stages, config)
    return only.behaviour(config)


def stage_at(plan: Sequence[Stage], config: Any, epoch: int) -> Stage:
    """The stage of a run's ``plan`` (:func:`stages_trained`) that trains in ``epoch``: each its ``epochs`` in turn, the last the rest."""
    end = 0
    for earlier in plan[:-1]:
        end += stage_epochs(earlier, config)
        if epoch < end:
            return earlier
    return plan[-1]


def stage_epochs(stage: Stage, config: Any) -> int:
    """The epochs of a stage that a later one follows in its run (``Stage.epochs``)."""
    if stage.epochs is None:
        raise MedsynthError(f"stage '{stage.name}' declares no epochs setting, so no stage can follow it in a run")
    return int(setting(config, stage.epochs))


def ema_first_epoch(plan: Sequence[Stage], config: Any) -> int:
    """The epoch from which ``train.ema_decay`` averages a run of ``plan``: after the last stage declared not ``averaged``
    that a later stage follows (0: from the start)."""
    end, first = 0, 0
    for earlier in plan[:-1]:
        end += stage_epochs(earlier, config)
        first = first if earlier.averaged else end
    return first


def stage_optimizer(module: MedsynthModule, stages: Sequence[Stage], plan: Sequence[Stage]) -> Any:
    """:func:`~medsynth.training.staged_optimizer` of a module that holds the networks of every declared stage: one parameter
    group per stage (its ``networks``), each on its own schedule over the epochs it trains in the run's ``plan``."""
    names = [s.name for s in stages]
    groups = [torch.nn.ModuleList([module.get_submodule(a) for a in s.networks]) if len(s.networks) > 1
              else module.get_submodule(s.networks[0]) for s in stages]
    return staged_optimizer(module, groups, lambda epoch: names.index(stage_at(plan, module.config, epoch).name))


def needed_loads(plan: Sequence[Stage], config: Any) -> list[tuple[Stage, Load]]:
    """The loads of a run's stages that apply: their ``when`` holds and the run does not train their stage itself."""
    trained = {s.name for s in plan}
    return [(s, load) for s in plan for load in s.loads
            if load.stage not in trained and (load.when is None or holds(config, load.when))]


def load_stage_weights(module: MedsynthModule, recipe: Recipe) -> None:
    """Copy into ``module`` the networks its run's stages take from earlier runs (``Load.weights``), when training starts."""
    for _, load in needed_loads(recipe.stages_trained(module.config), module.config):
        other = recipe.stage_run(module.config, load.key)
        for item in load.weights:
            mine, _, theirs = item.partition("=")
            module.get_submodule(mine).load_state_dict(other.get_submodule(theirs or mine).state_dict())


class StagedModule:
    """The Lightning hooks of a module whose stages carry their own methods (diffae, motion-ldm: ``Stage`` subclasses
    with ``training_step``, ``validation_step`` and ``on_train_epoch_start`` taking the module): each hook goes to the
    stage that trains in the current epoch, and the optimiser has one group per declared stage. Listed before the
    LightningModule among the bases; the module sets ``declared`` (its recipe's stages) and, in ``__init__``, ``plan``
    (the stages its run trains, :func:`stages_trained`)."""

    declared: ClassVar[tuple[Stage, ...]]
    plan: tuple[Stage, ...]

    @property
    def stage(self) -> Any:
        """The stage that trains in the current epoch."""
        return stage_at(self.plan, self.config, self.current_epoch)

    def configure_optimizers(self) -> Any:
        return stage_optimizer(self, self.declared, self.plan)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.stage.training_step(self, batch, batch_idx)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        return self.stage.validation_step(self, batch, batch_idx)

    def on_train_epoch_start(self) -> None:
        self.stage.on_train_epoch_start(self)


# -- what ``medsynth plan`` estimates (Recipe.plan_examples) ------------------------------------------------------


@dataclass
class Example:
    """One trainable stage of a recipe at an input size: its config (data fields filled), a batch and a sampling call.

    ``batch`` and ``sample`` are called inside the tensor mode that counts (fake or real), so they build their
    tensors there. ``sample(module)`` runs one call of the sampling network on ``sample_items`` items;
    ``sample_calls`` such calls make one batch of generated items (the sampler's steps).
    """

    stage: str
    config: RecipeConfig
    batch: Callable[[int], dict[str, Any]]  # batch size -> the batch dict the recipe's training_step takes
    sample: Callable[[Any], Any]
    sample_items: int
    sample_calls: int
    prepare: Callable[[Any, dict[str, Any]], None] | None = None  # (module, batch): state a trainer would set


def with_settings(config: RecipeConfig, section: str, **values: Any) -> RecipeConfig:
    """``config`` with the fields ``values`` of its section ``section`` (``model``, ``train``...) replaced (a copy)."""
    part = getattr(config, section)
    return config.model_copy(update={section: part.model_copy(update=values)})


class Recipe(ABC):
    """A generative system: its config, LightningModule, data, sampler, evaluation and report."""

    name: ClassVar[str]
    config_class: ClassVar[type[RecipeConfig]]
    monitor: ClassVar[str | None] = "val/loss"
    monitor_mode: ClassVar[str] = "min"  # "max" for a monitored score that should grow
    sample_modes: ClassVar[tuple[str, ...]] = ("random",)  # what `medsynth sample --mode` accepts for this recipe
    headline_metrics: ClassVar[tuple[str, ...]] = ()  # metrics.json keys the demo prints and the report opens with
    prepare_defaults: ClassVar[dict[str, Any]] = {}  # `medsynth prepare --recipe NAME` settings the user did not give
    tiny_example: ClassVar[TinyExample | None] = None  # required by the contract tests: every recipe declares one
    plan_config: ClassVar[str | None] = None  # the shipped config `medsynth plan` starts from (a full-size one; None: the defaults)
    condition_refusal: ClassVar[str | None] = None  # why `sample --condition` is refused (None: the recipe takes it)
    takes_phases: ClassVar[bool] = False  # `sample --phases` selects what to generate
    # its runs are slice priors of `medsynth reconstruct`, scored by `evaluate --reconstruction` (evaluate_reconstruction)
    reconstructs: ClassVar[bool] = False
    data_format: ClassVar[DataFormat]  # what it takes and writes (every recipe declares one)
    stages: ClassVar[tuple[Stage, ...]] = ()  # a staged recipe's stages, in training order
    variants: ClassVar[tuple[Variant, ...]] = ()  # declared variants (settings that select other stages)

    def resolve_config(self, config: RecipeConfig) -> RecipeConfig:
        """Fill the fields that depend on the data (channels, shapes, classes)."""
        return config

    @abstractmethod
    def build_module(self, config: RecipeConfig) -> MedsynthModule:
        """The LightningModule with fresh weights."""

    def build_datamodule(self, config: RecipeConfig) -> L.LightningDataModule:
        """The training/validation data: the prepared dataset's splits, held in memory, with :meth:`datamodule_options`."""
        from medsynth.data.datasets import PreparedDataModule

        return PreparedDataModule(Path(config.data_dir), batch_size=config.train.batch_size, num_workers=config.train.num_workers,
                                  seed=config.train.seed, in_memory=True, **self.datamodule_options(config))

    def datamodule_options(self, config: RecipeConfig) -> dict[str, Any]:
        """Further ``PreparedDataModule`` settings of this recipe (``transform``, ``train_transform``)."""
        return {}

    def data_settings(self, info: dict[str, Any], settings: dict[str, Any] | None = None) -> dict[str, Any]:
        """The model fields every recipe fills from its prepared data (``info`` and the prepare ``settings`` of
        :func:`~medsynth.data.datasets.require_prepared`), as its ``data_format`` declares them:
        ``reference_affine`` (the data's 4 x 4 as a list, None without one) and, for a recipe in CT units, its window
        field (``data_format.window``): the HU window of ``--normalize ct``, None for data normalised otherwise."""
        from medsynth.data.datasets import prepared_affine

        derived: dict[str, Any] = {"reference_affine": prepared_affine(info)}
        if self.data_format.window:
            window = (settings or {}).get("ct_window") if (settings or {}).get("normalize") == "ct" else None
            derived[self.data_format.window.rsplit(".", 1)[-1]] = [float(v) for v in window] if window else None
        return derived

    def to_units(self, x: torch.Tensor, config: RecipeConfig) -> torch.Tensor:
        """Network intensities (``data_format.model_range``) -> the data's units: HU through the run's CT window
        (``data_format.window``), else the prepared [0, 1]. Shape kept."""
        from medsynth.data.prepare import unit_to_hu

        lo, hi = self.data_format.model_range
        window = setting(config, self.data_format.window) if self.data_format.window else None
        return unit_to_hu((x.float() - lo) / (hi - lo), window)

    @abstractmethod
    def sample(self, module: MedsynthModule, request: SampleRequest, out: Path) -> list[Path]:
        """Generate, write files under ``out`` and return their paths."""

    @abstractmethod
    def evaluate(self, run: Run, module: MedsynthModule, data_dir: Path) -> dict[str, Any]:
        """Metrics for ``metrics.json``."""

    def evaluate_reconstruction(self, run: Run, module: MedsynthModule, data: Path) -> dict[str, Any]:
        """``evaluate --reconstruction DATA`` (recipes that declare ``reconstructs``): metrics of rebuilding DATA's held-out
        volumes with the run's module as the prior."""
        raise NotImplementedError(f"recipe '{self.name}' reconstructs nothing")

    def check_data(self, config: RecipeConfig) -> None:
        """Check everything training will read (the resolved ``config``'s data and the runs it names) before the run's
        first file is written: ``train`` calls it once, before ``config.yaml``, so a refusal leaves nothing behind and a
        retry with good data is not refused. The default checks that every prepared case file is there and that the
        earlier runs the run's stages load (``Load.weights``) trained what they must (read safely); a recipe that reads
        more (registration grids) adds its checks. It also says in one line when the run's last stage gets no epoch.

        Raises:
            MedsynthError: one line naming the file (or setting) and the problem.
        """
        from medsynth.data.datasets import check_prepared_files

        check_prepared_files(config.data_dir)
        plan = self.stages_trained(config)
        for _, load in needed_loads(plan, config):
            if load.weights:
                self.stage_run(config, load.key)
        if len(plan) > 1 and config.train.max_epochs <= (start := sum(stage_epochs(s, config) for s in plan[:-1])):
            from medsynth.console import note

            note(f"{self.name}: train.max_epochs={config.train.max_epochs} leaves no epoch for its last stage '{plan[-1].name}' after "
                 f"the {start} epochs of {', '.join(f'{s.name} ({s.epochs})' for s in plan[:-1])}: it stays untrained")

    # -- stages (see Stage)

    def variant(self, config: RecipeConfig) -> Variant | None:
        """The declared variant whose settings all hold in ``config`` (None: the recipe itself)."""
        return next((v for v in self.variants if all(holds(config, item) for item in v.settings)), None)

    def stages_of(self, config: RecipeConfig) -> tuple[Stage, ...]:
        """The stages declared for ``config``: its variant's, else the recipe's."""
        chosen = self.variant(config)
        return chosen.stages if chosen is not None else self.stages

    def stages_trained(self, config: RecipeConfig) -> tuple[Stage, ...]:
        """The stages a run of ``config`` trains, in order (:func:`stages_trained`)."""
        return stages_trained(self.stages_of(config), config)

    def stage_choices(self) -> tuple[str, ...]:
        """What ``train --stage`` (``model.stage``) takes: the values the config's ``model.stage`` accepts (each checked
        to be a declared stage or ``all``); () for a recipe whose runs train all their stages (no ``model.stage``)."""
        model = self.config_class.model_fields.get("model")
        stage = model.annotation.model_fields.get("stage") if model is not None and hasattr(model.annotation, "model_fields") else None
        choices = get_args(stage.annotation) if stage is not None else ()
        declared = [s.name for s in self.stages]
        if choices and set(choices) - {ALL_STAGES} != set(declared):
            raise MedsynthError(f"recipe '{self.name}': model.stage takes {', '.join(choices)}, its declared stages are {', '.join(declared)}")
        return choices

    def stage_setting(self, stage: str) -> str:
        """The ``model.stage=STAGE`` setting of ``train --stage STAGE``, or one line when the recipe has no such stage."""
        choices = self.stage_choices()
        if stage not in choices:
            offered = (f"its stages are {', '.join(choices)}" if choices else
                       "it trains all its stages in one run (no --stage)" if self.stages else "it has no stages (no --stage)")
            raise MedsynthError(f"train --stage {stage}: recipe '{self.name}' has no stage '{stage}': {offered}")
        return f"model.stage={stage}"

    def stage_run(self, config: RecipeConfig, key: str) -> MedsynthModule:
        """The module of the earlier run that setting ``key`` names (a ``Load`` of one of ``config``'s stages), weights read
        safely, checked to have trained the stage the load asks for.

        Raises:
            MedsynthError: the setting unset; BadInputError: not a run of this recipe, or one that did not train that stage.
        """
        stage, load = next((s, load) for s in self.stages_of(config) for load in s.loads if load.key == key)
        path = setting(config, key)
        if path is None:
            raise MedsynthError(f"{self.name}: the '{stage.name}' stage needs {key}: set it to a run that trained the "
                                f"'{load.stage}' stage" + (f" (or train --stage {ALL_STAGES})" if ALL_STAGES in self.stage_choices() else ""))
        other = load_module(path, self)
        trained = [s.name for s in self.stages_trained(other.config)]
        if load.stage not in trained:
            raise BadInputError(path, f"{key} must be a run that trained the '{load.stage}' stage; this one trained {', '.join(trained)}")
        return other

    def callbacks(self, config: RecipeConfig) -> list[Callback]:
        """Extra Lightning callbacks for this recipe's training (beside checkpointing, RNG, EMA)."""
        return []

    def ema_first_epoch(self, config: RecipeConfig) -> int:
        """The epoch from which ``train.ema_decay`` averages the weights (:func:`ema_first_epoch` of the run's stages)."""
        return ema_first_epoch(self.stages_trained(config), config)

    def report_sections(self, run: Run, module: MedsynthModule) -> list[ReportSection]:
        """Recipe-specific blocks of the report (figures, grids)."""
        return []

    # -- what `medsynth plan` and `train --dry-run` estimate (medsynth.plan)

    def input_size(self, config: RecipeConfig) -> list[int] | None:
        """The spatial input size ``config`` states (voxels/pixels, X Y [Z]: the data-filled field of the recipe's
        model), or None where it states none. The default reads ``model.image_shape``."""
        shape = getattr(getattr(config, "model", None), "image_shape", None)
        return list(shape) if shape else None

    def plan_examples(self, config: RecipeConfig, size: list[int]) -> list[Example]:
        """The stages a run of ``config`` trains, each as an :class:`Example` at the spatial input ``size`` (voxels/pixels,
        ``data_format.spatial_dims`` long, or 2 or 3 for a recipe whose data decides): its config with the data fields
        filled for ``size``, a batch builder and one call of its sampling network.

        Raises:
            MedsynthError: the recipe declares none, or ``size`` does not suit it (one line).
        """
        raise MedsynthError(f"recipe '{self.name}' declares no plan examples (medsynth plan cannot estimate it)")

    def plan_candidates(self, config: RecipeConfig) -> list[dict[str, Any]]:
        """The ``model`` settings ``medsynth plan`` tries in turn where a batch of 1 does not fit: ``{}`` (the config's own)
        first, then leaner ones (gradient checkpointing, smaller patches). The default tries nothing else."""
        return [{}]


def require_finite(outputs: torch.Tensor | Sequence[torch.Tensor], what: str) -> None:
    """Refuse (one line) to write generated ``outputs`` holding NaN or infinity: every recipe calls it
    on what its ``sample`` made, before the first file is written (a PNG would hide NaN as black)."""
    tensors = [outputs] if isinstance(outputs, torch.Tensor) else list(outputs)
    bad = sum(int((~torch.isfinite(t)).any()) for t in tensors if t.is_floating_point())
    if bad:
        raise MedsynthError(f"sample: {what}: {bad} of {len(tensors)} generated output(s) hold NaN or infinity; nothing was written "
                            "(the run's weights may have diverged, or a sampling setting is out of range)")


def condition_files(condition: Path) -> list[Path]:
    """``SampleRequest.condition``: a file, a DICOM series folder (one volume, or one 4D scan of one series per
    phase), or the readable files in a folder (sorted by name)."""
    from medsynth.data.dicom import is_dicom_folder

    if condition.is_dir() and is_dicom_folder(condition):
        return [condition]
    if condition.is_dir():
        files = sorted(p for p in condition.iterdir() if p.is_file() and suffix_of(p) in READABLE_SUFFIXES)
        if not files:
            raise BadInputError(condition, "folder holds no readable condition files")
        return files
    if not condition.exists():
        raise BadInputError(condition, "file not found")
    return [condition]


def condition_name(path: Path) -> str:
    """A conditioning file's name without its (possibly double) suffix: ``case_001.nii.gz`` -> ``case_001``."""
    suffix = suffix_of(path)
    return path.name[: -len(suffix)] if suffix and path.name.lower().endswith(suffix) else path.stem


@dataclass(frozen=True)
class ConditionVolume:
    """A condition volume (a CT frame) read for a model, as given and on the model's grid: the geometry carrier of
    the conditioned recipes. Both forms are ``MetaTensor``s, so what is generated from one is written with its affine
    (``save_image`` and ``save_field`` read a ``MetaTensor``'s own; :meth:`on_grid` wraps an output)."""

    name: str  # the file name without its suffix (or the prepared case's id)
    image: MetaTensor  # (1, *S) as read (e.g. HU), with the 4 x 4 of its own grid
    unit: MetaTensor  # (1, *shape) in [0, 1] on the model's grid (the same field of view), with that grid's 4 x 4

    @property
    def affine(self) -> np.ndarray:
        """``(4, 4)`` of the volume as given (voxel -> world mm)."""
        return np.asarray(self.image.affine, dtype=np.float64)

    @property
    def grid_affine(self) -> np.ndarray:
        """``(4, 4)`` of the model's grid over the volume's field of view."""
        return np.asarray(self.unit.affine, dtype=np.float64)

    def on_grid(self, output: torch.Tensor) -> MetaTensor:
        """``output`` ``(C, *shape)``, made on the model's grid from this condition, carrying the grid's affine."""
        return MetaTensor(output, affine=self.unit.affine)

    @classmethod
    def prepared(cls, name: str, item: dict[str, Any], image: torch.Tensor | None = None) -> ConditionVolume:
        """A prepared item (``image`` ``(1, *shape)`` in [0, 1], ``affine``) as a condition: it is on the model's grid
        already; ``image`` is the same volume in the data's units (HU; None: the [0, 1] one)."""
        affine = torch.as_tensor(item["affine"], dtype=torch.float64)
        unit = item["image"]
        return cls(name, MetaTensor(unit if image is None else image, affine=affine), MetaTensor(unit, affine=affine))


def condition_volumes(condition: Path, shape: Sequence[int], window: Sequence[float] | None, phase: int = 0) -> list[ConditionVolume]:
    """The 3D volumes of ``condition`` (a file or folder), each resampled over its own field of view to the model's
    ``shape`` when it has another (said in one line) and mapped to [0, 1] by the CT ``window`` (HU; None: as is).
    Of a 4D scan (a 4D NIfTI or a DICOM folder of one series per phase) phase ``phase`` is taken, said in one line."""
    from monai.transforms import Resize

    from medsynth.console import note
    from medsynth.data.io import load_image
    from medsynth.data.prepare import hu_to_unit

    volumes = []
    for path in condition_files(Path(condition)):
        image = load_image(path)
        if image.ndim == 4 and image.shape[0] > 1:  # (T, X, Y, Z): a 4D scan, phases in order
            if phase >= image.shape[0]:
                raise BadInputError(path, f"4D scan has {image.shape[0]} phases, no phase {phase} to condition on")
            note(f"{path}: 4D scan of {image.shape[0]} phases; phase {phase} is the condition")
            image = image[phase : phase + 1]
        if image.ndim != 4 or image.shape[0] != 1:
            raise BadInputError(path, f"a condition is one 3D volume, got shape {tuple(image.shape)}")
        grid = image
        if list(image.shape[1:]) != list(shape):
            note(f"{path}: shape {list(image.shape[1:])} resampled to the model grid {list(shape)} (same field of view)")
            grid = Resize(list(shape), mode="trilinear", anti_aliasing=True)(image)
        unit = hu_to_unit(grid.as_tensor().float(), window).clamp(0, 1)
        volumes.append(ConditionVolume(condition_name(path), MetaTensor(image.as_tensor().float(), affine=image.affine),
                                       MetaTensor(unit, affine=grid.affine)))
    return volumes
