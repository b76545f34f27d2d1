"""A sixth recipe, written as a test fixture: the smallest staged recipe (``staged-fixture``), one file.

It is what a new staged recipe needs and nothing more: a config, a module, two declared stages and the recipe
class; its entry ``ENTRY`` goes into ``medsynth.recipes.RECIPES`` (tests/recipes/test_staged_recipe.py). Nothing in
``cli.py``, ``api.py`` or ``demo.py`` names it.

- **autoencoder**: MONAI's ``AutoEncoder`` on 2D images in [0, 1] (prepared cilia cross-sections), mean squared error;
  ``model.autoencoder_epochs`` epochs when the prior follows in the same run.
- **prior**: a diagonal Gaussian (a mean and a log standard deviation per code element) fitted by maximum likelihood to
  the frozen encoder's codes; run alone (``--stage prior``), it loads the autoencoder of ``model.autoencoder_run``.

``sample`` decodes codes drawn from the prior, one seed per image (PNGs); ``evaluate`` scores the reconstruction of
the held-out images and the mean intensity of generated ones.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.trainer.states import TrainerFn
from monai.networks.nets import AutoEncoder
from pydantic import Field
from torch import Tensor, nn

from medsynth.config import RecipeConfig, StrictModel
from medsynth.data.datasets import first_split, require_prepared, stack_items
from medsynth.data.io import save_image
from medsynth.errors import MedsynthError
from medsynth.recipes import RECIPES, LazyRecipe
from medsynth.recipes.base import (
    DataFormat,
    Example,
    Load,
    Recipe,
    SampleRequest,
    Stage,
    StagedModule,
    TinyExample,
    load_stage_weights,
    require_finite,
    stages_trained,
    with_settings,
)
from medsynth.runs import Run
from medsynth.seeds import item_generators, item_noise, item_seeds
from medsynth.training import MedsynthModule

NAME = "staged-fixture"
ENTRY = LazyRecipe(__name__, "StagedFixtureRecipe")  # its entry in RECIPES


def register() -> None:
    """Add the recipe to ``medsynth.recipes.RECIPES`` (a child process's registry: tests monkeypatch the entry in)."""
    RECIPES[NAME] = ENTRY


class FixtureModelConfig(StrictModel):
    stage: Literal["all", "autoencoder", "prior"] = Field("all", description="train both stages in turn, or one")
    autoencoder_epochs: int = Field(2, ge=1, description="stage all: epochs of the autoencoder; the prior trains the rest")
    autoencoder_run: str | None = Field(None, description="stage prior alone: the run whose autoencoder to use")
    channels: list[int] = [4, 8]
    image_size: int | None = None  # filled from the data


class FixtureConfig(RecipeConfig):
    recipe: Literal["staged-fixture"] = "staged-fixture"
    model: FixtureModelConfig = FixtureModelConfig()


class GaussianPrior(nn.Module):
    """A diagonal Gaussian over codes of ``shape``: learnt mean and log standard deviation."""

    def __init__(self, shape: tuple[int, ...]):
        super().__init__()
        self.mean = nn.Parameter(torch.zeros(shape))
        self.log_std = nn.Parameter(torch.zeros(shape))

    def nll(self, z: Tensor) -> Tensor:
        """Mean negative log-likelihood per element of codes ``(B, *shape)``, without the constant."""
        return (0.5 * ((z - self.mean) / self.log_std.exp()) ** 2 + self.log_std).mean()


class LossStage(Stage):
    """A stage whose steps minimise its ``loss`` (logged as train/loss and val/loss)."""

    def loss(self, module: FixtureModule, x: Tensor) -> Tensor:
        raise NotImplementedError

    def training_step(self, module: FixtureModule, batch: dict[str, Any], batch_idx: int) -> Tensor:
        loss = self.loss(module, batch["image"].float())
        module.log("train/loss", loss, on_step=True, on_epoch=True, batch_size=len(batch["image"]))
        return loss

    def validation_step(self, module: FixtureModule, batch: dict[str, Any], batch_idx: int) -> None:
        module.log("val/loss", self.loss(module, batch["image"].float()), on_epoch=True, batch_size=len(batch["image"]))

    def on_train_epoch_start(self, module: FixtureModule) -> None:
        pass


class AutoencoderStage(LossStage):
    def loss(self, module: FixtureModule, x: Tensor) -> Tensor:
        return F.mse_loss(module.autoencoder(x), x)


class PriorStage(LossStage):
    def loss(self, module: FixtureModule, x: Tensor) -> Tensor:
        with torch.no_grad():
            z = module.autoencoder.encode(x)
        return module.prior.nll(z)


STAGES = (
    AutoencoderStage("autoencoder", ("autoencoder",), epochs="model.autoencoder_epochs", averaged=False),
    PriorStage("prior", ("prior",), loads=(Load("model.autoencoder_run", "autoencoder", weights=("autoencoder",)),)),
)


class FixtureModule(StagedModule, MedsynthModule):
    config: FixtureConfig
    declared = STAGES

    def __init__(self, config: FixtureConfig):
        super().__init__(config)
        model = config.model
        if model.image_size is None:
            raise MedsynthError(f"{NAME}: model.image_size is unset (train with --data)")
        strides = (2,) * len(model.channels)
        self.autoencoder = AutoEncoder(spatial_dims=2, in_channels=1, out_channels=1, channels=tuple(model.channels), strides=strides)
        self.code_shape = (model.channels[-1], *[model.image_size // 2 ** len(strides)] * 2)
        self.prior = GaussianPrior(self.code_shape)
        self.plan = stages_trained(STAGES, config)

    def setup(self, stage: str) -> None:  # Lightning's stage
        if TrainerFn(stage) is TrainerFn.FITTING:
            load_stage_weights(self, StagedFixtureRecipe())

    @torch.no_grad()
    def generate(self, seeds: list[int]) -> Tensor:
        """Images ``(len(seeds), 1, H, W)`` in [0, 1] decoded from prior draws, item i's from seed ``seeds[i]``."""
        eps = item_noise(self.code_shape, item_generators(seeds))
        return self.autoencoder.decode(self.prior.mean + self.prior.log_std.exp() * eps).clamp(0, 1)


class StagedFixtureRecipe(Recipe):
    name = NAME
    config_class = FixtureConfig
    data_format = DataFormat("any 2D image", 2, "none", "images (PNG) in the prepared [0, 1]", window=None)
    monitor = None  # val/loss changes meaning with the stage
    condition_refusal = f"{NAME} draws images without a condition"
    headline_metrics = ("reconstruction_mse", "generated_mean")
    stages = STAGES
    # 32 px in batches of 2: epochs about as long as cvae's tiny ones (0.1 s), between which the contract's resume test kills
    tiny_example = TinyExample(phantom="cilia", n=6, size=32, prepare={"size": 32, "seed": 0},
                               overrides=("model.autoencoder_epochs=2", "model.channels=[16, 32]", "train.batch_size=2", "train.num_threads=1"))

    def resolve_config(self, config: FixtureConfig) -> FixtureConfig:
        info, _ = require_prepared(config.data_dir, NAME, spatial_dims=2, one_shape=True, channels=1)
        return config.model_copy(update={"model": config.model.model_copy(update={"image_size": int(info["image_shape"][0])})})

    def build_module(self, config: FixtureConfig) -> FixtureModule:
        return FixtureModule(config)

    def sample(self, module: FixtureModule, request: SampleRequest, out: Path) -> list[Path]:
        if request.class_name is not None:
            raise MedsynthError(f"{NAME} has no classes")
        images = module.eval().generate(item_seeds(request.seed, request.n))
        require_finite(images, f"{NAME} {request.mode}")
        return [save_image(image, out / request.mode / f"{k:03d}.png") for k, image in enumerate(images)]

    def evaluate(self, run: Run, module: FixtureModule, data_dir: Path) -> dict[str, Any]:
        held_out = first_split(data_dir, ("test", "val"))
        if not held_out:
            raise MedsynthError(f"{data_dir}: evaluation needs held-out (test or val) images")
        real = stack_items(held_out, "image").float()
        with torch.no_grad():
            recon = module.eval().autoencoder(real)
        generated = module.generate(item_seeds(0, len(real)))
        return {"reconstruction_mse": float(F.mse_loss(recon, real)), "generated_mean": float(generated.mean()),
                "real_mean": float(real.mean()), "n_held_out": len(real)}

    # -- medsynth plan

    def input_size(self, config: FixtureConfig) -> list[int] | None:
        """The images' size (``model.image_size`` pixels, square: H W), or None."""
        return [config.model.image_size] * 2 if config.model.image_size else None

    def plan_examples(self, config: FixtureConfig, size: list[int]) -> list[Example]:
        """The stages the run trains (both in turn, or one) on square images of ``size`` (H W pixels); a sampling call
        decodes the codes of one ``sample`` call (its default ``--n``)."""
        if size[0] != size[1]:
            raise MedsynthError(f"{NAME}: --size {size}: images are square (one size, or two equal ones)")
        config = with_settings(config, "model", image_size=size[0])
        items = SampleRequest().n  # sample decodes its --n codes in one call

        def batch(b: int) -> dict[str, Any]:
            return {"image": torch.rand(b, 1, *size)}

        def sample(module: FixtureModule) -> Tensor:
            return module.autoencoder.decode(torch.zeros(items, *module.code_shape))

        return [Example(stage.name, with_settings(config, "model", stage=stage.name), batch, sample, items, 1)
                for stage in self.stages_trained(config)]
