"""Recipe ``flow-cvae``: image-conditioned 3D displacement fields (cardiac CT), as ground truth for motion models.

Data: flow pairs prepared with ``--normalize ct``: the end-systole frame F ``(1, *S)`` and the field u
``(3, *S)`` in voxels, pull convention from end-diastole G: ``warp_image(G, u) == F``; G is the prepared
``moving`` frame when the source has one, else ``warp_image(F, invert(u))``. Two stages (``--stage``):

- **cvae** (default): a conditional VAE (:mod:`medsynth.nets.flow_cvae`) whose encoder and decoder see
  the frame's feature pyramid at every level; ELBO per voxel = end-point error in mm (each case's
  affine: anisotropic voxels weigh right; a weighted mean with ``moving_weight`` > 0, the moving
  voxels weighing ``1 + moving_weight``) / ``recon_sigma_mm`` + beta * KL(q || N(0, I)) (closed form,
  summed over the spatial latent) / voxels, beta warmed up linearly. Prior samples draw
  ``z ~ N(m, T^2 diag(s^2))`` with ``T = sample.temperature``, and ``m = 0, s = 1`` (``model.prior: normal``)
  or the aggregate posterior of the training flows (``aggregate``: fitted when training ends, kept in the weights).
- **registration**: an unsupervised siamese registration network on (F, G) (LNCC or MSE + MONAI
  ``DiffusionLoss``); its encoder, frozen, is the cvae stage's ``registration`` pyramid
  (``--set model.registration_run=RUN``).

Augmentation: shift and zoom of frames and field together (:mod:`medsynth.motion.augment`), intensity
noise. Each sampled flow is written in mm with the frame's affine, beside ``warp_image(F, invert(u))``.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from lightning.pytorch.trainer.states import TrainerFn
from pydantic import Field
from torch import Tensor

from medsynth.config import RecipeConfig, StrictModel
from medsynth.data.datasets import first_split, held_out, load_prepared_info, load_split, require_prepared, stack_items
from medsynth.data.fields import save_field, voxel_to_mm
from medsynth.data.io import load_image, save_image, spacing_of
from medsynth.errors import MedsynthError
from medsynth.evaluate.downstream import MotionUtilitySettings
from medsynth.latent_space import KLTerm, channel_directions, direction_grid, interpolate_latents, plane_basis
from medsynth.motion.augment import augment_pair
from medsynth.motion.fields import epe_map_mm, invert, warp_image
from medsynth.nets.flow_cvae import FlowCVAE, ImagePyramid, LearnedPyramid, RegistrationNet
from medsynth.recipes.base import (
    ConditionVolume,
    DataFormat,
    Example,
    Load,
    Recipe,
    SampleRequest,
    Stage,
    TinyExample,
    condition_volumes,
    load_stage_weights,
    model_affine,
    require_finite,
    stage_object,
    with_settings,
)
from medsynth.report.sections import ReportSection
from medsynth.runs import Run
from medsynth.seeds import item_seed
from medsynth.training import MedsynthModule

HEART = ("left_atrium", "right_atrium", "rv_blood_pool", "lv_blood_pool", "lv_myocardium")  # CARDIAC_LABELS names


class FlowCVAEModelConfig(StrictModel):
    """Network, loss and stage. ``image_shape``, ``reference_affine``, ``ct_window`` are filled from the data."""

    stage: Literal["cvae", "registration"] = "cvae"
    pyramid: Literal["learned", "registration", "image"] = Field("learned", description="the frame's features at each level")
    channels: list[int] = Field([16, 32, 32], description="encoder/decoder channels per level; levels = len - 1 halvings")
    pyramid_channels: list[int] = Field([8, 16, 16], description="learned/registration pyramid channels per level")
    latent_channels: int = Field(4, ge=1, description="C_z of the spatial latent (C_z, *S / 2^levels)")
    residual: bool = True
    mean_flow_offset: bool = Field(True, description="centre the decoder on the mean training flow (it learns the deviation)")
    max_displacement: float = Field(20.0, gt=0, description="output bound per axis (tanh)")
    displacement_unit: Literal["mm", "voxels"] = "mm"
    recon_sigma_mm: float = Field(1.0, gt=0, description="likelihood scale: the ELBO's end-point error is divided by it")
    moving_weight: float = Field(0.0, ge=0, description=(
        "extra weight of moving voxels in the end-point error: 1 + w where the true |u| exceeds moving_threshold of the "
        "case's largest |u|, else 1 (the heart, a few per cent of the grid, otherwise regresses to the mean flow)"))
    moving_threshold: float = Field(0.1, gt=0, lt=1, description="moving voxels: |u| above this fraction of the case's largest |u| (mm)")
    prior: Literal["normal", "aggregate"] = Field("normal", description=(
        "what prior samples draw from: N(0, I), or the aggregate posterior of the training flows as a diagonal Gaussian, "
        "fitted when training ends (decoding N(0, I) drifts off the codes the decoder learned: the low implied EF)"))
    kl_weight: float = Field(1.0, ge=0, description="beta")
    kl_warmup_epochs: float = Field(5.0, ge=0)
    registration_run: str | None = Field(None, description="cvae stage with pyramid=registration: the registration run")
    registration_similarity: Literal["lncc", "mse"] = "lncc"
    registration_smoothness: float = Field(1.0, ge=0, description="weight of MONAI's DiffusionLoss")
    image_shape: list[int] | None = None
    reference_affine: list[list[float]] | None = None
    ct_window: list[float] | None = Field(None, description="HU window of --normalize ct (condition files are scaled by it)")


class FlowCVAEDataConfig(StrictModel):
    augment: bool = True
    shift_voxels: float = Field(2.0, ge=0, description="random shift in [-s, s] voxels per axis")
    zoom: float = Field(0.1, ge=0, lt=0.5, description="random zoom in [1 - z, 1 + z] per axis")
    noise_std: float = Field(0.02, ge=0, description="Gaussian intensity noise (frames in [0, 1])")


class FlowCVAESampleConfig(StrictModel):
    grid_directions: Literal["halves", "channels", "random"] = Field(
        "halves", description="halves: the two halves of the latent channels; channels: grid_channels; random: a random orthonormal pair")
    grid_channels: list[int] = [0, 1]
    grid_span: float = Field(2.5, gt=0, description="grid coefficients in [-span, span] (per-element value along each direction)")
    temperature: float = Field(1.0, gt=0, description="random mode (and evaluation): z = m + temperature * s * e, e ~ N(0, I) (m, s: model.prior)")


class FlowCVAEEvaluateConfig(MotionUtilitySettings):
    n_samples: int = Field(8, ge=2, description="prior samples per held-out frame")
    downstream_real_subjects: int = Field(8, ge=1, description="labelled pool L: the first training subjects, whose real pairs train the downstream network")
    generated_per_frame: int = Field(4, ge=1, description="generated (and classic, PCA) fields per unlabelled frame (downstream)")


class FlowCVAEConfig(RecipeConfig):
    recipe: Literal["flow-cvae"] = "flow-cvae"
    model: FlowCVAEModelConfig = FlowCVAEModelConfig()
    data: FlowCVAEDataConfig = FlowCVAEDataConfig()
    sample: FlowCVAESampleConfig = FlowCVAESampleConfig()
    evaluate: FlowCVAEEvaluateConfig = FlowCVAEEvaluateConfig()


def bound_voxels(model: FlowCVAEModelConfig) -> list[float]:
    """``max_displacement`` per axis in voxels of the prepared grid."""
    if model.displacement_unit == "voxels":
        return [model.max_displacement] * 3
    spacing = spacing_of(model_affine(model))
    return [float(model.max_displacement / s) for s in spacing[:3]]


def pairs(cases: list[dict[str, Any]]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Prepared cases as (fixed F ``(N, 1, *S)``, moving G ``(N, 1, *S)``, flow ``(N, 3, *S)`` voxels, affines ``(N, 4, 4)``)."""
    batch = {k: stack_items(cases, k) for k in ("image", "flow") + (("moving",) if "moving" in cases[0] else ())}
    return batch["image"], diastole(batch), batch["flow"], stack_items(cases, "affine")


def diastole(batch: dict[str, Any]) -> Tensor:
    """The end-diastole frames ``(B, 1, *S)``: the prepared ``moving`` frame, else ``warp_image(F, invert(u))``."""
    if "moving" in batch:
        return batch["moving"].float()
    with torch.no_grad():
        return warp_image(batch["image"].float(), invert(batch["flow"].float()))


# -- the two stages ---------------------------------------------------------------------------------


class CVAEStage:
    """The conditional VAE: p(u | z, F) with the frame's pyramid at every level."""

    generates = True  # its runs sample flows (and their report shows them)

    def __init__(self, config: FlowCVAEConfig):
        self.config, self.model = config, config.model

    def build(self) -> torch.nn.Module:
        model = self.model
        levels = len(model.channels) - 1
        pyramid = ImagePyramid(levels) if model.pyramid == "image" else LearnedPyramid(model.pyramid_channels, model.residual)
        if model.pyramid == "registration":
            pyramid.requires_grad_(False)  # frozen: the registration run's encoder, loaded before fitting
        return FlowCVAE(pyramid, model.channels, model.latent_channels, bound_voxels(model), model.residual,
                        model.image_shape if model.mean_flow_offset else None)

    def add_buffers(self, module: FlowCVAEModule) -> None:
        """With ``model.prior: aggregate``, the prior's mean and standard deviation: N(0, I) until ``on_fit_end`` fits them."""
        if self.model.prior == "aggregate":
            shape = module.net.latent_shape(self.model.image_shape)
            module.register_buffer("prior_mean", torch.zeros(shape))
            module.register_buffer("prior_std", torch.ones(shape))

    def before_fit(self, module: FlowCVAEModule) -> None:
        """Centre the decoder on the mean training flow (the registration pyramid is loaded by ``STAGES``' declaration)."""
        if self.model.mean_flow_offset and self.config.data_dir is not None:  # no data (a bare step): stays at zero
            module.net.decoder.set_offset(stack_items(load_split(self.config.data_dir, "train"), "flow").mean(0))

    def evaluate(self, recipe: FlowCVAERecipe, module: FlowCVAEModule, data_dir: Path, train: list[dict[str, Any]],
                 test: list[dict[str, Any]]) -> dict[str, Any]:
        return recipe.prior_metrics(module, data_dir, train, test)

    def voxel_weights(self, flow: Tensor, affines: Tensor) -> Tensor:
        """Weights ``(B, *S)`` of the reconstruction error: ``1 + model.moving_weight`` where the true field ``(B, 3, *S)``
        (voxels) moves more than ``model.moving_threshold`` of its case's largest |u| in mm, else 1."""
        magnitude = torch.linalg.vector_norm(voxel_to_mm(flow, affines), dim=1)  # (B, *S) mm
        peak = magnitude.flatten(1).amax(1).clamp_min(1e-6).view(-1, *[1] * (magnitude.ndim - 1))
        return 1.0 + self.model.moving_weight * (magnitude > self.model.moving_threshold * peak).to(magnitude.dtype)

    def losses(self, module: FlowCVAEModule, batch: dict[str, Any], beta: float) -> dict[str, Tensor]:
        frame, flow, affines = batch["image"].float(), batch["flow"].float(), batch["affine"]
        recon, mu, logvar = module.net(flow, frame)
        error = epe_map_mm(recon, flow, affines)  # (B, *S) mm
        voxels = error[0].numel()
        kl = module.kl(mu, logvar)
        # the weighted mean keeps the unweighted EPE's scale (per voxel), so recon_sigma_mm and beta mean the same
        weights = self.voxel_weights(flow, affines) if self.model.moving_weight > 0 else torch.ones_like(error)
        nll = (weights * error).sum() / weights.sum() / self.model.recon_sigma_mm
        return {"loss": nll + beta * kl / voxels, "epe_mm": error.mean(), "kl": kl, "beta": torch.tensor(beta)}


class RegistrationStage(CVAEStage):
    """Unsupervised registration of (F, G): ``warp_image(G, u) ~ F``; its encoder becomes a pyramid."""

    generates = False  # a registration network: nothing to sample

    def build(self) -> torch.nn.Module:
        from monai.losses import DiffusionLoss, LocalNormalizedCrossCorrelationLoss

        self.similarity = LocalNormalizedCrossCorrelationLoss(spatial_dims=3, kernel_size=5) \
            if self.model.registration_similarity == "lncc" else torch.nn.MSELoss()
        self.smoothness = DiffusionLoss()
        return RegistrationNet(self.model.pyramid_channels, self.model.channels, bound_voxels(self.model), self.model.residual)

    def add_buffers(self, module: FlowCVAEModule) -> None: ...  # no prior

    def before_fit(self, module: FlowCVAEModule) -> None: ...  # nothing to centre: trained from scratch

    def evaluate(self, recipe: FlowCVAERecipe, module: FlowCVAEModule, data_dir: Path, train: list[dict[str, Any]],
                 test: list[dict[str, Any]]) -> dict[str, Any]:
        """End-point error (mm) of the registration of the held-out pairs, beside that of a zero field."""
        fixed, moving, truth, affines = pairs(test)
        with torch.no_grad():
            flows = module.net(fixed, moving)
        return {"registration_epe_mm": float(epe_map_mm(flows, truth, affines).mean()),
                "registration_epe_zero_mm": float(epe_map_mm(torch.zeros_like(truth), truth, affines).mean())}

    def losses(self, module: FlowCVAEModule, batch: dict[str, Any], beta: float) -> dict[str, Tensor]:
        fixed, moving = batch["image"].float(), diastole(batch)
        flow = module.net(fixed, moving)
        similarity = self.similarity(warp_image(moving, flow), fixed)
        loss = similarity + self.model.registration_smoothness * self.smoothness(flow)
        return {"loss": loss, "similarity": similarity, "epe_mm": epe_map_mm(flow, batch["flow"].float(), batch["affine"]).mean()}


# One per run (model.stage); the cvae stage on a registration pyramid takes the frozen encoder of a registration run.
STAGES = (
    Stage("cvae", behaviour=CVAEStage, loads=(Load("model.registration_run", "registration", weights=("net.pyramid=net.encoder",),
                                                   when="model.pyramid=registration"),)),
    Stage("registration", behaviour=RegistrationStage),
)


class FlowCVAEModule(MedsynthModule):
    config: FlowCVAEConfig

    def __init__(self, config: FlowCVAEConfig):
        super().__init__(config)
        if config.model.image_shape is None:
            raise MedsynthError("flow-cvae: model.image_shape is unset (train with --data)")
        self.stage = stage_object(STAGES, config)
        self.kl = KLTerm(config.model.kl_weight, config.model.kl_warmup_epochs)
        self.net = self.stage.build()
        self.stage.add_buffers(self)

    def setup(self, stage: str) -> None:  # Lightning's stage (fit, validate, ...)
        if TrainerFn(stage) is TrainerFn.FITTING:
            self.stage.before_fit(self)
            load_stage_weights(self, FlowCVAERecipe())

    def on_fit_end(self) -> None:  # our own: MONAI and Lightning have no VAE prior fitting
        if hasattr(self, "prior_mean") and self.config.data_dir is not None:
            self.fit_aggregate_prior(load_split(self.config.data_dir, "train"))

    @torch.no_grad()
    def fit_aggregate_prior(self, cases: list[dict[str, Any]], chunk: int = 16) -> None:
        """The aggregate posterior (1/N) sum_i q(z | u_i, F_i) of the training pairs (unaugmented) as a diagonal
        Gaussian: per latent element, ``prior_mean`` = mean of the posterior means, ``prior_std`` = sqrt(their
        variance + the mean posterior variance). Shapes ``(C_z, *S / 2^L)``."""
        was_training, stats = self.net.training, []
        self.net.eval()
        for start in range(0, len(cases), chunk):
            part = cases[start:start + chunk]
            frames, flows = stack_items(part, "image").float().to(self.device), stack_items(part, "flow").float().to(self.device)
            stats.append(self.net.encode(flows, self.net.pyramid(frames)))
        self.net.train(was_training)
        mu, variance = torch.cat([m for m, _ in stats]), torch.cat([v for _, v in stats]).exp()
        self.prior_mean.copy_(mu.mean(0))
        self.prior_std.copy_((mu.var(0, unbiased=False) + variance.mean(0)).sqrt())

    def prior_stats(self) -> tuple[Tensor, Tensor]:
        """Mean and standard deviation ``(C_z, *S / 2^L)`` of the Gaussian that prior samples draw from (CPU)."""
        if hasattr(self, "prior_mean"):
            return self.prior_mean.cpu(), self.prior_std.cpu()
        shape = self.net.latent_shape(self.config.model.image_shape)
        return torch.zeros(shape), torch.ones(shape)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        losses = self.stage.losses(self, batch, self.kl.beta(self))
        self.log_losses("train", losses, len(batch["image"]))
        return losses["loss"]

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.log_losses("val", self.stage.losses(self, batch, self.kl.weight), len(batch["image"]))

    @torch.no_grad()
    def decode(self, z: Tensor, frame: Tensor) -> Tensor:
        """Fields in voxels ``(N, 3, *S)`` for latents ``(N, *latent_shape)`` on one frame ``(1, 1, *S)``."""
        features = [f.expand(len(z), *f.shape[1:]) for f in self.net.pyramid(frame.to(self.device))]
        return self.net.decode(z.to(self.device), features).cpu()

    @torch.no_grad()
    def posterior_mean(self, flow: Tensor, frame: Tensor) -> Tensor:
        return self.net.encode(flow.to(self.device), self.net.pyramid(frame.to(self.device)))[0].cpu()


# -- the recipe ---------------------------------------------------------------------------------


class FlowCVAERecipe(Recipe):
    name = "flow-cvae"
    data_format = DataFormat("CT (cardiac)", 3, "CT frame (end-systole)",
                             "displacement field to end-diastole (mm vectors, NIfTI with the frame's affine) and the warped frame (HU)")
    config_class = FlowCVAEConfig
    sample_modes = ("random", "grid", "plane", "interpolate")
    stages = STAGES
    headline_metrics = ("flow_epe_mean_mm", "flow_epe_zero_mm", "flow_epe_mean_flow_mm", "folding_share",
                        "downstream_epe_real_only_mm", "downstream_epe_classic_mm", "downstream_epe_with_generated_mm",
                        "downstream_epe_oracle_mm", "downstream_gain_share_generated")
    prepare_defaults = {"normalize": "ct"}  # HU window -1000..1000 -> [0, 1]; condition files are scaled the same way
    plan_config = "flow-cvae-86"
    tiny_example = TinyExample(
        phantom="cardiac", n=6, size=16, phantom_options={"flow_pairs": True}, prepare={"size": 16, "seed": 0}, config="flow-cvae-tiny",
        overrides=("model.channels=[4, 8]", "model.pyramid_channels=[4, 4]", "model.latent_channels=2", "train.batch_size=2",
                   "train.num_threads=1", "evaluate.n_samples=2", "evaluate.generated_per_frame=1", "evaluate.downstream_steps=2",
                   "evaluate.downstream_real_subjects=2", "evaluate.pca_modes=1"))

    def resolve_config(self, config: FlowCVAEConfig) -> FlowCVAEConfig:
        info, settings = require_prepared(config.data_dir, "flow-cvae", spatial_dims=3, one_shape=True, channels=1,
                                          normalize=("ct",))
        if info["flow_channels"] != 3:
            raise MedsynthError(f"{config.data_dir}: flow-cvae needs flow pairs (frame + 3-component field); prepare a flow-pair dataset")
        model, shape = config.model, list(info["image_shape"])
        factor = 2 ** (len(model.channels) - 1)
        if len(model.pyramid_channels) != len(model.channels):
            raise MedsynthError(f"flow-cvae: model.pyramid_channels {model.pyramid_channels} needs one value per level like model.channels")
        if any(s % factor for s in shape):
            raise MedsynthError(f"flow-cvae: volume shape {shape} must be divisible by {factor} (2^levels for model.channels)")
        run = model.registration_run
        return config.model_copy(update={"model": model.model_copy(update={
            "image_shape": shape, **self.data_settings(info, settings),
            "registration_run": str(Path(run).resolve()) if run else None})})

    def build_module(self, config: FlowCVAEConfig) -> FlowCVAEModule:
        return FlowCVAEModule(config)

    def datamodule_options(self, config: FlowCVAEConfig) -> dict[str, Any]:
        return {"train_transform": partial(augment_pair, shift=config.data.shift_voxels, zoom=config.data.zoom,
                                           noise_std=config.data.noise_std) if config.data.augment else None}

    # -- generation ---------------------------------------------------------------------------

    def frames(self, module: FlowCVAEModule, condition: Path | None) -> list[ConditionVolume]:
        """Condition frames (their ``unit`` ``(1, *S)`` in [0, 1] on the model's grid): the files given, or the held-out
        prepared frames."""
        model = module.config.model
        if condition is None:
            cases = first_split(module.config.data_dir, ("test", "val", "train"))
            if not cases:
                raise MedsynthError(f"flow-cvae: no --condition given and no prepared frames in {module.config.data_dir}")
            return [ConditionVolume.prepared(case["id"], case, self.to_units(case["image"], module.config)) for case in cases]
        return condition_volumes(Path(condition), model.image_shape, model.ct_window)

    def latents(self, module: FlowCVAEModule, request: SampleRequest, count: int) -> Tensor:
        """Latent codes ``(N, *latent_shape)`` of a request made on ``count`` condition frames."""
        shape = module.net.latent_shape(module.config.model.image_shape)
        dim, settings = int(np.prod(shape)), module.config.sample
        mean, std = module.prior_stats()  # random, grid and plane: standard-normal coordinates mapped to z = mean + std * e
        generator = torch.Generator().manual_seed(item_seed(request.seed, 0))
        if request.mode == "random":
            return mean + settings.temperature * std * torch.stack([
                torch.randn(shape, generator=torch.Generator().manual_seed(item_seed(request.seed, k))) for k in range(request.n * count)])
        if request.mode == "grid":
            steps = max(2, round(request.n ** 0.5))
            return mean + std * direction_grid(self.directions(module, generator), steps, settings.grid_span).view(-1, *shape)
        if request.mode == "plane":  # prior draws on a random plane, scaled to the prior's per-element size
            return mean + std * (torch.randn(request.n, 2, generator=generator) @ (plane_basis(dim, generator) * dim**0.5)).view(-1, *shape)
        cases = [c for c in held_out(module.config.data_dir) + load_split(module.config.data_dir, "train") if "flow" in c]
        if len(cases) < 2:
            raise MedsynthError(f"interpolate: need two real flows in {module.config.data_dir}")
        pair = [cases[int(i)] for i in torch.randperm(len(cases), generator=generator)[:2]]
        z = [module.posterior_mean(case["flow"][None], case["image"][None])[0].flatten() for case in pair]
        return interpolate_latents(z[0], z[1], steps=max(2, request.n)).view(-1, *shape)

    def directions(self, module: FlowCVAEModule, generator: torch.Generator) -> Tensor:
        """The grid's two latent directions ``(2, D)``; a coefficient is the value per element of their support."""
        shape, settings = module.net.latent_shape(module.config.model.image_shape), module.config.sample
        if settings.grid_directions == "random":
            return plane_basis(int(np.prod(shape)), generator) * float(np.prod(shape)) ** 0.5
        if settings.grid_directions == "halves":
            return channel_directions(shape, (list(range(shape[0] // 2)), list(range(shape[0] // 2, shape[0]))))
        return channel_directions(shape, ([settings.grid_channels[0]], [settings.grid_channels[-1]]))

    def write(self, module: FlowCVAEModule, frame: ConditionVolume, flows: Tensor, names: list[str], folder: Path) -> list[Path]:
        """Per flow ``(N, 3, *S)`` (voxels): ``<name>_field.nii.gz`` (mm) and ``<name>_warped.nii.gz`` (the synthetic
        diastole, HU), both with the affine the frame carries."""
        image = frame.unit.as_tensor()
        warped = warp_image(image[None].expand(len(flows), *image.shape), invert(flows))
        written = []
        for name, flow, volume in zip(names, flows, warped):
            written.append(save_field(frame.on_grid(flow), folder / f"{name}_field.nii.gz"))
            written.append(save_image(frame.on_grid(self.to_units(volume, module.config)), folder / f"{name}_warped.nii.gz"))
        return written

    def sample(self, module: FlowCVAEModule, request: SampleRequest, out: Path) -> list[Path]:
        if not module.stage.generates:
            raise MedsynthError("flow-cvae: this is a registration-stage run; sample from a cvae-stage run")
        if request.class_name is not None:
            raise MedsynthError("flow-cvae is conditioned on a CT frame, not a class: use --condition FRAME.nii.gz or a folder")
        module.eval()
        frames, folder = self.frames(module, request.condition), out / request.mode
        z = self.latents(module, request, len(frames) if request.condition is not None and request.mode == "random" else 1)
        if request.mode == "random" and request.condition is None:  # n flows over the held-out frames, cycled
            jobs = [(frames[k % len(frames)], k) for k in range(request.n)]
        elif request.mode == "random":  # n flows per condition file
            jobs = [(frame, i * request.n + k) for i, frame in enumerate(frames) for k in range(request.n)]
        else:  # grid, plane, interpolate: on the first frame
            jobs = [(frames[0], k) for k in range(len(z))]
        written: list[Path] = []
        for name in dict.fromkeys(frame.name for frame, _ in jobs):
            mine = [(frame, k) for frame, k in jobs if frame.name == name]
            condition = mine[0][0].unit.as_tensor()[None]  # (1, 1, *S)
            flows = torch.cat([module.decode(z[[k for _, k in mine[i:i + 16]]], condition) for i in range(0, len(mine), 16)])
            require_finite(flows, f"flow-cvae {request.mode}")
            written += self.write(module, mine[0][0], flows, [f"{name}_{k:03d}" for _, k in mine], folder)
        if request.mode == "grid":
            written += self.grid_figures(written, folder, steps=round(len(jobs) ** 0.5))
        return written

    def grid_figures(self, written: list[Path], folder: Path, steps: int) -> list[Path]:
        """The grid's mosaic (|u| in mm, middle axial slices) and a GIF that walks it row by row, snaking."""
        from medsynth.motion.render import render_movie
        from medsynth.report.html import image_grid, save_figure

        fields, warped = written[0::2], written[1::2]
        magnitudes = [torch.linalg.vector_norm(load_image(p).as_tensor(), dim=0, keepdim=True) for p in fields]
        peak = max(float(m.max()) for m in magnitudes) or 1.0
        mosaic = save_figure(image_grid(magnitudes, ncols=steps, vmin=0.0, vmax=peak), folder / "grid_mosaic.png")
        order = [r * steps + (c if r % 2 == 0 else steps - 1 - c) for r in range(steps) for c in range(steps)]
        movie = render_movie([warped[k] for k in order], folder / "grid_walk.gif", field=[fields[k] for k in order], views=("axial", "coronal"))
        return [mosaic, movie]

    # -- evaluation -----------------------------------------------------------------------------

    def prior_flows(self, module: FlowCVAEModule, frame: Tensor, n: int, seed: int) -> Tensor:
        """``n`` prior samples ``(n, 3, *S)`` voxels on a frame ``(1, *S)``, item ``k`` seeded by ``item_seed(seed, k)``."""
        return module.decode(self.latents(module, SampleRequest(n=n, seed=seed), 1), frame[None])

    def evaluate(self, run: Run, module: FlowCVAEModule, data_dir: Path) -> dict[str, Any]:
        """The run's stage's metrics on the held-out pairs (:meth:`prior_metrics` for a cvae run)."""
        module = module.eval()
        train, test = load_split(data_dir, "train"), held_out(data_dir)
        if not train or not test:
            raise MedsynthError(f"{data_dir}: evaluation needs training and held-out (test or val) flow pairs")
        return module.stage.evaluate(self, module, data_dir, train, test)

    def prior_metrics(self, module: FlowCVAEModule, data_dir: Path, train: list[dict[str, Any]], test: list[dict[str, Any]]) -> dict[str, Any]:
        """Field metrics of prior samples on held-out frames (:func:`medsynth.evaluate.fields.field_report`) and the
        downstream utility of generated flows for unlabelled frames (:func:`medsynth.evaluate.downstream.motion_utility`)."""
        from medsynth.evaluate.downstream import check_pools, motion_utility
        from medsynth.evaluate.fields import field_report

        settings = module.config.evaluate
        n_labelled, n_unlabelled = check_pools(  # before any work
            len(train), settings.downstream_real_subjects, settings.downstream_unlabelled_subjects, pca_modes=settings.pca_modes,
            labelled_setting="evaluate.downstream_real_subjects", unlabelled_setting="evaluate.downstream_unlabelled_subjects",
            pca_setting="evaluate.pca_modes")
        masks, lv = self.masks(data_dir, test)
        samples = [self.prior_flows(module, case["image"], settings.n_samples, item_seed(settings.seed, c)) for c, case in enumerate(test)]
        truths, affines = stack_items(test, "flow"), stack_items(test, "affine")
        metrics = field_report(samples, truths, affines, masks, stack_items(train, "flow"), stack_items(train, "affine"),
                               lv_masks=lv, prefix="flow")

        # The utility protocol: L's real pairs; U's ES frames (fixed) with k prior flows each, their synthetic ED warp_image(F, invert(u)).
        real, unlabelled = train[:n_labelled], train[n_labelled:n_labelled + n_unlabelled]
        k = settings.generated_per_frame
        downstream = motion_utility(
            pairs(real), stack_items(unlabelled, "image"), stack_items(unlabelled, "affine"), [case["flow"][None] for case in unlabelled],
            pairs(test), lambda i: self.prior_flows(module, unlabelled[i]["image"], k, item_seed(settings.seed + 1, i)), per_frame=k,
            pca_modes=settings.pca_modes, seeds=[settings.seed + s for s in range(settings.downstream_seeds)], steps=settings.downstream_steps,
            frame_role="fixed", seed=settings.seed, pca_setting="evaluate.pca_modes")
        return {**metrics, **downstream, "pyramid": module.config.model.pyramid, "n_samples": settings.n_samples,
                "n_test_real": len(test), "n_downstream_real": len(real), "n_downstream_generated": downstream["downstream_n_generated"],
                "downstream_n_labelled": len(real)}

    @staticmethod
    def masks(data_dir: Path, cases: list[dict[str, Any]]) -> tuple[dict[str, Tensor], Tensor | None]:
        """Evaluation masks ``(C, *S)``: heart and myocardium from CARDIAC_LABELS label maps, and the LV blood pool;
        without labels the heart is where the true field moves more than 10 % of its largest displacement."""
        if all("label" in case for case in cases):
            values = {name: value for value, name in load_prepared_info(data_dir)["labels"].items()}
            labels = stack_items(cases, "label")[:, 0]
            if all(name in values for name in HEART):
                heart = torch.isin(labels, torch.tensor([values[name] for name in HEART]))
                return {"heart": heart, "myocardium": labels == values["lv_myocardium"]}, labels == values["lv_blood_pool"]
        moving = torch.stack([torch.linalg.vector_norm(voxel_to_mm(c["flow"], c["affine"]), dim=0) for c in cases])
        return {"heart": moving > 0.1 * moving.flatten(1).amax(1).clamp_min(1e-6).view(-1, *[1] * (moving.ndim - 1))}, None

    # -- report ---------------------------------------------------------------------------------

    def report_sections(self, run: Run, module: FlowCVAEModule) -> list[ReportSection]:
        from medsynth.motion.render import render_still
        from medsynth.report.html import file_html

        if not module.stage.generates:
            return []
        folder = run.samples / "report"
        held_out_frame = self.frames(module, None)[0]
        name = held_out_frame.name
        frame = save_image(held_out_frame.image, folder / f"{name}_frame.nii.gz")
        field = self.write(module, held_out_frame, self.prior_flows(module, held_out_frame.unit.as_tensor(), 1, 0), [f"{name}_prior"], folder)[0]
        stills = [render_still(frame, folder / f"flow_{style}.png", field=field, style=style) for style in ("magnitude", "quiver")]
        grid = self.sample(module, SampleRequest(n=25, mode="grid"), folder)
        side = module.config.sample.grid_span
        return [
            ReportSection(f"A prior flow on held-out frame {name}: |u| in mm and in-plane arrows", "".join(file_html(p) for p in stills)),
            ReportSection(f"Latent grid ({module.config.sample.grid_directions} directions, coefficients in [-{side}, {side}]): |u| in mm, "
                          "middle axial slices", file_html(grid[-2])),
            ReportSection("The synthetic diastoles warp_image(F, invert(u)) of the grid, walked row by row (arrows: u)", file_html(grid[-1])),
        ]

    # -- medsynth plan (Recipe.plan_examples)

    def plan_examples(self, config: FlowCVAEConfig, size: list[int]) -> list[Example]:
        """The run's stage on volumes of ``size`` (X Y Z voxels); a sampling call decodes one batch of fields."""
        model = config.model
        config = with_settings(config, "model", image_shape=list(size), kl_warmup_epochs=0,
                               reference_affine=model.reference_affine or torch.eye(4).tolist(),
                               ct_window=model.ct_window or [-1000.0, 1000.0])
        items = config.sample.batch_size if hasattr(config.sample, "batch_size") else 1

        def batch(b: int) -> dict[str, Any]:
            from torch._subclasses.fake_tensor import unset_fake_temporarily

            with unset_fake_temporarily():  # a real tensor: the loss reads the affines with numpy
                affine = torch.eye(4, dtype=torch.float64).expand(b, 4, 4)
            return {"image": torch.rand(b, 1, *size), "flow": torch.rand(b, 3, *size), "moving": torch.rand(b, 1, *size),
                    "affine": affine}

        def sample(module: FlowCVAEModule) -> Tensor:
            return module.decode(torch.zeros(items, *module.net.latent_shape(size)), torch.rand(1, 1, *size))

        return [Example(model.stage, config, batch, sample, items, 1)]

