"""diffae: the slice data path, the module's encode/invert/decode round trip, the baseline and the latent DDIM."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.metrics import PSNRMetric

from medsynth import api
from medsynth.data.datasets import load_split, stack_items
from medsynth.latent_space import slerp
from medsynth.recipes import get_recipe
from medsynth.recipes.diffae import DDIMModule, DiffAEConfig, DiffAEModule, structure_classes, to_model

# Measured at the tiny size below (16 px, 10 DDIM steps, 2 fixed-point refinements per inversion step, 8 epochs of
# the first stage): a held-out slice comes back at 24.9 dB; the bound leaves a margin.
ROUND_TRIP_PSNR_DB = 20.0


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> Path:
    example = get_recipe("diffae").tiny_example
    return api.phantom("cardiac", tmp_path_factory.mktemp("diffae") / "raw", n=4, seed=0, size=32, progress=False,
                       **example.phantom_options)


@pytest.fixture(scope="module")
def prepared(phantom, tmp_path_factory) -> Path:
    return api.prepare(phantom, tmp_path_factory.mktemp("diffae") / "prepared", recipe="diffae", size=16, seed=0, progress=False)


@pytest.fixture(scope="module")
def trained(prepared, tmp_path_factory) -> DiffAEModule:
    example = get_recipe("diffae").tiny_example
    settings = [*example.overrides, "model.stage_epochs=8", "train.max_epochs=9", "sample.steps=10"]
    run = api.train("diffae", data=prepared, config=example.config, overrides=settings,
                    out=tmp_path_factory.mktemp("diffae-run") / "run", progress=False)
    from medsynth.training import load_module

    return load_module(run.path, get_recipe("diffae")).eval()


def test_prepare_writes_one_2d_case_per_subject_frame_and_thin_slice(phantom, prepared):
    manifest = json.loads((prepared / "dataset.json").read_text())
    assert manifest["spatial_dims"] == 2 and manifest["prepare"]["settings"]["slices"] is True
    for subject in ("sub000", "sub003"):
        hr = nib.load(str(phantom / subject / "sa_hr.nii.gz"))
        slices, frames = hr.shape[2], hr.shape[3]
        cases = [c for c in manifest["cases"] if c["subject"] == subject]
        assert len(cases) == slices * frames  # the thin truth, not the thick acquisition
        assert len({c["split"] for c in cases}) == 1  # one subject, one split
        case = next(c for c in cases if c["frame"] == 1 and c["slice"] == 2)
        with np.load(prepared / case["image"]) as data:
            image, label, affine = data["image"], data["label"], data["affine"]
        assert image.shape == (1, 16, 16) and 0 <= image.min() and image.max() <= 1
        truth = nib.load(str(phantom / subject / "sa_hr_gt.nii.gz")).get_fdata()[:, :, 2, 1]
        assert set(np.unique(label)) <= set(np.unique(truth))
        # geometry: the slice's pixel (i, j) of the 16 px grid is where pixel ((2i + 0.5), (2j + 0.5)) of the 32 px slice 2 is
        source = hr.affine @ np.array([2 * 3 + 0.5, 2 * 5 + 0.5, 2, 1.0])
        np.testing.assert_allclose(affine @ np.array([3, 5, 0, 1.0]), source, atol=1e-6)
    # units: every slice of a frame in its volume's (0.5, 99.5) percentiles -> [0, 1], as inverse/ maps a stack (each
    # slice stretched by its own percentiles instead would put the means 0.05-0.2 apart)
    hr = nib.load(str(phantom / "sub000" / "sa_hr.nii.gz")).get_fdata()[..., 1]
    low, high = np.percentile(hr, (0.5, 99.5))
    for k in range(hr.shape[2]):
        case = next(c for c in manifest["cases"] if c["subject"] == "sub000" and c["frame"] == 1 and c["slice"] == k)
        with np.load(prepared / case["image"]) as data:
            mean = float(data["image"].mean())
        np.testing.assert_allclose(mean, np.clip((hr[:, :, k] - low) / (high - low), 0, 1).mean(), atol=0.02)  # resized 32 -> 16


def test_structure_classes_count_the_labelled_structures():
    labels = torch.zeros(3, 1, 4, 4, dtype=torch.long)
    labels[1, 0, 0, 0] = 8
    labels[2, 0, 0, 0], labels[2, 0, 1, 1], labels[2, 0, 2, 2] = 7, 8, 9
    assert structure_classes(labels).tolist() == [0, 1, 3]


def test_slerp_keeps_the_ends_and_the_norm_of_orthogonal_codes():
    a, b = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])  # one code each (batch of 1), as interpolate passes them
    assert torch.allclose(slerp(a, b, 0.0), a) and torch.allclose(slerp(a, b, 1.0), b, atol=1e-6)
    assert torch.allclose(slerp(a, b, 0.3).norm(), torch.tensor(1.0))


def test_encode_invert_decode_round_trip_of_held_out_slices(trained, prepared):
    """DiffAE's inversion: a held-out slice encoded to (z_sem, x_T) and decoded at the configured steps comes back."""
    x = to_model(stack_items(load_split(prepared, "test")[:4], "image"))
    steps = trained.config.sample.steps
    with torch.no_grad():
        z = trained.encode_semantic(x)
        assert z.shape == (4, trained.config.model.semantic_dim) and trained.semantic and trained.image_size == 16
        x_T = trained.invert(x, z, steps)
        back = trained.decode(z, x_T, steps)
    psnr = float(PSNRMetric(max_val=2.0)(back, x).mean())
    assert psnr >= ROUND_TRIP_PSNR_DB, psnr
    assert float((x_T - x).abs().mean()) > 0.1  # a code at t = T - 1, not the slice itself


def test_decode_is_differentiable_in_both_codes(trained):
    z = torch.zeros(1, trained.config.model.semantic_dim, requires_grad=True)
    x_T = torch.randn(1, 1, 16, 16, generator=torch.Generator().manual_seed(0), requires_grad=True)
    trained.decode(z, x_T, 2).square().mean().backward()
    assert z.grad is not None and x_T.grad is not None and z.grad.abs().sum() > 0 and x_T.grad.abs().sum() > 0


def test_latent_stage_fits_the_code_statistics_and_samples_new_codes(trained, prepared):
    assert bool(trained.z_fitted)
    x = to_model(stack_items(load_split(prepared, "train"), "image"))
    with torch.no_grad():
        codes = trained.encode_semantic(x)
    torch.testing.assert_close(trained.z_mean, codes.mean(0), atol=1e-4, rtol=1e-4)
    samples = trained.random([0, 1, 2], trained.config.sample)
    assert samples.shape == (3, 1, 16, 16) and samples.min() >= -1 and samples.max() <= 1  # slices in the model's range
    assert not torch.equal(samples[0], samples[1]) and float(samples.std()) > 0.05  # new codes, not one grey slice
    # each slice is its seed's (its codes and noise from its own generator), whatever the batch it is sampled in
    torch.testing.assert_close(trained.random([1], trained.config.sample)[0], samples[1], rtol=0, atol=1e-5)


def test_ddim_baseline_has_no_encoder_and_no_latent_stage():
    config = DiffAEConfig.model_validate({"model": {"semantic": False, "image_size": 16, "channels": [8, 16], "attention_levels": [False, False],
                                                    "norm_num_groups": 4}})
    recipe = get_recipe("diffae")
    module = recipe.build_module(config).eval()
    assert isinstance(module, DDIMModule) and not isinstance(module, DiffAEModule)
    assert not module.semantic and not hasattr(module, "encoder") and not hasattr(module, "latent_net")
    assert recipe.variant(config).name == "ddim" and [s.name for s in recipe.stages_trained(config)] == ["ddim"]
    assert recipe.variant(config.model_copy(update={"model": config.model.model_copy(update={"semantic": True})})) is None
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    assert module.encode_semantic(x) is None
    with torch.no_grad():
        assert module.decode(None, module.invert(x, None, 2), 2).shape == x.shape
