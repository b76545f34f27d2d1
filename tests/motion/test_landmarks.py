"""Landmarks and TRE: the reported errors equal the field's error at the points, on a lung phantom with exact motion."""

from __future__ import annotations

import re

import nibabel as nib
import numpy as np
import pytest
import torch

from medsynth.cli import main
from medsynth.data.io import save_image
from medsynth.data.phantoms.lung import make_lung_dataset, render_lung, sample_lung_params
from medsynth.errors import BadInputError
from medsynth.motion.bspline import load_transform
from medsynth.motion.landmarks import displacement_at, landmark_file, read_pair, read_points
from medsynth.motion.phase_series import register_dataset
from medsynth.motion.registration import RegistrationConfig, register_pair

FAST = ["--config", "register-demo", "--set", "iterations=[6, 4]", "--no-progress"]
CONFIG = RegistrationConfig(levels=2, iterations=(6, 4), control_spacing_mm=25.0)


def _index_file(path, indices):
    path.write_text("index\n" + f"{len(indices)}\n" + "".join(" ".join(f"{v:.6f}" for v in row) + "\n" for row in indices))
    return path


def _lps_file(path, ras):
    lps = np.asarray(ras) * [-1.0, -1.0, 1.0]
    path.write_text("point\n" + f"{len(lps)}\n" + "".join(" ".join(f"{v:.6f}" for v in row) + "\n" for row in lps))
    return path


def _csv_file(path, ras):
    path.write_text("x,y,z\n" + "".join(",".join(f"{v:.6f}" for v in row) + "\n" for row in ras))
    return path


def _true_mm(sequence, phase, index) -> np.ndarray:
    """The phantom's exact displacement (mm) of ``phase`` at voxel ``index`` ``(N, 3)``: ``affine[:3, :3] @ u_voxels``."""
    field = sequence.fields[phase][:, index[:, 0], index[:, 1], index[:, 2]].T  # (N, 3) voxels
    return field @ sequence.affine[:3, :3].T


def _field_mm(path, index) -> np.ndarray:
    """The written field (a mm vector NIfTI, read with nibabel alone) at voxel ``index``."""
    data = np.asarray(nib.load(str(path)).dataobj, dtype=np.float64).reshape(*nib.load(str(path)).shape[:3], 3)
    return data[index[:, 0], index[:, 1], index[:, 2]]


@pytest.fixture(scope="module")
def lung_pair(tmp_path_factory):
    """End-exhale (fixed, phase 1) and end-inhale (moving, phase 0) of a lung phantom, and landmarks at the
    8 inner voxels that move most: fixed at the voxel centres, moving where the exact motion takes them."""
    root = tmp_path_factory.mktemp("landmarks")
    sequence = render_lung(sample_lung_params(3), phases=3, size=(24, 24, 12))
    fixed = save_image(sequence.images[1][None], root / "fixed.nii.gz", affine=sequence.affine)
    moving = save_image(sequence.images[0][None], root / "moving.nii.gz", affine=sequence.affine)
    motion = np.linalg.norm(np.einsum("ij,jxyz->ixyz", sequence.affine[:3, :3], sequence.fields[1]), axis=0)[2:-2, 2:-2, 2:-2]
    index = np.stack(np.unravel_index(np.argsort(motion, axis=None)[::-1][:8], motion.shape), axis=1) + 2
    fixed_mm = index @ sequence.affine[:3, :3].T + sequence.affine[:3, 3]
    moving_mm = fixed_mm + _true_mm(sequence, 1, index)
    assert np.linalg.norm(moving_mm - fixed_mm, axis=1).min() > 2.0  # the points move: TRE before is not trivially 0
    return root, sequence, fixed, moving, index, fixed_mm, moving_mm


@pytest.mark.parametrize("formats", ["index-lps", "csv-index"])
def test_tre_is_the_error_of_the_computed_field_at_the_points(lung_pair, formats, capsys):
    root, sequence, fixed, moving, index, fixed_mm, moving_mm = lung_pair
    folder = root / formats
    folder.mkdir()
    if formats == "index-lps":
        points = (_index_file(folder / "fixed.pts", index), _lps_file(folder / "moving.pts", moving_mm))
    else:
        moving_index = (moving_mm - sequence.affine[:3, 3]) @ np.linalg.inv(sequence.affine[:3, :3]).T  # continuous voxel indices
        points = (_csv_file(folder / "fixed.csv", fixed_mm), _index_file(folder / "moving.pts", moving_index))
    out = folder / "dvf.nii.gz"
    assert main(["register", str(fixed), str(moving), "--out", str(out), "--landmarks", *map(str, points), *FAST]) == 0
    line = capsys.readouterr().err.strip()

    truth = _true_mm(sequence, 1, index)
    before = np.linalg.norm(truth, axis=1)
    after = np.linalg.norm(_field_mm(out, index) - truth, axis=1)  # |p + u(p) - q| with q = p + u_true(p)
    assert after.mean() < 0.8 * before.mean()  # the registration did move the points towards each other
    result = register_pair(fixed, moving, folder / "again.nii.gz", CONFIG, landmarks=points)
    assert result.tre_before.count == result.tre_after.count == 8
    assert result.tre_before.mean == pytest.approx(before.mean(), abs=1e-4)
    assert result.tre_before.sd == pytest.approx(before.std(), abs=1e-4)
    assert result.tre_before.max == pytest.approx(before.max(), abs=1e-4)
    assert result.tre_after.mean == pytest.approx(after.mean(), abs=1e-4)
    assert result.tre_after.sd == pytest.approx(after.std(), abs=1e-4)
    assert result.tre_after.max == pytest.approx(after.max(), abs=1e-4)
    assert f"TRE {before.mean():.2f} ± {before.std():.2f} (max {before.max():.2f}) -> {after.mean():.2f} ± {after.std():.2f} " \
           f"(max {after.max():.2f}) mm over 8 landmarks" in line


def test_the_field_is_interpolated_trilinearly_between_voxels():
    affine = np.array([[0.0, -2.0, 0.0, 10.0], [1.5, 0.0, 0.0, -4.0], [0.0, 0.0, 3.0, 7.0], [0.0, 0.0, 0.0, 1.0]])
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in (6, 5, 4)], indexing="ij"))  # (3, X, Y, Z)
    world = np.einsum("ij,jxyz->ixyz", affine[:3, :3], grid) + affine[:3, 3, None, None, None]
    linear = np.array([[0.1, -0.2, 0.05], [0.0, 0.3, 0.1], [-0.1, 0.0, 0.2]])  # u_mm(x) = L x + c: trilinear is exact
    field_mm = np.einsum("ij,jxyz->ixyz", linear, world) + np.array([1.0, -2.0, 0.5])[:, None, None, None]
    ddf = torch.from_numpy(np.einsum("ij,jxyz->ixyz", np.linalg.inv(affine[:3, :3]), field_mm))  # in voxels
    points = np.array([[0.3, 1.7, 2.2], [4.9, 0.1, 3.0], [2.5, 2.5, 1.5]]) @ affine[:3, :3].T + affine[:3, 3]
    assert np.allclose(displacement_at(ddf, affine, points), points @ linear.T + [1.0, -2.0, 0.5], atol=1e-9)


def test_register_data_reports_tre_for_pairs_with_landmarks_beside_their_phases(tmp_path):
    data = make_lung_dataset(tmp_path / "lung", n=1, frames=3, size=(24, 24, 12), seed=3)
    affine = nib.load(str(data / "sub000/image_t00.nii.gz")).affine
    exact = nib.load(str(data / "sub000/dvf_t01.nii.gz")).get_fdata().reshape(24, 24, 12, 3)  # mm, phase 0 -> 1
    index = np.array([[12, 12, 3], [8, 14, 5], [15, 9, 6], [10, 10, 8]])
    fixed_mm = index @ affine[:3, :3].T + affine[:3, 3]
    moving_mm = fixed_mm + exact[index[:, 0], index[:, 1], index[:, 2]]
    _index_file(data / "sub000/image_t01.pts", index)  # phase 1 is fixed, phase 0 (the reference) moves
    _csv_file(data / "sub000/image_t00.csv", moving_mm)
    results = register_dataset(data, tmp_path / "out", CONFIG, progress=False)
    with_tre, without = results
    dense = load_transform(with_tre.output)[0].dense_field()
    computed = displacement_at(dense.as_tensor(), dense.affine, fixed_mm)
    assert with_tre.tre_before.mean == pytest.approx(np.linalg.norm(moving_mm - fixed_mm, axis=1).mean(), abs=1e-4)
    assert with_tre.tre_after.mean == pytest.approx(np.linalg.norm(fixed_mm + computed - moving_mm, axis=1).mean(), abs=1e-4)
    assert without.tre_after is None and any("no TRE" in note and "image_t00.csv" in note for note in without.notes)
    again = register_dataset(data, tmp_path / "out", CONFIG, progress=False)  # done earlier: the TRE is reported again
    assert again[0].skipped and again[0].tre_after == with_tre.tre_after


def test_landmark_files_beside_phase_files_and_4d_files(tmp_path):
    phase = save_image(np.zeros((1, 4, 4, 4), np.float32), tmp_path / "image_t01.nii.gz")
    volume = tmp_path / "case1.nii.gz"
    volume.write_bytes(b"")
    assert landmark_file(phase) is None
    (tmp_path / "image_t01.pts").write_text("point\n1\n0 0 0\n")
    (tmp_path / "case1_t03.csv").write_text("1,2,3\n")
    assert landmark_file(phase) == tmp_path / "image_t01.pts"
    assert landmark_file(volume, 3) == tmp_path / "case1_t03.csv" and landmark_file(volume, 2) is None
    (tmp_path / "image_t01.csv").write_text("1,2,3\n")
    with pytest.raises(BadInputError, match="image_t01.pts: two landmark files for one phase"):
        landmark_file(phase)


def test_conventions_lps_points_index_voxels_csv_ras(tmp_path):
    lps = _lps_file(tmp_path / "a.pts", [[1.0, 2.0, 3.0]])  # written from RAS (1, 2, 3): the file holds (-1, -2, 3)
    assert lps.read_text().splitlines()[2] == "-1.000000 -2.000000 3.000000"
    assert np.allclose(read_points(lps).points, [[1.0, 2.0, 3.0]])
    csv = tmp_path / "b.csv"
    csv.write_text("4, 5, 6\n\n7,8,9\n")  # no header, a blank line
    assert np.allclose(read_points(csv).points, [[4, 5, 6], [7, 8, 9]])
    index = _index_file(tmp_path / "c.txt", [[1, 2, 3]])
    affine = np.diag([2.0, 3.0, 4.0, 1.0])
    affine[:3, 3] = [10, 20, 30]
    assert read_points(index).kind == "index" and np.allclose(read_points(index).world(affine), [[12, 26, 42]])


def test_bad_landmark_files_are_refused_naming_the_file(tmp_path, lung_pair, capsys):
    _, _, fixed, moving, index, fixed_mm, moving_mm = lung_pair
    good = _index_file(tmp_path / "good.pts", index)
    cases = {
        "count.pts": ("point\n3\n1 2 3\n4 5 6\n", "line 2 says 3 point"),
        "word.pts": ("index\n1\n1 two 3\n", "line 3: expected three numbers"),
        "flat.pts": ("point\n1\n1 2\n", "line 3: expected three numbers x y z .3D points., got 2"),
        "nan.csv": ("x,y,z\n1,nan,3\n", "line 2: point holds NaN"),
        "empty.csv": ("x,y,z\n", "landmark file lists no points"),
        "other.txt": ("1 2 3\n", "not a landmark file"),
    }
    for name, (text, problem) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(BadInputError, match=f"{name}: {problem}"):
            read_points(tmp_path / name)
    with pytest.raises(BadInputError, match="two.csv: lists 2 point.s., the fixed landmarks .*good.pts list 8"):
        read_pair(good, _csv_file(tmp_path / "two.csv", moving_mm[:2]))

    out = tmp_path / "dvf.nii.gz"
    far = _csv_file(tmp_path / "lps_as_ras.csv", moving_mm * [-1.0, -1.0, 1.0] + [0.0, 300.0, 0.0])  # a mixed-up convention
    for landmarks, problem in [((good, tmp_path / "count.pts"), "count.pts: line 2 says 3"),
                               ((good, far), "lps_as_ras.csv: 8 point.s. lie outside .*moving.nii.gz, the first is point 1")]:
        assert main(["register", str(fixed), str(moving), "--out", str(out), "--landmarks", *map(str, landmarks), *FAST]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "Traceback" not in err
        assert re.search(problem, err), err
        assert not out.exists()  # refused before registering: nothing written
