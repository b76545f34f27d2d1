"""The geometry carrier of the conditioned recipes (``ConditionVolume``): what is made from a condition reaches its
file with the condition's affine, on the model's grid or on the volume's own, with no affine passed by hand."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import torch

from medsynth.data.fields import save_field
from medsynth.data.io import save_image
from medsynth.recipes.base import ConditionVolume, condition_volumes
from oblique_geometry import oblique_affine, world


def _corners_mm(affine, shape):
    """World positions (8, 3) mm of the outer corners of a grid's field of view (voxel centres +- half a voxel)."""
    n0, n1, n2 = shape
    corners = np.array([[i, j, k] for i in (-0.5, n0 - 0.5) for j in (-0.5, n1 - 0.5) for k in (-0.5, n2 - 0.5)])
    return world(affine, corners)


def test_a_resampled_condition_carries_both_grids_to_its_outputs(tmp_path):
    shape, affine = (12, 10, 6), oblique_affine((1.5, 1.0, 3.0))
    ct = np.random.default_rng(0).uniform(-1000, 400, shape).astype(np.float32)
    nib.save(nib.Nifti1Image(ct, affine), tmp_path / "frame.nii.gz")
    (volume,) = condition_volumes(tmp_path / "frame.nii.gz", (8, 8, 4), (-1000.0, 400.0))
    assert volume.name == "frame" and tuple(volume.unit.shape) == (1, 8, 8, 4)
    assert np.allclose(volume.affine, affine)
    # the model's grid spans the same field of view, with larger voxels
    assert np.allclose(_corners_mm(volume.grid_affine, (8, 8, 4)), _corners_mm(affine, shape), atol=1e-4)

    field = torch.zeros(3, 8, 8, 4)
    field[0] = 1.0  # one voxel along the grid's first axis
    save_field(volume.on_grid(field), tmp_path / "field.nii.gz")
    save_image(volume.on_grid(volume.unit.as_tensor()), tmp_path / "unit.nii.gz")
    save_image(volume.image, tmp_path / "ct.nii.gz")  # as read
    written = nib.load(tmp_path / "field.nii.gz")
    assert np.allclose(written.affine, volume.grid_affine)
    assert np.allclose(np.asarray(written.dataobj)[..., 0, :], volume.grid_affine[:3, 0], atol=1e-5)  # mm
    assert np.allclose(nib.load(tmp_path / "unit.nii.gz").affine, volume.grid_affine)
    assert np.allclose(nib.load(tmp_path / "ct.nii.gz").affine, affine)
    assert np.allclose(np.asarray(nib.load(tmp_path / "ct.nii.gz").dataobj), ct)


def test_a_prepared_item_is_a_condition_on_the_model_grid():
    affine = oblique_affine((2.0, 2.0, 4.0))
    unit = torch.rand(1, 4, 4, 2)
    item = {"image": unit, "affine": torch.from_numpy(affine)}
    volume = ConditionVolume.prepared("case_7", item, unit * 1000 - 1000)
    assert np.allclose(volume.affine, affine) and np.allclose(volume.grid_affine, affine)
    assert torch.equal(volume.unit.as_tensor(), unit) and torch.allclose(volume.image.as_tensor(), unit * 1000 - 1000)
    assert torch.equal(ConditionVolume.prepared("case_7", item).image.as_tensor(), unit)  # no units given: the [0, 1] volume
