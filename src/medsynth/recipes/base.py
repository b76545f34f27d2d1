"""What every recipe provides to the pipeline (train -> sample -> evaluate -> report)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

from medsynth.config import RecipeConfig
from medsynth.data.io import READABLE_SUFFIXES, suffix_of
from medsynth.errors import BadInputError, MedsynthError
from medsynth.report.sections import ReportSection
from medsynth.runs import Run
from medsynth.training import MedsynthModule


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
    condition_refusal: ClassVar[str | None] = None  # why `sample --condition` is refused (None: the recipe takes it)
    takes_phases: ClassVar[bool] = False  # `sample --phases` selects what to generate
    # its runs are slice priors of `medsynth reconstruct`, scored by `evaluate --reconstruction` (evaluate_reconstruction)
    reconstructs: ClassVar[bool] = False

    def resolve_config(self, config: RecipeConfig) -> RecipeConfig:
        """Fill the fields that depend on the data (channels, shapes, classes)."""
        return config

    @abstractmethod
    def build_module(self, config: RecipeConfig) -> MedsynthModule:
        """The LightningModule with fresh weights."""

    @abstractmethod
    def build_datamodule(self, config: RecipeConfig) -> L.LightningDataModule:
        """The training/validation data."""

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
        retry with good data is not refused. The default checks that every prepared case file is there; a recipe
        that reads more (registration grids, another run's weights) adds its checks.

        Raises:
            MedsynthError: one line naming the file (or setting) and the problem.
        """
        from medsynth.data.datasets import check_prepared_files

        check_prepared_files(config.data_dir)

    def callbacks(self, config: RecipeConfig) -> list[Callback]:
        """Extra Lightning callbacks for this recipe's training (beside checkpointing, RNG, EMA)."""
        return []

    def ema_first_epoch(self, config: RecipeConfig) -> int:
        """The epoch from which ``train.ema_decay`` averages the weights (a staged recipe: its last stage's first)."""
        return 0

    def report_sections(self, run: Run, module: MedsynthModule) -> list[ReportSection]:
        """Recipe-specific blocks of the report (figures, grids)."""
        return []


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
    """A condition CT read for a model: as given and on the model's grid."""

    name: str  # the file name without its suffix
    image: torch.Tensor  # (1, *S) as read (e.g. HU), on its own grid
    affine: np.ndarray  # (4, 4) of that grid
    unit: torch.Tensor  # (1, *shape) in [0, 1] on the model's grid
    grid_affine: np.ndarray  # (4, 4) of the model's grid (the same field of view)


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
        volumes.append(ConditionVolume(condition_name(path), image.as_tensor().float(), np.asarray(image.affine, dtype=np.float64),
                                       unit, np.asarray(grid.affine, dtype=np.float64)))
    return volumes
