"""Recipe ``motion-ldm``: latent diffusion of respiratory deformation fields for 4D CT, conditioned on the
CT and the breathing phase.

Three stages, trained in one run one after the other (``model.stage: all``; ``model.stage_epochs``
gives the first two their epochs, the LDM the rest), or one at a time (``--stage image-ae|field-vae|ldm``;
the ``ldm`` stage then loads the autoencoders of ``model.image_ae_run`` / ``model.field_vae_run``):

- **image-ae**: MONAI ``AutoencoderKL`` on the phase images, downsampled in-plane only (the slice
  axis is kept, as the original does for 50-slice scans): :mod:`medsynth.diffusion.autoencoder`;
- **field-vae**: the same on the fields (mm / ``model.field_scale_mm``), with L1 + gradient
  smoothness + bending energy + a small KL, as the original;
- **ldm**: MONAI's diffusion UNet over (the reference CT's latent, the noisy field latent) that
  denoises the field latent, the phase as a class embedding; latents are the frozen autoencoders'
  posterior means, cached, scaled to unit variance when the stage starts (Rombach et al. 2022).

Data (``medsynth prepare --recipe motion-ldm``): one prepared case per subject and phase, with
the subject's reference phase (``model.reference_phase``, end-inhale) as the condition. The
training field of a phase is the registration's (``data.registration``: the folder of
``medsynth register --data --pairs reference|consecutive``; its compact grids are made dense
per subject while loading, consecutive ones composed), or the dataset's own fields
(``flow``, e.g. a phantom's exact motion) without it. A field ``u_t`` warps the reference onto
phase t: ``warp_image(reference, u_t) ~ phase_t``.

One file a little over 450 lines: three networks trained in one run, whose sampling, evaluation and
report read them together; the generic parts are services (PhaseData, the autoencoder, breathing metrics).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from lightning.pytorch.trainer.states import TrainerFn
from pydantic import Field
from torch import Tensor

from medsynth.config import RecipeConfig, StrictModel
from medsynth.data.datasets import HELD_OUT, held_out, load_prepared_manifest, require_prepared, stack_items
from medsynth.data.fields import mm_to_voxel
from medsynth.data.io import AFFINE_TOLERANCE
from medsynth.data.manifest import MANIFEST_NAME
from medsynth.diffusion.autoencoder import AutoencoderConfig, LatentAutoencoder, LatentCache
from medsynth.diffusion.condition import Condition
from medsynth.diffusion.config import DenoiserConfig
from medsynth.diffusion.denoiser import ConditionedDenoiser
from medsynth.diffusion.module import DiffusionModule
from medsynth.diffusion.sampling import SamplerConfig
from medsynth.errors import BadInputError, MedsynthError
from medsynth.evaluate.downstream import MotionUtilitySettings
from medsynth.motion.fields import resample_field, warp_image
from medsynth.motion.phase_series import PhaseData
from medsynth.recipes.base import (
    ConditionVolume,
    DataFormat,
    Example,
    Load,
    Recipe,
    SampleRequest,
    Stage,
    StagedModule,
    TinyExample,
    condition_volumes,
    load_stage_weights,
    require_finite,
    stages_trained,
    with_settings,
)
from medsynth.report.sections import ReportSection
from medsynth.runs import Run
from medsynth.seeds import item_seed, item_seeds


class MotionLDMModelConfig(DenoiserConfig):
    """The three networks. ``phases``, ``image_shape``, ``reference_affine``, ``ct_window`` and ``labels``
    are filled from the prepared data."""

    stage: Literal["all", "image-ae", "field-vae", "ldm"] = Field("all", description="train all stages in turn, or one")
    stage_epochs: list[int] = Field([10, 10], description="stage all: epochs of the image autoencoder and the field VAE; the LDM trains the rest")
    image_ae: AutoencoderConfig = AutoencoderConfig(spatial_dims=3, in_channels=1, channels=[16, 32, 32], latent_channels=3, keep_axis=2)
    field_vae: AutoencoderConfig = AutoencoderConfig(spatial_dims=3, in_channels=3, channels=[16, 32, 32], latent_channels=4, keep_axis=2)
    field_scale_mm: float = Field(10.0, gt=0, description="fields enter the field VAE as mm / this")
    field_smoothness: float = Field(0.1, ge=0, description="weight of the decoded field's gradient smoothness (MONAI DiffusionLoss)")
    field_bending: float = Field(0.1, ge=0, description="weight of the decoded field's bending energy (MONAI BendingEnergyLoss)")
    image_ae_run: str | None = Field(None, description="stage ldm: the run whose image autoencoder to use")
    field_vae_run: str | None = Field(None, description="stage ldm: the run whose field VAE to use")
    cond_drop_prob: float = Field(0.0, ge=0, lt=1, description="no guidance: the original samples the conditional model")
    phases: int | None = None
    reference_phase: int = Field(0, ge=0, description="the phase every field starts from (the condition CT's phase)")
    image_shape: list[int] | None = None
    reference_affine: list[list[float]] | None = None
    ct_window: list[float] | None = None
    labels: dict[str, str] = {}


class MotionLDMDataConfig(StrictModel):
    registration: str | None = Field(None, description="a `medsynth register --data` folder whose fields train the model; None: the dataset's fields")
    cached_subjects: int = Field(64, ge=1, description="subjects whose dense fields stay in memory while loading")


class MotionLDMSampleConfig(SamplerConfig):
    sampler: Literal["ddpm", "ddim", "dpmpp", "rflow"] = "ddim"
    phases: list[int] | None = Field(None, description="phases to generate (None: all)")
    movie_style: Literal["quiver", "magnitude"] = "quiver"


class MotionLDMEvaluateConfig(MotionUtilitySettings):
    n_samples: int = Field(4, ge=1, description="generated motions per held-out subject")
    generated_per_subject: int = Field(2, ge=1, description="generated motions (every moving phase) per unlabelled CT; classic and PCA draw as many fields")


class MotionLDMConfig(RecipeConfig):
    recipe: Literal["motion-ldm"] = "motion-ldm"
    model: MotionLDMModelConfig = MotionLDMModelConfig()
    data: MotionLDMDataConfig = MotionLDMDataConfig()
    sample: MotionLDMSampleConfig = MotionLDMSampleConfig()
    evaluate: MotionLDMEvaluateConfig = MotionLDMEvaluateConfig()


# -- the three stages ---------------------------------------------------------------------------------


class AutoencoderStage(Stage):
    """An autoencoder stage: its losses (``losses``), logged as ``train/<stage>_<loss>`` and ``val/<stage>_<loss>``."""

    def losses(self, module: MotionLDMModule, batch: dict[str, Any]) -> dict[str, Tensor]:
        raise NotImplementedError

    def training_step(self, module: MotionLDMModule, batch: dict[str, Any], batch_idx: int) -> Tensor:
        losses = self.losses(module, batch)
        module.log_dict({f"train/{self.name}_{k}": v for k, v in losses.items()}, on_step=True, on_epoch=True, batch_size=len(batch["image"]))
        return losses["loss"]

    def validation_step(self, module: MotionLDMModule, batch: dict[str, Any], batch_idx: int) -> None:
        losses = self.losses(module, batch)
        module.log_dict({"val/loss": losses["loss"], **{f"val/{self.name}_{k}": v for k, v in losses.items()}}, prog_bar=True,
                        on_epoch=True, batch_size=len(batch["image"]))

    def on_train_epoch_start(self, module: MotionLDMModule) -> None: ...


class ImageAEStage(AutoencoderStage):
    """The image autoencoder on the phase images in [-1, 1]: L1 + a small KL."""

    def losses(self, module: MotionLDMModule, batch: dict[str, Any]) -> dict[str, Tensor]:
        x = batch["image"].float() * 2 - 1
        recon, mu, sigma = module.image_ae.reconstruct(x)
        losses = {"l1": (recon - x).abs().mean(), "kl": module.image_ae.kl_loss(mu, sigma)}
        losses["loss"] = losses["l1"] + module.config.model.image_ae.kl_weight * losses["kl"]
        return losses


class FieldVAEStage(AutoencoderStage):
    """The field VAE on the fields (mm / ``model.field_scale_mm``): L1 + gradient smoothness + bending energy + a small KL."""

    def losses(self, module: MotionLDMModule, batch: dict[str, Any]) -> dict[str, Tensor]:
        model, x = module.config.model, batch["field"].float()
        recon, mu, sigma = module.field_vae.reconstruct(x)
        losses = {"l1": (recon - x).abs().mean(), "smoothness": module.smoothness(recon), "bending": module.bending(recon),
                  "kl": module.field_vae.kl_loss(mu, sigma)}
        losses["loss"] = (losses["l1"] + model.field_smoothness * losses["smoothness"] + model.field_bending * losses["bending"]
                          + model.field_vae.kl_weight * losses["kl"])
        return losses


class LDMStage(Stage):
    """The latent denoiser on the frozen autoencoders' scaled latents (:meth:`MotionLDMModule.training_pair`)."""

    def training_step(self, module: MotionLDMModule, batch: dict[str, Any], batch_idx: int) -> Tensor:
        return DiffusionModule.training_step(module, batch, batch_idx)

    def validation_step(self, module: MotionLDMModule, batch: dict[str, Any], batch_idx: int) -> None:
        return DiffusionModule.validation_step(module, batch, batch_idx)

    def on_train_epoch_start(self, module: MotionLDMModule) -> None:
        if not bool(module.scales_fitted):
            module.fit_latent_scales()


# Trained in turn in one run (model.stage: all; the autoencoders frozen after their stage, so the weight average starts
# with the LDM), or one per run: the ldm stage alone then loads the autoencoders of the runs that trained them.
STAGES = (
    ImageAEStage("image-ae", ("image_ae",), epochs="model.stage_epochs.0", averaged=False),
    FieldVAEStage("field-vae", ("field_vae",), epochs="model.stage_epochs.1", averaged=False),
    LDMStage("ldm", ("net",), loads=(Load("model.image_ae_run", "image-ae", weights=("image_ae",)),
                                     Load("model.field_vae_run", "field-vae", weights=("field_vae",)))),
)


# -- the LightningModule ------------------------------------------------------------------------------


class MotionLDMModule(StagedModule, DiffusionModule):
    """The image autoencoder, the field VAE and the latent denoiser; the stage of the epoch (``STAGES``) trains."""

    declared = STAGES

    config: MotionLDMConfig

    def __init__(self, config: MotionLDMConfig):
        from monai.losses import BendingEnergyLoss, DiffusionLoss

        model = config.model
        if model.phases is None or model.image_shape is None:
            raise MedsynthError("motion-ldm: model.phases and model.image_shape are unset (train with --data)")
        image_channels, field_channels = model.image_ae.latent_channels, model.field_vae.latent_channels
        unet = model.build_unet(3, image_channels + field_channels, field_channels, num_class_embeds=model.phases)
        super().__init__(config, ConditionedDenoiser(unet), model.make_schedule())  # no null condition: no guidance
        self.image_ae = LatentAutoencoder(model.image_ae)
        self.field_vae = LatentAutoencoder(model.field_vae)
        self.smoothness, self.bending = DiffusionLoss(), BendingEnergyLoss()
        self.register_buffer("scales_fitted", torch.tensor(False))  # latent scale factors set (saved with the weights)
        # Posterior means under the frozen autoencoders, in memory (a resumed run encodes again: deterministic).
        self.image_cache, self.field_cache = LatentCache(None), LatentCache(None)
        self._means: tuple[dict[str, Tensor], dict[str, Tensor]] | None = None
        self.plan = stages_trained(STAGES, config)  # the stages this run trains, in turn

    def setup(self, stage: str) -> None:  # Lightning's stage (fit, validate, ...)
        if TrainerFn(stage) is TrainerFn.FITTING:
            load_stage_weights(self, MotionLDMRecipe())  # the ldm stage alone: the autoencoders of the runs that trained them

    # -- the latent diffusion stage

    def posterior_means(self) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Posterior means ``(L, *latent)`` of every subject's reference image and every case's field
        (all splits of the datamodule), encoded once by the frozen autoencoders."""
        if self._means is None:
            datasets = getattr(self._trainer.datamodule, "datasets", None) if self._trainer is not None else None
            if datasets is None:  # data given without the prepared datamodule (a custom loop): encoded per batch
                return {}, {}
            items = {item["id"]: item for dataset in datasets.values() for item in (dataset[i] for i in range(len(dataset)))}
            references = {item["subject"]: item["reference"] for item in items.values()}
            size = self.config.train.batch_size
            image = self.image_cache.get(self.image_ae, sorted(references), lambda ids: torch.stack([references[i] for i in ids]) * 2 - 1, size)
            field = self.field_cache.get(self.field_vae, sorted(items), lambda ids: torch.stack([items[i]["field"] for i in ids]), size)
            self._means = ({k: mu for k, (mu, _) in image.items()}, {k: mu for k, (mu, _) in field.items()})
        return self._means

    @torch.no_grad()
    def fit_latent_scales(self) -> None:
        """Scale both latent spaces to unit standard deviation over the training items (once, when the LDM starts)."""
        image, field = self.posterior_means()
        if not image:  # trained without the prepared datamodule: the scales stay 1
            return
        train = self.trainer.datamodule.datasets["train"]
        ids = [train.cases[i].id for i in range(len(train))]
        subjects = sorted({train.cases[i].subject for i in range(len(train))})
        self.image_ae.fit_scale_factor(torch.stack([image[s] for s in subjects]))
        self.field_vae.fit_scale_factor(torch.stack([field[i] for i in ids]))
        self.scales_fitted.fill_(True)

    def training_pair(self, batch: dict[str, Any], generator: torch.Generator | None = None) -> tuple[Tensor, Condition]:
        """(the scaled field latent, Condition(the scaled reference-image latent, the phase)); deterministic."""
        image, field = self.posterior_means()
        z_field = self.field_vae.to_diffusion(cached(field, batch["id"], lambda: self.field_vae.encode(batch["field"].float())[0], self.device))
        z_image = self.image_ae.to_diffusion(cached(image, batch["subject"], lambda: self.image_ae.encode(batch["reference"].float() * 2 - 1)[0], self.device))
        return z_field, Condition(concat=z_image, class_labels=batch["phase"].long().to(self.device))

    @torch.no_grad()
    def fields_mm(self, reference: Tensor, phases: Sequence[int], seeds: Sequence[int], settings: MotionLDMSampleConfig) -> Tensor:
        """Generated fields ``(len(phases), 3, *S)`` in world mm for one reference image ``(1, *S)`` in [0, 1];
        item i has phase ``phases[i]`` and seed ``seeds[i]``; the reference phase's field is zero."""
        self.eval()
        shape = tuple(reference.shape[1:])
        z_image = self.image_ae.to_diffusion(self.image_ae.encode(reference[None].to(self.device).float() * 2 - 1)[0])
        labels = torch.as_tensor(list(phases), device=self.device)
        cond = Condition(concat=z_image.expand(len(phases), *z_image.shape[1:]), class_labels=labels)
        z = self.generate((self.config.model.field_vae.latent_channels, *z_image.shape[2:]), cond, settings, seeds)
        fields = self.field_vae.decode(self.field_vae.from_diffusion(z), shape) * self.config.model.field_scale_mm
        fields[labels == self.config.model.reference_phase] = 0.0
        return fields.float().cpu()


def phase_data(config: MotionLDMConfig, data_dir: Path | None = None) -> PhaseData:
    """The run's prepared phase series with its training fields (mm / ``model.field_scale_mm``)."""
    return PhaseData(data_dir or Path(config.data_dir), config.data.registration, config.model.reference_phase,
                     config.model.field_scale_mm, config.data.cached_subjects)


def check_registration(config: MotionLDMConfig) -> None:
    """Refuse a ``data.registration`` folder that cannot give every training field, before the run's first write:
    every subject of the prepared dataset needs a grid for every phase but the reference, each read safely (never
    unpickled) and finite (:func:`~medsynth.motion.bspline.load_transform`), all of a subject fitted on one image
    grid that covers the subject's prepared volume (in world mm: grids of another acquisition are refused).

    Raises:
        BadInputError: naming the folder or grid file and the problem.
    """
    from medsynth.data.datasets import read_case
    from medsynth.motion.bspline import load_transform
    from medsynth.motion.phase_series import RECORD_NAME
    from medsynth.runs import read_structured

    folder, reference = Path(config.data.registration), config.model.reference_phase
    record_path = folder / RECORD_NAME
    record = read_structured(record_path, "registration summary")
    registered = record.get("subjects") if isinstance(record, dict) else None
    if not isinstance(registered, dict):
        raise BadInputError(record_path, "broken registration record (no subjects); run `medsynth register --data` again")
    manifest = load_prepared_manifest(config.data_dir)
    by_subject: dict[str, list] = {}
    for case in manifest.cases:
        by_subject.setdefault(case.subject, []).append(case)
    missing = sorted(set(by_subject) - set(registered))
    if missing:
        raise BadInputError(folder, f"has no grids for {len(missing)} of the {len(by_subject)} subjects of {config.data_dir} "
                                    f"({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}; it registered "
                                    f"{', '.join(sorted(registered)[:5]) or 'none'}): register this dataset's phases with `medsynth register --data`")
    for subject, cases in sorted(by_subject.items()):
        reference_case = next((case for case in cases if case.phase == reference), None)
        if reference_case is None:
            raise BadInputError(manifest.resolve(MANIFEST_NAME), f"subject {subject} has no reference phase {reference}")
        volume_affine = np.asarray(read_case(manifest.resolve(reference_case.image))["affine"], dtype=np.float64)
        volume_shape = [int(n) for n in reference_case.stats["prepared_shape"]]
        first = None
        for case in sorted(cases, key=lambda c: c.phase):
            if case.phase == reference:
                continue
            path = folder / subject / f"grid_t{case.phase:02d}.npz"
            if not path.is_file():
                raise BadInputError(path, f"missing: subject {subject} phase {case.phase} has no grid (run `medsynth register --data` again to finish)")
            transform, _ = load_transform(path)  # np.load(allow_pickle=False); NaN/Inf refused
            grid = (tuple(transform.shape), np.asarray(transform.affine, dtype=np.float64))
            if first is None:
                first = (path, grid)
                _check_covers(path, grid, volume_shape, volume_affine, subject)
            elif grid[0] != first[1][0] or np.abs(grid[1] - first[1][1]).max() > AFFINE_TOLERANCE:
                raise BadInputError(path, f"fitted on another image grid ({list(grid[0])}) than {first[0].name} ({list(first[1][0])}) of subject {subject}")


def _check_covers(path: Path, grid: tuple[tuple[int, ...], np.ndarray], shape: Sequence[int], affine: np.ndarray, subject: str) -> None:
    """Refuse a grid whose image grid does not hold the centre of the subject's prepared volume, or whose extent along
    an axis is under half the volume's (world mm): the field would not cover the volume."""
    grid_shape, grid_affine = grid
    corners = np.array([[i, j, k, 1.0] for i in (0, shape[0] - 1) for j in (0, shape[1] - 1) for k in (0, shape[2] - 1)])
    inside = (np.linalg.inv(grid_affine) @ affine @ corners.T)[:3].T  # the volume's corners in the grid's voxels
    low, high = inside.min(0), inside.max(0)
    centre, overlap = (low + high) / 2, np.minimum(high, np.asarray(grid_shape) - 1) - np.maximum(low, 0)
    if np.any(centre < -0.5) or np.any(centre > np.asarray(grid_shape) - 0.5) or np.any(overlap < 0.5 * (high - low)):
        raise BadInputError(path, f"does not cover subject {subject}'s prepared volume (grid {list(grid_shape)} voxels; the volume spans "
                                  f"voxels {np.round(low, 1).tolist()} to {np.round(high, 1).tolist()} of it): grids of another subject or scan?")


def check_latent_grid(model: MotionLDMModelConfig, shape: list[int]) -> None:
    """One line unless both autoencoders give the same latent grid and the LDM's UNet can halve it at every level."""
    image, field = model.image_ae.downsampling, model.field_vae.downsampling
    if image != field:
        raise MedsynthError(f"motion-ldm: the image autoencoder downsamples by {list(image)}, the field VAE by {list(field)}: "
                            "their latents are concatenated, so channels and keep_axis must give the same grid")
    latent, multiple = [-(-s // f) for s, f in zip(shape, image)], 2 ** (len(model.channels) - 1)
    if any(size % multiple for size in latent):
        raise MedsynthError(f"motion-ldm: the latent grid {latent} (volume {shape} / autoencoder downsampling {list(image)}) must be "
                            f"divisible by {multiple} for model.channels {model.channels}: prepare another size or use fewer UNet levels")


def cached(means: dict[str, Tensor], keys: Sequence[str], encode: Any, device: torch.device) -> Tensor:
    """The cached posterior means of ``keys`` stacked, or ``encode()`` (no gradients) when one is not cached."""
    if all(key in means for key in keys):
        return torch.stack([means[key] for key in keys]).to(device)
    with torch.no_grad():
        return encode().to(device)


# -- the recipe -----------------------------------------------------------------------------------


class MotionLDMRecipe(Recipe):
    name = "motion-ldm"
    data_format = DataFormat("4D CT (breathing)", 3, "CT volume (its reference phase)",
                             "a displacement field per phase (mm vectors) and the warped 4D CT (HU), with the CT's affine")
    config_class = MotionLDMConfig
    monitor = None  # val/loss changes meaning with the stage: no "best" checkpoint across stages
    stages = STAGES
    sample_modes = ("random",)
    takes_phases = True
    headline_metrics = ("warped_ssim_generated", "field_epe_mean_mm", "folding_share", "lung_volume_ratio_generated",
                        "downstream_epe_real_only_mm", "downstream_epe_classic_mm", "downstream_epe_with_generated_mm",
                        "downstream_epe_oracle_mm", "downstream_gain_share_generated")
    prepare_defaults = {"normalize": "ct"}
    plan_config = "motion-ldm-256"
    tiny_example = TinyExample(
        phantom="lung", n=6, size=32, phantom_options={"frames": 3}, prepare={"ct_window": (-1000.0, 500.0), "seed": 0},
        config="motion-ldm-tiny",  # (32, 32, 6) volumes; the resume test crosses both stage boundaries
        overrides=("model.stage_epochs=[1, 1]", "model.channels=[8, 8]", "model.attention_levels=[false, false]",
                   "model.norm_num_groups=4", "model.image_ae.channels=[4, 4]", "model.field_vae.channels=[4, 4]",
                   "model.image_ae.norm_num_groups=4", "model.field_vae.norm_num_groups=4", "train.batch_size=2",
                   "train.num_threads=1", "sample.steps=3", "evaluate.n_samples=2", "evaluate.downstream_steps=2",
                   "evaluate.downstream_real_subjects=2", "evaluate.generated_per_subject=1", "evaluate.pca_modes=1"))

    def resolve_config(self, config: MotionLDMConfig) -> MotionLDMConfig:
        data_dir = Path(config.data_dir)
        info, settings = require_prepared(data_dir, "motion-ldm", spatial_dims=3, one_shape=True, channels=1, normalize=("ct", "percentile"))
        phases = sorted({case.phase for case in load_prepared_manifest(data_dir).cases if case.phase is not None})
        if len(phases) < 2 or phases != list(range(len(phases))):
            raise BadInputError(data_dir, f"motion-ldm needs every subject's phases 0..P-1 (P >= 2) as prepared cases, found phases {phases}")
        model, data = config.model, config.data
        reference_phase = model.reference_phase
        if data.registration is not None:
            from medsynth.runs import read_structured

            registration = Path(data.registration).resolve()
            summary = registration / "registration.json"
            if not summary.exists():
                raise BadInputError(registration, "no registration.json: not a `medsynth register --data` folder")
            reference_phase = int(read_structured(summary, "registration summary")["reference_phase"])
            data = data.model_copy(update={"registration": str(registration)})
        check_latent_grid(model, list(info["image_shape"]))
        model = model.model_copy(update={
            "phases": len(phases), "reference_phase": reference_phase, "image_shape": list(info["image_shape"]),
            **self.data_settings(info, settings), "labels": {str(k): v for k, v in info["labels"].items()},
            **{key: str(Path(getattr(model, key)).resolve()) for key in ("image_ae_run", "field_vae_run") if getattr(model, key)},
        })
        return config.model_copy(update={"model": model, "data": data})

    def check_data(self, config: MotionLDMConfig) -> None:
        """The prepared files and the autoencoder runs that stage ldm alone loads (``Recipe.check_data``), and the
        registration grids (:func:`check_registration`), before the first write."""
        super().check_data(config)
        if config.data.registration is not None:
            check_registration(config)

    def build_module(self, config: MotionLDMConfig) -> MotionLDMModule:
        return MotionLDMModule(config)

    def datamodule_options(self, config: MotionLDMConfig) -> dict[str, Any]:
        return {"transform": phase_data(config)}

    # -- sampling

    def conditions(self, module: MotionLDMModule, condition: Path | None) -> list[ConditionVolume]:
        """The condition CTs (:func:`~medsynth.recipes.base.condition_volumes`), or the held-out subjects' reference phases."""
        model = module.config.model
        if condition is not None:
            return condition_volumes(Path(condition), model.image_shape, model.ct_window, phase=model.reference_phase)  # a 4D scan: its reference phase
        series = phase_data(module.config)
        held_out_cases = [c for c in held_out(module.config.data_dir) if c["phase"] == model.reference_phase]
        return [ConditionVolume.prepared(series.subject[c["id"]], c, self.to_units(c["image"], module.config)) for c in held_out_cases]

    def requested_phases(self, module: MotionLDMModule, phases: Sequence[int] | None) -> list[int]:
        count = module.config.model.phases
        chosen = list(range(count)) if phases is None else list(phases)
        if not chosen:
            raise MedsynthError(f"--phases: empty; give 'all' or phases such as 0,{count - 1} (trained phases 0..{count - 1})")
        bad = [p for p in chosen if not 0 <= p < count]
        if bad:
            raise MedsynthError(f"--phases {','.join(map(str, bad))}: outside the trained phases 0..{count - 1}")
        return chosen

    def sample(self, module: MotionLDMModule, request: SampleRequest, out: Path) -> list[Path]:
        """For each condition CT and sample: every requested phase's field (mm, the CT's affine), the CT warped by
        it (per phase and as one 4D file) and movies (:func:`medsynth.motion.render.write_motion`)."""
        from medsynth.motion.render import write_motion

        settings = module.config.sample
        phases = self.requested_phases(module, request.phases if request.phases is not None else settings.phases)
        conditions = self.conditions(module, request.condition)
        if not conditions:
            raise MedsynthError(f"motion-ldm: no --condition given and no held-out reference phases in {module.config.data_dir}")
        generated = []
        for c, ct in enumerate(conditions):
            for k in range(request.n):  # item (CT c, sample k, phase p): up to 100 samples of 1000 phases per CT
                fields = module.fields_mm(ct.unit.as_tensor(), phases, [item_seed(request.seed, c, k, p, sizes=(100, 1000)) for p in phases], settings)
                on_ct = [resample_field(f, ct.grid_affine, tuple(ct.image.shape[1:]), ct.affine) for f in mm_to_voxel(fields.double(), ct.grid_affine)]
                generated.append((ct.name if request.n == 1 else f"{ct.name}_s{k:02d}", ct, torch.stack(on_ct).float()))
        require_finite([fields for *_, fields in generated], "motion-ldm fields")
        return [path for name, ct, fields in generated
                for path in write_motion(out / request.mode / name, ct.image, fields, phases, style=settings.movie_style)]

    # -- evaluation

    def evaluate(self, run: Run, module: MotionLDMModule, data_dir: Path) -> dict[str, Any]:
        """On held-out subjects: autoencoder fidelity; generated motions against the real phases (warped-CT SSIM) and
        true fields (:func:`~medsynth.evaluate.fields.field_report`, prefix ``field``); lung-volume curve and
        diaphragm excursion (:func:`~medsynth.evaluate.breathing.breathing_metrics`); downstream utility."""
        from medsynth.evaluate.breathing import BreathingCase, breathing_metrics, volume_ssim
        from medsynth.evaluate.fields import field_report
        from medsynth.motion.render import write_motion

        model, settings, module = module.config.model, module.config.evaluate, module.eval()
        series = phase_data(module.config, data_dir)
        train, test = series.by_subject(("train",)), series.by_subject(HELD_OUT)
        if not train or not test:
            raise MedsynthError(f"{data_dir}: evaluation needs training and held-out (test or val) subjects")
        pools = self.pools(len(train), model.phases - 1, settings)  # before any work
        moving = [p for p in range(model.phases) if p != model.reference_phase]
        metrics: dict[str, Any] = autoencoder_fidelity(module, [item for phases in test.values() for item in phases.values()])
        # (N, P, 3, *S) voxel fields per held-out subject, zero at the reference phase
        generated = {subject: self.motions(module, phases[model.reference_phase], settings.n_samples, item_seed(settings.seed, s))
                     for s, (subject, phases) in enumerate(test.items())}
        cases = [(phases[model.reference_phase], phases[p], generated[subject][:, p]) for subject, phases in test.items() for p in moving]
        warped = [volume_ssim(warp_image(ref["image"][None].expand(len(fields), -1, *ref["image"].shape[1:]), fields),
                              real["image"][None].expand(len(fields), -1, *real["image"].shape[1:])) for ref, real, fields in cases]
        train_items = [item for phases in train.values() for p, item in phases.items() if p != model.reference_phase]
        lung = next((int(value) for value, name in model.labels.items() if name == "lung"), None)
        masks = {} if lung is None else {"body": [real["label"][0] > 0 for _, real, _ in cases], "lung": [real["label"][0] == lung for _, real, _ in cases]}
        metrics.update(field_report([fields for *_, fields in cases], [series.true_field(real) for _, real, _ in cases],
                                    [real["affine"] for _, real, _ in cases], masks, torch.stack([series.field_voxels(i) for i in train_items]),
                                    stack_items(train_items, "affine"), prefix="field"))
        metrics.update({"warped_ssim_generated": float(np.mean(warped)), "warped_ssim_generated_sd": float(np.std(warped)),
                        "warped_ssim_zero": float(np.mean([volume_ssim(ref["image"][None], real["image"][None]) for ref, real, _ in cases]))})
        if lung is not None:
            def breathing(phases: dict[int, dict[str, Any]]) -> BreathingCase:
                ordered = [phases[p] for p in range(model.phases)]
                return BreathingCase(torch.stack([i["label"][0] == lung for i in ordered]), torch.stack([series.true_field(i) for i in ordered]),
                                     ordered[0]["affine"].numpy(), model.reference_phase)

            metrics.update(breathing_metrics([breathing(p) for p in test.values()], list(generated.values()), [breathing(p) for p in train.values()]))
        metrics.update(self.downstream(module, series, train, test, settings, pools))
        metrics.update({"n_test_subjects": len(test), "n_samples": settings.n_samples, "phases": model.phases,
                        "sampler": module.config.sample.describe(module.schedule),
                        "training_fields": "registration" if module.config.data.registration else "dataset"})
        subject, reference = next(iter(test)), next(iter(test.values()))[model.reference_phase]
        folder = run.samples / "evaluate" / subject  # one generated motion of a held-out subject, for the report
        write_motion(folder, ConditionVolume.prepared(subject, reference, self.to_units(reference["image"], module.config)).image, generated[subject][0],
                     range(model.phases), views=("axial", "coronal"), style=module.config.sample.movie_style)
        return metrics

    @staticmethod
    def motions(module: MotionLDMModule, reference: dict[str, Any], n: int, seed: int) -> Tensor:
        """``n`` generated motions ``(n, P, 3, *S)`` (voxels, zero at the reference phase) of a prepared reference item."""
        model = module.config.model
        phases = [p for p in range(model.phases) for _ in range(n)]
        fields = module.fields_mm(reference["image"], phases, item_seeds(seed, len(phases)), module.config.sample)
        return mm_to_voxel(fields.double(), reference["affine"]).float().unflatten(0, (model.phases, n)).transpose(0, 1)

    @staticmethod
    def pools(n_train: int, moving_phases: int, settings: MotionLDMEvaluateConfig) -> tuple[int, int]:
        """(L, U) subjects of the utility protocol, or one line naming the setting that empties a pool or over-asks the PCA."""
        from medsynth.evaluate.downstream import check_pools

        return check_pools(n_train, settings.downstream_real_subjects, settings.downstream_unlabelled_subjects, pca_modes=settings.pca_modes,
                           fields_per_subject=moving_phases, labelled_setting="evaluate.downstream_real_subjects",
                           unlabelled_setting="evaluate.downstream_unlabelled_subjects", pca_setting="evaluate.pca_modes")

    def downstream(self, module: MotionLDMModule, series: PhaseData, train: dict, test: dict, settings: MotionLDMEvaluateConfig,
                   pools: tuple[int, int]) -> dict[str, Any]:
        """The utility protocol (:func:`~medsynth.evaluate.downstream.motion_utility`) for a registration network on
        (phase, reference) pairs: L's real pairs (their training fields as targets); U's reference CTs (moving) warped by
        k generated motions each (every moving phase), by classic and PCA fields, or by their own training fields (oracle);
        end-point error on the held-out subjects' pairs against their true fields."""
        from medsynth.evaluate.downstream import motion_utility

        model = module.config.model
        moving = [p for p in range(model.phases) if p != model.reference_phase]
        subjects, unlabelled = list(train)[: pools[0]], list(train)[pools[0]: pools[0] + pools[1]]
        references = [train[subject][model.reference_phase] for subject in unlabelled]
        k = settings.generated_per_subject

        def pairs(triples: list[tuple[dict[str, Any], Tensor, Tensor]]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
            """(reference item, fixed image, field) -> (fixed, moving, flow, affines)."""
            return (torch.stack([fixed for _, fixed, _ in triples]), torch.stack([ref["image"] for ref, _, _ in triples]),
                    torch.stack([flow for *_, flow in triples]), torch.stack([ref["affine"] for ref, _, _ in triples]))

        real = [(train[s][model.reference_phase], train[s][p]["image"], series.field_voxels(train[s][p])) for s in subjects for p in moving]
        held_out = [(phases[model.reference_phase], phases[p]["image"], series.true_field(phases[p])) for phases in test.values() for p in moving]
        oracle = [torch.stack([series.field_voxels(train[subject][p]) for p in moving]) for subject in unlabelled]
        metrics = motion_utility(
            pairs(real), stack_items(references, "image"), stack_items(references, "affine"), oracle, pairs(held_out),
            lambda i: self.motions(module, references[i], k, item_seed(settings.seed + 1, i))[:, moving].flatten(0, 1),
            per_frame=k * len(moving), pca_modes=settings.pca_modes, seeds=[settings.seed + s for s in range(settings.downstream_seeds)],
            steps=settings.downstream_steps, frame_role="moving", seed=settings.seed, pca_setting="evaluate.pca_modes")
        return {**metrics, "downstream_n_labelled": len(subjects)}

    # -- report

    def report_sections(self, run: Run, module: MotionLDMModule) -> list[ReportSection]:
        from matplotlib.figure import Figure

        from medsynth.motion.render import render_still
        from medsynth.report.html import figure_html, file_html
        from medsynth.runs import read_structured

        folders = sorted(p for p in (run.samples / "evaluate").glob("*") if p.is_dir()) if (run.samples / "evaluate").is_dir() else []
        if not folders or not run.metrics_path.exists():
            return [ReportSection("Generated motion", "<p>Run <code>medsynth evaluate</code> first: it writes the motions shown here.</p>")]
        folder, metrics = folders[0], read_structured(run.metrics_path, "metrics")
        sections = [ReportSection(f"A generated breathing cycle of held-out subject {folder.name}: its reference CT warped by each phase's "
                                  f"field ({view}; arrows: the field)", file_html(folder / f"movie_{view}.gif")) for view in ("axial", "coronal")]
        exhale = int(metrics.get("end_exhale_phase") or module.config.model.phases // 2)
        still = render_still(folder / f"image_t{exhale:02d}.nii.gz", folder / "jacobian.png", field=folder / f"field_t{exhale:02d}.nii.gz",
                             views=("coronal", "axial"), style="jacobian")
        sections.append(ReportSection(f"Jacobian determinant of its end-exhale field (phase {exhale}; <= 0 folds)", file_html(still)))
        if metrics.get("lung_volume_curve_real"):
            figure = Figure(figsize=(5, 3), layout="constrained")
            axes = figure.add_subplot()
            for key, style in (("lung_volume_curve_real", "k-o"), ("lung_volume_curve_generated", "C1-s")):
                axes.plot(metrics[key], style, label=key.rsplit("_", 1)[-1])
            axes.set(xlabel="phase", ylabel="lung volume / reference phase")
            axes.legend()
            sections.append(ReportSection("Lung volume over the breathing cycle, mean of the held-out subjects", figure_html(figure, "lung volume curve")))
        return sections

    # -- medsynth plan (Recipe.plan_examples)

    def plan_examples(self, config: MotionLDMConfig, size: list[int]) -> list[Example]:
        """The stages the run trains (one, or all in turn) on volumes of ``size`` (X Y Z voxels); a sampling call
        denoises one batch of field latents."""
        model = config.model
        config = with_settings(config, "model", image_shape=list(size), phases=model.phases or 10,
                               reference_affine=model.reference_affine or torch.eye(4).tolist(),
                               ct_window=model.ct_window or [-1000.0, 500.0])
        settings = config.sample
        items = settings.batch_size

        def batch(b: int) -> dict[str, Any]:
            return {"image": torch.rand(b, 1, *size), "reference": torch.rand(b, 1, *size), "field": torch.rand(b, 3, *size),
                    "phase": torch.zeros(b, dtype=torch.long), "id": [f"c{i}" for i in range(b)],
                    "subject": [f"s{i}" for i in range(b)]}

        def cached_latents(module: MotionLDMModule, batch: dict[str, Any]) -> None:
            # as a trainer's run does: posterior means are encoded once per dataset and cached, not per step
            with torch.no_grad():
                image = module.image_ae.encode(batch["reference"] * 2 - 1)[0]
                fields = module.field_vae.encode(batch["field"])[0]
            module._means = (dict(zip(batch["subject"], image)), dict(zip(batch["id"], fields)))

        def sample(module: MotionLDMModule) -> Tensor:
            latent = module.image_ae.latent_shape(size)
            cond = Condition(concat=torch.zeros(items, model.image_ae.latent_channels, *latent),
                             class_labels=torch.zeros(items, dtype=torch.long))
            return module.denoiser(settings)(torch.rand(items, model.field_vae.latent_channels, *latent),
                                             torch.zeros(items, dtype=torch.long), cond)

        steps = settings.steps_for(model.make_schedule())
        return [Example(stage.name, with_settings(config, "model", stage=stage.name), batch, sample, items, steps,
                        cached_latents if isinstance(stage, LDMStage) else None) for stage in self.stages_trained(config)]

    def plan_candidates(self, config: MotionLDMConfig) -> list[dict[str, Any]]:
        """The config's own, then both autoencoders with gradient checkpointing (MONAI's), where it is not on already."""
        model = config.model
        found: list[dict[str, Any]] = [{}]
        if not (model.image_ae.use_checkpoint and model.field_vae.use_checkpoint):
            found.append({"image_ae": model.image_ae.model_copy(update={"use_checkpoint": True}),
                          "field_vae": model.field_vae.model_copy(update={"use_checkpoint": True})})
        return found


# -- evaluation helpers -------------------------------------------------------------------------------


def autoencoder_fidelity(module: MotionLDMModule, items: list[dict[str, Any]]) -> dict[str, float]:
    """PSNR and SSIM of the image autoencoder and end-point error (mm) of the field VAE on held-out items (posterior means)."""
    from monai.metrics import PSNRMetric

    from medsynth.evaluate.breathing import volume_ssim

    with torch.no_grad():
        images = stack_items(items, "image").float()
        recon = (module.image_ae.decode(module.image_ae.encode(images * 2 - 1)[0], tuple(images.shape[2:])).clamp(-1, 1) + 1) / 2
        fields = stack_items(items, "field").float()
        field_recon = module.field_vae.decode(module.field_vae.encode(fields)[0], tuple(fields.shape[2:]))
    scale = module.config.model.field_scale_mm
    return {"image_ae_psnr": float(PSNRMetric(max_val=1.0)(recon, images).mean()), "image_ae_ssim": volume_ssim(recon, images),
            "field_vae_epe_mm": float(torch.linalg.vector_norm((field_recon - fields) * scale, dim=1).mean()),
            "field_vae_epe_zero_mm": float(torch.linalg.vector_norm(fields * scale, dim=1).mean())}
