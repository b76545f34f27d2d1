"""Recipe ``class-diffusion``: a class-conditional diffusion model of 2D/3D images, beside ``cvae`` on the same data.

The issue-19 alternative to the cilia CVAE, whose ELBO samples are blurred: the same prepared class-per-folder
images (``prepare --recipe cvae``), the same sample layout and the same evaluation
(:mod:`medsynth.evaluate.class_generator`), with a diffusion model as the generator.

- **Denoiser**: MONAI's ``DiffusionModelUNet`` (:mod:`medsynth.diffusion`), the class through its class embedding
  (``num_class_embeds`` = classes + 1: the last index is the null class of classifier-free guidance, given to
  ``model.cond_drop_prob`` of the training images).
- **Space-to-depth** (``model.fold``): the image (C, H, W) in [-1, 1] is diffused folded into (C f^2, H/f, W/f)
  (MONAI ``pixelunshuffle``; f^3 in 3D), a lossless reshape that makes every UNet level f^2 times cheaper on a
  CPU (the patchify step of DiT and U-ViT, with patches of f x f pixels).
- **Sampling**: DPM-Solver++(2M) (or DDIM) in ``sample.steps`` steps with guidance ``sample.guidance``
  (eps(x|y) + s (eps(x|y) - eps(x|none))); every image has its own seed (``seed``, class, item), so an image does
  not depend on the batch it is drawn in.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from monai.networks.utils import pixelshuffle, pixelunshuffle
from pydantic import Field
from torch import Tensor

from medsynth.config import RecipeConfig
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
from medsynth.diffusion.config import DenoiserConfig
from medsynth.diffusion.denoiser import ConditionedDenoiser
from medsynth.diffusion.module import DiffusionModule
from medsynth.diffusion.sampling import SamplerConfig
from medsynth.errors import MedsynthError
from medsynth.evaluate.class_generator import ClassGeneratorEvaluateConfig, evaluate_class_generator, real_vs_generated_section
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
from medsynth.report.html import image_grid, save_figure
from medsynth.report.sections import ReportSection
from medsynth.runs import Run
from medsynth.seeds import class_seed, item_seeds


class ClassDiffusionModelConfig(DenoiserConfig):
    """The UNet, schedule and guidance training (:class:`DenoiserConfig`), and the fold. ``spatial_dims``, ``in_shape``,
    ``classes`` and ``reference_affine`` are filled from the data."""

    channels: list[int] = [32, 64, 64]
    attention_levels: list[bool] = [False, False, True]
    num_head_channels: int = Field(16, ge=1)
    schedule: Literal["linear", "scaled_linear", "sigmoid", "cosine", "rflow"] = "cosine"
    prediction: Literal["epsilon", "sample", "v_prediction"] = "v_prediction"
    fold: int = Field(2, ge=1, description="space-to-depth factor: diffuse the image as (C f^d, H/f, ..) channels (1: as is)")
    spatial_dims: Literal[2, 3] | None = None
    in_shape: list[int] | None = None
    classes: list[str] = []
    reference_affine: list[list[float]] | None = Field(None, description="affine given to generated 3D volumes")

    def divisor(self) -> int:
        """What every image side must be divisible by: the fold times the UNet's downsampling."""
        return self.fold * 2 ** (len(self.channels) - 1)


class ClassDiffusionSampleConfig(SamplerConfig):
    steps: int | None = Field(20, ge=1, description="sampler steps (dpmpp: 20; ddim: 25-50)")
    batch_size: int = Field(64, ge=1, description="images per sampler call")
    clip_x0: float | None = Field(1.0, gt=0, description="clamp every step's x_0 estimate to the images' [-1, 1]")


class ClassDiffusionConfig(RecipeConfig):
    recipe: Literal["class-diffusion"] = "class-diffusion"
    model: ClassDiffusionModelConfig = ClassDiffusionModelConfig()
    data: ClassImageDataConfig = ClassImageDataConfig()
    sample: ClassDiffusionSampleConfig = ClassDiffusionSampleConfig()
    evaluate: ClassGeneratorEvaluateConfig = ClassGeneratorEvaluateConfig()


class ClassDiffusionModule(DiffusionModule):
    """Denoising training on folded images in [-1, 1] with class labels (null class dropped in), and class-guided sampling."""

    config: ClassDiffusionConfig

    def __init__(self, config: ClassDiffusionConfig):
        model = config.model
        if model.spatial_dims is None or model.in_shape is None or not model.classes:
            raise MedsynthError("class-diffusion: model.spatial_dims, model.in_shape and model.classes are unset (train with --data)")
        channels = model.in_shape[0] * model.fold ** model.spatial_dims
        null_class = len(model.classes)  # the class embedding's last row
        unet = model.build_unet(model.spatial_dims, channels, channels, num_class_embeds=null_class + 1)
        super().__init__(config, ConditionedDenoiser(unet, tensor_as="class_labels"), model.make_schedule(),
                         cond_drop_prob=model.cond_drop_prob, null_cond=torch.tensor(null_class))

    def to_model(self, images: Tensor) -> Tensor:
        """Images ``(B, C, *S)`` in [0, 1] -> the diffused tensor ``(B, C f^d, *S / f)`` in [-1, 1]."""
        model = self.config.model
        return pixelunshuffle(images.float() * 2 - 1, model.spatial_dims, model.fold)

    def to_images(self, x: Tensor) -> Tensor:
        """The inverse of :meth:`to_model`, clamped to [0, 1]."""
        model = self.config.model
        return ((pixelshuffle(x.float(), model.spatial_dims, model.fold) + 1) / 2).clamp(0, 1)

    def training_pair(self, batch: dict[str, Any], generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """(folded x_0 in [-1, 1], class indices (B,))."""
        return self.to_model(batch["image"]), batch["class"].long()

    @torch.no_grad()
    def sample_images(self, classes: Tensor, seeds: list[int]) -> Tensor:
        """One image per class index of ``classes`` ``(N,)`` and seed: ``(N, C, *S)`` in [0, 1] (``config.sample``'s sampler)."""
        model = self.config.model
        shape = [model.in_shape[0] * model.fold ** model.spatial_dims, *(s // model.fold for s in model.in_shape[1:])]
        x = self.generate(shape, classes.long().to(self.device), self.config.sample, seeds)
        return self.to_images(x).cpu()


class ClassDiffusionRecipe(Recipe):
    name = "class-diffusion"
    data_format = DataFormat("electron microscopy (cilia cross-sections), or any class-labelled 2D/3D image", None, "class label",
                             "images per class: PNG (2D) or NIfTI (3D), in the prepared [0, 1]", model_range=(-1.0, 1.0), window=None)
    config_class = ClassDiffusionConfig
    sample_modes = ("random",)
    headline_metrics = ("classifier_accuracy_real", "classifier_accuracy_generated", "tstr_accuracy", "downstream_accuracy_with_generated",
                        "spectrum_ratio_high", "memorisation_max_ssim")
    condition_refusal = "class-diffusion is conditioned on classes: use --class NAME"
    tiny_example = TinyExample(
        phantom="cilia", n=6, size=32, prepare={"size": 32, "normalize": "none", "seed": 0}, config="class-diffusion-tiny",
        overrides=("model.channels=[8, 8]", "model.attention_levels=[false, true]", "model.norm_num_groups=4", "model.num_head_channels=4",
                   "train.batch_size=8", "train.num_threads=1", "sample.steps=3", "evaluate.n_per_class=4", "evaluate.classifier_epochs=1"))

    def resolve_config(self, config: ClassDiffusionConfig) -> ClassDiffusionConfig:
        model = config.model.model_copy(update=class_image_info(config.data_dir, "class-diffusion"))
        if any(size % model.divisor() for size in model.in_shape[1:]):
            raise MedsynthError(f"class-diffusion: image shape {model.in_shape[1:]} must be divisible by {model.divisor()} "
                                "(model.fold x 2 per UNet level after the first)")
        return config.model_copy(update={"model": model})

    def build_module(self, config: ClassDiffusionConfig) -> ClassDiffusionModule:
        return ClassDiffusionModule(config)

    def build_datamodule(self, config: ClassDiffusionConfig) -> L.LightningDataModule:
        return class_image_datamodule(config.data_dir, config.train, config.data.augment, config.model.spatial_dims)

    # -- generation ---------------------------------------------------------------------------

    def generate(self, module: ClassDiffusionModule, class_index: int, n: int, seed: int) -> Tensor:
        """``n`` images of one class ``(n, C, *S)`` in [0, 1]; item i's seed depends on (seed, class, i) only."""
        seeds = item_seeds(class_seed(seed, class_index), n)
        return module.sample_images(torch.full((n,), class_index, dtype=torch.long), seeds)

    def generate_for(self, module: ClassDiffusionModule, classes: Tensor, seed: int) -> Tensor:
        """One image for each class index of ``classes`` ``(N,)``: ``(N, C, *S)`` in [0, 1], in that order."""
        images = torch.empty((len(classes), *module.config.model.in_shape))
        for k in torch.unique(classes).tolist():
            where = (classes == k).nonzero().flatten()
            images[where] = self.generate(module, k, len(where), seed)
        return images

    def sample(self, module: ClassDiffusionModule, request: SampleRequest, out: Path) -> list[Path]:
        if request.mode not in self.sample_modes:
            raise MedsynthError(f"unknown sampling mode '{request.mode}' (use: {', '.join(self.sample_modes)})")
        model = module.config.model
        suffix = ".png" if model.spatial_dims == 2 else ".nii.gz"
        affine = model_affine(model)
        batches = [(k, self.generate(module, k, request.n, request.seed)) for k in class_indices(model.classes, request.class_name)]
        require_finite([images for _, images in batches], f"class-diffusion {request.mode}")
        written: list[Path] = []
        for class_index, images in batches:
            name = model.classes[class_index]
            folder = out / request.mode / name
            for k, image in enumerate(images):
                written.append(save_image(image, folder / f"{name}_{k:03d}{suffix}", affine=affine))
            if model.spatial_dims == 2:
                save_figure(image_grid(list(images), ncols=min(8, len(images))), out / request.mode / f"{name}.png")
        return written

    # -- evaluation -----------------------------------------------------------------------------

    def evaluate(self, run: Run, module: ClassDiffusionModule, data_dir: Path) -> dict[str, Any]:
        """The class-conditional generator protocol (:func:`medsynth.evaluate.class_generator.evaluate_class_generator`),
        the same as ``cvae``'s."""
        return evaluate_class_generator(lambda classes, seed: self.generate_for(module, classes, seed), data_dir,
                                        module.config.model.classes, module.config.evaluate)

    def report_sections(self, run: Run, module: ClassDiffusionModule) -> list[ReportSection]:
        classes = module.config.model.classes
        real = [real_images(module.config.data_dir, held_out_split(module.config.data_dir), k) for k in range(len(classes))]
        fake = [self.generate(module, k, 6, seed=0) for k in range(len(classes))]
        sampler = module.config.sample.describe(module.schedule)
        section = real_vs_generated_section(real, fake, classes)
        return [ReportSection(f"{section.title} ({sampler})", section.html)]

    # -- medsynth plan (Recipe.plan_examples)

    def input_size(self, config: ClassDiffusionConfig) -> list[int] | None:
        return class_image_size(config.model)

    def plan_examples(self, config: ClassDiffusionConfig, size: list[int]) -> list[Example]:
        """One stage on images of ``size`` (H W or D H W); a sampling call denoises one batch of folded images."""
        config = with_settings(config, "model", **class_image_fields(config.model, size))
        channels = config.model.in_shape[0]
        fold, settings = config.model.fold, config.sample
        items = settings.batch_size
        folded = [channels * fold ** len(size), *(s // fold for s in size)]  # what the UNet sees (space-to-depth)

        def batch(b: int) -> dict[str, Any]:
            return {"image": torch.rand(b, channels, *size), "class": torch.zeros(b, dtype=torch.long)}

        def sample(module: ClassDiffusionModule) -> torch.Tensor:
            return module.denoiser(settings)(torch.rand(items, *folded), torch.zeros(items, dtype=torch.long),
                                             torch.zeros(items, dtype=torch.long))

        return [Example("diffusion", config, batch, sample, items, settings.steps_for(config.model.make_schedule()))]
