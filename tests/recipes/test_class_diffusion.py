"""The class-diffusion recipe at a tiny size: folding, class conditioning, the null class of guidance, seeded
sampling independent of the batch, and the class-conditional evaluation protocol (the same keys as cvae)."""

from __future__ import annotations

import math
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import torch

from medsynth import api
from medsynth.errors import MedsynthError
from medsynth.recipes import get_recipe
from medsynth.runs import Run
from medsynth.training import load_module

TINY = list(get_recipe("class-diffusion").tiny_example.overrides)
CLASSES = ["normal", "disarranged", "oda_defect", "ida_defect", "cp_defect"]


@pytest.fixture(scope="module")
def trained(prepared, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "run"
    return api.train("class-diffusion", data=prepared, config="class-diffusion-tiny", overrides=TINY + ["train.max_epochs=2"],
                     out=out, progress=False)


@pytest.fixture(scope="module")
def module(trained):
    return load_module(Run(trained.path), get_recipe("class-diffusion"))


@pytest.fixture(scope="module")
def dark_bright(tmp_path_factory):
    """A model of two classes whose truth is known: dark (grey 40 of 255) and bright (215) 16 px images, 30 steps."""
    root = tmp_path_factory.mktemp("dark-bright")
    rng = np.random.default_rng(0)
    for name, level in (("dark", 40), ("bright", 215)):
        (root / "raw" / name).mkdir(parents=True)
        for k in range(8):
            iio.imwrite(root / "raw" / name / f"{name}_{k}.png", np.clip(level + rng.normal(0, 10, (16, 16)), 0, 255).astype(np.uint8))
    prepared = api.prepare(root / "raw", root / "prepared", size=16, normalize="none", seed=0, progress=False)
    run = api.train("class-diffusion", data=prepared, config="class-diffusion-tiny", out=root / "run", progress=False,
                    overrides=["model.channels=[8, 8]", "model.attention_levels=[false, false]", "model.norm_num_groups=4",
                               "model.num_head_channels=4", "train.batch_size=8", "train.num_threads=1", "train.max_epochs=15",
                               "train.lr=0.003", "train.ema_decay=0.9", "sample.steps=5"])
    return load_module(Run(run.path), get_recipe("class-diffusion"))


def test_fold_is_lossless_and_maps_to_minus_one_one(module):
    images = torch.rand(3, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    folded = module.to_model(images)
    assert folded.shape == (3, 4, 16, 16)  # fold 2: 2 x 2 pixels a channel
    assert torch.equal(folded[:, 0], images[:, 0, ::2, ::2] * 2 - 1)  # the first channel is every other pixel
    assert torch.allclose(module.to_images(folded), images, atol=1e-6)


def test_class_embedding_has_a_null_row(module):
    assert module.config.model.classes == CLASSES
    assert module.net.unet.class_embedding.num_embeddings == len(CLASSES) + 1
    assert int(module.null_cond) == len(CLASSES)


def test_guidance_uses_the_null_class(dark_bright):
    module = dark_bright
    generator = torch.Generator().manual_seed(1)
    x, t = torch.randn(2, 4, 8, 8, generator=generator), torch.tensor([900, 300])
    classes, null = torch.tensor([0, 1]), torch.tensor([2, 2])
    with torch.no_grad():
        conditional, unconditional = module.net(x, t, classes), module.net(x, t, null)
        guided = module.guided(2.0)(x, t, classes)
    assert (conditional - unconditional).abs().mean() > 1e-3  # the class and the null class reach the output
    assert torch.allclose(guided, conditional + 2.0 * (conditional - unconditional), atol=1e-5)
    assert module.guided(0.0) is module.net


def test_the_class_decides_the_samples(dark_bright):
    module, seeds = dark_bright, list(range(8))
    classes = module.config.model.classes  # sorted folder names: bright, dark
    bright = module.sample_images(torch.full((8,), classes.index("bright")), seeds)
    dark = module.sample_images(torch.full((8,), classes.index("dark")), seeds)
    assert bright.shape == (8, 1, 16, 16) and 0 <= float(dark.min()) and float(bright.max()) <= 1
    # the truth: 215/255 = 0.84 and 40/255 = 0.16 (same seeds: only the class differs)
    assert float(bright.mean()) > 0.6 and float(dark.mean()) < 0.4


def test_an_image_does_not_depend_on_its_batch(module):
    recipe = get_recipe("class-diffusion")
    mixed = recipe.generate_for(module, torch.tensor([1, 0, 1]), seed=3)
    ones, zero = recipe.generate(module, 1, 2, seed=3), recipe.generate(module, 0, 1, seed=3)
    assert torch.allclose(mixed, torch.stack([ones[0], zero[0], ones[1]]), atol=1e-6)


def test_same_seed_same_files_bit_for_bit(trained, tmp_path):
    first = api.sample(trained.path, n=2, seed=7, out=tmp_path / "a")
    second = api.sample(trained.path, n=2, seed=7, out=tmp_path / "b")
    other = api.sample(trained.path, n=2, seed=8, out=tmp_path / "c")
    assert len(first) == 2 * len(CLASSES) and all(p.suffix == ".png" for p in first)
    assert [p.relative_to(tmp_path / "a") for p in first][0] == Path("random/normal/normal_000.png")
    assert (tmp_path / "a" / "random" / "normal.png").is_file()  # the class's grid, as cvae writes it
    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in second]
    assert [p.read_bytes() for p in first] != [p.read_bytes() for p in other]


def test_refuses_unknown_class_and_mode(trained, tmp_path):
    with pytest.raises(MedsynthError, match="unknown class 'cancer'"):
        api.sample(trained.path, n=1, class_name="cancer", out=tmp_path / "x")
    with pytest.raises(MedsynthError, match="has no mode 'grid'"):
        api.sample(trained.path, n=1, mode="grid", out=tmp_path / "y")


def test_refuses_a_shape_the_unet_cannot_halve(prepared, tmp_path):
    with pytest.raises(MedsynthError, match=r"image shape \[32, 32\] must be divisible by 6"):
        api.train("class-diffusion", data=prepared, config="class-diffusion-tiny", overrides=TINY + ["model.fold=3"],
                  out=tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_evaluation_reports_the_issue_19_keys(trained):
    metrics = api.evaluate(trained.path)
    keys = ["tstr_accuracy", "tstr_accuracy_real_reference", "downstream_accuracy_real_only", "downstream_accuracy_classic",
            "downstream_accuracy_with_generated", "downstream_accuracy_oracle", "spectrum_ratio_high", "spectrum_ratio_high_real_reference",
            "classifier_accuracy_real", "classifier_accuracy_generated", "memorisation_max_ssim"]
    for key in keys:  # accuracies are shares of images, in [0, 1]; an SSIM is at most 1; a ratio of spectral energies above 0
        if key.startswith("spectrum_ratio"):
            assert 0 < metrics[key] < math.inf, key
        else:
            assert (-1.0 if "ssim" in key else 0.0) <= metrics[key] <= 1.0, key
    assert set(metrics["classifier_accuracy_generated_per_class"]) == set(CLASSES)
    assert metrics["n_generated_per_class"] == 4 and metrics["downstream_n_labelled"] + metrics["downstream_n_unlabelled"] > 0
    for key in ("downstream_gain_share_generated", "downstream_gain_share_classic"):
        assert key in metrics  # None when the oracle equals L alone (a 1-epoch classifier on 6 images a class)
