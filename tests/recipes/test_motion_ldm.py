"""motion-ldm beyond the recipe contract: what sampling writes for a CT, and the bad inputs of the issue.

The module is built from the tiny settings without data (an untrained model: the tests are about
geometry and refusals, not about the motion it generates).
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medsynth import api
from medsynth.config import load_config
from medsynth.data.fields import mm_to_voxel
from medsynth.errors import MedsynthError
from medsynth.motion.fields import warp_image
from medsynth.recipes import get_recipe
from medsynth.recipes.base import SampleRequest
from oblique_geometry import oblique_affine

SHAPE = [16, 16, 4]
TINY = ["model.channels=[8, 8]", "model.attention_levels=[false, false]", "model.norm_num_groups=4", "model.image_ae.channels=[4, 4]",
        "model.field_vae.channels=[4, 4]", "model.image_ae.norm_num_groups=4", "model.field_vae.norm_num_groups=4", "sample.steps=2"]


def build(stage: str = "all", **model):
    recipe = get_recipe("motion-ldm")
    config = load_config(recipe.config_class, "motion-ldm-tiny", [*TINY, f"model.stage={stage}"])
    config = config.model_copy(update={"model": config.model.model_copy(update={
        "phases": 4, "image_shape": SHAPE, "ct_window": [-1000.0, 500.0], **model})})
    return recipe, recipe.build_module(config).eval()


def write_ct(path: Path, shape, affine) -> Path:
    ct = np.linspace(-900.0, 300.0, int(np.prod(shape)), dtype=np.float32).reshape(shape)
    nib.save(nib.Nifti1Image(ct, affine), str(path))
    return path


def test_fields_for_an_oblique_anisotropic_ct_carry_its_affine_and_warp_it(tmp_path):
    recipe, module = build()
    affine = oblique_affine((1.5, 2.0, 8.0))
    condition = write_ct(tmp_path / "ct.nii.gz", SHAPE, affine)
    written = recipe.sample(module, SampleRequest(n=1, condition=condition, phases=(1, 3)), tmp_path / "out")
    folder = tmp_path / "out" / "random" / "ct"
    assert sorted(p.name for p in written if p.parent == folder) == sorted(
        ["field_t01.nii.gz", "field_t03.nii.gz", "image_t01.nii.gz", "image_t03.nii.gz", "image_4d.nii.gz",
         "movie_axial.gif", "movie_coronal.gif", "movie_sagittal.gif"])
    ct = torch.from_numpy(np.asarray(nib.load(str(condition)).dataobj, dtype=np.float32))
    for phase in (1, 3):
        field = nib.load(str(folder / f"field_t{phase:02d}.nii.gz"))
        np.testing.assert_allclose(field.affine, affine, atol=1e-6)
        mm = torch.from_numpy(np.asarray(field.dataobj, dtype=np.float64)[:, :, :, 0, :]).permute(3, 0, 1, 2)
        # the written phase is the CT pulled by the field read back from mm through the CT's own affine
        expected = warp_image(ct[None, None].double(), mm_to_voxel(mm, affine)[None])[0, 0]
        phase_image = nib.load(str(folder / f"image_t{phase:02d}.nii.gz"))
        np.testing.assert_allclose(phase_image.affine, affine, atol=1e-6)
        np.testing.assert_allclose(np.asarray(phase_image.dataobj), expected.numpy(), atol=1e-2)
    series = nib.load(str(folder / "image_4d.nii.gz"))
    assert series.shape == (*SHAPE, 2)
    np.testing.assert_allclose(series.affine, affine, atol=1e-6)


def test_a_ct_of_another_size_is_resampled_and_the_fields_come_back_on_its_grid(tmp_path, capsys):
    recipe, module = build()
    affine = np.diag([2.0, 2.0, 6.0, 1.0])
    condition = write_ct(tmp_path / "big.nii.gz", [20, 18, 5], affine)
    recipe.sample(module, SampleRequest(n=1, condition=condition, phases=(2,)), tmp_path / "out")
    assert "resampled to the model grid" in capsys.readouterr().err
    field = nib.load(str(tmp_path / "out" / "random" / "big" / "field_t02.nii.gz"))
    assert field.shape[:3] == (20, 18, 5)
    np.testing.assert_allclose(field.affine, affine)


def test_reference_phase_field_is_exactly_zero(tmp_path):
    recipe, module = build()
    condition = write_ct(tmp_path / "ct.nii.gz", SHAPE, np.eye(4))
    recipe.sample(module, SampleRequest(n=1, condition=condition, phases=(0,)), tmp_path / "out")
    assert not np.asarray(nib.load(str(tmp_path / "out" / "random" / "ct" / "field_t00.nii.gz")).dataobj).any()


def test_phases_outside_the_trained_range_are_refused(tmp_path):
    recipe, module = build()
    condition = write_ct(tmp_path / "ct.nii.gz", SHAPE, np.eye(4))
    with pytest.raises(MedsynthError, match=r"--phases 4: outside the trained phases 0..3"):
        recipe.sample(module, SampleRequest(n=1, condition=condition, phases=(1, 4)), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_condition_that_is_not_one_volume_is_refused(tmp_path):
    recipe, module = build()
    path = tmp_path / "flat.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros(SHAPE[:2], dtype=np.float32), np.eye(4)), str(path))
    with pytest.raises(MedsynthError, match="flat.nii.gz.*one 3D volume"):
        recipe.sample(module, SampleRequest(n=1, condition=path), tmp_path / "out")


def test_a_4d_condition_is_its_reference_phase(tmp_path, capsys):
    recipe, module = build(reference_phase=1)
    affine = np.diag([2.0, 2.0, 6.0, 1.0])
    phases = np.stack([np.full(SHAPE, -900.0 + 300.0 * t, dtype=np.float32) for t in range(3)], axis=-1)  # (X, Y, Z, T)
    nib.save(nib.Nifti1Image(phases, affine), str(tmp_path / "ct4d.nii.gz"))
    recipe.sample(module, SampleRequest(n=1, condition=tmp_path / "ct4d.nii.gz", phases=(1,)), tmp_path / "out")
    assert "ct4d.nii.gz: 4D scan of 3 phases; phase 1 is the condition" in capsys.readouterr().err
    written = nib.load(str(tmp_path / "out" / "random" / "ct4d" / "image_t01.nii.gz"))  # phase 1 warped by its zero field
    np.testing.assert_allclose(written.affine, affine)
    np.testing.assert_allclose(np.asarray(written.dataobj), -600.0, atol=1e-3)


def test_the_ldm_stage_without_the_earlier_stages_is_refused():
    _, module = build(stage="ldm")
    with pytest.raises(MedsynthError, match="model.image_ae_run"):
        module.setup("fit")


def test_phases_are_refused_for_a_recipe_without_phases(tmp_path, monkeypatch):
    monkeypatch.setattr(api, "open_run", lambda run: (None, get_recipe("cvae")))
    with pytest.raises(MedsynthError, match="recipe 'cvae' generates no phases"):
        api.sample(tmp_path / "cvae-run", phases=[1])
