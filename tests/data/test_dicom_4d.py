"""4D DICOM: a folder of one series per phase (as TCIA's 4D-Lung and cardiac CT scanners write it) read as one
4D volume ordered by phase, built here from pydicom's own CT test slice with phase tags."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest

from medsynth.data.dicom import is_phase_series, phase_series_geometry, read_phase_series, read_series
from medsynth.data.io import LPS_TO_RAS, load_image
from medsynth.errors import BadInputError

COLUMNS, ROWS, SLICES = 5, 6, 4  # X, Y, Z of every phase
SLICE_GAP = 2.5  # mm
ORIGIN = (-158.135803, -179.035797, -75.7)  # LPS of the first voxel: CT_small's own position


def _pixels(rank: int, k: int) -> np.ndarray:
    """Stored values of slice ``k`` of the phase of ``rank`` (in phase order) ``(rows, columns)``: every voxel
    differs, and the thousands give the phase and the hundreds the slice, so both orders can be read back."""
    return (1000 * rank + 100 * k + np.arange(ROWS * COLUMNS).reshape(ROWS, COLUMNS)).astype(np.int16)


def write_phases(folder: Path, tag: str, values: list[float], *, seed: int = 0, shift: dict[int, float] | None = None) -> list[str]:
    """One series of ``SLICES`` slices per value of ``tag``, copied from ``CT_small.dcm``, into ``folder``.

    ``tag``: ``"NominalPercentageOfCardiacPhase"``, ``"TriggerTime"`` or ``"SeriesDescription"`` (written as
    TCIA's ``"Gated, 10.0%"``). File names are shuffled over all slices of all phases (neither names nor
    InstanceNumbers give an order). ``shift`` moves the origin of the series at index ``i`` by that many mm.
    Returns the SeriesInstanceUIDs in the order of ``values``.
    """
    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid

    base = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    folder.mkdir(parents=True, exist_ok=True)
    ranks = {value: rank for rank, value in enumerate(sorted(values))}
    names = np.random.default_rng(seed).permutation(len(values) * SLICES)
    uids = []
    for i, value in enumerate(values):
        uid = generate_uid()
        uids.append(uid)
        for k in range(SLICES):
            ds = copy.deepcopy(base)
            ds.SeriesInstanceUID = uid
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            ds.InstanceNumber = int(np.random.default_rng(seed + i).permutation(SLICES)[k]) + 1
            ds.Rows, ds.Columns = ROWS, COLUMNS
            ds.PixelData = _pixels(ranks[value], k).tobytes()
            ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
            dz = (shift or {}).get(i, 0.0)
            ds.ImagePositionPatient = [ORIGIN[0] + dz, ORIGIN[1], ORIGIN[2] + SLICE_GAP * k]
            if tag == "SeriesDescription":
                ds.SeriesDescription = f"Gated, {value:.1f}%"
            else:
                setattr(ds, tag, value)
            ds.save_as(folder / f"1-{names[i * SLICES + k]:02d}.dcm")
    return uids


def _check_order(folder: Path, values: list[float]) -> None:
    array, affine, phases = read_phase_series(folder)
    assert phases == sorted(values)
    assert array.shape == (len(values), COLUMNS, ROWS, SLICES)
    for t in range(len(values)):  # HU = stored - 1024 (CT_small's RescaleIntercept), x along the row direction
        expected = np.stack([_pixels(t, k).T for k in range(SLICES)], axis=-1) - 1024.0
        np.testing.assert_array_equal(array[t], expected)
    spacing = [float(s) for s in (0.661468, 0.661468)]
    assert np.allclose(affine, [[spacing[1], 0, 0, ORIGIN[0]], [0, spacing[0], 0, ORIGIN[1]], [0, 0, SLICE_GAP, ORIGIN[2]], [0, 0, 0, 1]])


def test_phases_ordered_by_the_percentage_in_the_series_description(tmp_path):
    values = [20.0, 0.0, 10.0]  # written out of order
    write_phases(tmp_path / "ct", "SeriesDescription", values)
    assert is_phase_series(tmp_path / "ct")
    _check_order(tmp_path / "ct", values)


def test_phases_ordered_by_trigger_time(tmp_path):
    values = [350.0, 50.0, 700.0, 125.5]
    write_phases(tmp_path / "ct", "TriggerTime", values, seed=3)
    _check_order(tmp_path / "ct", values)


def test_phases_ordered_by_nominal_cardiac_percentage(tmp_path):
    values = [75.0, 5.0, 40.0]
    write_phases(tmp_path / "ct", "NominalPercentageOfCardiacPhase", values, seed=5)
    _check_order(tmp_path / "ct", values)


def test_the_nominal_percentage_comes_before_trigger_time_and_description(tmp_path):
    import pydicom

    folder = tmp_path / "ct"
    write_phases(folder, "NominalPercentageOfCardiacPhase", [0.0, 50.0])
    for path in folder.iterdir():  # trigger times and descriptions that would order the phases the other way round
        ds = pydicom.dcmread(path)
        first = float(ds.NominalPercentageOfCardiacPhase) == 0.0
        ds.TriggerTime, ds.SeriesDescription = (900.0, "Gated, 90.0%") if first else (10.0, "Gated, 10.0%")
        ds.save_as(path)
    _check_order(folder, [0.0, 50.0])


def test_load_image_reads_the_folder_as_a_4d_nifti_reads(tmp_path):
    write_phases(tmp_path / "ct", "SeriesDescription", [10.0, 0.0])
    array, affine, _ = read_phase_series(tmp_path / "ct")
    image = load_image(tmp_path / "ct")  # (T, X, Y, Z) in RAS, like a 4D NIfTI
    assert image.shape == (2, COLUMNS, ROWS, SLICES)
    np.testing.assert_array_equal(image.numpy(), array.astype(np.float32))
    np.testing.assert_array_equal(image.affine.numpy(), LPS_TO_RAS @ affine)


def test_each_phase_has_the_affine_and_voxels_of_the_3d_reader(tmp_path):
    uids = write_phases(tmp_path / "ct", "TriggerTime", [400.0, 0.0, 200.0], seed=7)
    array, affine, _ = read_phase_series(tmp_path / "ct")
    geometry = phase_series_geometry(tmp_path / "ct")
    assert geometry.shape == (COLUMNS, ROWS, SLICES, 3) and geometry.phases == [0.0, 200.0, 400.0]
    for t, uid in enumerate([uids[1], uids[2], uids[0]]):  # phase order: 0, 200, 400 ms
        one, one_affine = read_series(tmp_path / "ct", series=uid)
        np.testing.assert_array_equal(one_affine, affine)
        np.testing.assert_array_equal(one[0], array[t])


def test_phases_on_different_grids_are_refused(tmp_path):
    write_phases(tmp_path / "ct", "SeriesDescription", [0.0, 10.0, 20.0], shift={2: 1.0})
    assert is_phase_series(tmp_path / "ct")  # the tags alone say phases; the grids are checked on reading
    with pytest.raises(BadInputError, match=r"ct: phase 20 \(SeriesDescription\) lies on another grid than phase 0 \(affine differs by up to 1 mm\)"):
        read_phase_series(tmp_path / "ct")
    with pytest.raises(BadInputError, match="lies on another grid"):
        load_image(tmp_path / "ct")


def test_phases_with_different_slice_counts_are_refused(tmp_path):
    folder = tmp_path / "ct"
    write_phases(folder, "TriggerTime", [0.0, 100.0])
    import pydicom

    last = next(p for p in sorted(folder.iterdir()) if float(pydicom.dcmread(p).TriggerTime) == 100.0
                and float(pydicom.dcmread(p).ImagePositionPatient[2]) == ORIGIN[2] + SLICE_GAP * (SLICES - 1))
    last.unlink()  # the top slice of the second phase
    with pytest.raises(BadInputError, match=rf"ct: phase 100 \(TriggerTime\) has shape \({COLUMNS}, {ROWS}, {SLICES - 1}\), phase 0"):
        read_phase_series(folder)


def test_series_without_phase_tags_keep_the_choose_one_message(tmp_path):
    import pydicom

    folder = tmp_path / "ct"
    write_phases(folder, "TriggerTime", [0.0, 100.0])
    for path in folder.iterdir():
        ds = pydicom.dcmread(path)
        if float(ds.TriggerTime) == 100.0:
            del ds.TriggerTime  # one series without a phase: not the phases of one acquisition
            ds.save_as(path)
    assert not is_phase_series(folder)
    with pytest.raises(BadInputError, match="holds 2 DICOM series, choose one with --series"):
        load_image(folder)
    with pytest.raises(BadInputError, match="holds 2 DICOM series, choose one with --series"):
        read_phase_series(folder)


def test_two_series_of_one_phase_are_refused(tmp_path):
    write_phases(tmp_path / "ct", "SeriesDescription", [0.0, 10.0, 10.0])
    with pytest.raises(BadInputError, match=r"ct: several DICOM series share the phase 10 \(SeriesDescription\)"):
        read_phase_series(tmp_path / "ct")


def test_one_series_is_not_a_phase_series(tmp_path):
    write_phases(tmp_path / "ct", "TriggerTime", [0.0])
    assert not is_phase_series(tmp_path / "ct") and not is_phase_series(tmp_path)
    assert load_image(tmp_path / "ct").shape == (1, COLUMNS, ROWS, SLICES)  # read as before
    with pytest.raises(BadInputError, match="holds one DICOM series, not one series per phase"):
        read_phase_series(tmp_path / "ct")


def test_series_whose_slices_span_several_trigger_times_are_not_phases(tmp_path):
    import pydicom

    folder = tmp_path / "cine"
    write_phases(folder, "TriggerTime", [0.0, 100.0])
    for path in folder.iterdir():  # each series' top slice at another time: a cine MR position per series, not a phase
        ds = pydicom.dcmread(path)
        if float(ds.ImagePositionPatient[2]) == ORIGIN[2] + SLICE_GAP * (SLICES - 1):
            ds.TriggerTime = float(ds.TriggerTime) + 40.0
            ds.save_as(path)
    assert not is_phase_series(folder)
    with pytest.raises(BadInputError, match="holds 2 DICOM series, choose one with --series"):
        load_image(folder)
