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

from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
from monai.data import MetaTensor
from pydantic import AliasChoices, Field
from torch import Tensor

from medsynth.config import RecipeConfig
from medsynth.data.datasets import first_split, held_out, held_out_split, require_prepared
from medsynth.data.io import save_image
from medsynth.data.labels import load_labelled, load_labelled_split, read_label_map, save_labelled, value_lookup, values_of
from medsynth.data.prepare import hu_to_unit
from medsynth.diffusion import cascade
from medsynth.diffusion.condition import Condition
from medsynth.diffusion.config import DenoiserConfig
from medsynth.diffusion.denoiser import ConditionedDenoiser
from medsynth.diffusion.module import DiffusionModule
from medsynth.diffusion.patches import PatchSamplerConfig, PatchTrainingConfig, PatchwiseDenoiser, random_patches
from medsynth.diffusion.samplers import Denoiser
from medsynth.diffusion.sampling import generate_by_shape
from medsynth.errors import BadInputError, MedsynthError
from medsynth.evaluate.segmentation import LabelMapFidelityConfig, label_map_fidelity
from medsynth.nets.patch_embedding import coordinate_channels
from medsynth.recipes.base import (
    DataFormat,
    Example,
    Load,
    Recipe,
    SampleRequest,
    Stage,
    TinyExample,
    condition_files,
    condition_name,
    model_affine,
    require_finite,
    stage_object,
    with_settings,
)
from medsynth.report.sections import ReportSection
from medsynth.runs import Run
from medsynth.seeds import item_seeds


class SDMModelConfig(DenoiserConfig):
    """Network, schedule and stage. ``image_shape``, ``classes``, ``label_values``,
    ``reference_affine`` and ``ct_window`` are filled from the prepared data."""

    stage: Literal["low", "high"] = Field("low", description="low: whole low-res volume; high: high-res patches + low-res reference")
    image_shape: list[int] | None = Field(None, description="prepared (high-res) volume shape")
    classes: list[str] = []
    label_values: list[int] = Field([], description="label value of each class index (contiguous remapping)")
    reference_affine: list[list[float]] | None = None
    ct_window: list[float] | None = Field(None, validation_alias=AliasChoices("ct_window", "intensity_window"),  # its name before
                                          description="HU window of --normalize ct: outputs are written in HU")
    low_res_factor: int = Field(2, ge=1, description="low-res grid = prepared grid / this factor (average pooling)")
    patch_size: list[int] | None = Field(None, description="high stage: training patch (voxels); default half the volume")
    spade_channels: int = Field(16, ge=1, description="hidden channels of each SPADE block (MONAI default 128)")
    position_channels: bool = Field(True, description="high stage: give the UNet the patch's whole-volume coordinates")


class SDMSampleConfig(PatchSamplerConfig):  # the patch settings are the high stage's
    low_res_run: str | None = Field(None, description="high stage: the low-res run that makes the references")


class SDMConfig(RecipeConfig):
    recipe: Literal["sdm"] = "sdm"
    model: SDMModelConfig = SDMModelConfig()
    data: PatchTrainingConfig = PatchTrainingConfig()  # the high stage's patches
    sample: SDMSampleConfig = SDMSampleConfig()
    evaluate: LabelMapFidelityConfig = LabelMapFidelityConfig()


# -- the two stages ---------------------------------------------------------------------------------


class LowStage:
    """The whole volume on the low-res grid (prepared grid / ``low_res_factor``), label map to SPADE."""

    concat_channels = 0  # channels concatenated to x_t

    def __init__(self, config: SDMConfig):
        self.config, self.model, self.num_classes = config, config.model, len(config.model.classes)
        self.multiple = 2 ** (len(self.model.channels) - 1)  # the UNet's total stride
        self.grid_factor = self.model.low_res_factor  # prepared grid / generated grid

    def resolve_patch(self, shape: list[int], data_dir: Path) -> list[int] | None:
        low = [s // self.model.low_res_factor for s in shape]
        if any(s % self.multiple for s in low):
            raise MedsynthError(f"sdm: low-res shape {low} must be divisible by {self.multiple} "
                                f"(2^(levels-1) for model.channels {self.model.channels})")
        return self.model.patch_size

    def check_config(self) -> None:
        """Refuse a config this stage cannot build a module from (one line)."""

    def check_shape(self, path: Path | str, shape: tuple[int, ...]) -> None:
        need = self.model.low_res_factor * self.multiple
        if any(s % need for s in shape):
            raise BadInputError(path, f"label map shape {list(shape)} must be divisible by {need} (low_res_factor x network stride)")

    def condition(self, labels: Tensor, reference: Tensor | None = None) -> Condition:
        """Class indices ``(B, 1, *S)`` on the prepared grid -> the low-res one-hot label map."""
        return Condition(seg=cascade.one_hot(cascade.downsample_labels(labels, self.num_classes, self.grid_factor), self.num_classes))

    def training_pair(self, image: Tensor, labels: Tensor, generator: torch.Generator | None) -> tuple[Tensor, Condition]:
        return cascade.downsample_image(image, self.grid_factor) * 2 - 1, self.condition(labels)

    def denoiser(self, model: Denoiser, settings: SDMSampleConfig) -> Denoiser:
        return model

    def reference(self, recipe: SDMRecipe, module: SDMModule, labels: Tensor, seeds: Sequence[int], given: Tensor | None) -> Tensor | None:
        return None

    def evaluation_reference(self, module: SDMModule, images: Tensor) -> tuple[Tensor | None, str | None]:
        return None, None

    def extra_metrics(self, generated: Tensor, kind: str | None) -> dict[str, Any]:
        return {}


class HighStage(LowStage):
    """Patches of the prepared grid; x_t concatenated with the reference (and position), label map to SPADE."""

    def __init__(self, config: SDMConfig):
        super().__init__(config)
        self.concat_channels = 1 + (3 if self.model.position_channels else 0)  # the reference, and x/y/z coordinates
        self.grid_factor = 1

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

    def check_config(self) -> None:
        if self.model.patch_size is None:
            raise MedsynthError("sdm: model.patch_size is unset for the high stage (train with --data)")

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
        return Condition(seg=cascade.one_hot(labels, self.num_classes), concat=torch.cat(concat, dim=1))

    def training_pair(self, image: Tensor, labels: Tensor, generator: torch.Generator | None) -> tuple[Tensor, Condition]:
        """``data.patches_per_volume`` random patches per volume, the same windows of x_0 and every condition."""
        cond = self.condition(labels, cascade.low_res_reference(image, self.model.low_res_factor))
        return random_patches(image * 2 - 1, cond, self.model.patch_size, self.config.data.patches_per_volume, generator)

    def denoiser(self, model: Denoiser, settings: SDMSampleConfig) -> Denoiser:
        return PatchwiseDenoiser(model, self.model.patch_size, settings.patch_overlap, settings.patch_batch)

    def reference(self, recipe: SDMRecipe, module: SDMModule, labels: Tensor, seeds: Sequence[int], given: Tensor | None) -> Tensor:
        """The given references, or the low-res run's volumes for the label maps, upsampled."""
        if given is not None:
            return given
        low = recipe.low_res_module(module)
        return cascade.upsample_image(low.volumes(labels, seeds, low.config.sample), self.model.low_res_factor)

    def evaluation_reference(self, module: SDMModule, images: Tensor) -> tuple[Tensor | None, str | None]:
        if module.config.sample.low_res_run is not None:
            return None, "low-res run (cascade)"
        # no low-res run: judge the high stage alone, on the real volumes' low-res references
        return cascade.low_res_reference(images, self.model.low_res_factor), "real volumes, average-pooled and upsampled (super-resolution)"

    def extra_metrics(self, generated: Tensor, kind: str | None) -> dict[str, Any]:
        from medsynth.evaluate.segmentation import mean_seam_score

        seams = mean_seam_score(generated, self.model.patch_size, self.config.sample.patch_overlap)
        return {"reference": kind, **{f"seam_{key}": value for key, value in seams.items()}}


# One per run (model.stage); the high stage samples its references from a low-stage run (sample.low_res_run).
DECLARED_STAGES = (Stage("low", behaviour=LowStage),
                   Stage("high", behaviour=HighStage, loads=(Load("sample.low_res_run", "low"),)))


# -- the LightningModule ------------------------------------------------------------------------


class SDMModule(DiffusionModule):
    """The denoiser of one stage; the batch's label map, low-res volume, reference and patch are made by the stage."""

    config: SDMConfig

    def __init__(self, config: SDMConfig):
        model = config.model
        if model.image_shape is None or not model.classes:
            raise MedsynthError("sdm: model.image_shape and model.classes are unset (train with --data)")
        stage = stage_object(DECLARED_STAGES, config)
        stage.check_config()
        unet = model.build_unet(3, 1 + stage.concat_channels, 1, label_nc=len(model.classes),
                                spade_intermediate_channels=model.spade_channels)
        # The null condition: an empty label map; the reference and position channels are kept.
        super().__init__(config, ConditionedDenoiser(unet), model.make_schedule(), model.cond_drop_prob, {"seg": torch.zeros_like})
        self.stage = stage
        self.register_buffer("lut", value_lookup(model.label_values), persistent=False)

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


# -- the recipe ---------------------------------------------------------------------------------


class SDMRecipe(Recipe):
    name = "sdm"
    data_format = DataFormat("CT (coronary CTA)", 3, "label map", "CT volumes (HU) and their label maps, NIfTI with the label map's affine",
                             model_range=(-1.0, 1.0))
    config_class = SDMConfig
    sample_modes = ("random",)
    stages = DECLARED_STAGES
    headline_metrics = ("segmenter_dice_real", "segmenter_dice_generated", "segmenter_dice_ratio", "tstr_dice",
                        "downstream_dice_with_generated", "spectrum_ratio_high", "memorisation_max_ssim")
    # HU window -> [0, 1] (written back in HU); --size crops/pads around the heart at the --spacing grid.
    prepare_defaults = {"normalize": "ct", "crop": True}
    plan_config = "sdm-low-64"
    tiny_example = TinyExample(  # 16^3 volumes, the low stage on the 8^3 grid
        phantom="coronary", n=6, size=16, prepare={"ct_window": (-1000.0, 1000.0), "seed": 0}, config="sdm-tiny",
        overrides=("model.channels=[8, 16]", "model.attention_levels=[false, false]", "model.norm_num_groups=4", "model.num_head_channels=4",
                   "model.spade_channels=8", "model.low_res_factor=2", "train.batch_size=2", "train.num_threads=1", "sample.steps=4",
                   "evaluate.n_generated=2", "evaluate.segmenter_epochs=1", "evaluate.segmenter_channels=[4, 8]"))

    def resolve_config(self, config: SDMConfig) -> SDMConfig:
        data_dir = Path(config.data_dir)
        # one-channel volumes in [0, 1] (CT by HU window, or percentiles), with label maps
        info, settings = require_prepared(data_dir, "sdm", spatial_dims=3, one_shape=True, labels=True, channels=1,
                                          normalize=("ct", "percentile"))
        shape, factor = list(info["image_shape"]), config.model.low_res_factor
        if any(s % factor for s in shape):
            raise MedsynthError(f"sdm: volume shape {shape} is not divisible by model.low_res_factor {factor}")
        patch = stage_object(DECLARED_STAGES, config).resolve_patch(shape, data_dir)
        labels = dict(sorted(info["labels"].items()))
        model = config.model.model_copy(update={
            "image_shape": shape, "classes": list(labels.values()), "label_values": list(labels), "patch_size": patch,
            **self.data_settings(info, settings),
        })
        sample = config.sample
        if sample.low_res_run is not None:
            sample = sample.model_copy(update={"low_res_run": str(Path(sample.low_res_run).resolve())})
        return config.model_copy(update={"model": model, "sample": sample})

    def build_module(self, config: SDMConfig) -> SDMModule:
        return SDMModule(config)

    def low_res_module(self, module: SDMModule) -> SDMModule:
        """The run named by ``sample.low_res_run`` (:meth:`~medsynth.recipes.base.Recipe.stage_run`), checked against the high-res stage."""
        path = module.config.sample.low_res_run
        low = self.stage_run(module.config, "sample.low_res_run")
        model, high = low.config.model, module.config.model
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
        jobs: list[tuple[str, MetaTensor]] = []  # (name, class indices (1, 1, *S) carrying the label map's affine)
        if request.condition is not None:
            for path in condition_files(Path(request.condition)):
                indices, affine = read_label_map(path, module.config.model.label_values, module.config.model.classes)
                labels = MetaTensor(indices, affine=affine)
                module.stage.check_shape(path, tuple(labels.shape[2:]))
                jobs += [(condition_name(path) if request.n == 1 else f"{condition_name(path)}_{k:02d}", labels) for k in range(request.n)]
        else:  # label maps of the prepared dataset's held-out cases, cycled
            cases = first_split(module.config.data_dir, ("test", "val", "train"))
            if not cases:
                raise MedsynthError(f"sdm: no --condition given and no prepared label maps in {module.config.data_dir}")
            for k in range(request.n):
                case = cases[k % len(cases)]
                jobs.append((f"{case['id']}_{k:03d}", MetaTensor(module.classes_of(case["label"][None]), affine=case["affine"])))
        model, factor = module.config.model, module.stage.grid_factor
        volumes = generate_by_shape([labels.as_tensor() for _, labels in jobs], lambda labels, indices: self.generate(
            module, labels.to(module.device), item_seeds(request.seed, indices)))
        require_finite(volumes, f"sdm {request.mode}")
        written, folder = [], out / request.mode
        for index, (name, labels) in enumerate(jobs):
            on_grid = partial(MetaTensor, affine=cascade.low_res_affine(labels.affine, factor))  # the generated grid's geometry
            written.append(save_image(on_grid(self.to_units(volumes[index], module.config).cpu()), folder / f"{name}.nii.gz"))
            if request.condition is None:
                values = values_of(cascade.downsample_labels(labels.as_tensor(), len(model.classes), factor)[0], model.label_values)
                save_image(on_grid(values), folder / "labels" / f"{name}.nii.gz")
        return written

    def evaluate(self, run: Run, module: SDMModule, data_dir: Path) -> dict[str, Any]:
        from medsynth.evaluate.metrics import memorisation_audit, real_reference, spectrum_ratio_high

        settings, model, stage = module.config.evaluate, module.config.model, module.stage
        num_classes, factor = len(model.classes), stage.grid_factor
        module = module.eval()

        def load(split: str) -> dict[str, Tensor]:
            """Volumes in [0, 1] and class maps of a split, on the prepared grid and on the evaluated one."""
            if (loaded := load_labelled_split(data_dir, split, model.label_values)) is None:
                return {}
            images, labels = loaded
            return {"image": images, "label": labels, "x": cascade.downsample_image(images, factor),
                    "y": cascade.downsample_labels(labels, num_classes, factor)[:, 0]}

        def units(x01: Tensor) -> Tensor:
            return self.to_units(x01 * 2 - 1, module.config)

        train, test = load("train"), (load(split) if (split := held_out_split(data_dir)) else {})
        if not train or not test:
            raise MedsynthError(f"{data_dir}: evaluation needs training and held-out (test or val) cases")

        # Generate from the held-out label maps, cycled to n_generated volumes.
        order = [k % len(test["x"]) for k in range(settings.n_generated)]
        cond_y = test["y"][order]
        reference, reference_kind = stage.evaluation_reference(module, test["image"][order])
        seeds = item_seeds(settings.seed, settings.n_generated)
        generated = ((self.generate(module, test["label"][order].to(module.device), seeds, reference) + 1) / 2).cpu()

        audit = memorisation_audit(generated, train["x"], held_out=test["x"])
        metrics: dict[str, Any] = {
            "stage": model.stage,
            **label_map_fidelity(units(train["x"]), train["y"], units(test["x"]), test["y"], units(generated), cond_y,
                                 model.classes, units="HU" if model.ct_window else "[0, 1]",
                                 epochs=settings.segmenter_epochs, seed=settings.seed, channels=settings.segmenter_channels),
            **audit,
            "memorisation_real_test_max_ssim": audit["memorisation_max_ssim_real_reference"],
            "n_generated": settings.n_generated,
            "n_test_real": len(test["x"]),
            "evaluated_shape": list(generated.shape[2:]),
            "sampler": module.config.sample.describe(module.schedule),
            **stage.extra_metrics(units(generated), reference_kind),
            "spectrum_ratio_high": spectrum_ratio_high(test["x"], generated),
            "spectrum_ratio_high_real_reference": real_reference(spectrum_ratio_high, test["x"], seed=settings.seed),
        }
        if settings.utility:
            metrics |= self.utility(module, train, test, units, settings)
        affine = cascade.low_res_affine(model_affine(model), factor)
        save_labelled(run.samples / "evaluate", units(generated), values_of(cond_y[:, None], model.label_values), affine)
        return metrics

    def utility(self, module: SDMModule, train: dict[str, Tensor], test: dict[str, Tensor], units: Callable[[Tensor], Tensor],
                settings: LabelMapFidelityConfig) -> dict[str, Any]:
        """Train-on-synthetic (volumes generated from the training label maps) and the augmentation test (a labelled
        pool, classic augmentation, volumes generated for the other pool's label maps, the oracle), by the segmenter's Dice.

        ``train``/``test`` hold ``x`` (volumes in [0, 1] on the evaluated grid) and ``y`` (their class maps).
        """
        from medsynth.evaluate.image_utility import augmentation_test, labelled_pools, segmenter_task, tstr

        n = len(train["x"])
        count = n if settings.n_synthetic is None else settings.n_synthetic
        if count > n:
            raise MedsynthError(f"evaluate.n_synthetic={count}: the training split has {n} subjects")
        chosen = torch.randperm(n, generator=torch.Generator().manual_seed(settings.seed))[:count].sort().values
        images, maps = units(train["x"][chosen]), train["y"][chosen]
        n_labelled = settings.n_labelled if settings.n_labelled is not None else max(1, count // 4)
        labelled, unlabelled = labelled_pools(maps, n_labelled, seed=settings.seed, setting="evaluate.n_labelled")
        reference, _ = module.stage.evaluation_reference(module, train["image"][chosen])
        seeds = item_seeds(settings.seed + 1, count)  # other seeds than the evaluation's volumes
        generated = units((self.generate(module, train["label"][chosen].to(module.device), seeds, reference) + 1) / 2).cpu()
        task = segmenter_task(module.config.model.classes, settings.segmenter_epochs, settings.segmenter_channels)
        real_test = (units(test["x"]), test["y"])
        return {**tstr(task, (images, maps), (generated, maps), real_test, settings.utility_seeds),
                **augmentation_test(task, (images[labelled], maps[labelled]), (images[unlabelled], maps[unlabelled]),
                                    generated[unlabelled], real_test, settings.utility_seeds)}

    def report_sections(self, run: Run, module: SDMModule) -> list[ReportSection]:
        from medsynth.report.html import figure_html, label_map_grid

        generated = load_labelled(run.samples / "evaluate", limit=6)
        if not generated:
            return [ReportSection("Generated volumes", "<p>Run <code>medsynth evaluate</code> first: it writes the generated volumes shown here.</p>")]
        model, factor = module.config.model, module.stage.grid_factor
        pairs = [(name, "generated", module.classes_of(labels), hu_to_unit(volume, model.ct_window))
                 for name, labels, volume in generated]
        pairs += [(case["id"], "real", cascade.downsample_labels(module.classes_of(case["label"][None]), len(model.classes), factor)[0],
                   cascade.downsample_image(case["image"][None], factor)[0]) for case in held_out(module.config.data_dir)[:6]]
        figure = figure_html(label_map_grid(pairs, len(model.classes), ncols=4), "label maps and volumes")
        return [ReportSection("Label maps with generated (top) and real (bottom) volumes, middle axial slices", figure)]

    # -- medsynth plan (Recipe.plan_examples)

    def plan_examples(self, config: SDMConfig, size: list[int]) -> list[Example]:
        """The run's stage on volumes of ``size`` (X Y Z voxels, the prepared grid): the low stage on the low-res grid,
        the high one on its training patch (resolved as training resolves it); a sampling call denoises one batch
        (patch-tiled on the high stage)."""
        classes = config.model.classes or ["background", "myocardium", "blood_pool", "coronary"]
        config = with_settings(config, "model", image_shape=list(size), classes=classes, label_values=list(range(len(classes))))
        stage = stage_object(self.stages, config)
        config = with_settings(config, "model", patch_size=stage.resolve_patch(list(size), Path("--size")))
        settings = config.sample
        items = settings.batch_size

        def batch(b: int) -> dict[str, Any]:
            return {"image": torch.rand(b, 1, *size), "label": torch.zeros(b, 1, *size, dtype=torch.long)}

        def sample(module: SDMModule) -> Tensor:
            labels = torch.zeros(items, 1, *size, dtype=torch.long)
            # a stage that concatenates channels (high) is conditioned on the upsampled low-res volume too
            reference = torch.rand(items, 1, *size) if stage.concat_channels else None
            cond = module.stage.condition(labels, reference)
            grid = [s // stage.grid_factor for s in size]
            return module.denoiser(settings)(torch.rand(items, 1, *grid), torch.zeros(items, dtype=torch.long), cond)

        return [Example(config.model.stage, config, batch, sample, items, settings.steps_for(config.model.make_schedule()))]

    def plan_candidates(self, config: SDMConfig) -> list[dict[str, Any]]:
        """The config's own, then (the high stage, which trains on patches) its patch halved while each side stays at
        least twice the UNet's stride (2^(levels-1)) and divisible by it."""
        model = config.model
        found: list[dict[str, Any]] = [{}]
        if any(issubclass(stage.behaviour, HighStage) for stage in self.stages_trained(config)):
            multiple = 2 ** (len(model.channels) - 1)
            patch = list(model.patch_size)
            while all(p // 2 >= 2 * multiple and (p // 2) % multiple == 0 for p in patch):
                patch = [p // 2 for p in patch]
                found.append({"patch_size": patch})
        return found
