"""Recipe ``sdm``: 3D CT synthesis from a semantic label map (SPADE) with classifier-free guidance.

Two stages, each a run of its own (``--stage low|high``) and a small object below that says its
conditions, training pair, sampling grid and checks:

- **low**: the whole volume at low resolution (the prepared volume average-pooled by
  ``model.low_res_factor``), a SPADE diffusion UNet conditioned on the one-hot label map.
- **high**: patches of the prepared volume. The UNet's input is the noisy patch, the matching crop
  of the *reference* (the low-res volume upsampled back) and the patch's position (whole-volume
  coordinates, :mod:`medsynth.nets.patch_embedding`); the label-map patch goes to SPADE. Sampling
  denoises the whole volume patch by patch at every step (:mod:`medsynth.diffusion.patches`), so
  volumes larger than any training patch come out without seams.

Guidance: the null condition is an empty label map (reference and position kept); training drops
the label map with ``model.cond_drop_prob``; ``sample.guidance`` is s in
``eps = eps(x|y) + s (eps(x|y) - eps(x|none))``.

Data: ``medsynth prepare --recipe sdm`` (HU window to [0, 1], crop/pad around the labels); label
values are remapped to contiguous classes (``model.label_values``), low-res volumes and label maps
are average-pooled (labels by majority vote) on the fly.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from pydantic import Field
from torch import Tensor

from medsynth.config import RecipeConfig, StrictModel
from medsynth.data.datasets import PreparedDataModule, load_prepared_info, load_prepared_manifest, load_split, stack_items
from medsynth.data.io import load_image, save_image
from medsynth.diffusion.cascade import downsample_image, downsample_labels, low_res_affine, one_hot, upsample_image
from medsynth.diffusion.condition import Condition
from medsynth.diffusion.denoiser import ConditionedDenoiser
from medsynth.diffusion.module import DiffusionModule
from medsynth.diffusion.patches import PatchwiseDenoiser
from medsynth.diffusion.samplers import Denoiser
from medsynth.diffusion.sampling import SamplerConfig
from medsynth.diffusion.schedule import make_schedule
from medsynth.diffusion.unet import build_unet
from medsynth.errors import BadInputError, MedsynthError
from medsynth.nets.patch_embedding import coordinate_channels
from medsynth.recipes.base import Recipe, SampleRequest, TinyExample, condition_files, condition_name
from medsynth.report.sections import ReportSection
from medsynth.runs import Run
from medsynth.seeds import item_seeds
from medsynth.training import load_module

POSITION_CHANNELS = 3


class SDMModelConfig(StrictModel):
    """Network, schedule and stage. ``image_shape``, ``classes``, ``label_values``,
    ``reference_affine`` and ``intensity_window`` are filled from the prepared data."""

    stage: Literal["low", "high"] = Field("low", description="low: whole low-res volume; high: high-res patches + low-res reference")
    image_shape: list[int] | None = Field(None, description="prepared (high-res) volume shape")
    classes: list[str] = []
    label_values: list[int] = Field([], description="label value of each class index (contiguous remapping)")
    reference_affine: list[list[float]] | None = None
    intensity_window: list[float] | None = Field(None, description="HU window of --normalize ct: outputs are written in HU")
    low_res_factor: int = Field(2, ge=1, description="low-res grid = prepared grid / this factor (average pooling)")
    patch_size: list[int] | None = Field(None, description="high stage: training patch (voxels); default half the volume")
    channels: list[int] = [16, 32, 32]
    attention_levels: list[bool] = [False, False, False]
    num_res_blocks: int = Field(1, ge=1)
    norm_num_groups: int = Field(8, ge=1)
    num_head_channels: int = Field(8, ge=1)
    spade_channels: int = Field(16, ge=1, description="hidden channels of each SPADE block (MONAI default 128)")
    use_flash_attention: bool = True
    position_channels: bool = Field(True, description="high stage: give the UNet the patch's whole-volume coordinates")
    schedule: Literal["linear", "scaled_linear", "sigmoid", "cosine", "rflow"] = "linear"
    num_train_timesteps: int = Field(1000, ge=2)
    prediction: Literal["epsilon", "sample", "v_prediction"] = "epsilon"
    cond_drop_prob: float = Field(0.15, ge=0, lt=1, description="share of training samples without label map (CFG)")


class SDMDataConfig(StrictModel):
    patches_per_volume: int = Field(4, ge=1, description="high stage: random patches drawn from each volume of a batch")


class SDMSampleConfig(SamplerConfig):
    patch_overlap: float = Field(0.5, ge=0, lt=1, description="high stage: overlap of neighbouring patches (share of the patch)")
    patch_batch: int = Field(8, ge=1, description="high stage: patch locations per forward pass")
    low_res_run: str | None = Field(None, description="high stage: the low-res run that makes the references")


class SDMEvaluateConfig(StrictModel):
    n_generated: int = Field(8, ge=1, description="volumes generated from held-out label maps")
    segmenter_epochs: int = Field(40, ge=1)
    segmenter_channels: list[int] = [8, 16, 32]
    seed: int = 0


class SDMConfig(RecipeConfig):
    recipe: Literal["sdm"] = "sdm"
    model: SDMModelConfig = SDMModelConfig()
    data: SDMDataConfig = SDMDataConfig()
    sample: SDMSampleConfig = SDMSampleConfig()
    evaluate: SDMEvaluateConfig = SDMEvaluateConfig()


# -- the two stages ---------------------------------------------------------------------------------


class LowStage:
    """The whole volume on the low-res grid (prepared grid / ``low_res_factor``), label map to SPADE."""

    concat_channels = 0  # channels concatenated to x_t

    def __init__(self, config: SDMConfig):
        self.config, self.model, self.num_classes = config, config.model, len(config.model.classes)
        self.multiple = 2 ** (len(self.model.channels) - 1)  # the UNet's total stride

    @property
    def grid_factor(self) -> int:
        """Prepared grid / generated grid."""
        return self.model.low_res_factor

    def resolve_patch(self, shape: list[int], data_dir: Path) -> list[int] | None:
        low = [s // self.model.low_res_factor for s in shape]
        if any(s % self.multiple for s in low):
            raise MedsynthError(f"sdm: low-res shape {low} must be divisible by {self.multiple} "
                                f"(2^(levels-1) for model.channels {self.model.channels})")
        return self.model.patch_size

    def check_shape(self, path: Path | str, shape: tuple[int, ...]) -> None:
        need = self.model.low_res_factor * self.multiple
        if any(s % need for s in shape):
            raise BadInputError(path, f"label map shape {list(shape)} must be divisible by {need} (low_res_factor x network stride)")

    def condition(self, labels: Tensor, reference: Tensor | None = None) -> Condition:
        """Class indices ``(B, 1, *S)`` on the prepared grid -> the low-res one-hot label map."""
        return Condition(seg=one_hot(downsample_labels(labels, self.num_classes, self.grid_factor), self.num_classes))

    def training_pair(self, image: Tensor, labels: Tensor, generator: torch.Generator | None) -> tuple[Tensor, Condition]:
        return downsample_image(image, self.grid_factor) * 2 - 1, self.condition(labels)

    def denoiser(self, model: Denoiser, settings: SDMSampleConfig) -> Denoiser:
        return model

    def reference(self, recipe: SDMRecipe, module: SDMModule, labels: Tensor, seeds: Sequence[int],
                  given: Tensor | None) -> Tensor | None:
        return None

    def evaluation_reference(self, module: SDMModule, images: Tensor) -> tuple[Tensor | None, str | None]:
        return None, None

    def extra_metrics(self, generated: Tensor, kind: str | None) -> dict[str, Any]:
        return {}


class HighStage(LowStage):
    """Patches of the prepared grid; x_t concatenated with the reference (and position), label map to SPADE."""

    def __init__(self, config: SDMConfig):
        super().__init__(config)
        self.concat_channels = 1 + (POSITION_CHANNELS if self.model.position_channels else 0)

    @property
    def grid_factor(self) -> int:
        return 1

    def resolve_patch(self, shape: list[int], data_dir: Path) -> list[int]:
        m = self.multiple
        patch = self.model.patch_size or [max(m, (s // 2) // m * m) for s in shape]
        if len(patch) != 3:
            raise MedsynthError(f"sdm: model.patch_size needs 3 sizes, got {patch}")
        if any(p > s for p, s in zip(patch, shape)):
            raise MedsynthError(f"sdm: model.patch_size {patch} is larger than the volume {shape} ({data_dir})")
        if any(p % m for p in patch):
            raise MedsynthError(f"sdm: model.patch_size {patch} must be divisible by {m} (2^(levels-1) for model.channels)")
        return patch

    def check_shape(self, path: Path | str, shape: tuple[int, ...]) -> None:
        if any(s < p for s, p in zip(shape, self.model.patch_size)):
            raise BadInputError(path, f"patch size {self.model.patch_size} is larger than the volume {list(shape)}")
        if any(s % self.model.low_res_factor for s in shape):
            raise BadInputError(path, f"label map shape {list(shape)} must be divisible by low_res_factor {self.model.low_res_factor}")

    def condition(self, labels: Tensor, reference: Tensor | None = None) -> Condition:
        """Class indices and reference ``(B, 1, *S)`` in [-1, 1] -> label map, reference + position."""
        if reference is None:
            raise MedsynthError("sdm high stage: sampling needs a low-res reference (sample.low_res_run)")
        concat = [reference]
        if self.model.position_channels:
            coords = coordinate_channels(labels.shape[2:], device=labels.device)
            concat.append(coords.expand(len(labels), *coords.shape))
        return Condition(seg=one_hot(labels, self.num_classes), concat=torch.cat(concat, dim=1))

    def training_pair(self, image: Tensor, labels: Tensor, generator: torch.Generator | None) -> tuple[Tensor, Condition]:
        """``data.patches_per_volume`` random patches per volume, the same windows of x_0 and every condition."""
        factor = self.model.low_res_factor
        x0, cond = image * 2 - 1, self.condition(labels, upsample_image(downsample_image(image, factor), factor) * 2 - 1)
        windows = []
        for b in [b for b in range(len(x0)) for _ in range(self.config.data.patches_per_volume)]:
            starts = [int(torch.randint(0, s - p + 1, (), generator=generator)) for s, p in zip(x0.shape[2:], self.model.patch_size)]
            windows.append((b, slice(None), *(slice(s, s + p) for s, p in zip(starts, self.model.patch_size))))
        return torch.stack([x0[w] for w in windows]), cond.map(lambda part: torch.stack([part[w] for w in windows]))

    def denoiser(self, model: Denoiser, settings: SDMSampleConfig) -> Denoiser:
        return PatchwiseDenoiser(model, self.model.patch_size, settings.patch_overlap, settings.patch_batch)

    def reference(self, recipe: SDMRecipe, module: SDMModule, labels: Tensor, seeds: Sequence[int],
                  given: Tensor | None) -> Tensor:
        """The given references, or the low-res run's volumes for the label maps, upsampled."""
        if given is not None:
            return given
        low = recipe.low_res_module(module)
        return upsample_image(low.volumes(labels, seeds, low.config.sample), self.model.low_res_factor)

    def evaluation_reference(self, module: SDMModule, images: Tensor) -> tuple[Tensor | None, str | None]:
        if module.config.sample.low_res_run is not None:
            return None, "low-res run (cascade)"
        # no low-res run: judge the high stage alone, on the real volumes' low-res references
        factor = self.model.low_res_factor
        return upsample_image(downsample_image(images, factor), factor) * 2 - 1, \
            "real volumes, average-pooled and upsampled (super-resolution)"

    def extra_metrics(self, generated: Tensor, kind: str | None) -> dict[str, Any]:
        from medsynth.evaluate.segmentation import seam_score, sliding_window_borders

        borders = sliding_window_borders(generated.shape[2:], self.model.patch_size, self.config.sample.patch_overlap)
        scores = [seam_score(volume, borders) for volume in generated]
        return {"reference": kind, **{f"seam_{key}": float(np.mean([s[key] for s in scores]))
                                      for key in ("step_at_borders", "step_inside", "ratio")}}


STAGES: dict[str, type[LowStage]] = {"low": LowStage, "high": HighStage}


# -- the LightningModule ------------------------------------------------------------------------


class SDMModule(DiffusionModule):
    """The denoiser of one stage; the batch's label map, low-res volume, reference and patch are made by the stage."""

    config: SDMConfig

    def __init__(self, config: SDMConfig):
        model = config.model
        if model.image_shape is None or not model.classes:
            raise MedsynthError("sdm: model.image_shape and model.classes are unset (train with --data)")
        if model.stage == "high" and model.patch_size is None:
            raise MedsynthError("sdm: model.patch_size is unset for the high stage (train with --data)")
        stage = STAGES[model.stage](config)
        unet = build_unet(
            3, 1 + stage.concat_channels, 1, label_nc=len(model.classes),
            channels=tuple(model.channels), attention_levels=tuple(model.attention_levels),
            num_res_blocks=model.num_res_blocks, norm_num_groups=model.norm_num_groups,
            num_head_channels=model.num_head_channels, spade_intermediate_channels=model.spade_channels,
            use_flash_attention=model.use_flash_attention,
        )
        schedule = make_schedule(model.schedule, model.num_train_timesteps,
                                 prediction="flow" if model.schedule == "rflow" else model.prediction)
        # The null condition: an empty label map; the reference and position channels are kept.
        super().__init__(config, ConditionedDenoiser(unet), schedule, model.cond_drop_prob, {"seg": torch.zeros_like})
        self.stage = stage
        lut = torch.full((max(model.label_values) + 1,), -1, dtype=torch.long)
        lut[torch.tensor(model.label_values)] = torch.arange(len(model.label_values))
        self.register_buffer("lut", lut, persistent=False)

    def classes_of(self, labels: Tensor) -> Tensor:
        """Prepared label values ``(B, 1, *S)`` to contiguous class indices."""
        return self.lut[labels.long()]

    def training_pair(self, batch: dict[str, Any], generator: torch.Generator | None = None) -> tuple[Tensor, Condition]:
        """(x_0 in [-1, 1], condition) of a batch of prepared cases: low-res volumes or high-res patches."""
        return self.stage.training_pair(batch["image"].float(), self.classes_of(batch["label"]), generator)

    def denoiser(self, settings: SDMSampleConfig) -> Denoiser:
        return self.stage.denoiser(self.guided(settings.guidance), settings)

    @torch.no_grad()
    def volumes(self, labels: Tensor, seeds: Sequence[int], settings: SDMSampleConfig, reference: Tensor | None = None) -> Tensor:
        """Volumes in [-1, 1] for class-index label maps ``(B, 1, *S)`` on the prepared grid, one seed each;
        ``reference`` (high stage): the upsampled low-res volumes ``(B, 1, *S)`` in [-1, 1].

        Returns ``(B, 1, *S / low_res_factor)`` for the low stage, ``(B, 1, *S)`` for the high stage.
        """
        cond = self.stage.condition(labels, reference)
        return self.generate((1, *cond.seg.shape[2:]), cond, settings, seeds).clamp(-1, 1)


# -- label maps from files ------------------------------------------------------------------------


def read_label_map(path: Path, module: SDMModule) -> tuple[Tensor, np.ndarray]:
    """A label-map file as class indices ``(1, 1, X, Y, Z)`` and its affine; bad files get one line naming them."""
    image = load_image(path, dtype=np.int64)
    if image.ndim != 4 or image.shape[0] != 1:
        shape = list(image.shape[1:]) if image.shape[0] == 1 else [*image.shape[1:], image.shape[0]]
        raise BadInputError(path, f"label map has {len(shape)} dimension(s) {shape}; sdm needs a 3D label map (X, Y, Z)")
    known = module.config.model.label_values
    unknown = [int(v) for v in torch.unique(image.as_tensor()) if int(v) not in known]
    if unknown:
        names = ", ".join(f"{v} {n}" for v, n in zip(known, module.config.model.classes))
        raise BadInputError(path, f"label value(s) {', '.join(map(str, unknown))} not among the classes this model was trained on ({names})")
    labels = module.classes_of(image.as_tensor()[None])
    module.stage.check_shape(path, tuple(labels.shape[2:]))
    return labels, np.asarray(image.affine, dtype=np.float64)


# -- the recipe ---------------------------------------------------------------------------------


class SDMRecipe(Recipe):
    name = "sdm"
    config_class = SDMConfig
    sample_modes = ("random",)
    headline_metrics = ("segmenter_dice_real", "segmenter_dice_generated", "segmenter_dice_ratio", "memorisation_max_ssim")
    # HU window -> [0, 1] (written back in HU); --size crops/pads around the heart at the --spacing grid.
    prepare_defaults = {"normalize": "ct", "crop": True}
    tiny_example = TinyExample(  # 16^3 volumes, the low stage on the 8^3 grid
        phantom="coronary", n=6, size=16, prepare={"ct_window": (-1000.0, 1000.0), "seed": 0}, config="sdm-tiny",
        overrides=("model.channels=[8, 16]", "model.attention_levels=[false, false]", "model.norm_num_groups=4", "model.num_head_channels=4",
                   "model.spade_channels=8", "model.low_res_factor=2", "train.batch_size=2", "train.num_threads=1", "sample.steps=4",
                   "evaluate.n_generated=2", "evaluate.segmenter_epochs=1", "evaluate.segmenter_channels=[4, 8]"))

    def resolve_config(self, config: SDMConfig) -> SDMConfig:
        data_dir = Path(config.data_dir)
        info = load_prepared_info(data_dir)
        if info["spatial_dims"] != 3 or info["image_shape"] is None:
            raise MedsynthError(f"{data_dir}: sdm needs 3D volumes of one shape; prepare with --size")
        if not info["has_label"] or not info["labels"]:
            raise MedsynthError(f"{data_dir}: sdm needs label maps (an nnU-Net raw folder or a dataset with labelsTr)")
        if info["in_channels"] != 1:
            raise MedsynthError(f"{data_dir}: sdm synthesises one-channel CT; this dataset has {info['in_channels']} channels")
        settings = (load_prepared_manifest(data_dir).prepare or {}).get("settings", {})
        if settings.get("normalize") not in ("ct", "percentile"):
            raise MedsynthError(f"{data_dir}: sdm needs intensities in [0, 1]; prepare with --normalize ct (CT, HU window) "
                                f"or percentile, not '{settings.get('normalize')}'")
        shape, factor = list(info["image_shape"]), config.model.low_res_factor
        if any(s % factor for s in shape):
            raise MedsynthError(f"sdm: volume shape {shape} is not divisible by model.low_res_factor {factor}")
        patch = STAGES[config.model.stage](config).resolve_patch(shape, data_dir)
        labels = dict(sorted(info["labels"].items()))
        window = settings.get("ct_window") if settings.get("normalize") == "ct" else None
        model = config.model.model_copy(update={
            "image_shape": shape, "classes": list(labels.values()), "label_values": list(labels),
            "reference_affine": np.asarray(info["affine"]).tolist() if info.get("affine") is not None else None,
            "intensity_window": [float(v) for v in window] if window else None, "patch_size": patch,
        })
        sample = config.sample
        if sample.low_res_run is not None:
            sample = sample.model_copy(update={"low_res_run": str(Path(sample.low_res_run).resolve())})
        return config.model_copy(update={"model": model, "sample": sample})

    def build_module(self, config: SDMConfig) -> SDMModule:
        return SDMModule(config)

    def build_datamodule(self, config: SDMConfig) -> L.LightningDataModule:
        return PreparedDataModule(Path(config.data_dir), batch_size=config.train.batch_size,
                                  num_workers=config.train.num_workers, seed=config.train.seed, in_memory=True)

    @staticmethod
    def to_units(x: Tensor, module: SDMModule) -> Tensor:
        """Model range [-1, 1] to the data's units: HU with a CT window, else [0, 1]."""
        unit = (x.float() + 1) / 2
        window = module.config.model.intensity_window
        return unit if window is None else window[0] + unit * (window[1] - window[0])

    def low_res_module(self, module: SDMModule) -> SDMModule:
        """The run named by ``sample.low_res_run``, checked against the high-res stage."""
        path = module.config.sample.low_res_run
        if path is None:
            raise MedsynthError("sdm high stage: set sample.low_res_run to a trained low-res run (it makes the references)")
        low = load_module(path, self)
        model, high = low.config.model, module.config.model
        if model.stage != "low":
            raise BadInputError(path, f"sample.low_res_run must be a low-stage sdm run, this one is '{model.stage}'")
        if (model.low_res_factor, model.label_values) != (high.low_res_factor, high.label_values):
            raise BadInputError(path, "low-res run has another low_res_factor or other classes than this high-res run")
        return low.to(module.device)

    def generate(self, module: SDMModule, labels: Tensor, seeds: Sequence[int], reference: Tensor | None = None,
                 settings: SDMSampleConfig | None = None) -> Tensor:
        """Volumes in [-1, 1] for class-index label maps (references from the low-res run when needed)."""
        settings = settings or module.config.sample
        return module.volumes(labels, seeds, settings, module.stage.reference(self, module, labels, seeds, reference))

    def sample(self, module: SDMModule, request: SampleRequest, out: Path) -> list[Path]:
        if request.mode != "random":
            raise MedsynthError(f"sdm samples from label maps; mode '{request.mode}' is not available (use: random)")
        if request.class_name is not None:
            raise MedsynthError("sdm is conditioned on label maps, not classes: use --condition LABELS.nii.gz or a folder")
        module.eval()
        jobs: list[tuple[str, Tensor, np.ndarray]] = []  # (name, class indices (1, 1, *S), affine)
        if request.condition is not None:
            for path in condition_files(Path(request.condition)):
                labels, affine = read_label_map(path, module)
                jobs += [(condition_name(path) if request.n == 1 else f"{condition_name(path)}_{k:02d}", labels, affine) for k in range(request.n)]
        else:  # label maps of the prepared dataset's held-out cases, cycled
            cases = self.real_cases(module, ("test", "val", "train"))
            if not cases:
                raise MedsynthError(f"sdm: no --condition given and no prepared label maps in {module.config.data_dir}")
            for k in range(request.n):
                case = cases[k % len(cases)]
                jobs.append((f"{case['id']}_{k:03d}", module.classes_of(case["label"][None]), case["affine"].numpy()))
        model, factor = module.config.model, module.stage.grid_factor
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for index, (_, labels, _) in enumerate(jobs):
            by_shape.setdefault(tuple(labels.shape[2:]), []).append(index)
        volumes: dict[int, Tensor] = {}
        for indices in by_shape.values():
            labels = torch.cat([jobs[i][1] for i in indices]).to(module.device)
            volumes.update(zip(indices, self.generate(module, labels, item_seeds(request.seed, indices))))
        written, folder = [], out / request.mode
        for index, (name, labels, affine) in enumerate(jobs):
            grid_affine = low_res_affine(affine, factor)
            written.append(save_image(self.to_units(volumes[index], module).cpu(), folder / f"{name}.nii.gz", affine=grid_affine))
            if request.condition is None:
                values = torch.tensor(model.label_values)[downsample_labels(labels, len(model.classes), factor)[0]]
                save_image(values.to(torch.int16), folder / "labels" / f"{name}.nii.gz", affine=grid_affine)
        return written

    def real_cases(self, module: SDMModule, splits: Sequence[str]) -> list[dict[str, Any]]:
        """The prepared cases of the first non-empty split of ``splits`` (none without data)."""
        data_dir = module.config.data_dir
        if data_dir is None or not (Path(data_dir) / "dataset.json").exists():
            return []
        return next((items for split in splits if (items := load_split(data_dir, split))), [])

    def evaluate(self, run: Run, module: SDMModule, data_dir: Path) -> dict[str, Any]:
        from medsynth.evaluate.metrics import memorisation_audit
        from medsynth.evaluate.segmentation import dice_per_class, intensity_stats_per_label, segment, train_segmenter

        settings, model, stage = module.config.evaluate, module.config.model, module.stage
        classes, num_classes, factor = model.classes, len(model.classes), stage.grid_factor
        module = module.eval()

        def load(split: str) -> dict[str, Tensor]:
            """Volumes in [0, 1] and class maps of a split, on the prepared grid and on the evaluated one."""
            items = load_split(data_dir, split)
            if not items:
                return {}
            images, labels = stack_items(items, "image"), module.classes_of(stack_items(items, "label"))
            if (labels < 0).any():
                raise BadInputError(data_dir, "holds label values this model was not trained on")
            return {"image": images, "label": labels, "x": downsample_image(images, factor),
                    "y": downsample_labels(labels, num_classes, factor)[:, 0]}

        def units(x01: Tensor) -> Tensor:
            return self.to_units(x01 * 2 - 1, module)

        train, test = load("train"), load("test") or load("val")
        if not train or not test:
            raise MedsynthError(f"{data_dir}: evaluation needs training and held-out (test or val) cases")
        segmenter = train_segmenter(units(train["x"]), train["y"], num_classes, epochs=settings.segmenter_epochs,
                                    seed=settings.seed, channels=settings.segmenter_channels)
        dice_real = dice_per_class(segment(segmenter, units(test["x"])), test["y"], num_classes, classes)

        # Generate from the held-out label maps, cycled to n_generated volumes.
        order = [k % len(test["x"]) for k in range(settings.n_generated)]
        cond_y = test["y"][order]
        reference, reference_kind = stage.evaluation_reference(module, test["image"][order])
        seeds = item_seeds(settings.seed, settings.n_generated)
        generated = ((self.generate(module, test["label"][order].to(module.device), seeds, reference) + 1) / 2).cpu()
        dice_generated = dice_per_class(segment(segmenter, units(generated)), cond_y, num_classes, classes)

        stats_real = intensity_stats_per_label(units(test["x"]), test["y"], classes)
        stats_generated = intensity_stats_per_label(units(generated), cond_y, classes)
        shared = [name for name in classes if name in stats_real and name in stats_generated]
        audit = memorisation_audit(generated, train["x"], held_out=test["x"])
        real_mean, generated_mean = float(dice_real.pop("mean_foreground")), float(dice_generated.pop("mean_foreground"))
        sample = module.config.sample
        metrics: dict[str, Any] = {
            "stage": model.stage,
            "segmenter_dice_real": real_mean,
            "segmenter_dice_generated": generated_mean,
            "segmenter_dice_ratio": generated_mean / real_mean if real_mean > 0 else float("nan"),
            "segmenter_dice_real_per_class": dice_real,
            "segmenter_dice_generated_per_class": dice_generated,
            "intensity_units": "HU" if model.intensity_window else "[0, 1]",
            "intensity_real_per_label": stats_real,
            "intensity_generated_per_label": stats_generated,
            "intensity_mean_abs_difference": float(np.mean([abs(stats_real[n]["mean"] - stats_generated[n]["mean"]) for n in shared])),
            **audit,
            "memorisation_real_test_max_ssim": audit["memorisation_max_ssim_real_reference"],
            "n_generated": settings.n_generated,
            "n_test_real": len(test["x"]),
            "evaluated_shape": list(generated.shape[2:]),
            "sampler": f"{sample.sampler} ({sample.steps_for(module.schedule)} steps), guidance {sample.guidance}",
            **stage.extra_metrics(units(generated), reference_kind),
        }
        samples = run.samples / "evaluate"
        affine = low_res_affine(np.asarray(model.reference_affine if model.reference_affine is not None else np.eye(4)), factor)
        for k, volume in enumerate(units(generated)):
            save_image(volume, samples / f"generated_{k:03d}.nii.gz", affine=affine)
            save_image(torch.tensor(model.label_values)[cond_y[k]][None].to(torch.int16), samples / f"labels_{k:03d}.nii.gz", affine=affine)
        return metrics

    def report_sections(self, run: Run, module: SDMModule) -> list[ReportSection]:
        from medsynth.report.html import figure_html, image_grid

        samples = run.samples / "evaluate"
        generated = sorted(samples.glob("generated_*.nii.gz"))[:6]
        if not generated:
            return [ReportSection("Generated volumes", "<p>Run <code>medsynth evaluate</code> first: it writes the generated volumes shown here.</p>")]
        model, factor = module.config.model, module.stage.grid_factor
        window, top = model.intensity_window or [0.0, 1.0], max(1, len(model.classes) - 1)
        images, titles = [], []
        for path in generated:
            labels = module.classes_of(load_image(samples / path.name.replace("generated_", "labels_"), dtype=np.int64).as_tensor())
            images += [labels.float() / top, (load_image(path).as_tensor() - window[0]) / (window[1] - window[0])]
            titles += [f"labels {path.name[10:13]}", f"generated {path.name[10:13]}"]
        for case in self.real_cases(module, ("test", "val"))[:6]:
            labels = module.classes_of(case["label"][None])
            images += [downsample_labels(labels, len(model.classes), factor)[0].float() / top, downsample_image(case["image"][None], factor)[0]]
            titles += [f"labels {case['id']}", f"real {case['id']}"]
        figure = figure_html(image_grid(images, ncols=4, titles=titles, vmin=0.0, vmax=1.0), "label maps and volumes")
        return [ReportSection("Label maps with generated (top) and real (bottom) volumes, middle axial slices", figure)]
