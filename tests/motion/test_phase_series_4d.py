"""Real 4D layouts through the CLI: a subject folder with one 4D NIfTI, and one with a DICOM series per phase,
are that subject's phases for `register --data`, `prepare --recipe motion-ldm` and `sample --condition`."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medsynth.cli import main
from medsynth.data.io import LPS_TO_RAS, load_image
from medsynth.data.phantoms.lung import render_lung, sample_lung_params
from medsynth.errors import BadInputError
from medsynth.motion.bspline import load_transform
from medsynth.recipes.base import condition_files, condition_volumes

PHASES, SIZE = 3, (24, 24, 12)
FAST = ["--config", "register-demo", "--set", "iterations=[2,2]", "--no-progress"]  # register-demo has 2 levels


@pytest.fixture(scope="module")
def subjects() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Two lung phantoms: name -> (phases ``(T, X, Y, Z)`` whole HU as float32, so DICOM stores them exactly; RAS affine)."""
    out = {}
    for i, name in enumerate(("patient01", "patient02")):
        sequence = render_lung(sample_lung_params(10 + i), PHASES, SIZE)
        out[name] = np.round(np.stack(sequence.images)).astype(np.float32), np.asarray(sequence.affine, dtype=np.float64)
    return out


def _cli(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().err


def write_3d(root: Path, subjects) -> Path:
    for name, (images, affine) in subjects.items():
        (root / name).mkdir(parents=True)
        for t, image in enumerate(images):
            nib.save(nib.Nifti1Image(image, affine), str(root / name / f"image_t{t:02d}.nii.gz"))
    return root


def write_4d(root: Path, subjects) -> Path:
    for name, (images, affine) in subjects.items():
        (root / name).mkdir(parents=True)
        nib.save(nib.Nifti1Image(np.moveaxis(images, 0, -1), affine), str(root / name / "ct4d.nii.gz"))
    return root


def write_dicom(folder: Path, images: np.ndarray, affine: np.ndarray) -> Path:
    """``images`` ``(T, X, Y, Z)`` (whole HU) on the RAS ``affine`` as one CT series per phase (copies of pydicom's
    ``CT_small.dcm``), phase t described as TCIA's 4D-Lung does (``"Gated, 10.0%"``), files named out of order."""
    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid

    base = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    lps = LPS_TO_RAS @ affine
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    folder.mkdir(parents=True)
    names = np.random.default_rng(0).permutation(images.shape[0] * images.shape[3])
    for t, volume in enumerate(images):
        uid = generate_uid()
        for k in range(volume.shape[2]):
            ds = copy.deepcopy(base)
            ds.SeriesInstanceUID, ds.SeriesDescription = uid, f"Gated, {10.0 * t:.1f}%"
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            ds.Columns, ds.Rows = volume.shape[0], volume.shape[1]
            ds.RescaleIntercept, ds.RescaleSlope = 0, 1
            ds.PixelData = volume[:, :, k].T.astype(np.int16).tobytes()  # (rows, columns)
            ds.ImageOrientationPatient = [*(lps[:3, 0] / spacing[0]), *(lps[:3, 1] / spacing[1])]
            ds.PixelSpacing = [spacing[1], spacing[0]]  # between rows, between columns
            ds.ImagePositionPatient = list((lps @ [0, 0, k, 1])[:3])
            ds.save_as(folder / f"1-{names[t * volume.shape[2] + k]:03d}.dcm")
    return folder


def _grids(folder: Path, subject: str) -> list[torch.Tensor]:
    return [load_transform(folder / subject / f"grid_t{t:02d}.npz")[0].coefficients for t in range(1, PHASES)]


def test_a_subject_folder_with_one_4d_nifti_registers_as_its_3d_phases(tmp_path, capsys, subjects):
    three, four = write_3d(tmp_path / "three", subjects), write_4d(tmp_path / "four", subjects)
    for data in (three, four):
        code, err = _cli(capsys, "register", "--data", str(data), "--out", str(tmp_path / f"{data.name}-grids"), *FAST)
        assert code == 0, err
    for name in subjects:
        for a, b in zip(_grids(tmp_path / "three-grids", name), _grids(tmp_path / "four-grids", name), strict=True):
            assert torch.equal(a, b)  # the same voxels and affine: the same grids, bit for bit
    _, extra = load_transform(tmp_path / "four-grids" / "patient02" / "grid_t02.npz")
    assert extra["fixed"] == f"{four / 'patient02' / 'ct4d.nii.gz'}[phase 2]" and extra["moving"].endswith("ct4d.nii.gz[phase 0]")
    record = json.loads((tmp_path / "four-grids" / "registration.json").read_text())
    assert record["subjects"]["patient01"]["phases"] == [0, 1, 2]


def test_a_dicom_phase_series_folder_registers_and_prepares_as_its_nifti_phases(tmp_path, capsys, subjects):
    three = write_3d(tmp_path / "three", subjects)
    dicom = tmp_path / "dicom"
    for name, (images, affine) in subjects.items():
        write_dicom(dicom / name, images, affine)
    image = load_image(dicom / "patient01")  # (T, X, Y, Z), phases in order, the NIfTI's world frame
    np.testing.assert_array_equal(image.numpy(), subjects["patient01"][0])
    np.testing.assert_allclose(image.affine.numpy(), subjects["patient01"][1], atol=1e-6)

    for data in (three, dicom):
        code, err = _cli(capsys, "register", "--data", str(data), "--out", str(tmp_path / f"{data.name}-grids"), *FAST)
        assert code == 0, err
        code, err = _cli(capsys, "prepare", str(data), "--out", str(tmp_path / f"{data.name}-prepared"), "--recipe", "motion-ldm", "--no-progress")
        assert code == 0, err
    for name in subjects:  # DICOM keeps positions as decimal strings: the affines agree to ~1e-12 mm, the grids nearly bit for bit
        for a, b in zip(_grids(tmp_path / "three-grids", name), _grids(tmp_path / "dicom-grids", name), strict=True):
            assert torch.allclose(a, b, atol=1e-5)
    prepared = {name: json.loads((tmp_path / f"{name}-prepared" / "dataset.json").read_text()) for name in ("three", "dicom")}
    cases = {name: {c["id"]: c for c in manifest["cases"]} for name, manifest in prepared.items()}
    assert sorted(cases["dicom"]) == [f"{s}_t{t:02d}" for s in subjects for t in range(PHASES)] == sorted(cases["three"])
    for case_id, case in cases["dicom"].items():
        assert (case["subject"], case["phase"]) == (cases["three"][case_id]["subject"], cases["three"][case_id]["phase"])
        with np.load(tmp_path / "dicom-prepared" / "cases" / f"{case_id}.npz") as a, np.load(tmp_path / "three-prepared" / "cases" / f"{case_id}.npz") as b:
            np.testing.assert_array_equal(a["image"], b["image"])
            np.testing.assert_allclose(a["affine"], b["affine"], atol=1e-6)


def test_a_subject_folder_with_a_4d_scan_and_3d_phases_is_refused(tmp_path, capsys, subjects):
    data = write_4d(tmp_path / "data", subjects)
    images, affine = subjects["patient02"]
    nib.save(nib.Nifti1Image(images[0], affine), str(data / "patient02" / "image_t00.nii.gz"))
    for argv in (["register", "--data", str(data), "--out", str(tmp_path / "grids"), *FAST],
                 ["prepare", str(data), "--out", str(tmp_path / "prepared"), "--recipe", "motion-ldm", "--no-progress"]):
        code, err = _cli(capsys, *argv)
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert f"{data / 'patient02'}" in err and "holds a 4D scan (ct4d.nii.gz) and 1 other phase file(s)" in err
    assert not (tmp_path / "grids").exists() and not (tmp_path / "prepared").exists()


def test_a_4d_condition_gives_its_reference_phase(tmp_path, capsys, subjects):
    images, affine = subjects["patient01"]
    dicom = write_dicom(tmp_path / "ct", images, affine)
    four = write_4d(tmp_path / "four", {"patient01": subjects["patient01"]}) / "patient01" / "ct4d.nii.gz"
    assert condition_files(dicom) == [dicom]  # one acquisition, not a folder of condition files
    for path in (dicom, four):
        (volume,) = condition_volumes(path, list(SIZE), [-1000.0, 1000.0], phase=1)
        np.testing.assert_array_equal(volume.image.numpy(), images[1:2])
        np.testing.assert_allclose(volume.affine, affine, atol=1e-6)
        assert torch.allclose(volume.unit, ((torch.from_numpy(images[1:2]) + 1000) / 2000).clamp(0, 1))
        assert "4D scan of 3 phases; phase 1 is the condition" in capsys.readouterr().err
    with pytest.raises(BadInputError, match="ct4d.nii.gz: 4D scan has 3 phases, no phase 5"):
        condition_volumes(four, list(SIZE), None, phase=5)


def test_a_folder_of_scans_holds_4d_files(tmp_path, capsys, subjects):
    images, affine = subjects["patient01"]
    (tmp_path / "scans").mkdir()
    nib.save(nib.Nifti1Image(np.moveaxis(images, 0, -1), affine), str(tmp_path / "scans" / "a.nii.gz"))
    nib.save(nib.Nifti1Image(images[0], affine), str(tmp_path / "scans" / "b.nii.gz"))  # one 3D phase among 4D scans
    code, err = _cli(capsys, "prepare", str(tmp_path / "scans"), "--out", str(tmp_path / "prepared"), "--recipe", "motion-ldm", "--no-progress")
    assert code == 2 and "b.nii.gz: expected a 4D scan (X, Y, Z, phase), got 3D" in err and len(err.strip().splitlines()) == 1
