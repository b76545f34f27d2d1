"""The cardiac 3D+t phantom: layout, exact motion, anatomy per subject, planes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from medsynth.data.importers import import_flow_pairs
from medsynth.data.io import load_image, spacing_of
from medsynth.data.manifest import Manifest
from medsynth.data.phantoms.cardiac import CARDIAC_LABELS, make_cardiac_dataset, render_cardiac, sample_cardiac_params
from medsynth.motion.fields import jacobian_determinant, load_field, warp_image, warp_labels

SIZE = (32, 32, 24)
FRAMES = 4


def dice(a: torch.Tensor, b: torch.Tensor, label: int) -> float:
    a, b = a == label, b == label
    return float(2 * (a & b).sum() / (a.sum() + b.sum()))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_cardiac_dataset(tmp_path_factory.mktemp("cardiac"), n=2, frames=FRAMES, modality="ct", size=SIZE, seed=3)


def test_layout_manifest_and_geometry_of_files(dataset):
    manifest = json.loads((dataset / "dataset.json").read_text())
    assert manifest["spatial_dims"] == 3 and manifest["modality"] == "CT" and manifest["source"] == "phantom-cardiac"
    assert manifest["labels"] == {str(k): v for k, v in CARDIAC_LABELS.items()}
    assert len(manifest["cases"]) == 2 * FRAMES
    assert Manifest.load(dataset).subjects() == ["sub000", "sub001"]  # importable as it is
    case = manifest["cases"][FRAMES + 3]
    expected = {"id": "sub001_t03", "subject": "sub001", "image": "sub001/image_t03.nii.gz", "label": "sub001/label_t03.nii.gz", "phase": 3, "flow": "sub001/dvf_t03.nii.gz"}
    assert {key: case[key] for key in expected} == expected
    image, label, field = load_image(dataset / case["image"]), load_image(dataset / case["label"]), load_field(dataset / case["flow"])
    assert image.shape == (1, *SIZE) and field.shape == (3, *SIZE)
    assert np.allclose(image.affine, label.affine) and np.allclose(image.affine, field.affine)
    spacing = spacing_of(image.affine)
    assert spacing[2] != spacing[0]  # anisotropic voxels, real millimetres
    assert set(np.unique(load_image(dataset / "sub000/label_t00.nii.gz").numpy())) == set(CARDIAC_LABELS)
    ct = image.numpy()
    assert ct.min() < -900 and ct.max() > 250  # air and contrast-enhanced blood, in HU


def test_warping_frame_zero_by_its_exact_field_gives_frame_t(dataset):
    first = load_image(dataset / "sub000/image_t00.nii.gz").as_tensor()
    first_labels = load_image(dataset / "sub000/label_t00.nii.gz").as_tensor()
    for t in range(1, FRAMES):
        frame = load_image(dataset / f"sub000/image_t{t:02d}.nii.gz").as_tensor()
        labels = load_image(dataset / f"sub000/label_t{t:02d}.nii.gz").as_tensor()
        field = load_field(dataset / f"sub000/dvf_t{t:02d}.nii.gz").as_tensor()
        assert jacobian_determinant(field).min() > 0  # the exact motion never folds
        error, motion = (warp_image(first, field) - frame).abs().mean(), (first - frame).abs().mean()
        assert error < 10.0  # HU: interpolation error only
        assert error < (0.4 if motion > 15.0 else 0.5) * motion
        warped = warp_labels(first_labels, field)
        assert (warped == labels).float().mean() > 0.98
        for k in (8, 9):  # the LV blood pool and myocardium follow the field
            assert dice(warped, labels, k) > 0.7
            assert dice(warped, labels, k) >= dice(first_labels, labels, k) - 0.02
        if dice(first_labels, labels, 9) < 0.5:  # large motion: the warp removes most label differences
            assert (warped != labels).sum() < 0.6 * (first_labels != labels).sum()
            assert dice(warped, labels, 9) > 0.75  # a wall of about 1.5 voxels at this size
    assert load_field(dataset / "sub000/dvf_t00.nii.gz").abs().max() < 1e-6  # frame 0 is the reference


def test_anatomy_is_per_subject_and_reproducible():
    first, again, other = sample_cardiac_params(5), sample_cardiac_params(5), sample_cardiac_params(6)
    assert first == again
    assert first.lv_radius != other.lv_radius and first.wall != other.wall
    assert not np.allclose(first.rotation[:, 2], other.rotation[:, 2])  # heart-axis orientation
    a, b = render_cardiac(first, 2, "ct", (16, 16, 12)), render_cardiac(again, 2, "ct", (16, 16, 12))
    assert np.array_equal(a.images, b.images) and np.array_equal(a.fields, b.fields)
    assert np.allclose(first.rotation.T @ first.rotation, np.eye(3))


def test_beating_cycle_contracts_the_ventricle_and_returns():
    params = sample_cardiac_params(2)
    frames = 10
    sequence = render_cardiac(params, frames, "ct", (24, 24, 16))
    lv_volume = [(labels == 8).sum() for labels in sequence.labels]
    es = params.end_systole(frames)
    assert 0 < es < frames - 1
    assert lv_volume[es] < 0.8 * lv_volume[0]  # ejection
    assert lv_volume[-1] > lv_volume[es]  # and filling again
    magnitude = np.abs(sequence.fields).reshape(frames, -1).max(axis=1)
    assert magnitude.argmax() == es


def test_mri_contrast_is_bright_blood():
    sequence = render_cardiac(sample_cardiac_params(1), 2, "mri", (24, 24, 16))
    image, labels = sequence.images[0], sequence.labels[0]
    blood, myocardium, lung = (image[labels == k].mean() for k in (8, 9, 2))
    assert blood > myocardium > lung


def test_short_and_long_axis_planes(dataset):
    geometry = json.loads((dataset / "sub000/geometry.json").read_text())
    axis = np.asarray(geometry["long_axis"]["direction"])
    base, apex = np.asarray(geometry["long_axis"]["base"]), np.asarray(geometry["long_axis"]["apex"])
    assert np.allclose((base - apex) / np.linalg.norm(base - apex), axis, atol=1e-3)
    assert len(geometry["sax"]["slices"]) == 10 and geometry["sax"]["slice_spacing_mm"] > 0
    for plane in geometry["sax"]["slices"]:
        u, v, normal = (np.asarray(plane[k]) for k in ("u", "v", "normal"))
        assert np.allclose(np.stack([u, v, normal]) @ np.stack([u, v, normal]).T, np.eye(3), atol=1e-3)
        assert abs(normal @ axis) > 0.999  # short-axis planes are normal to the long axis
    for name in ("2ch", "3ch", "4ch"):
        plane = geometry["lax"][name]
        normal, origin = np.asarray(plane["normal"]), np.asarray(plane["origin"])
        assert abs(normal @ axis) < 1e-3  # long-axis planes contain the long axis ...
        assert abs((origin - base) @ normal) < 1e-2  # ... and pass through it
    assert geometry["ed_frame"] == 0 and 0 < geometry["es_frame"] < FRAMES


def test_flow_pairs_layout_is_the_exact_end_systole_pair(tmp_path, dataset):
    out = make_cardiac_dataset(tmp_path / "pairs", n=1, frames=FRAMES, size=SIZE, seed=3, flow_pairs="npy")
    info = json.loads((out / "flow_pairs.json").read_text())
    manifest = import_flow_pairs(out)  # the flow-pair importer reads it, with its label map, ED frame and affine
    assert len(manifest.cases) == 1 and manifest.labels == {str(k): v for k, v in CARDIAC_LABELS.items()}
    case = manifest.cases[0]
    assert (case.label, case.moving, case.affine) == ("label_0.npy", "diastole_img_0.npy", "affine_0.npy")
    es = info["pairs"][0]["es_frame"]
    template, flow, affine, label, diastole = (np.load(out / f"{kind}_0.npy") for kind in ("template_img", "flow", "affine", "label", "diastole_img"))
    assert template.shape == SIZE and template.dtype == np.float32
    assert flow.shape == (3, *SIZE) and flow.dtype == np.float32
    end_diastole = load_image(dataset / "sub000/image_t00.nii.gz")
    assert np.allclose(affine, end_diastole.affine)
    assert np.allclose(template, load_image(dataset / f"sub000/image_t{es:02d}.nii.gz").numpy()[0], atol=1e-3)
    assert np.array_equal(label, load_image(dataset / f"sub000/label_t{es:02d}.nii.gz", dtype=np.int64).numpy()[0])
    assert np.allclose(diastole, end_diastole.numpy()[0], atol=1e-3)
    warped = warp_image(torch.from_numpy(diastole)[None], torch.from_numpy(flow))[0].numpy()
    assert np.abs(warped - template).mean() < 0.4 * np.abs(diastole - template).mean()


def test_flow_pairs_nifti_layout(tmp_path):
    out = make_cardiac_dataset(tmp_path / "pairs", n=2, frames=FRAMES, size=SIZE, seed=3, flow_pairs="nifti")
    manifest = Manifest.load(out)
    assert manifest.subjects() == ["sub000", "sub001"] and len(manifest.cases) == 2
    case = manifest.cases[0]
    assert (case.image, case.flow, case.label, case.moving) == (
        "sub000/frame_es.nii.gz", "sub000/flow_es_ed.nii.gz", "sub000/label_es.nii.gz", "sub000/frame_ed.nii.gz")
    frame, diastole = load_image(out / case.image), load_image(out / case.moving)
    field, label = load_field(out / case.flow), load_image(out / case.label, dtype=np.int64)
    for other in (field, label, diastole):
        assert np.allclose(other.affine, frame.affine)  # the frame's geometry everywhere
    npy = make_cardiac_dataset(tmp_path / "npy", n=1, frames=FRAMES, size=SIZE, seed=3, flow_pairs="npy")
    voxels = torch.from_numpy(np.load(npy / "flow_0.npy")).double()
    linear = torch.from_numpy(np.load(npy / "affine_0.npy")[:3, :3])
    mm = load_image(out / case.flow).numpy()  # on disk: mm vectors, the voxel flow through the affine's linear part
    np.testing.assert_allclose(mm, torch.einsum("ij,j...->i...", linear, voxels).numpy(), atol=1e-4)
    np.testing.assert_allclose(field.numpy(), voxels.numpy(), atol=1e-5)  # same subject, same flow in both layouts
    assert np.array_equal(label.numpy()[0], np.load(npy / "label_0.npy"))
    warped = warp_image(diastole.as_tensor(), field.as_tensor())[0]
    assert (warped - frame[0]).abs().mean() < 0.4 * (diastole - frame).abs().mean()
