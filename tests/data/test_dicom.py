"""DICOM series: grouped by series, ordered along the slice normal, refused when irregular, placed exactly."""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from medsynth.data.importers import import_dataset
from medsynth.data.io import _from_sitk, load_image
from medsynth.data.prepare import prepare_dataset
from medsynth.errors import BadInputError


def _rotation(a: float, b: float, c: float) -> np.ndarray:
    """A rotation (LPS) about z, then y, then x: an oblique slice orientation."""
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rx = np.array([[1, 0, 0], [0, np.cos(c), -np.sin(c)], [0, np.sin(c), np.cos(c)]])
    return rx @ ry @ rz


ROTATION = _rotation(0.3, -0.2, 0.15)  # columns: row direction, column direction, slice normal
SPACING = (0.8, 0.5, 2.0)  # mm between columns, between rows, between slices
ORIGIN = np.array([10.0, -20.0, 30.0])  # LPS of the first voxel


def _volume(shape: tuple[int, int, int] = (5, 4, 6), offset: int = 0) -> np.ndarray:
    """A volume ``(X, Y, Z)`` = (columns, rows, slices) whose every voxel differs."""
    return (np.arange(np.prod(shape)).reshape(shape) + offset).astype(np.int16)


def write_series(folder: Path, volume: np.ndarray, *, slices: list[float] | None = None, uid: str | None = None,
                 description: str = "axial", seed: int = 0) -> str:
    """Write ``volume`` ``(X, Y, Z)`` as CT slices at ``slices`` (mm along the normal; default regular) into ``folder``.

    File names and InstanceNumbers are shuffled (differently), so neither gives the slice order.
    Returns the SeriesInstanceUID.
    """
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    uid = uid or generate_uid()
    slices = [SPACING[2] * k for k in range(volume.shape[2])] if slices is None else slices
    names, instances = rng.permutation(len(slices)), rng.permutation(len(slices)) + 1
    for k, along in enumerate(slices):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = folder / f"IM{seed}_{names[k]:03d}"
        ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SeriesDescription = "1.2.3", uid, description
        ds.Modality, ds.InstanceNumber = "CT", int(instances[k])
        ds.Rows, ds.Columns = volume.shape[1], volume.shape[0]
        ds.PixelSpacing = [SPACING[1], SPACING[0]]  # (between rows, between columns)
        ds.SliceThickness = 5.0  # deliberately not the spacing: positions decide
        ds.ImageOrientationPatient = [*ROTATION[:, 0], *ROTATION[:, 1]]
        ds.ImagePositionPatient = [*(ORIGIN + along * ROTATION[:, 2])]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        ds.PixelData = np.ascontiguousarray(volume[:, :, k].T).tobytes()  # stored (rows, columns)
        ds.save_as(str(path), enforce_file_format=True)
    return uid


def _expected_ras(voxels: np.ndarray) -> np.ndarray:
    """World RAS (mm) of voxel indices ``(N, 3)`` from the construction (LPS) above."""
    lps = ORIGIN + (voxels * np.asarray(SPACING)) @ ROTATION.T
    return lps * [-1.0, -1.0, 1.0]


def test_oblique_series_volume_and_world_positions_match_the_construction(tmp_path: Path) -> None:
    volume = _volume()
    write_series(tmp_path / "s", volume)
    image = load_image(tmp_path / "s")
    np.testing.assert_array_equal(image.numpy()[0], volume - 1024.0)  # through RescaleIntercept
    voxels = np.array(np.meshgrid(*[range(n) for n in volume.shape], indexing="ij")).reshape(3, -1).T
    world = (image.affine.numpy() @ np.c_[voxels, np.ones(len(voxels))].T)[:3].T
    np.testing.assert_allclose(world, _expected_ras(voxels), atol=1e-4)  # positions are stored as decimal strings
    # SimpleITK's GDCM series reader agrees on voxels and geometry.
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(tmp_path / "s")))
    array, affine = _from_sitk(reader.Execute())
    np.testing.assert_array_equal(array, image.numpy())
    np.testing.assert_allclose(affine, image.affine.numpy(), atol=1e-4)


def test_shuffled_file_names_give_the_same_volume(tmp_path: Path) -> None:
    volume = _volume()
    write_series(tmp_path / "a", volume, seed=1)
    write_series(tmp_path / "b", volume, seed=2)
    a, b = load_image(tmp_path / "a"), load_image(tmp_path / "b")
    np.testing.assert_array_equal(a.numpy(), b.numpy())
    np.testing.assert_array_equal(a.affine.numpy(), b.affine.numpy())


def test_irregular_positions_are_refused_with_the_gaps(tmp_path: Path) -> None:
    write_series(tmp_path / "s", _volume((5, 4, 4)), slices=[0.0, 2.0, 4.0, 70.3])
    with pytest.raises(BadInputError, match=r"slice spacing varies from 2\.00 to 66\.30 mm"):
        load_image(tmp_path / "s")


def test_duplicated_positions_are_refused(tmp_path: Path) -> None:
    write_series(tmp_path / "s", _volume((5, 4, 4)), slices=[0.0, 2.0, 2.0, 4.0])
    with pytest.raises(BadInputError, match=r"slices IM0_\d+ and IM0_\d+ share the position [-0-9.]+ mm along the slice normal \(duplicated slices\)"):
        load_image(tmp_path / "s")


def test_two_series_are_refused_with_a_list_and_one_is_chosen_by_uid_or_description(tmp_path: Path) -> None:
    first = write_series(tmp_path / "s", _volume(), description="T1", seed=1)
    second = write_series(tmp_path / "s", _volume(offset=500), description="T2", seed=2)
    with pytest.raises(BadInputError) as error:
        load_image(tmp_path / "s")
    message = str(error.value)
    assert "\n" not in message and "holds 2 DICOM series" in message and "--series" in message
    assert f"{first} 'T1' (6 slices)" in message and f"{second} 'T2' (6 slices)" in message
    np.testing.assert_array_equal(load_image(tmp_path / "s", series=second).numpy()[0], _volume(offset=500) - 1024.0)
    np.testing.assert_array_equal(load_image(tmp_path / "s", series="T1").numpy()[0], _volume() - 1024.0)
    with pytest.raises(BadInputError, match="no DICOM series match --series 'T3'"):
        load_image(tmp_path / "s", series="T3")


def _nnunet_with_series(root: Path, n: int = 2) -> Path:
    """nnU-Net raw folder whose images are DICOM series folders ``imagesTr/c<k>_0000/``, labels NIfTI on their grid."""
    for k in range(n):
        write_series(root / "imagesTr" / f"c{k}_0000", _volume(offset=100 * k), seed=k)
    (root / "labelsTr").mkdir()
    for k in range(n):
        label = np.zeros((5, 4, 6), np.uint8)
        label[1:3, 1:3, 2:4] = 1
        nib.save(nib.Nifti1Image(label, load_image(root / "imagesTr" / f"c{k}_0000").affine.numpy()), str(root / "labelsTr" / f"c{k}.nii.gz"))
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": {"background": 0, "organ": 1},
                                                   "numTraining": n, "file_ending": ".nii.gz"}))
    return root


def test_nnunet_layout_with_series_folders_imports_and_prepares(tmp_path: Path) -> None:
    src = _nnunet_with_series(tmp_path / "raw")
    manifest = import_dataset(src)
    assert [case.image for case in manifest.cases] == ["imagesTr/c0_0000", "imagesTr/c1_0000"]
    assert manifest.spatial_dims == 3
    out = prepare_dataset(src, tmp_path / "prepared", normalize="none", val_fraction=0.0, test_fraction=0.0, progress=False)
    with np.load(out / "cases" / "c1.npz") as data:
        np.testing.assert_array_equal(data["image"][0], _volume(offset=100) - 1024.0)
        np.testing.assert_allclose(data["affine"], load_image(src / "imagesTr" / "c1_0000").affine.numpy())
        assert data["label"].sum() == 8


def test_an_edited_slice_is_prepared_again(tmp_path: Path) -> None:
    from pydicom import dcmread

    src = _nnunet_with_series(tmp_path / "raw")
    settings = {"normalize": "none", "val_fraction": 0.0, "test_fraction": 0.0, "progress": False}
    out = prepare_dataset(src, tmp_path / "prepared", **settings)
    before = {k: (out / "cases" / f"c{k}.npz").stat().st_ino for k in (0, 1)}
    with np.load(out / "cases" / "c0.npz") as data:
        old = data["image"].copy()
    # Edit one slice's pixels in place (same file size); its modification time moves on.
    path = sorted((src / "imagesTr" / "c0_0000").iterdir())[2]
    ds = dcmread(path)
    ds.PixelData = (ds.pixel_array + 7).astype(np.int16).tobytes()
    mtime = path.stat().st_mtime_ns
    ds.save_as(str(path))
    os.utime(path, ns=(mtime + 10**9, mtime + 10**9))
    prepare_dataset(src, out, **settings)
    with np.load(out / "cases" / "c0.npz") as data:
        changed = np.flatnonzero((data["image"] != old).any(axis=(0, 1, 2)))
    assert len(changed) == 1  # exactly the edited slice differs
    assert (out / "cases" / "c1.npz").stat().st_ino == before[1]  # the untouched case was reused
    assert (out / "cases" / "c0.npz").stat().st_ino != before[0]


def test_prepare_chooses_a_series_by_description(tmp_path: Path) -> None:
    src = _nnunet_with_series(tmp_path / "raw", n=1)
    write_series(src / "imagesTr" / "c0_0000", _volume(offset=900), description="scout", seed=5)
    settings = {"normalize": "none", "val_fraction": 0.0, "test_fraction": 0.0, "progress": False}
    with pytest.raises(BadInputError, match="c0_0000: holds 2 DICOM series"):
        prepare_dataset(src, tmp_path / "prepared", **settings)
    out = prepare_dataset(src, tmp_path / "prepared", series="axial", **settings)
    with np.load(out / "cases" / "c0.npz") as data:
        np.testing.assert_array_equal(data["image"][0], _volume() - 1024.0)


def test_a_decathlon_image_may_be_a_series_folder_and_foreign_files_are_named(tmp_path: Path) -> None:
    write_series(tmp_path / "raw" / "imagesTr" / "ct_7", _volume())
    (tmp_path / "raw" / "dataset.json").write_text(json.dumps({"training": [{"image": "./imagesTr/ct_7", "label": None}],
                                                                 "modality": {"0": "CT"}}))
    assert [case.id for case in import_dataset(tmp_path / "raw").cases] == ["ct_7"]
    (tmp_path / "raw" / "imagesTr" / "ct_7" / "notes.txt").write_text("scanned on Monday")
    with pytest.raises(BadInputError, match=r"notes\.txt: not a DICOM file"):
        load_image(tmp_path / "raw" / "imagesTr" / "ct_7")
    with pytest.raises(BadInputError, match="holds no DICOM files .sub-folders are not searched"):
        load_image(tmp_path / "raw" / "imagesTr")


# -- real files shipped with pydicom (no network: the wheel holds them) --------------------------

def _pydicom_series(name: str) -> Path:
    import pydicom.data

    folder = Path(pydicom.data.__file__).parent / "test_files" / "dicomdirtests" / name
    assert folder.is_dir(), f"pydicom's wheel ships {folder}; a pydicom without it cannot run these real-file tests"
    return folder


def test_a_real_ct_series_matches_simpleitk() -> None:
    folder = _pydicom_series("98892001/CT5N")
    image = load_image(folder)
    assert image.shape == (1, 16, 16, 5)
    np.testing.assert_allclose(np.linalg.norm(image.affine.numpy()[:3, :3], axis=0), [0.488281, 0.488281, 2.5], atol=1e-6)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    array, affine = _from_sitk(reader.Execute())
    np.testing.assert_array_equal(array, image.numpy())
    np.testing.assert_allclose(affine, image.affine.numpy(), atol=1e-5)


def test_real_irregular_and_mixed_orientation_series_are_refused() -> None:
    with pytest.raises(BadInputError, match=r"slice spacing varies from 1\.25 to 202\.50 mm"):
        load_image(_pydicom_series("77654033/CT2"))
    with pytest.raises(BadInputError, match="slice orientation differs"):
        load_image(_pydicom_series("98892001/CT2N"))


def test_the_cli_refuses_mixed_and_irregular_series_in_one_line(tmp_path: Path, capsys) -> None:
    from medsynth.cli import main

    src = _nnunet_with_series(tmp_path / "raw", n=2)
    write_series(src / "imagesTr" / "c0_0000", _volume(offset=900), description="T2", seed=9)  # a second series beside the first
    assert main(["prepare", str(src), "--out", str(tmp_path / "p"), "--normalize", "none", "--no-progress"]) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "holds 2 DICOM series" in error and not (tmp_path / "p" / "dataset.json").exists()
    irregular = tmp_path / "irregular"
    write_series(irregular, _volume(), slices=[0.0, 2.0, 4.0, 6.0, 30.0, 32.0])
    assert main(["render", str(irregular), "--out", str(tmp_path / "x.png"), "--still"]) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "slice spacing varies" in error
