"""The lung 4D CT phantom: layout, breathing cycle, exact motion, per-subject variation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from medsynth.data.io import load_image
from medsynth.data.manifest import Manifest
from medsynth.data.phantoms.lung import LUNG_LABELS, make_lung_dataset, render_lung, sample_lung_params
from medsynth.motion.fields import jacobian_determinant, load_field, warp_image, warp_labels

SIZE = (48, 48, 24)


@pytest.fixture(scope="module")
def sequence():
    return render_lung(sample_lung_params(4), phases=10, size=SIZE)


def test_layout_and_manifest(tmp_path):
    out = make_lung_dataset(tmp_path / "lung", n=1, frames=3, size=(24, 24, 12), seed=1)
    manifest = json.loads((out / "dataset.json").read_text())
    assert manifest["modality"] == "CT" and manifest["source"] == "phantom-lung" and manifest["spatial_dims"] == 3
    assert manifest["labels"] == {str(k): v for k, v in LUNG_LABELS.items()}
    assert [case["phase"] for case in manifest["cases"]] == [0, 1, 2]
    assert [case.flow for case in Manifest.load(out).cases] == [f"sub000/dvf_t{t:02d}.nii.gz" for t in range(3)]
    image, field = load_image(out / manifest["cases"][1]["image"]), load_field(out / manifest["cases"][1]["flow"])
    assert image.shape == (1, 24, 24, 12) and field.shape == (3, 24, 24, 12)
    assert np.allclose(image.affine, field.affine)
    assert json.loads((out / "sub000/params.json").read_text())["si_amplitude"] > 0


def test_end_inhale_first_end_exhale_in_the_middle(sequence):
    diaphragm = sequence.labels[0] != 2  # moving tissue is measured where it is not lung at end-inhale
    si = [np.abs(field[2]).max() for field in sequence.fields]
    assert si[0] == 0.0  # phase 0 is the reference
    assert int(np.argmax(si)) == 5
    assert all(a < b for a, b in zip(si[:5], si[1:6]))
    assert diaphragm.any()


def test_diaphragm_moves_more_than_the_apex(sequence):
    lung = sequence.labels[0] == 2
    z = np.nonzero(lung.any(axis=(0, 1)))[0]
    u_z = np.abs(sequence.fields[5][2])
    assert u_z[:, :, z[0]][lung[:, :, z[0]]].mean() > 3 * u_z[:, :, z[-1]][lung[:, :, z[-1]]].mean()


def test_chest_wall_hysteresis(sequence):
    # Phases 2 and 8 have the same diaphragm position, but the chest wall lags: inhale and exhale paths differ.
    params = sample_lung_params(4)
    assert params.excursion(2, 10)[0] == pytest.approx(params.excursion(8, 10)[0])
    assert np.allclose(sequence.fields[2][2], sequence.fields[8][2], atol=1e-4)
    assert np.abs(sequence.fields[2][1] - sequence.fields[8][1]).max() > 0.05


def test_warping_phase_zero_by_its_exact_field_gives_phase_t(sequence):
    first, first_labels = torch.from_numpy(sequence.images[0])[None], torch.from_numpy(sequence.labels[0])[None]
    for t in (4, 5, 6):  # large motion: interpolation error stays well below the motion
        field = torch.from_numpy(sequence.fields[t])
        assert jacobian_determinant(field).min() > 0
        frame, labels = sequence.images[t], sequence.labels[t]
        error = np.abs(warp_image(first, field)[0].numpy() - frame).mean()
        assert error < 0.4 * np.abs(sequence.images[0] - frame).mean()
        warped = warp_labels(first_labels, field)[0].numpy()
        assert (warped == labels).mean() > 0.97
        assert (warped != labels).sum() < 0.6 * (sequence.labels[0] != labels).sum()
        lung_dice = 2 * ((warped == 2) & (labels == 2)).sum() / ((warped == 2).sum() + (labels == 2).sum())
        assert lung_dice > 0.96


def test_subjects_differ_in_amplitude_and_nodules():
    a, b = sample_lung_params(10), sample_lung_params(11)
    assert a.si_amplitude != b.si_amplitude and a.hysteresis != b.hysteresis
    assert a == sample_lung_params(10)
    sequence = render_lung(a, phases=2, size=(64, 64, 32))
    assert (sequence.labels[0] == 7).any()  # nodules
    assert {1, 2, 3, 4, 6} <= set(np.unique(sequence.labels[0]))
    lung = sequence.images[0][sequence.labels[0] == 2]
    assert lung.min() < -800 and np.percentile(lung, 99.5) > -500  # parenchyma with vessels
