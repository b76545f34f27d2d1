"""Cine-MRI acquisitions of the cardiac phantom: oblique geometry, slice profile, labels, layout."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from medsynth.data.cine import import_ukbb, read_info
from medsynth.data.phantoms import get_phantom
from medsynth.data.phantoms._scene import world_grid
from medsynth.data.phantoms.cardiac import (
    CardiacParams,
    _cardiac_anatomy,
    _cardiac_motion,
    cardiac_geometry,
)
from medsynth.data.phantoms.cardiac_views import VIEW_LABELS, make_cardiac_phantom, profile_offsets
from medsynth.errors import MedsynthError

SIZE, FRAMES, FACTOR = 32, 3, 4


CLEAN = {"noise": 0.0, "shading": 0.0, "trabeculation": False}  # the geometry's tests compare with the analytic anatomy


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_cardiac_phantom(tmp_path_factory.mktemp("views"), n=1, seed=5, size=SIZE, frames=FRAMES, modality="mri",
                                views=True, hr_factor=FACTOR, **CLEAN)


def _load(path):
    image = nib.load(str(path))
    return np.asarray(image.dataobj), np.asarray(image.affine)


def _params(dataset) -> CardiacParams:
    return CardiacParams(**json.loads((dataset / "sub000/params.json").read_text()))


def _pixel(affine: np.ndarray, i: float, j: float, k: float) -> np.ndarray:
    return (affine @ [i, j, k, 1.0])[:3]


def test_sax_slices_lie_on_the_geometry_planes(dataset):
    image, affine = _load(dataset / "sub000/sa.nii.gz")
    sax = cardiac_geometry(_params(dataset), FRAMES, sax_spacing_mm=10.0)["sax"]["slices"]
    assert image.shape == (SIZE, SIZE, len(sax), FRAMES) and len(sax) >= 5
    centre = (SIZE - 1) / 2
    for k, plane in enumerate(sax):
        assert np.abs(_pixel(affine, centre, centre, k) - plane["origin"]).max() < 1e-4
    assert np.allclose(np.linalg.norm(affine[:3, :3], axis=0), [160.0 / SIZE, 160.0 / SIZE, 10.0])  # pixel and spacing (mm)
    normal = np.cross(affine[:3, 0], affine[:3, 1])
    assert np.allclose(normal / np.linalg.norm(normal), sax[0]["normal"], atol=1e-4)  # oblique: normal to the long axis
    assert abs(np.abs(sax[0]["normal"]).max()) < 0.99  # not an axis of the world


def test_long_axis_planes_contain_the_long_axis(dataset):
    params = _params(dataset)
    for view in ("2ch", "3ch", "4ch"):
        image, affine = _load(dataset / f"sub000/la_{view}.nii.gz")
        assert image.shape == (SIZE, SIZE, 1, FRAMES)
        normal = np.cross(affine[:3, 0], affine[:3, 1])
        normal /= np.linalg.norm(normal)
        for point in (np.asarray(params.lv_base), params.apex):
            assert abs(normal @ (point - affine[:3, 3])) < 1e-4, view
        assert np.isclose(np.linalg.norm(affine[:3, 2]), 6.0)  # the slice thickness


def test_high_resolution_truth_lies_on_the_stack(dataset):
    sa, sa_affine = _load(dataset / "sub000/sa.nii.gz")
    hr, hr_affine = _load(dataset / "sub000/sa_hr.nii.gz")
    sa_gt, hr_gt = _load(dataset / "sub000/sa_gt.nii.gz")[0], _load(dataset / "sub000/sa_hr_gt.nii.gz")[0]
    slices = sa.shape[2]
    assert hr.shape == (SIZE, SIZE, (slices - 1) * FACTOR + 1, FRAMES) and hr_gt.shape == hr.shape
    assert np.isclose(np.linalg.norm(hr_affine[:3, 2]), 10.0 / FACTOR)
    for k in range(slices):
        for corner in ((0, 0), (SIZE - 1, 3)):
            assert np.abs(_pixel(hr_affine, *corner, k * FACTOR) - _pixel(sa_affine, *corner, k)).max() < 1e-6
        assert np.array_equal(hr_gt[:, :, k * FACTOR], sa_gt[:, :, k])  # labels at the same slice centres


def test_labels_are_the_three_structures_and_the_heart_contracts(dataset):
    gt = _load(dataset / "sub000/sa_gt.nii.gz")[0]
    assert set(np.unique(gt)) == set(VIEW_LABELS)
    info = read_info(dataset / "sub000/Info.cfg", ("ED", "ES"))
    es = _params(dataset).end_systole(FRAMES)
    assert (info["ED"], info["ES"], info["FirstFrame"]) == ("0", str(es), "0")
    for k in range(1, gt.shape[2] - 1):  # mid slices
        assert all((gt[:, :, k, 0] == label).any() for label in (7, 8, 9)), k
    assert (gt[..., es] == 8).sum() < 0.8 * (gt[..., 0] == 8).sum()  # LV blood pool shrinks at end-systole


def test_a_thick_slice_is_the_mean_of_thin_samples(dataset):
    params, (sa, affine) = _params(dataset), _load(dataset / "sub000/sa.nii.gz")
    hr = _load(dataset / "sub000/sa_hr.nii.gz")[0]
    pixel = 160.0 / SIZE
    anatomy, motion = _cardiac_anatomy(params, "mri", pixel), _cardiac_motion(params, FRAMES)
    count = len(profile_offsets(8.0, pixel))
    depths = np.linspace(-4.0 + 4.0 / count, 4.0 - 4.0 / count, count)  # midpoints of `count` parts of 8 mm
    normal = np.asarray(cardiac_geometry(params, FRAMES, sax_spacing_mm=10.0)["sax"]["slices"][0]["normal"])
    k, t = 2, FRAMES - 1
    points = world_grid((SIZE, SIZE, 1), affine)[:, :] + k * affine[:3, 2]
    thin = [anatomy(p + motion(p, t))[0] for p in (points + d * normal for d in depths)]
    assert np.abs(np.mean(thin, axis=0).reshape(SIZE, SIZE) - sa[:, :, k, t]).max() < 1e-5
    centre = thin[count // 2].reshape(SIZE, SIZE)
    assert np.abs(centre - hr[:, :, k * FACTOR, t]).max() < 1e-5  # the truth is the thin centre sample
    assert np.abs(centre - sa[:, :, k, t]).mean() > 1e-3  # and the profile matters


def test_manifest_is_what_the_importer_makes(dataset):
    written = json.loads((dataset / "dataset.json").read_text())
    assert written == import_ukbb(dataset).model_dump(mode="json", by_alias=True)
    assert written["labels"] == {"0": "background", "7": "rv_blood_pool", "8": "lv_blood_pool", "9": "lv_myocardium"}
    assert written["cine"]["sub000"] == {"frames": FRAMES, "ed": 0, "es": _params(dataset).end_systole(FRAMES), "views": ["2ch", "3ch", "4ch"]}


def test_views_need_mri_and_options_are_checked(tmp_path):
    with pytest.raises(MedsynthError, match="modality mri"):
        make_cardiac_phantom(tmp_path, n=1, size=16, frames=2, modality="ct", views=True)
    assert get_phantom("cardiac").check({"views": True, "sax_spacing_mm": 8.0}) == {"views": True, "sax_spacing_mm": 8.0}
    with pytest.raises(MedsynthError, match="hr_factor"):
        get_phantom("cardiac").check({"hr_factor": 1})


def test_cli_writes_the_layout_and_refuses_ct(tmp_path, capsys):
    from medsynth.cli import main

    args = ["--views", "--n", "1", "--size", "12", "--frames", "2", "--no-progress"]
    assert main(["phantom", "cardiac", "--modality", "mri", *args, "--out", str(tmp_path / "mri")]) == 0
    names = {p.name for p in (tmp_path / "mri/sub000").iterdir()}
    assert {"sa.nii.gz", "sa_gt.nii.gz", "la_2ch.nii.gz", "la_3ch.nii.gz", "la_4ch.nii.gz", "sa_hr.nii.gz", "sa_hr_gt.nii.gz", "Info.cfg"} <= names
    assert main(["phantom", "cardiac", *args, "--out", str(tmp_path / "ct")]) == 2
    assert "modality mri" in capsys.readouterr().err


def test_the_acquisition_adds_rician_noise_and_coil_shading_and_the_truth_stays_noise_free(dataset, tmp_path):
    noisy = make_cardiac_phantom(tmp_path / "acquired", n=1, seed=5, size=SIZE, frames=FRAMES, modality="mri", views=True,
                                 hr_factor=FACTOR, noise=0.05, shading=0.0, trabeculation=False)
    clean_sa, noisy_sa = _load(dataset / "sub000/sa.nii.gz")[0], _load(noisy / "sub000/sa.nii.gz")[0]
    # Rician: where the signal is 0 (air) the magnitude is Rayleigh, mean sigma sqrt(pi / 2); where it is high, Gaussian
    air, blood = clean_sa < 1e-4, clean_sa > 0.9
    assert air.sum() > 100 and blood.sum() > 50
    assert abs(noisy_sa[air].mean() - 0.05 * np.sqrt(np.pi / 2)) < 0.005
    assert abs(np.std(noisy_sa[blood] - clean_sa[blood]) - 0.05) < 0.01
    assert np.array_equal(_load(dataset / "sub000/sa_hr.nii.gz")[0], _load(noisy / "sub000/sa_hr.nii.gz")[0])  # truth: no noise
    shaded = make_cardiac_phantom(tmp_path / "shaded", n=1, seed=5, size=SIZE, frames=FRAMES, modality="mri", views=True,
                                  hr_factor=FACTOR, noise=0.0, shading=0.2, trabeculation=False)
    gain_sa = _load(shaded / "sub000/sa.nii.gz")[0][blood] / clean_sa[blood]
    assert 0.05 < gain_sa.std() and 0.5 <= gain_sa.min() and gain_sa.max() <= 1.5  # a smooth gain across the view
    # the coil's field is one of world position: the truth's slice on an acquired slice's centre has the same gain there
    hr_clean, hr_shaded = _load(dataset / "sub000/sa_hr.nii.gz")[0], _load(shaded / "sub000/sa_hr.nii.gz")[0]
    inside = hr_clean[:, :, ::FACTOR] > 0.9
    ratio = hr_shaded[:, :, ::FACTOR][inside] / hr_clean[:, :, ::FACTOR][inside]
    sa_ratio = (_load(shaded / "sub000/sa.nii.gz")[0] / np.maximum(clean_sa, 1e-6))[inside]
    assert np.abs(ratio - sa_ratio).max() < 0.02


def test_trabeculae_are_thin_muscle_strands_labelled_cavity_in_the_apical_lv(dataset, tmp_path):
    trabeculated = make_cardiac_phantom(tmp_path / "trab", n=1, seed=5, size=SIZE, frames=FRAMES, modality="mri", views=True,
                                        hr_factor=FACTOR, noise=0.0, shading=0.0, trabeculation=True)
    clean, trab = _load(dataset / "sub000/sa_hr.nii.gz")[0], _load(trabeculated / "sub000/sa_hr.nii.gz")[0]
    labels = _load(dataset / "sub000/sa_hr_gt.nii.gz")[0]
    assert np.array_equal(labels, _load(trabeculated / "sub000/sa_hr_gt.nii.gz")[0])  # the cavity label keeps them
    changed = np.abs(trab - clean) > 0.05
    assert changed.sum() > 20
    # in the LV cavity, or in the myocardium's partial-volume rim next to it (5 mm pixels here)
    assert np.isin(labels[changed], (8, 9)).mean() > 0.95 and (labels[changed] == 8).mean() > 0.5
    assert (trab[changed] < clean[changed]).mean() > 0.9  # darker: muscle in bright blood
