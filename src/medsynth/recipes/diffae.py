"""Recipe ``diffae``: a diffusion autoencoder (DiffAE, Preechakul et al. 2022) of 2D short-axis cine-MRI slices,
and with ``model.semantic: false`` its DDIM baseline.

- **Semantic encoder** (MONAI ``Regressor``): slice ``x`` (B, 1, H, W) in [-1, 1] -> ``z_sem`` (B, ``semantic_dim``).
- **Conditional decoder**: MONAI's ``DiffusionModelUNet`` predicting eps (or v) from (x_t, t, z_sem). ``z_sem``
  enters through the UNet's time embedding: ``num_class_embeds`` is set and ``unet.class_embedding`` replaced by
  ``nn.Linear(semantic_dim, time_embed_dim)``, so MONAI adds ``W z_sem`` to the timestep embedding that scales and
  shifts the GroupNorm of every ResBlock. This is a documented variant of DiffAE's AdaGN (which multiplies the
  normalised features by an affine map of z_sem after the time scale/shift), chosen because MONAI's UNet takes it
  without reaching into its ``forward``.
- **Stochastic encoder**: deterministic DDIM inversion (:func:`medsynth.diffusion.inversion.ddim_invert`), x_T.
- **Latent DDIM** (second stage): a small MLP (:class:`medsynth.nets.latent_mlp.LatentMLP`) denoising
  ``z_sem`` normalised by its training mean and standard deviation, so ``sample --mode random`` draws new hearts.

Training (one run): for ``model.stage_epochs`` epochs the encoder and UNet train jointly, end to end, on the
diffusion loss; then the encoder is frozen, the code statistics fitted, and the latent DDIM trains the rest
(``STAGES``; ``recipes.base.stage_optimizer``: one parameter group and cosine schedule per stage). The DDIM baseline
is a declared variant (``DDIM``: ``model.semantic: false``): its own module (:class:`DDIMModule`) with one stage.

Data: ``medsynth prepare <ukbb|acdc|phantom views> --recipe diffae --size 32`` (``slices: true``): one 2D
case per subject, frame and SAX slice (the phantom's thin-slice truth ``sa_hr`` where present), intensities
by percentiles to [0, 1] per slice, resized, with labels; splits by subject (:func:`medsynth.data.cine.slice_manifest`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from monai.networks.nets import Regressor
from pydantic import Field
from torch import Tensor, nn

from medsynth.config import RecipeConfig, StrictModel
from medsynth.data.datasets import held_out, held_out_split, load_split, require_prepared, stack_items
from medsynth.data.io import save_image
from medsynth.diffusion.config import DenoiserConfig
from medsynth.diffusion.denoiser import ConditionedDenoiser
from medsynth.diffusion.inversion import ddim_invert
from medsynth.diffusion.module import DiffusionModule
from medsynth.diffusion.objectives import DiffusionLoss
from medsynth.diffusion.samplers import sample_ddim
from medsynth.diffusion.sampling import SamplerConfig, run_sampler
from medsynth.errors import MedsynthError
from medsynth.inverse.evaluation import EVAL_METHODS
from medsynth.inverse.latent import ReconstructSettings
from medsynth.latent_space import slerp
from medsynth.nets.latent_mlp import LatentMLP
from medsynth.recipes.base import (
    DataFormat,
    Example,
    Recipe,
    SampleRequest,
    Stage,
    StagedModule,
    TinyExample,
    Variant,
    require_finite,
    stages_trained,
    with_settings,
)
from medsynth.report.sections import ReportSection
from medsynth.runs import Run
from medsynth.seeds import item_generators, item_noise, item_seeds


class DiffAEModelConfig(DenoiserConfig):
    """Encoder, decoder UNet, latent DDIM and stages. ``image_size`` and ``labels`` are filled from the data."""

    semantic: bool = Field(True, description="false: the DDIM baseline (no encoder, unconditional UNet, no latent stage)")
    semantic_dim: int = Field(64, ge=1, description="size of z_sem (DiffAE: 512)")
    encoder_channels: list[int] = Field([16, 32, 64], description="MONAI Regressor channels, each level strided by 2")
    stage_epochs: int = Field(10, ge=1, description="epochs of the encoder + UNet; the latent DDIM trains the rest of max_epochs")
    latent_hidden: int = Field(256, ge=1, description="width of the latent DDIM's MLP")
    latent_layers: int = Field(4, ge=1, description="residual blocks of the latent DDIM's MLP")
    cond_drop_prob: float = Field(0.0, ge=0, lt=1, description="no guidance: DiffAE decodes its own code")
    image_size: int | None = None
    labels: dict[str, str] = {}


class DiffAESampleConfig(SamplerConfig):
    sampler: Literal["ddpm", "ddim", "dpmpp", "rflow"] = "ddim"
    steps: int | None = Field(20, ge=1, description="decoding, inversion and latent steps")
    interpolation_frames: int = Field(7, ge=3, description="--mode interpolate: images per strip, both ends included")
    clip_x0: float | None = Field(1.0, gt=0, description="--mode random: clamp each step's x_0 estimate to the slices' [-1, 1] "
                                                        "(the demo's priors diverge from pure noise without it)")
    latent_clip: float | None = Field(5.0, gt=0, description="--mode random: the same for the latent DDIM's normalised z_sem")
    inversion_iterations: int = Field(10, ge=0, description="fixed-point refinements per DDIM inversion step (0: plain inversion; "
                                                           "at 10 steps on the demo's 40-epoch prior 0/5/10/20 gave "
                                                           "14.9/35.1/44.9/50.0 dB round trips of held-out SAX slices)")


class DiffAEEvaluateConfig(StrictModel):
    steps: int = Field(30, ge=1, description="DDIM steps of the autoencoding (inversion and decoding)")
    n_autoencode: int = Field(16, ge=1, description="held-out slices autoencoded")
    n_generated: int = Field(64, ge=2, description="random samples judged against held-out slices")
    classifier_epochs: int = Field(10, ge=1, description="epochs of the feature network (structures present in a slice)")
    seed: int = 0
    ddim_run: str | None = Field(None, description="--reconstruction: a DDIM-baseline run (model.semantic=false), the prior of ddim_lax")
    reconstruction_methods: list[str] = Field(list(EVAL_METHODS), description="--reconstruction: methods scored (inverse.evaluation)")
    reconstruct: ReconstructSettings = Field(ReconstructSettings(), description="--reconstruction: the latent methods' settings")
    segmenter_epochs: int = Field(20, ge=1, description="--reconstruction: epochs of the 2D segmenter trained on the thin slices")
    reconstruction_subjects: int | None = Field(None, ge=1, description="--reconstruction: at most this many held-out subjects")


class DiffAEConfig(RecipeConfig):
    recipe: Literal["diffae"] = "diffae"
    model: DiffAEModelConfig = DiffAEModelConfig()
    sample: DiffAESampleConfig = DiffAESampleConfig()
    evaluate: DiffAEEvaluateConfig = DiffAEEvaluateConfig()


def to_model(x01: Tensor) -> Tensor:
    """Prepared intensities [0, 1] -> the model's [-1, 1]."""
    return x01.float() * 2 - 1


def to_unit(x: Tensor) -> Tensor:
    """The model's [-1, 1] -> [0, 1], clamped."""
    return ((x.float() + 1) / 2).clamp(0, 1)


# -- the stages ---------------------------------------------------------------------------------------


class AutoencoderStage(Stage):
    """The encoder and the UNet, end to end on the diffusion loss (:meth:`DiffAEModule.training_pair`)."""

    def training_step(self, module: DiffAEModule, batch: dict[str, Any], batch_idx: int) -> Tensor:
        return DiffusionModule.training_step(module, batch, batch_idx)

    def validation_step(self, module: DiffAEModule, batch: dict[str, Any], batch_idx: int) -> None:
        return DiffusionModule.validation_step(module, batch, batch_idx)

    def on_train_epoch_start(self, module: DiffAEModule) -> None: ...


class LatentStage(Stage):
    """The latent DDIM on the frozen encoder's normalised codes (the code statistics fitted when it starts)."""

    def training_step(self, module: DiffAEModule, batch: dict[str, Any], batch_idx: int) -> Tensor:
        loss, logs = module.latent_loss(module.latent_net, module.latent_pair(batch))
        module.log_dict({f"train/latent_{k}": v for k, v in logs.items()}, on_step=True, on_epoch=True, batch_size=len(batch["image"]))
        return loss

    def validation_step(self, module: DiffAEModule, batch: dict[str, Any], batch_idx: int) -> None:
        generator = torch.Generator(device=module.device).manual_seed(batch_idx)
        loss, logs = module.latent_loss(module.latent_net, module.latent_pair(batch), None, generator)
        module.log_dict({f"val/latent_{k}": v for k, v in logs.items()} | {"val/loss": loss}, prog_bar=True, on_epoch=True,
                        batch_size=len(batch["image"]))

    def on_train_epoch_start(self, module: DiffAEModule) -> None:
        if not bool(module.z_fitted):
            module.fit_code_statistics()


STAGES = (AutoencoderStage("autoencoder", ("encoder", "net"), epochs="model.stage_epochs"), LatentStage("latent", ("latent_net",)))
# The DDIM baseline: an unconditional UNet, one stage (DDIMModule).
DDIM = Variant("ddim", ("model.semantic=false",), stages=(Stage("ddim", ("net",)),))


# -- the LightningModules -----------------------------------------------------------------------------


class DDIMModule(DiffusionModule):
    """The DDIM baseline (variant ``DDIM``): an unconditional UNet trained on the diffusion loss; a slice prior
    (:class:`~medsynth.inverse.prior.SlicePrior`) without a semantic code. :class:`DiffAEModule` adds the code."""

    config: DiffAEConfig
    semantic = False  # SlicePrior: no semantic encoder, z_sem is None
    random_kind = "DDIM"  # how its random slices are made (the report's title)

    def __init__(self, config: DiffAEConfig):
        model = config.model
        if model.image_size is None:
            raise MedsynthError("diffae: model.image_size is unset (train with --data)")
        super().__init__(config, ConditionedDenoiser(self.denoiser_unet(model), tensor_as="class_labels"), model.make_schedule())
        self.image_size = model.image_size

    @staticmethod
    def denoiser_unet(model: DiffAEModelConfig) -> nn.Module:
        """The decoder UNet (2D, one channel in and out)."""
        return model.build_unet(2, 1, 1)

    # -- the public interface of the inverse layer

    def encode_semantic(self, x: Tensor) -> Tensor | None:
        """Slices ``x`` (B, 1, H, W) in [-1, 1] -> ``z_sem`` (B, D); None for the DDIM baseline."""
        return None

    def invert(self, x: Tensor, z_sem: Tensor | None, steps: int) -> Tensor:
        """Deterministic DDIM inversion: slices ``x`` (B, 1, H, W) in [-1, 1] and their codes -> x_T (B, 1, H, W)
        (``sample.inversion_iterations`` fixed-point refinements per step)."""
        return ddim_invert(self.net, x.float(), self.schedule, z_sem, steps=steps,
                           fixed_point_iterations=self.config.sample.inversion_iterations)

    def decode(self, z_sem: Tensor | None, x_T: Tensor, steps: int) -> Tensor:
        """Deterministic DDIM (eta 0) from x_T (B, 1, H, W) under ``z_sem`` (B, D) -> x0 (B, 1, H, W), unclamped.
        Differentiable in both (no ``no_grad`` here: reconstruction back-propagates through it)."""
        return sample_ddim(self.net, x_T, self.schedule, z_sem, steps=steps, eta=0.0)

    def denoise(self, x: Tensor, z_sem: Tensor | None, timestep: int, noise: Tensor) -> Tensor:
        """Slices ``x`` (B, 1, H, W) in [-1, 1] noised to ``timestep`` with ``noise`` -> the one-step x0 estimate (B, 1, H, W)."""
        t = torch.tensor(timestep, device=x.device)
        abar = self.schedule.abar(t).to(x.dtype)
        x_t = abar.sqrt() * x + (1 - abar).sqrt() * noise
        prediction, _ = self.schedule.split(self.net(x_t, t.expand(len(x)), z_sem))
        x0, _ = self.schedule.predict_x0_eps(prediction, x_t, t)
        return x0

    def slice_priors(self, ddim: DDIMModule | None) -> tuple[DiffAEModule | None, DDIMModule | None]:
        """(the DiffAE prior, the DDIM prior) of ``evaluate --reconstruction`` with this run and ``evaluate.ddim_run``'s module."""
        return None, self

    # -- training

    def training_pair(self, batch: dict[str, Any], generator: torch.Generator | None = None) -> tuple[Tensor, Any]:
        """(x_0 in [-1, 1], z_sem with gradients to the encoder, or None for the baseline)."""
        x0 = to_model(batch["image"])
        return x0, self.encode_semantic(x0)

    # -- sampling

    def codes(self, generators: list[torch.Generator], settings: DiffAESampleConfig) -> Tensor | None:
        """New codes z_sem (len(generators), D) for random slices, item i's draws from ``generators[i]`` (the baseline: None)."""
        return None

    @torch.no_grad()
    def random(self, seeds: list[int], settings: DiffAESampleConfig) -> Tensor:
        """New slices (len(seeds), 1, H, W) in [-1, 1], one per seed: z_sem from the latent DDIM (the baseline:
        none), x_T ~ N(0, I), decoded; item i's draws come from its own generator."""
        self.eval()
        size, outputs = self.image_size, []
        for start in range(0, len(seeds), settings.batch_size):
            generators = item_generators(seeds[start:start + settings.batch_size])
            z_sem = self.codes(generators, settings)
            x_T = item_noise((1, size, size), generators).to(self.device)
            outputs.append(run_sampler(self.net, x_T, self.schedule, z_sem, settings, generators))
        return torch.cat(outputs).clamp(-1, 1)

    @torch.no_grad()
    def autoencode(self, x: Tensor, steps: int, batch_size: int = 16) -> Tensor:
        """Slices (B, 1, H, W) in [-1, 1] -> encode, invert, decode -> (B, 1, H, W), unclamped."""
        self.eval()
        outputs = []
        for start in range(0, len(x), batch_size):
            part = x[start:start + batch_size].to(self.device).float()
            z_sem = self.encode_semantic(part)
            outputs.append(self.decode(z_sem, self.invert(part, z_sem, steps), steps))
        return torch.cat(outputs)


class DiffAEModule(StagedModule, DDIMModule):
    """Semantic encoder, conditional UNet and latent DDIM; the stage of the epoch (``STAGES``) trains."""

    declared = STAGES

    semantic = True  # SlicePrior: z_sem from the encoder
    random_kind = "latent DDIM code, DDIM decoding"

    def __init__(self, config: DiffAEConfig):
        super().__init__(config)
        model = config.model
        size = model.image_size
        self.encoder = Regressor(in_shape=(1, size, size), out_shape=(model.semantic_dim,), channels=tuple(model.encoder_channels),
                                 strides=(2,) * len(model.encoder_channels), num_res_units=1)
        self.latent_net = LatentMLP(model.semantic_dim, model.latent_hidden, model.latent_layers)
        self.latent_schedule = model.make_schedule()
        self.latent_loss = DiffusionLoss(self.latent_schedule)
        # statistics of z_sem over the training slices (saved with the weights), set when the latent stage starts
        self.register_buffer("z_mean", torch.zeros(model.semantic_dim))
        self.register_buffer("z_std", torch.ones(model.semantic_dim))
        self.register_buffer("z_fitted", torch.tensor(False))
        self.plan = stages_trained(STAGES, config)

    @staticmethod
    def denoiser_unet(model: DiffAEModelConfig) -> nn.Module:
        """The decoder UNet, z_sem joining its timestep embedding (the module docstring says why)."""
        unet = model.build_unet(2, 1, 1, num_class_embeds=1)
        unet.class_embedding = nn.Linear(model.semantic_dim, model.channels[0] * 4)
        return unet

    def encode_semantic(self, x: Tensor) -> Tensor:
        """Slices ``x`` (B, 1, H, W) in [-1, 1] -> ``z_sem`` (B, D)."""
        return self.encoder(x)

    def slice_priors(self, ddim: DDIMModule | None) -> tuple[DiffAEModule | None, DDIMModule | None]:
        return self, ddim

    # -- training

    def latent_pair(self, batch: dict[str, Any]) -> Tensor:
        """Normalised codes (B, D) of a batch under the frozen encoder."""
        with torch.no_grad():
            return (self.encoder(to_model(batch["image"])) - self.z_mean) / self.z_std

    @torch.no_grad()
    def fit_code_statistics(self) -> None:
        """Mean and standard deviation of z_sem over the training slices (once, when the latent stage starts)."""
        datasets = getattr(self.trainer.datamodule, "datasets", None)
        if datasets is None:
            return
        train = datasets["train"]
        images = torch.stack([train[i]["image"] for i in range(len(train))]).to(self.device)
        codes = torch.cat([self.encoder(to_model(images[k:k + 256])) for k in range(0, len(images), 256)])
        self.z_mean.copy_(codes.mean(0))
        self.z_std.copy_(codes.std(0).clamp_min(1e-4) if len(codes) > 1 else torch.ones_like(self.z_mean))
        self.z_fitted.fill_(True)

    # -- sampling

    def codes(self, generators: list[torch.Generator], settings: DiffAESampleConfig) -> Tensor:
        """New codes z_sem (len(generators), D) from the latent DDIM, item i's draws from ``generators[i]``."""
        z = run_sampler(self.latent_net, item_noise((self.config.model.semantic_dim,), generators).to(self.device),
                        self.latent_schedule, None, settings.model_copy(update={"clip_x0": settings.latent_clip}), generators)
        return z * self.z_std + self.z_mean


# -- the recipe -----------------------------------------------------------------------------------


def structure_classes(labels: Tensor) -> Tensor:
    """Label maps (N, 1, H, W) -> the number of structures (non-zero label values) in each slice (N,):
    0 beyond the heart, rising from apex to base. The feature network's training target."""
    return torch.stack([(torch.unique(label) > 0).sum() for label in labels.long()])


class DiffAERecipe(Recipe):
    name = "diffae"
    data_format = DataFormat("cine MRI (short-axis slices)", 2, "none (a slice's own semantic code)",
                             "slices (PNG) in [0, 1]; as a reconstruction prior, fine SAX volumes in the stack's units", model_range=(-1.0, 1.0), window=None)
    config_class = DiffAEConfig
    monitor = None  # val/loss changes meaning with the stage
    sample_modes = ("random", "interpolate", "autoencode")
    condition_refusal = "diffae draws slices without a condition (use --mode autoencode or interpolate for real slices)"
    headline_metrics = ("autoencode_psnr", "autoencode_ssim", "mmd_classifier_features", "ms_ssim_generated", "memorisation_max_ssim")
    prepare_defaults = {"slices": True, "normalize": "percentile"}
    reconstructs = True  # its runs (and its DDIM baseline's) are the slice priors of `medsynth reconstruct`
    stages = STAGES
    variants = (DDIM,)
    plan_config = "diffae-128"
    tiny_example = TinyExample(  # 16 x 16 slices of 4 phantom subjects, 2 frames; the resume test crosses the stage boundary
        phantom="cardiac", n=4, size=32, phantom_options={"modality": "mri", "views": True, "frames": 2, "hr_factor": 2},
        prepare={"size": 16, "seed": 0}, config="diffae-tiny",
        overrides=("model.stage_epochs=2", "model.channels=[8, 16]", "model.attention_levels=[false, false]", "model.norm_num_groups=4",
                   "model.encoder_channels=[4, 8]", "model.semantic_dim=8", "model.latent_hidden=16", "model.latent_layers=1",
                   "train.batch_size=16", "train.num_threads=1", "sample.steps=3", "evaluate.steps=3", "evaluate.n_autoencode=2",
                   "evaluate.n_generated=4", "evaluate.classifier_epochs=1"))

    def resolve_config(self, config: DiffAEConfig) -> DiffAEConfig:
        info, _ = require_prepared(Path(config.data_dir), "diffae", spatial_dims=2, one_shape=True, channels=1, normalize=("percentile",))
        height, width = info["image_shape"]
        multiple = 2 ** (len(config.model.channels) - 1)
        if height != width or height % multiple:
            raise MedsynthError(f"diffae: slices {height} x {width} must be square and divisible by {multiple} (model.channels levels); "
                                "prepare with --size")
        model = config.model
        labels = {str(k): v for k, v in (info.get("labels") or {}).items()}
        return config.model_copy(update={"model": model.model_copy(update={"image_size": height, "labels": labels})})

    def build_module(self, config: DiffAEConfig) -> DDIMModule:
        return DDIMModule(config) if self.variant(config) == DDIM else DiffAEModule(config)

    # -- sampling

    def sample(self, module: DDIMModule, request: SampleRequest, out: Path) -> list[Path]:
        """random: ``n`` new slices; interpolate: ``n`` strips between pairs of held-out slices; autoencode: ``n``
        held-out slices beside their encode -> invert -> decode. PNGs in [0, 1], a grid or strip figure each."""
        from medsynth.report.html import image_grid, save_figure

        if request.mode not in self.sample_modes:
            raise MedsynthError(f"diffae: unknown mode '{request.mode}' (use: {', '.join(self.sample_modes)})")
        settings, folder = module.config.sample, out / request.mode
        steps = settings.steps_for(module.schedule)
        rows: list[tuple[str, Tensor]] = []  # (name, images (K, 1, H, W) in [0, 1])
        if request.mode == "random":
            rows = [("random", to_unit(module.random(item_seeds(request.seed, request.n), settings)))]
        else:
            real = held_out(module.config.data_dir)
            if len(real) < 2:
                raise MedsynthError(f"diffae {request.mode}: needs at least 2 held-out slices in {module.config.data_dir}")
            order = torch.randperm(len(real), generator=torch.Generator().manual_seed(request.seed))
            if request.mode == "autoencode":
                picked = order[: request.n].tolist()
                x = to_model(stack_items([real[i] for i in picked], "image"))
                rows = [(f"{real[i]['id']}", torch.stack([to_unit(a), to_unit(b)]))
                        for i, a, b in zip(picked, x, module.autoencode(x, steps).cpu())]
            else:
                for k in range(request.n):
                    a, b = real[int(order[(2 * k) % len(real)])], real[int(order[(2 * k + 1) % len(real)])]
                    rows.append((f"{a['id']}__{b['id']}", to_unit(self.interpolate(module, a["image"], b["image"], settings.interpolation_frames, steps))))
        require_finite([images for _, images in rows], f"diffae {request.mode}")
        written = []
        for name, images in rows:
            written += [save_image(image, folder / name / f"{k:03d}.png") for k, image in enumerate(images)]
            save_figure(image_grid(list(images), ncols=len(images) if request.mode != "random" else min(8, len(images))), folder / f"{name}.png")
        return written

    @staticmethod
    @torch.no_grad()
    def interpolate(module: DDIMModule, a: Tensor, b: Tensor, frames: int, steps: int) -> Tensor:
        """Two real slices (1, H, W) in [0, 1] -> ``frames`` decoded slices (frames, 1, H, W) in [-1, 1] from slerp of
        their x_T and lerp of their z_sem (both ends included)."""
        module.eval()
        x = to_model(torch.stack([a, b])).to(module.device)
        z = module.encode_semantic(x)
        x_T = module.invert(x, z, steps)
        weights = torch.linspace(0, 1, frames).tolist()
        noise = torch.cat([slerp(x_T[:1], x_T[1:], w) for w in weights])
        codes = None if z is None else torch.stack([torch.lerp(z[0], z[1], w) for w in weights])
        return module.decode(codes, noise, steps).clamp(-1, 1).cpu()

    # -- evaluation

    def evaluate(self, run: Run, module: DDIMModule, data_dir: Path) -> dict[str, Any]:
        """Autoencoding PSNR/SSIM/MSE of held-out slices at ``evaluate.steps``; random samples against held-out
        slices: feature MMD (a network trained here to count the structures in a slice), MS-SSIM diversity and the
        memorisation audit, each with its real reference."""
        from monai.metrics import PSNRMetric

        from medsynth.evaluate.classifier import classify, train_classifier
        from medsynth.evaluate.metrics import feature_mmd, memorisation_audit, ms_ssim_diversity, real_reference, ssim

        settings, module = module.config.evaluate, module.eval()
        train, test = load_split(data_dir, "train"), held_out(data_dir)
        if not train or len(test) < 2:
            raise MedsynthError(f"{data_dir}: evaluation needs training and at least 2 held-out (test or val) slices")
        train_x, test_x = stack_items(train, "image").float(), stack_items(test, "image").float()
        pick = torch.randperm(len(test), generator=torch.Generator().manual_seed(settings.seed))[: settings.n_autoencode]
        real = test_x[pick]
        recon = to_unit(module.autoencode(to_model(real), settings.steps).cpu())

        metrics: dict[str, Any] = {
            "autoencode_psnr": float(PSNRMetric(max_val=1.0)(recon, real).mean()), "autoencode_ssim": float(ssim(recon, real, 7 if module.image_size >= 32 else 3).mean()),
            "autoencode_mse": float(((recon - real) ** 2).mean()), "autoencode_steps": settings.steps, "n_autoencode": len(real),
        }
        generated = to_unit(module.random(item_seeds(settings.seed, settings.n_generated), module.config.sample).cpu())
        metrics.update({"ms_ssim_generated": ms_ssim_diversity(generated, seed=settings.seed),
                        "ms_ssim_generated_real_reference": ms_ssim_diversity(test_x, seed=settings.seed),
                        **memorisation_audit(generated, train_x, held_out=test_x)})
        mmd, mmd_reference = None, None
        if "label" in train[0]:
            classes = structure_classes(stack_items(train, "label"))
            network = train_classifier(train_x, classes, int(classes.max()) + 1, epochs=settings.classifier_epochs, seed=settings.seed)
            real_features, fake_features = classify(network, test_x).features, classify(network, generated).features
            mmd = feature_mmd(real_features, fake_features, seed=settings.seed)
            mmd_reference = real_reference(feature_mmd, real_features, seed=settings.seed, size=len(fake_features))
        # random_mmd*: the same figures under issue 20's names (random slices against real ones)
        metrics.update({"mmd_classifier_features": mmd, "mmd_classifier_features_real_reference": mmd_reference,
                        "random_mmd": mmd, "random_mmd_real_reference": mmd_reference,
                        "n_generated": len(generated), "n_test_real": len(test_x), "semantic": self.variant(module.config) != DDIM,
                        "sampler": module.config.sample.describe(module.schedule)})
        folder = run.samples / "evaluate"
        for name, images in (("autoencode", torch.cat([real, recon], dim=3)), ("generated", generated[:16])):
            for k, image in enumerate(images):
                save_image(image, folder / name / f"{k:03d}.png")
        return metrics

    def evaluate_reconstruction(self, run: Run, module: DDIMModule, data: Path) -> dict[str, Any]:
        """``evaluate --reconstruction DATA``: every method on the held-out subjects of DATA (the run's test split by
        subject, from its prepared dataset) against their thin-slice truth (:func:`~medsynth.inverse.evaluation.
        reconstruction_metrics`); the DDIM prior from ``evaluate.ddim_run``. Volumes and histories go to
        ``samples/reconstruction`` for the report."""
        from medsynth.inverse.evaluation import reconstruction_metrics
        from medsynth.training import load_module

        settings = module.config.evaluate
        ddim = None
        if settings.ddim_run:
            ddim = load_module(Run.open(settings.ddim_run), self).eval()
            if self.variant(ddim.config) != DDIM:
                raise MedsynthError(f"{settings.ddim_run}: evaluate.ddim_run must be a DDIM-baseline run (model.semantic=false)")
        from medsynth.data.manifest import Manifest

        splits = {case.subject: case.split for case in Manifest.load(module.config.data_dir).cases}
        held = sorted(s for s, split in splits.items() if split == held_out_split(module.config.data_dir))[: settings.reconstruction_subjects] or None
        train = sorted(s for s, split in splits.items() if split == "train") or None
        diffae, ddim = module.slice_priors(ddim)
        return reconstruction_metrics(diffae, data, ddim, settings.reconstruction_methods, settings.reconstruct, held_out=held, train=train,
                                      segmenter_epochs=settings.segmenter_epochs, seed=settings.seed, out=run.samples / "reconstruction")

    # -- report

    def report_sections(self, run: Run, module: DDIMModule) -> list[ReportSection]:
        from medsynth.data.io import load_image
        from medsynth.report.html import figure_html, image_grid

        folder = run.samples / "evaluate"
        if not folder.is_dir():
            return [ReportSection("Slices", "<p>Run <code>medsynth evaluate</code> first: it writes the slices shown here.</p>")]
        sections = []
        for name, title in (("autoencode", "Held-out slices (left) and their encode -> invert -> decode (right)"),
                            ("generated", f"Random slices ({module.random_kind})")):
            images = [load_image(path).as_tensor() for path in sorted((folder / name).glob("*.png"))[:16]]
            if images:
                sections.append(ReportSection(title, figure_html(image_grid(images, ncols=8), name)))
        from medsynth.inverse.evaluation import reconstruction_figures

        return sections + [ReportSection(title, figure_html(fig, title)) for title, fig in reconstruction_figures(run.samples / "reconstruction")]

    # -- medsynth plan (Recipe.plan_examples)

    def input_size(self, config: DiffAEConfig) -> list[int] | None:
        """The slices' size (``model.image_size`` pixels, square: H W), or None."""
        return [config.model.image_size] * 2 if config.model.image_size else None

    def plan_examples(self, config: DiffAEConfig, size: list[int]) -> list[Example]:
        """The autoencoder stage on square slices of ``size`` (H W pixels); a sampling call denoises one batch (with a
        semantic code, but in the DDIM baseline)."""
        if len(size) != 2 or size[0] != size[1]:
            raise MedsynthError(f"diffae: --size {size}: slices are square (one size, or two equal ones)")
        config = with_settings(config, "model", image_size=size[0])
        settings = config.sample
        items = settings.batch_size
        coded = self.variant(config) is not DDIM  # the DDIM baseline's UNet takes no z_sem

        def batch(b: int) -> dict[str, Any]:
            return {"image": torch.rand(b, 1, *size)}

        def sample(module: DDIMModule) -> Tensor:
            z_sem = torch.zeros(items, config.model.semantic_dim) if coded else None
            return module.denoiser(settings)(torch.rand(items, 1, *size), torch.zeros(items, dtype=torch.long), z_sem)

        # the latent DDIM (an MLP on z_sem) trains after the autoencoder stage: its step is negligible beside it
        return [Example("autoencoder", config, batch, sample, items, settings.steps_for(config.model.make_schedule()))]
