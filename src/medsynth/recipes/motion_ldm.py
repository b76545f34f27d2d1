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
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from pydantic import Field
from torch import Tensor

from medsynth.config import RecipeConfig, StrictModel
from medsynth.data.datasets import PreparedDataModule, load_prepared_manifest, load_split, require_prepared, stack_items
from medsynth.data.fields import mm_to_voxel, save_field, voxel_to_mm
from medsynth.data.io import load_image, save_image
from medsynth.data.prepare import hu_to_unit, unit_to_hu
from medsynth.diffusion.autoencoder import AutoencoderConfig, LatentAutoencoder, LatentCache
from medsynth.diffusion.condition import Condition
from medsynth.diffusion.config import DenoiserConfig
from medsynth.diffusion.denoiser import ConditionedDenoiser
from medsynth.diffusion.module import DiffusionModule
from medsynth.diffusion.sampling import SamplerConfig
from medsynth.errors import BadInputError, MedsynthError
from medsynth.motion.fields import resample_field, warp_image
from medsynth.recipes.base import Recipe, SampleRequest, TinyExample, condition_files, condition_name, require_finite
from medsynth.report.sections import ReportSection
from medsynth.runs import Run
from medsynth.seeds import item_seed, item_seeds
from medsynth.training import load_module, scaled_lr

STAGES = ("image-ae", "field-vae", "ldm")


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

    def stage_at(self, epoch: int) -> str:
        """The stage that trains in ``epoch``."""
        if self.stage != "all":
            return self.stage
        image, field = self.stage_epochs
        return "image-ae" if epoch < image else "field-vae" if epoch < image + field else "ldm"


class MotionLDMDataConfig(StrictModel):
    registration: str | None = Field(None, description="a `medsynth register --data` folder whose fields train the model; None: the dataset's fields")
    cached_subjects: int = Field(64, ge=1, description="subjects whose dense fields stay in memory while loading")


class MotionLDMSampleConfig(SamplerConfig):
    sampler: Literal["ddpm", "ddim", "dpmpp", "rflow"] = "ddim"
    phases: list[int] | None = Field(None, description="phases to generate (None: all)")
    movie_style: Literal["quiver", "magnitude"] = "quiver"


class MotionLDMEvaluateConfig(StrictModel):
    n_samples: int = Field(4, ge=1, description="generated motions per held-out subject")
    downstream_real_subjects: int = Field(4, ge=1, description="training subjects whose real pairs train the downstream network")
    generated_per_subject: int = Field(2, ge=1, description="generated motions added per downstream subject")
    downstream_steps: int = Field(200, ge=1)
    seed: int = 0


class MotionLDMConfig(RecipeConfig):
    recipe: Literal["motion-ldm"] = "motion-ldm"
    model: MotionLDMModelConfig = MotionLDMModelConfig()
    data: MotionLDMDataConfig = MotionLDMDataConfig()
    sample: MotionLDMSampleConfig = MotionLDMSampleConfig()
    evaluate: MotionLDMEvaluateConfig = MotionLDMEvaluateConfig()


# -- data ---------------------------------------------------------------------------------------------


class PhaseSeries:
    """Adds to each prepared case (one phase of a subject) ``subject``, ``reference`` (the subject's
    reference-phase image ``(1, *S)``) and ``field`` (``(3, *S)`` world mm / ``field_scale_mm``).

    Registration fields are made dense per subject on first use and kept for ``cached_subjects``
    subjects, so a large dataset stays a folder of compact grids.
    """

    def __init__(self, data_dir: Path, config: MotionLDMConfig):
        self.config, self.data_dir = config, Path(data_dir)
        cases = load_prepared_manifest(data_dir).cases
        self.subject = {case.id: case.subject for case in cases}
        self.phase_case = {(case.subject, case.phase): case.id for case in cases}
        self.registered = lru_cache(maxsize=config.data.cached_subjects)(self._registered)
        self.reference_image = lru_cache(maxsize=config.data.cached_subjects)(self._reference_image)

    def _reference_image(self, subject: str) -> Tensor:
        case = self.phase_case.get((subject, self.config.model.reference_phase))
        if case is None:
            raise BadInputError(self.data_dir, f"subject {subject} has no reference phase {self.config.model.reference_phase}")
        return torch.from_numpy(np.load(self.data_dir / "cases" / f"{case}.npz")["image"]).float()

    def _registered(self, subject: str) -> tuple[Tensor, np.ndarray]:
        """The registration's fields of every phase ``(P, 3, *S)`` voxels on their grid, and its affine."""
        from medsynth.motion.phase_series import phase_fields

        fields = phase_fields(self.config.data.registration, subject)
        return fields.as_tensor(), np.asarray(fields.affine, dtype=np.float64)

    def field_mm(self, sample: dict[str, Any]) -> Tensor:
        """The training field of a case in mm ``(3, *S)`` on its prepared grid."""
        affine = sample["affine"].numpy()
        if self.config.data.registration is None:
            if "flow" not in sample:
                raise BadInputError(self.data_dir, f"case {sample['id']} has no field: give data.registration (a `medsynth register --data` folder)")
            return voxel_to_mm(sample["flow"].double(), affine).float()
        fields, grid_affine = self.registered(self.subject[sample["id"]])
        field = resample_field(fields[sample["phase"]], grid_affine, tuple(sample["image"].shape[1:]), affine)
        return voxel_to_mm(field.double(), affine).float()

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        subject = self.subject[sample["id"]]
        return {**sample, "subject": subject, "reference": self.reference_image(subject),
                "field": self.field_mm(sample) / self.config.model.field_scale_mm}


# -- the LightningModule ------------------------------------------------------------------------------


class MotionLDMModule(DiffusionModule):
    """The image autoencoder, the field VAE and the latent denoiser; ``model.stage_at(epoch)`` picks what trains."""

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

    @property
    def stage(self) -> str:
        return self.config.model.stage_at(self.current_epoch)

    def setup(self, stage: str) -> None:
        if stage == "fit" and self.config.model.stage == "ldm":
            self.load_autoencoders()

    def load_autoencoders(self) -> None:
        """Stage ldm alone: the autoencoders of ``model.image_ae_run`` and ``model.field_vae_run``."""
        for attribute, key in (("image_ae", "image_ae_run"), ("field_vae", "field_vae_run")):
            path = getattr(self.config.model, key)
            if path is None:
                raise MedsynthError(f"motion-ldm: the ldm stage needs the earlier stages: set model.{key} to a run that trained them (or train --stage all)")
            other = load_module(path, MotionLDMRecipe())
            stage = attribute.replace("_", "-")  # image-ae, field-vae
            if other.config.model.stage not in ("all", stage):
                raise BadInputError(path, f"this run trained the '{other.config.model.stage}' stage, not the {stage}")
            getattr(self, attribute).load_state_dict(getattr(other, attribute).state_dict())

    def configure_optimizers(self) -> Any:
        """One AdamW group per network; each follows a cosine schedule over its own stage's steps.
        A network outside its stage gets no gradient, which AdamW skips (no momentum drift)."""
        train = self.config.train
        networks = (self.image_ae, self.field_vae, self.net)
        optimizer = torch.optim.AdamW([{"params": n.parameters()} for n in networks], lr=scaled_lr(train), weight_decay=train.weight_decay)
        if train.lr_schedule == "constant":
            return optimizer
        per_epoch = max(1, int(self.trainer.estimated_stepping_batches) // max(1, self.trainer.max_epochs))
        windows = [[e for e in range(self.trainer.max_epochs) if self.config.model.stage_at(e) == name] or [0] for name in STAGES]

        def cosine(window: list[int]):
            start, length = window[0] * per_epoch, len(window) * per_epoch
            return lambda step: 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, max(0, step - start) / length)))  # a float: checkpoints hold no numpy

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, [cosine(w) for w in windows])
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- the autoencoder stages

    def autoencoder_losses(self, stage: str, batch: dict[str, Any]) -> dict[str, Tensor]:
        model = self.config.model
        if stage == "image-ae":
            x = batch["image"].float() * 2 - 1
            recon, mu, sigma = self.image_ae.reconstruct(x)
            losses = {"l1": (recon - x).abs().mean(), "kl": self.image_ae.kl_loss(mu, sigma)}
            losses["loss"] = losses["l1"] + model.image_ae.kl_weight * losses["kl"]
            return losses
        x = batch["field"].float()
        recon, mu, sigma = self.field_vae.reconstruct(x)
        losses = {"l1": (recon - x).abs().mean(), "smoothness": self.smoothness(recon), "bending": self.bending(recon),
                  "kl": self.field_vae.kl_loss(mu, sigma)}
        losses["loss"] = (losses["l1"] + model.field_smoothness * losses["smoothness"] + model.field_bending * losses["bending"]
                          + model.field_vae.kl_weight * losses["kl"])
        return losses

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        stage = self.stage
        if stage == "ldm":
            return super().training_step(batch, batch_idx)
        losses = self.autoencoder_losses(stage, batch)
        self.log_dict({f"train/{stage}_{k}": v for k, v in losses.items()}, on_step=True, on_epoch=True, batch_size=len(batch["image"]))
        return losses["loss"]

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        stage = self.stage
        if stage == "ldm":
            return super().validation_step(batch, batch_idx)
        losses = self.autoencoder_losses(stage, batch)
        self.log_dict({"val/loss": losses["loss"], **{f"val/{stage}_{k}": v for k, v in losses.items()}}, prog_bar=True, on_epoch=True,
                      batch_size=len(batch["image"]))

    # -- the latent diffusion stage

    def on_train_epoch_start(self) -> None:
        if self.stage == "ldm" and not bool(self.scales_fitted):
            self.fit_latent_scales()

    def posterior_means(self) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Posterior means ``(L, *latent)`` of every subject's reference image and every case's field
        (all splits of the datamodule), encoded once by the frozen autoencoders."""
        if self._means is None:
            datasets = getattr(self.trainer.datamodule, "datasets", None) if self._trainer is not None else None
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
    config_class = MotionLDMConfig
    monitor = None  # val/loss changes meaning with the stage: no "best" checkpoint across stages
    sample_modes = ("random",)
    takes_phases = True
    headline_metrics = ("warped_ssim_generated", "field_epe_mean_mm", "folding_share", "lung_volume_ratio_generated",
                        "downstream_epe_with_generated_mm")
    prepare_defaults = {"normalize": "ct"}
    tiny_example = TinyExample(
        phantom="lung", n=6, size=32, phantom_options={"frames": 3}, prepare={"ct_window": (-1000.0, 500.0), "seed": 0},
        config="motion-ldm-tiny",  # (32, 32, 6) volumes; the resume test crosses both stage boundaries
        overrides=("model.stage_epochs=[1, 1]", "model.channels=[8, 8]", "model.attention_levels=[false, false]",
                   "model.norm_num_groups=4", "model.image_ae.channels=[4, 4]", "model.field_vae.channels=[4, 4]",
                   "model.image_ae.norm_num_groups=4", "model.field_vae.norm_num_groups=4", "train.batch_size=2",
                   "train.num_threads=1", "sample.steps=3", "evaluate.n_samples=2", "evaluate.downstream_steps=2",
                   "evaluate.downstream_real_subjects=2", "evaluate.generated_per_subject=1"))

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
        if model.stage == "all" and config.train.max_epochs <= sum(model.stage_epochs):
            from medsynth.console import note

            note(f"motion-ldm: train.max_epochs={config.train.max_epochs} leaves no epoch for the LDM after model.stage_epochs "
                 f"{model.stage_epochs}: only the autoencoders train")
        check_latent_grid(model, list(info["image_shape"]))
        window = settings.get("ct_window") if settings.get("normalize") == "ct" else None
        model = model.model_copy(update={
            "phases": len(phases), "reference_phase": reference_phase, "image_shape": list(info["image_shape"]),
            "reference_affine": np.asarray(info["affine"]).tolist() if info.get("affine") is not None else None,
            "ct_window": [float(v) for v in window] if window else None, "labels": {str(k): v for k, v in info["labels"].items()},
            **{key: str(Path(getattr(model, key)).resolve()) for key in ("image_ae_run", "field_vae_run") if getattr(model, key)},
        })
        return config.model_copy(update={"model": model, "data": data})

    def ema_first_epoch(self, config: MotionLDMConfig) -> int:
        return sum(config.model.stage_epochs) if config.model.stage == "all" else 0

    def build_module(self, config: MotionLDMConfig) -> MotionLDMModule:
        return MotionLDMModule(config)

    def build_datamodule(self, config: MotionLDMConfig) -> L.LightningDataModule:
        return PreparedDataModule(Path(config.data_dir), batch_size=config.train.batch_size, num_workers=config.train.num_workers,
                                  seed=config.train.seed, in_memory=True, transform=PhaseSeries(Path(config.data_dir), config))

    # -- sampling

    def conditions(self, module: MotionLDMModule, condition: Path | None) -> list[tuple[str, Tensor, np.ndarray]]:
        """(name, the CT in HU ``(1, *S)`` on its own grid, its affine) of each condition file, or of the held-out subjects."""
        model = module.config.model
        if condition is None:
            series = PhaseSeries(Path(module.config.data_dir), module.config)
            held_out = [c for c in load_split(module.config.data_dir, "test") if c["phase"] == model.reference_phase]
            return [(series.subject[c["id"]], unit_to_hu(c["image"], model.ct_window), c["affine"].numpy()) for c in held_out]
        found = []
        for path in condition_files(Path(condition)):
            image = load_image(path)
            if image.shape[0] != 1 or image.ndim != 4:
                raise BadInputError(path, f"expected one 3D CT volume, got shape {tuple(image.shape)}")
            found.append((condition_name(path), image.as_tensor().float(), np.asarray(image.affine, dtype=np.float64)))
        return found

    def on_model_grid(self, module: MotionLDMModule, name: str, ct: Tensor, affine: np.ndarray) -> tuple[Tensor, np.ndarray]:
        """The CT in [0, 1] on the model's grid (resampled over the same field of view when its shape differs) and that grid's affine."""
        from monai.data import MetaTensor
        from monai.transforms import Resize

        shape = module.config.model.image_shape
        if list(ct.shape[1:]) != shape:
            from medsynth.console import note

            note(f"{name}: CT of shape {list(ct.shape[1:])} resampled to the model's {shape} over the same field of view")
            resized = Resize(shape, mode="trilinear", anti_aliasing=True)(MetaTensor(ct, affine=torch.as_tensor(affine)))
            ct, affine = resized.as_tensor(), np.asarray(resized.affine, dtype=np.float64)
        return hu_to_unit(ct, module.config.model.ct_window).float(), affine

    def requested_phases(self, module: MotionLDMModule, phases: Sequence[int] | None) -> list[int]:
        count = module.config.model.phases
        chosen = list(range(count)) if phases is None else list(phases)
        bad = [p for p in chosen if not 0 <= p < count]
        if bad:
            raise MedsynthError(f"--phases {','.join(map(str, bad))}: outside the trained phases 0..{count - 1}")
        return chosen

    def sample(self, module: MotionLDMModule, request: SampleRequest, out: Path) -> list[Path]:
        from medsynth.motion.render import render_movie

        settings = module.config.sample
        phases = self.requested_phases(module, request.phases if request.phases is not None else settings.phases)
        conditions = self.conditions(module, request.condition)
        if not conditions:
            raise MedsynthError(f"motion-ldm: no --condition given and no held-out reference phases in {module.config.data_dir}")
        generated = []
        for c, (name, ct, affine) in enumerate(conditions):
            image, grid_affine = self.on_model_grid(module, name, ct, affine)
            for k in range(request.n):
                seeds = [item_seed(request.seed, c * 100_000 + k * 1000 + p) for p in phases]
                fields_mm = module.fields_mm(image, phases, seeds, settings)
                generated.append((name if request.n == 1 else f"{name}_s{k:02d}", ct, affine, mm_to_voxel(fields_mm.double(), grid_affine), grid_affine))
        require_finite([g[3] for g in generated], "motion-ldm fields")
        written = []
        for name, ct, affine, fields, grid_affine in generated:
            folder = out / request.mode / name
            fields = torch.stack([resample_field(f, grid_affine, tuple(ct.shape[1:]), affine) for f in fields]).float()
            frames = warp_image(ct[None].expand(len(fields), *ct.shape).float(), fields)[:, 0]
            field_paths = [save_field(f, folder / f"field_t{p:02d}.nii.gz", affine) for p, f in zip(phases, fields)]
            frame_paths = [save_image(frame[None], folder / f"ct_t{p:02d}.nii.gz", affine=affine) for p, frame in zip(phases, frames)]
            written += field_paths + frame_paths + [save_image(frames, folder / "ct_4d.nii.gz", affine=affine, series=True)]
            written += [render_movie(frame_paths, folder / f"movie_{view}.gif", field=field_paths, views=(view,), style=settings.movie_style)
                        for view in ("axial", "coronal", "sagittal")]
        return written

    # -- evaluation

    def evaluate(self, run: Run, module: MotionLDMModule, data_dir: Path) -> dict[str, Any]:
        """Autoencoder fidelity, the generated motion of every held-out subject against its real phases and
        true fields (:func:`medsynth.evaluate.fields.field_report`, prefix ``field``), the lung-volume curve,
        diaphragm excursion, and the downstream utility of generated pairs for a registration network."""
        from medsynth.evaluate.fields import field_report

        model, settings, module = module.config.model, module.config.evaluate, module.eval()
        series = PhaseSeries(Path(data_dir), module.config)
        train, test = by_subject(series, data_dir, ("train",)), by_subject(series, data_dir, ("test", "val"))
        if not train or not test:
            raise MedsynthError(f"{data_dir}: evaluation needs training and held-out (test or val) subjects")
        moving_phases = [p for p in range(model.phases) if p != model.reference_phase]
        lung = lung_value(model.labels)
        metrics: dict[str, Any] = {**autoencoder_fidelity(module, [item for phases in test.values() for item in phases.values()])}

        cases, samples, warped_ssim, zero_ssim = [], [], [], []
        generated_by_subject = {}
        for s, (subject, phases) in enumerate(test.items()):
            reference = phases[model.reference_phase]
            fields = torch.stack([module.fields_mm(reference["image"], moving_phases, item_seeds(item_seed(settings.seed, s) + 1000 * k, len(moving_phases)),
                                                   module.config.sample) for k in range(settings.n_samples)])  # (N, P-1, 3, *S) mm
            fields = mm_to_voxel(fields.flatten(0, 1).double(), reference["affine"]).float().unflatten(0, fields.shape[:2])
            generated_by_subject[subject] = fields
            for index, phase in enumerate(moving_phases):
                real = phases[phase]
                cases.append((subject, phase, real))
                samples.append(fields[:, index])
                warped = warp_image(reference["image"][None].expand(settings.n_samples, -1, *reference["image"].shape[1:]), fields[:, index])
                warped_ssim.append(ssim(warped, real["image"][None].expand_as(warped)))
                zero_ssim.append(ssim(reference["image"][None], real["image"][None]))
        truths = [true_field(series, real) for _, _, real in cases]
        masks = {} if lung is None else {"body": [real["label"][0] > 0 for _, _, real in cases], "lung": [real["label"][0] == lung for _, _, real in cases]}
        train_items = [item for phases in train.values() for p, item in phases.items() if p != model.reference_phase]
        train_fields = torch.stack([field_voxels(series, item) for item in train_items])
        metrics.update(field_report(samples, truths, [real["affine"] for _, _, real in cases], masks, train_fields,
                                    stack_items(train_items, "affine"), prefix="field"))
        metrics.update({"warped_ssim_generated": float(np.mean(warped_ssim)), "warped_ssim_generated_sd": float(np.std(warped_ssim)),
                        "warped_ssim_zero": float(np.mean(zero_ssim))})
        if lung is not None:
            metrics.update(breathing_metrics(test, generated_by_subject, train, series, model, lung))
        metrics.update(self.downstream(module, series, train, test, settings))
        metrics.update({"n_test_subjects": len(test), "n_samples": settings.n_samples, "phases": model.phases,
                        "sampler": module.config.sample.describe(module.schedule),
                        "training_fields": "registration" if module.config.data.registration else "dataset"})
        first = next(iter(test))
        write_subject(run.samples / "evaluate" / first, test[first], generated_by_subject[first][0], moving_phases, model, module.config.sample.movie_style)
        return metrics

    def downstream(self, module: MotionLDMModule, series: PhaseSeries, train: dict, test: dict, settings: MotionLDMEvaluateConfig) -> dict[str, Any]:
        """A registration network trained on real phase pairs of a few training subjects, alone and with generated
        (warped reference, reference, generated field) triples of the same subjects added; EPE on held-out real pairs."""
        from medsynth.evaluate.downstream import downstream_motion_utility

        model = module.config.model
        moving_phases = [p for p in range(model.phases) if p != model.reference_phase]
        subjects = list(train)[: settings.downstream_real_subjects]
        real = [(train[s][model.reference_phase], train[s][p], field_voxels(series, train[s][p])) for s in subjects for p in moving_phases]
        fake = []
        for s, subject in enumerate(subjects):
            reference = train[subject][model.reference_phase]
            for k in range(settings.generated_per_subject):
                seeds = item_seeds(item_seed(settings.seed + 1, s) + 1000 * k, len(moving_phases))
                fields = mm_to_voxel(module.fields_mm(reference["image"], moving_phases, seeds, module.config.sample).double(), reference["affine"]).float()
                fake += [(reference, warp_image(reference["image"], field), field) for field in fields]
        test_pairs = [(phases[model.reference_phase], phases[p], true_field(series, phases[p])) for phases in test.values() for p in moving_phases]

        def pairs(triples: list) -> tuple[Tensor, Tensor, Tensor, Tensor]:
            fixed = torch.stack([t[1] if isinstance(t[1], Tensor) else t[1]["image"] for t in triples])
            moving = torch.stack([t[0]["image"] for t in triples])
            return fixed, moving, torch.stack([t[2] for t in triples]), torch.stack([t[0]["affine"] for t in triples])

        return downstream_motion_utility(pairs([(r, p["image"], f) for r, p, f in real]), pairs(fake),
                                         pairs([(r, p["image"], f) for r, p, f in test_pairs]), steps=settings.downstream_steps, seed=settings.seed)

    # -- report

    def report_sections(self, run: Run, module: MotionLDMModule) -> list[ReportSection]:
        from medsynth.report.html import figure_html, file_html
        from medsynth.runs import read_structured

        folder = next((p for p in sorted((run.samples / "evaluate").glob("*")) if p.is_dir()), None) if (run.samples / "evaluate").exists() else None
        if folder is None or not (run.path / "metrics.json").exists():
            return [ReportSection("Generated motion", "<p>Run <code>medsynth evaluate</code> first: it writes the motions shown here.</p>")]
        metrics = read_structured(run.path / "metrics.json", "metrics")
        sections = [ReportSection(f"Generated breathing of held-out subject {folder.name}: the reference CT warped by each phase's field "
                                  f"({view}, arrows: the field)", file_html(folder / f"movie_{view}.gif")) for view in ("axial", "coronal")]
        if (folder / "jacobian.png").exists():
            sections.append(ReportSection("Jacobian determinant of the generated end-exhale field (middle coronal slice; < 0 folds)", file_html(folder / "jacobian.png")))
        if metrics.get("lung_volume_curve_real"):
            sections.append(ReportSection("Lung volume over the breathing cycle (relative to the reference phase), held-out subjects",
                                          figure_html(lung_volume_figure(metrics), "lung volume curve")))
        return sections


# -- evaluation helpers -------------------------------------------------------------------------------


def by_subject(series: PhaseSeries, data_dir: Path, splits: Sequence[str]) -> dict[str, dict[int, dict[str, Any]]]:
    """The first non-empty split of ``splits`` as subject -> phase -> item (with ``reference`` and ``field``)."""
    for split in splits:
        items = load_split(data_dir, split)
        if items:
            grouped: dict[str, dict[int, dict[str, Any]]] = {}
            for item in items:
                item = series(item)
                grouped.setdefault(item["subject"], {})[int(item["phase"])] = item
            return grouped
    return {}


def field_voxels(series: PhaseSeries, item: dict[str, Any]) -> Tensor:
    """The training field of an item in voxels of its grid."""
    return mm_to_voxel(item["field"].double() * series.config.model.field_scale_mm, item["affine"]).float()


def true_field(series: PhaseSeries, item: dict[str, Any]) -> Tensor:
    """The reference for a held-out phase: the dataset's own field (a phantom's exact motion), else the registration's."""
    return item["flow"].float() if "flow" in item else field_voxels(series, item)


def lung_value(labels: dict[str, str]) -> int | None:
    return next((int(value) for value, name in labels.items() if name == "lung"), None)


def ssim(a: Tensor, b: Tensor) -> float:
    """Mean SSIM of volumes ``(B, 1, *S)`` in [0, 1] (MONAI; the window fits the thinnest axis)."""
    from monai.metrics import SSIMMetric

    window = [min(7, s if s % 2 else s - 1) for s in a.shape[2:]]
    return float(SSIMMetric(spatial_dims=3, data_range=1.0, win_size=window)(a.float(), b.float()).mean())


def autoencoder_fidelity(module: MotionLDMModule, items: list[dict[str, Any]]) -> dict[str, float]:
    """PSNR and SSIM of the image autoencoder and end-point error (mm) of the field VAE on held-out items (posterior means)."""
    from monai.metrics import PSNRMetric

    with torch.no_grad():
        images = stack_items(items, "image").float()
        recon = (module.image_ae.decode(module.image_ae.encode(images * 2 - 1)[0], tuple(images.shape[2:])).clamp(-1, 1) + 1) / 2
        fields = stack_items(items, "field").float()
        field_recon = module.field_vae.decode(module.field_vae.encode(fields)[0], tuple(fields.shape[2:]))
    scale = module.config.model.field_scale_mm
    return {"image_ae_psnr": float(PSNRMetric(max_val=1.0)(recon, images).mean()), "image_ae_ssim": ssim(recon, images),
            "field_vae_epe_mm": float(torch.linalg.vector_norm((field_recon - fields) * scale, dim=1).mean()),
            "field_vae_epe_zero_mm": float(torch.linalg.vector_norm(fields * scale, dim=1).mean())}


def lung_volumes(lung_reference: Tensor, fields: Tensor) -> Tensor:
    """Lung volume of each phase relative to the reference phase: the reference lung mask ``(*S)`` warped by
    each field ``(P, 3, *S)`` (voxels; linear interpolation keeps partial volumes), summed."""
    mask = lung_reference.float()[None, None].expand(len(fields), 1, *lung_reference.shape)
    return warp_image(mask, fields.float()).flatten(1).sum(1) / mask[0].sum().clamp_min(1.0)


def superior_excursion_mm(field: Tensor, affine: Tensor, region: Tensor) -> float:
    """The 95th percentile of the superior-inferior (world z) displacement magnitude (mm) inside ``region``: the diaphragm's excursion."""
    si = voxel_to_mm(field.double(), affine)[2].abs()
    return float(torch.quantile(si[region.bool()].float(), 0.95)) if region.any() else float("nan")


def breathing_metrics(test: dict, generated: dict[str, Tensor], train: dict, series: PhaseSeries, model: MotionLDMModelConfig,
                      lung: int) -> dict[str, Any]:
    """Lung-volume curves (generated: the reference lung warped by each generated field; real: the real phases'
    lung labels) with their ratio at end-exhale (the phase of smallest real lung volume), and the diaphragm's
    superior-inferior excursion at end-exhale against the range of the real ones (training and held-out)."""
    moving = [p for p in range(model.phases) if p != model.reference_phase]
    real_curves, generated_curves = [], []
    for subject, phases in test.items():
        lung_reference = phases[model.reference_phase]["label"][0] == lung
        real_curves.append([float((phases[p]["label"][0] == lung).sum() / lung_reference.sum().clamp_min(1)) for p in range(model.phases)])
        curves = torch.stack([lung_volumes(lung_reference, fields) for fields in generated[subject]])  # (N, P-1)
        full = torch.ones(len(curves), model.phases, dtype=curves.dtype)
        full[:, moving] = curves
        generated_curves.append(full.mean(0).tolist())
    real_curve, generated_curve = np.mean(real_curves, axis=0), np.mean(generated_curves, axis=0)
    exhale = int(np.argmin(real_curve))
    index = moving.index(exhale) if exhale in moving else 0
    excursion_generated = [superior_excursion_mm(fields[index], test[s][exhale]["affine"], test[s][exhale]["label"][0] == lung)
                           for s, sample_fields in generated.items() for fields in sample_fields]
    real_excursions = [superior_excursion_mm(true_field(series, phases[exhale]), phases[exhale]["affine"], phases[exhale]["label"][0] == lung)
                       for phases in (*train.values(), *test.values())]
    low, high = float(np.nanmin(real_excursions)), float(np.nanmax(real_excursions))
    return {"end_exhale_phase": exhale, "lung_volume_ratio_generated": float(generated_curve[exhale]),
            "lung_volume_ratio_real": float(real_curve[exhale]), "lung_volume_curve_generated": generated_curve.tolist(),
            "lung_volume_curve_real": real_curve.tolist(),
            "diaphragm_excursion_generated_mm": float(np.nanmean(excursion_generated)), "diaphragm_excursion_real_mm": float(np.nanmean(real_excursions)),
            "diaphragm_excursion_real_min_mm": low, "diaphragm_excursion_real_max_mm": high,
            "diaphragm_excursion_generated_in_real_range": float(np.mean([low <= e <= high for e in excursion_generated]))}


def write_subject(folder: Path, phases: dict[int, dict[str, Any]], fields: Tensor, moving: list[int], model: MotionLDMModelConfig,
                  style: str) -> None:
    """One generated motion of a held-out subject for the report: the warped reference per phase, its movies and
    the Jacobian determinant of the end-exhale field."""
    from matplotlib.figure import Figure

    from medsynth.motion.fields import jacobian_determinant
    from medsynth.motion.render import render_movie
    from medsynth.report.html import save_figure

    reference = phases[model.reference_phase]
    affine = reference["affine"].numpy()
    all_fields = torch.zeros(model.phases, 3, *reference["image"].shape[1:])
    all_fields[moving] = fields
    ct = unit_to_hu(reference["image"], model.ct_window)
    frames = warp_image(ct[None].expand(model.phases, *ct.shape).float(), all_fields)[:, 0]
    frame_paths = [save_image(frame[None], folder / f"ct_t{p:02d}.nii.gz", affine=affine) for p, frame in enumerate(frames)]
    field_paths = [save_field(f, folder / f"field_t{p:02d}.nii.gz", affine) for p, f in enumerate(all_fields)]
    for view in ("axial", "coronal"):
        render_movie(frame_paths, folder / f"movie_{view}.gif", field=field_paths, views=(view,), style=style)
    determinant = jacobian_determinant(all_fields[model.phases // 2][None])[0]
    figure = Figure(figsize=(4, 3))
    axes = figure.add_subplot()
    shown = axes.imshow(determinant[:, determinant.shape[1] // 2, :].T.numpy(), origin="lower", cmap="RdBu_r", vmin=0.5, vmax=1.5, aspect="auto")
    figure.colorbar(shown, ax=axes)
    save_figure(figure, folder / "jacobian.png")


def lung_volume_figure(metrics: dict[str, Any]) -> Any:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5, 3))
    axes = figure.add_subplot()
    for key, style in (("lung_volume_curve_real", "k-o"), ("lung_volume_curve_generated", "C1-s")):
        axes.plot(metrics[key], style, label=key.rsplit("_", 1)[-1])
    axes.set_xlabel("phase")
    axes.set_ylabel("lung volume / reference")
    axes.legend()
    figure.tight_layout()
    return figure

