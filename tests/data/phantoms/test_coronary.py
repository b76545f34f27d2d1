"""The coronary CTCA phantom: determinism, anatomy of the label map and the coronary tree, HU, files."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from medsynth.data.phantoms.coronary import (
    CORONARY_LABELS,
    coronary_centrelines,
    make_coronary_dataset,
    render_coronary,
    sample_coronary_params,
)
from medsynth.errors import MedsynthError

LV, RV, LA, RA, MYOCARDIUM, AORTA, PULMONARY_ARTERY, CORONARY = range(1, 9)
CHAMBERS = (LV, RV, LA, RA, PULMONARY_ARTERY)
SIZE = 32
SEEDS = (0, 1, 2)


def _params(seed: int):
    return sample_coronary_params(np.random.default_rng([0, seed]))


@pytest.fixture(scope="module")
def subjects():
    return [(_params(seed), *render_coronary(_params(seed), SIZE)) for seed in SEEDS]


def _six_neighbours(volume: np.ndarray) -> np.ndarray:
    """The 6 face neighbours of every voxel ``(6, X, Y, Z)``, -1 outside the volume."""
    padded = np.pad(volume, 1, constant_values=-1)
    shifts = [(1, 0, 0), (-1, 0, 0), (0, 1, 0), (0, -1, 0), (0, 0, 1), (0, 0, -1)]
    return np.stack([padded[tuple(slice(1 + d, 1 + d + n) for d, n in zip(shift, volume.shape))] for shift in shifts])


def test_same_seed_same_arrays_other_seed_differs():
    image, labels, affine = render_coronary(_params(5), SIZE)
    again = render_coronary(_params(5), SIZE)
    assert image.tobytes() == again[0].tobytes() and labels.tobytes() == again[1].tobytes()
    np.testing.assert_array_equal(affine, again[2])
    assert image.dtype == np.float32 and labels.dtype == np.int16 and image.shape == labels.shape == (SIZE,) * 3
    assert not np.array_equal(labels, render_coronary(_params(6), SIZE)[1])


def test_all_nine_labels_present_at_32(subjects):
    for _, _, labels, _ in subjects:
        assert set(np.unique(labels)) == set(CORONARY_LABELS)


def test_each_coronary_tree_is_connected(subjects):
    for _, _, labels, _ in subjects:
        components, count = ndimage.label(labels == CORONARY, structure=np.ones((3, 3, 3)))
        assert 1 <= count <= 3
        assert np.bincount(components.ravel())[1:].min() > 20  # trees, not specks


def test_coronaries_lie_on_the_epicardium(subjects):
    for params, _, labels, _ in subjects:
        branches = coronary_centrelines(params, SIZE)
        vessel = labels == CORONARY
        neighbours = _six_neighbours(labels)[:, vessel]
        # Voxels touching a blood pool other than the aorta are only those at the ostia.
        ostia = np.stack([branches["lm"].points[0], branches["rca"].points[0]])
        touching = np.argwhere(vessel)[np.isin(neighbours, CHAMBERS).any(axis=0)]
        if len(touching):
            reach = 3 * max(branches["lm"].radius[0], branches["rca"].radius[0])
            assert np.linalg.norm(touching[:, None] - ostia[None], axis=-1).min(axis=1).max() <= reach
        # The wall of the tubes is epicardial fat or myocardium.
        surface = (neighbours != CORONARY).any(axis=0)
        assert np.isin(neighbours, (0, MYOCARDIUM)).any(axis=0)[surface].mean() > 0.9
        # Branches on the LV rest on its myocardium: the centreline is a radius (+ rounding) from it.
        to_myocardium = ndimage.distance_transform_edt(labels != MYOCARDIUM)
        for name in ("lad", "d1", "lcx", "om1", "pda"):
            branch = branches[name]
            index = tuple(np.clip(branch.points.round().astype(int), 0, SIZE - 1).T)
            assert (to_myocardium[index] <= branch.radius + 1.5).all(), name


def test_tubes_taper_from_the_ostium(subjects):
    for params, _, labels, _ in subjects:
        branches = coronary_centrelines(params, SIZE)
        for branch in branches.values():
            assert branch.radius[0] > branch.radius[-1]
        thickness = ndimage.distance_transform_edt(labels == CORONARY)  # ~ local radius on the centreline
        for name in ("lad", "lcx", "rca"):
            measured = thickness[tuple(np.clip(branches[name].points.round().astype(int), 0, SIZE - 1).T)]
            quarter = len(measured) // 4
            assert measured[:quarter].mean() > measured[-quarter:].mean(), name


def test_hounsfield_units_per_label(subjects):
    for params, image, labels, _ in subjects:
        interior = (_six_neighbours(labels) == labels).all(axis=0)
        for label in (LV, RV, LA, RA, AORTA, PULMONARY_ARTERY):
            voxels = image[(labels == label) & interior]
            if voxels.size:  # a thin vessel may have no interior at 32^3
                assert 200 <= np.median(voxels) <= 460, CORONARY_LABELS[label]
        assert 60 <= np.median(image[(labels == MYOCARDIUM) & interior]) <= 150
        assert 150 <= np.median(image[labels == CORONARY]) <= 460
        assert np.median(image[labels == 0]) < -600  # mostly lung and air
        assert 300 <= params.contrast_hu <= 450 and 15 <= params.noise_hu <= 25


def test_affine_is_real_geometry(subjects):
    for params, _, _, affine in subjects:
        spacing = np.linalg.norm(affine[:3, :3], axis=0)
        np.testing.assert_allclose(spacing, params.spacing)
        assert ((spacing >= 0.8) & (spacing <= 1.2)).all()
        assert not np.allclose(affine, np.eye(4)) and np.abs(affine[:3, 3]).max() > 10.0
        centre = affine @ np.array([(SIZE - 1) / 2] * 3 + [1.0])
        np.testing.assert_allclose(centre[:3], params.centre_mm)


def test_dataset_in_nnunet_raw_layout(tmp_path):
    out = make_coronary_dataset(tmp_path / "raw", n=2, size=16, seed=3)
    description = json.loads((out / "dataset.json").read_text())
    assert description == {
        "channel_names": {"0": "CT"},
        "labels": {name: index for index, name in CORONARY_LABELS.items()},
        "numTraining": 2,
        "file_ending": ".nii.gz",
        "name": "medsynth-coronary",
    }
    for k in range(2):
        image = nib.load(out / "imagesTr" / f"coronary_{k:03d}_0000.nii.gz")
        labels = nib.load(out / "labelsTr" / f"coronary_{k:03d}.nii.gz")
        assert image.shape == labels.shape == (16, 16, 16)
        np.testing.assert_allclose(image.affine, labels.affine)
        assert not np.allclose(image.affine, np.eye(4))
        expected_image, expected_labels, _ = render_coronary(sample_coronary_params(np.random.default_rng([3, k])), 16)
        np.testing.assert_array_equal(np.asarray(labels.dataobj), expected_labels)
        np.testing.assert_array_equal(np.asarray(image.dataobj), expected_image)


def test_fixed_spacing_applies_to_every_subject(tmp_path):
    out = make_coronary_dataset(tmp_path / "raw", n=1, size=16, spacing=(0.7, 0.7, 1.5))
    affine = nib.load(out / "imagesTr" / "coronary_000_0000.nii.gz").affine
    np.testing.assert_allclose(np.linalg.norm(affine[:3, :3], axis=0), (0.7, 0.7, 1.5))


@pytest.mark.parametrize("options", [{"n": 0}, {"size": 15}])
def test_refuses_too_few_subjects_or_too_small_volumes(tmp_path, options):
    with pytest.raises(MedsynthError):
        make_coronary_dataset(tmp_path / "raw", **{"n": 1, "size": 16, **options})
