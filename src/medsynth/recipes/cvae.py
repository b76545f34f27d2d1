"""Recipe ``cvae``: class-conditional VAE for 2D/3D images (cilia cross-sections, 5 defect classes).

Generation draws z from the prior N(0, I) and decodes it with the requested class; it never
resamples around stored posteriors of training images (the original's near-copies).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import PatchAdversarialLoss, SSIMLoss
from monai.networks.nets import PatchDiscriminator
from pydantic import Field
from torch.func import functional_call

from medsynth.config import RecipeConfig, StrictModel
from medsynth.console import note
from medsynth.data.class_images import (
    ClassImageDataConfig,
    class_image_datamodule,
    class_image_fields,
    class_image_info,
    class_image_size,
    class_indices,
    real_images,
)
from medsynth.data.datasets import held_out_split
from medsynth.data.io import save_image
from medsynth.errors import MedsynthError
from medsynth.evaluate.class_generator import ClassGeneratorEvaluateConfig, evaluate_class_generator, real_vs_generated_section
from medsynth.latent_space import KLTerm, LatentMode, grid_latents, interpolate_latents, plane_latents, random_latents
from medsynth.nets.cvae import ConditionalVAE
from medsynth.recipes.base import (
    DataFormat,
    Example,
    Recipe,
    SampleRequest,
    TinyExample,
    model_affine,
    require_finite,
    with_settings,
)
from medsynth.report.html import figure_html, image_grid, save_figure
from medsynth.report.sections import ReportSection
from medsynth.runs import Run
from medsynth.seeds import class_seed
from medsynth.training import MedsynthModule


class CVAEModelConfig(StrictModel):
    """Network and loss. ``spatial_dims``, ``in_shape``, ``classes`` are filled from the data."""

    spatial_dims: Literal[2, 3] | None = None
    in_shape: list[int] | None = None
    classes: list[str] = []
    reference_affine: list[list[float]] | None = Field(None, description="affine given to generated 3D volumes")
    latent_size: int = Field(32, ge=2)
    channels: list[int] = [32, 64, 128, 256]
    strides: list[int] = [2, 2, 2, 2]
    embed_dim: int = Field(16, ge=1)
    num_res_units: int = Field(1, ge=0)
    recon_loss: Literal["mse", "l1", "bce"] = "bce"
    ssim_weight: float = Field(0.0, ge=0)
    kl_weight: float = Field(1.0, ge=0)
    kl_warmup_epochs: float = Field(5.0, ge=0)
    adversarial_weight: float = Field(0.0, ge=0, description="a patch-GAN term against blur (MONAI PatchDiscriminator, least "
                                      "squares, on reconstructions and prior samples), as MONAI trains its autoencoders; 0: the original ELBO")
    adversarial_start_epoch: int = Field(10, ge=0, description="epochs of plain ELBO before the adversarial term starts")
    discriminator_channels: int = Field(32, ge=4, description="the discriminator's first-layer channels (3 layers)")


CVAEDataConfig = ClassImageDataConfig
CVAEEvaluateConfig = ClassGeneratorEvaluateConfig


class CVAEConfig(RecipeConfig):
    recipe: Literal["cvae"] = "cvae"
    model: CVAEModelConfig = CVAEModelConfig()
    data: CVAEDataConfig = CVAEDataConfig()
    evaluate: CVAEEvaluateConfig = CVAEEvaluateConfig()


class CVAEModule(MedsynthModule):
    """ELBO training: reconstruction (+ optional SSIM) + beta * KL with a linear warm-up of beta."""

    config: CVAEConfig

    def __init__(self, config: CVAEConfig):
        super().__init__(config)
        model = config.model
        if model.spatial_dims is None or model.in_shape is None or not model.classes:
            raise MedsynthError("cvae: model.spatial_dims, model.in_shape and model.classes are unset (train with --data)")
        self.net = ConditionalVAE(
            spatial_dims=model.spatial_dims, in_shape=model.in_shape, num_classes=len(model.classes),
            latent_size=model.latent_size, channels=model.channels, strides=model.strides,
            embed_dim=model.embed_dim, num_res_units=model.num_res_units,
            output_activation="none" if model.recon_loss == "bce" else "sigmoid",
        )
        self.kl = KLTerm(model.kl_weight, model.kl_warmup_epochs)
        # MONAI's SSIMLoss names its window `win_size`; 7 px suits the 64-448 px sizes shipped.
        self.ssim = SSIMLoss(spatial_dims=model.spatial_dims, win_size=7) if model.ssim_weight > 0 else None
        self.discriminator = (PatchDiscriminator(spatial_dims=model.spatial_dims, num_layers_d=3, channels=model.discriminator_channels,
                                                 in_channels=model.in_shape[0], out_channels=1)
                              if model.adversarial_weight > 0 else None)
        self.adversarial = PatchAdversarialLoss(criterion="least_squares")

    def decode(self, z: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] from latents ``(B, D)`` and classes ``(B,)``."""
        out = self.net.decode_latent(z, c)
        return torch.sigmoid(out) if self.config.model.recon_loss == "bce" else out

    def encode(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Posterior means ``(B, D)``."""
        return self.net.encode_posterior(x, c)[0]

    def _losses(self, batch: dict[str, Any], beta: float) -> dict[str, torch.Tensor]:
        x, c = batch["image"], batch["class"]
        out, mu, logvar, _ = self.net(x, c)
        per_image = x[0].numel()
        kind = self.config.model.recon_loss
        if kind == "bce":
            recon = F.binary_cross_entropy_with_logits(out, x, reduction="mean") * per_image
            image = torch.sigmoid(out)
        else:
            recon = (F.mse_loss if kind == "mse" else F.l1_loss)(out, x, reduction="mean") * per_image
            image = out
        kl = self.kl(mu, logvar)
        loss = recon + beta * kl
        if self.ssim is not None:
            loss = loss + self.config.model.ssim_weight * self.ssim(image.float(), x.float()) * per_image
        losses = {"loss": loss, "recon": recon, "kl": kl}
        if self.discriminator is not None and self.training and self.current_epoch >= self.config.model.adversarial_start_epoch:
            losses = self._adversarial(losses, x, c, image, per_image)
        return losses

    def _adversarial(self, losses: dict[str, torch.Tensor], x: torch.Tensor, c: torch.Tensor, image: torch.Tensor,
                     per_image: int) -> dict[str, torch.Tensor]:
        """Add the generator's and the discriminator's least-squares patch-GAN losses to ``losses``.

        One loss for one optimiser (so Lightning's clipping, checkpoints and resume stay as they are): the
        generator's term sees the discriminator through detached weights, so its gradient reaches the
        decoder only; the discriminator's term sees detached fakes, so its gradient reaches the
        discriminator only. Fakes are the reconstructions and as many decodes of prior samples.
        """
        prior = self.decode(torch.randn((len(c), self.config.model.latent_size), device=x.device, dtype=x.dtype), c)
        fakes = torch.cat([image, prior])
        frozen = {name: p.detach() for name, p in self.discriminator.named_parameters()}
        generator = self.adversarial(functional_call(self.discriminator, frozen, (fakes,))[-1], target_is_real=True, for_discriminator=False)
        discriminator = 0.5 * (self.adversarial(self.discriminator(fakes.detach())[-1], target_is_real=False, for_discriminator=True)
                               + self.adversarial(self.discriminator(x)[-1], target_is_real=True, for_discriminator=True))
        weight = self.config.model.adversarial_weight * per_image  # on the scale of the summed reconstruction error
        return {**losses, "loss": losses["loss"] + weight * generator + per_image * discriminator, "adv_g": generator, "adv_d": discriminator}

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        beta = self.kl.beta(self)
        losses = self._losses(batch, beta)
        self.log_losses("train", losses | {"beta": torch.tensor(beta)}, len(batch["image"]))
        return losses["loss"]

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.log_losses("val", self._losses(batch, self.kl.weight), len(batch["image"]))


def grid_steps(n: int) -> int:
    """Grid mode's points per axis for ``--n n``: ``round(sqrt(n))``, at least 2 (``steps**2`` images per class)."""
    return max(2, round(n ** 0.5))


class CVAERecipe(Recipe):
    name = "cvae"
    data_format = DataFormat("electron microscopy (cilia cross-sections), or any class-labelled 2D/3D image", None, "class label",
                             "images per class: PNG (2D) or NIfTI (3D), in the prepared [0, 1]", window=None)
    config_class = CVAEConfig
    sample_modes = tuple(mode.value for mode in LatentMode)  # random, grid, plane, interpolate
    headline_metrics = ("classifier_accuracy_real", "classifier_accuracy_generated", "tstr_accuracy", "downstream_accuracy_with_generated",
                        "spectrum_ratio_high", "memorisation_max_ssim")
    condition_refusal = "cvae is conditioned on classes: use --class NAME"
    plan_config = "cvae-224"
    tiny_example = TinyExample(
        phantom="cilia", n=6, size=32, prepare={"size": 32, "normalize": "none", "seed": 0}, config="cvae-tiny",
        overrides=("model.channels=[8, 16]", "model.strides=[2, 2]", "model.latent_size=4", "model.embed_dim=4", "train.batch_size=8",
                   "train.num_threads=1", "evaluate.n_per_class=4", "evaluate.classifier_epochs=1"))

    def resolve_config(self, config: CVAEConfig) -> CVAEConfig:
        model = config.model.model_copy(update=class_image_info(config.data_dir, "cvae"))
        factor = int(np.prod(model.strides))
        if any(size % factor for size in model.in_shape[1:]):
            raise MedsynthError(f"cvae: image shape {model.in_shape[1:]} must be divisible by {factor} (the product of model.strides)")
        return config.model_copy(update={"model": model})

    def build_module(self, config: CVAEConfig) -> CVAEModule:
        return CVAEModule(config)

    def build_datamodule(self, config: CVAEConfig) -> L.LightningDataModule:
        return class_image_datamodule(config.data_dir, config.train, config.data.augment, config.model.spatial_dims)

    # -- generation ---------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, module: CVAEModule, class_index: int, z: torch.Tensor) -> torch.Tensor:
        """Decode latents ``(N, D)`` of one class: images ``(N, C, *spatial)`` in [0, 1]."""
        module.eval()
        c = torch.full((len(z),), class_index, dtype=torch.long)
        return torch.cat([module.decode(chunk, c[: len(chunk)]) for chunk in z.split(64)]).clamp(0, 1)

    def latents(self, module: CVAEModule, request: SampleRequest, class_index: int) -> torch.Tensor:
        dim = module.config.model.latent_size
        generator = torch.Generator().manual_seed(class_seed(request.seed, class_index))
        mode = LatentMode(request.mode)
        if mode is LatentMode.RANDOM:
            return random_latents(request.n, dim, generator)
        if mode is LatentMode.GRID:
            return grid_latents(dim, steps=grid_steps(request.n))
        if mode is LatentMode.PLANE:
            return plane_latents(request.n, dim, generator)
        data_dir = module.config.data_dir
        real = real_images(data_dir, "test", class_index) + real_images(data_dir, "train", class_index)
        if len(real) < 2:
            raise MedsynthError(f"interpolate: need two real images of class '{module.config.model.classes[class_index]}' in {module.config.data_dir}")
        order = torch.randperm(len(real), generator=generator)[:2]
        pair = torch.stack([real[i] for i in order])
        with torch.no_grad():
            z = module.encode(pair, torch.full((2,), class_index, dtype=torch.long))
        return interpolate_latents(z[0], z[1], steps=max(2, request.n))

    def sample(self, module: CVAEModule, request: SampleRequest, out: Path) -> list[Path]:
        try:
            LatentMode(request.mode)
        except ValueError:
            raise MedsynthError(f"unknown sampling mode '{request.mode}' (use: {', '.join(m.value for m in LatentMode)})") from None
        written: list[Path] = []
        model = module.config.model
        suffix = ".png" if model.spatial_dims == 2 else ".nii.gz"
        affine = model_affine(model)
        indices = class_indices(model.classes, request.class_name)
        if request.mode == LatentMode.GRID.value:
            steps = grid_steps(request.n)
            note(f"grid: {steps} x {steps} = {steps * steps} images per class, {steps * steps * len(indices)} in all "
                 f"(--n {request.n} is rounded to a square grid over latent axes 0 and 1, at least 2 x 2)")
        batches = [(k, self.generate(module, k, self.latents(module, request, k))) for k in indices]
        require_finite([images for _, images in batches], f"cvae {request.mode}")
        for class_index, images in batches:
            name = model.classes[class_index]
            folder = out / request.mode / name
            for k, image in enumerate(images):
                written.append(save_image(image, folder / f"{name}_{k:03d}{suffix}", affine=affine))
            ncols = round(len(images) ** 0.5) if request.mode == "grid" else min(8, len(images))
            save_figure(image_grid(list(images), ncols=ncols), out / request.mode / f"{name}.png")
        return written

    # -- evaluation -----------------------------------------------------------------------------

    def evaluate(self, run: Run, module: CVAEModule, data_dir: Path) -> dict[str, Any]:
        """The class-conditional generator protocol (:func:`medsynth.evaluate.class_generator.evaluate_class_generator`),
        on images decoded from the prior."""
        return evaluate_class_generator(lambda classes, seed: self.generate_for(module, classes, seed), data_dir,
                                        module.config.model.classes, module.config.evaluate)

    def generate_for(self, module: CVAEModule, classes: torch.Tensor, seed: int) -> torch.Tensor:
        """One image from the prior for each class index of ``classes`` ``(N,)``: ``(N, C, *spatial)`` in [0, 1], in that order."""
        images = torch.empty((len(classes), *module.config.model.in_shape))
        for k in torch.unique(classes).tolist():
            where = (classes == k).nonzero().flatten()
            images[where] = self.generate(module, k, self.latents(module, SampleRequest(n=len(where), seed=seed), k))
        return images

    def report_sections(self, run: Run, module: CVAEModule) -> list[ReportSection]:
        classes = module.config.model.classes
        real = [real_images(module.config.data_dir, held_out_split(module.config.data_dir), k) for k in range(len(classes))]
        fake = [self.generate(module, k, self.latents(module, SampleRequest(n=6, seed=0), k)) for k in range(len(classes))]
        sections = [real_vs_generated_section(real, fake, classes)]
        grid_request = SampleRequest(n=49, mode="grid")
        traversal = self.generate(module, 0, self.latents(module, grid_request, 0))
        sections.append(ReportSection(f"Latent traversal: class '{classes[0]}', axes 0 and 1 in [-2.5, 2.5]",
                                      figure_html(image_grid(list(traversal), ncols=7, cell=0.9), "latent traversal")))
        try:
            path = self.generate(module, 0, self.latents(module, SampleRequest(n=8, mode="interpolate"), 0))
            sections.append(ReportSection(f"Interpolation between two real '{classes[0]}' images (spherical, in latent space)",
                                          figure_html(image_grid(list(path), ncols=8), "interpolation")))
        except MedsynthError:
            pass  # no real images of that class are at hand: the report goes without interpolation
        return sections

    # -- medsynth plan (Recipe.plan_examples)

    def input_size(self, config: CVAEConfig) -> list[int] | None:
        return class_image_size(config.model)

    def plan_examples(self, config: CVAEConfig, size: list[int]) -> list[Example]:
        """One stage on images of ``size`` (H W or D H W); a sampling call decodes one chunk of 64 codes."""
        # kl_warmup_epochs reads the Trainer's batches per epoch; 0 (the full weight) leaves the step's compute unchanged
        config = with_settings(config, "model", **class_image_fields(config.model, size), kl_warmup_epochs=0)
        channels = config.model.in_shape[0]
        items = 64  # CVAERecipe.generate decodes in chunks of 64

        def batch(b: int) -> dict[str, Any]:
            return {"image": torch.rand(b, channels, *size), "class": torch.zeros(b, dtype=torch.long)}

        def sample(module: CVAEModule) -> torch.Tensor:
            return module.decode(torch.zeros(items, config.model.latent_size), torch.zeros(items, dtype=torch.long))

        return [Example("cvae", config, batch, sample, items, 1)]
