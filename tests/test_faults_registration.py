"""Fault injection through the CLI for `medsynth register` (issue 17: Why 3, 5, 6): settings recorded and compared,
settings out of bounds, constant images. Every failure is one line, exit 2, no traceback, nothing written or lost."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medsynth.cli import main
from medsynth.data.phantoms.lung import make_lung_dataset
from medsynth.motion.bspline import load_transform

FAST = ["--config", "register-demo", "--set", "iterations=[3, 2]", "--no-progress"]


def cli(capsys, *argv) -> tuple[int, str]:
    """``medsynth ARGV`` in this process: the exit status and stderr."""
    code = main([str(arg) for arg in argv])
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    return code, err


@pytest.fixture(scope="module")
def lung(tmp_path_factory) -> Path:
    return make_lung_dataset(tmp_path_factory.mktemp("faults") / "lung", n=2, frames=3, size=(24, 24, 12), seed=1)


def _grids(out: Path) -> dict[str, int]:
    return {path.relative_to(out).as_posix(): path.stat().st_mtime_ns for path in sorted(out.rglob("grid_t*.npz"))}


def test_a_rerun_with_other_settings_is_refused_naming_them_and_the_same_settings_resume(capsys, tmp_path, lung):
    out = tmp_path / "registered"
    assert cli(capsys, "register", "--data", lung, "--out", out, *FAST)[0] == 0
    record = json.loads((out / "registration.json").read_text())
    assert record["settings"]["control_spacing_mm"] == 25.0 and record["settings"]["iterations"] == [3, 2]
    assert record["settings"]["similarity"] == "lncc" and "device" not in record["settings"]
    made = _grids(out)
    assert len(made) == 4

    code, err = cli(capsys, "register", "--data", lung, "--out", out, *FAST, "--set", "control_spacing_mm=15", "--set", "similarity=mse")
    assert code == 2 and len(err.splitlines()) == 1
    assert "registration.json: grids here were made with other settings (control_spacing_mm: 25.0 -> 15.0, similarity: lncc -> mse)" in err
    assert "--force" in err and _grids(out) == made  # nothing redone, nothing lost
    code, err = cli(capsys, "register", "--data", lung, "--out", out, *FAST, "--pairs", "consecutive", "--reference-phase", "1")
    assert code == 2 and "(pairs: reference -> consecutive, reference_phase: 0 -> 1)" in err

    code, err = cli(capsys, "register", "--data", lung, "--out", out, *FAST, "--set", "device=cpu", "--set", "mi_bins=16")
    assert code == 0 and _grids(out) == made  # neither the device nor an unused method's setting changes a grid: it resumes
    assert err.count("done earlier") == 4


def test_force_starts_over_and_leaves_no_old_grid(capsys, tmp_path, lung):
    out = tmp_path / "registered"
    assert cli(capsys, "register", "--data", lung, "--out", out, *FAST)[0] == 0
    one = tmp_path / "one"  # the same data less its second subject: its old grids must not stay beside the new ones
    shutil.copytree(lung, one)
    manifest = json.loads((one / "dataset.json").read_text())
    manifest["cases"] = [case for case in manifest["cases"] if case["subject"] == "sub000"]
    (one / "dataset.json").write_text(json.dumps(manifest))
    assert cli(capsys, "register", "--data", one, "--out", out, *FAST, "--set", "control_spacing_mm=15", "--force")[0] == 0
    assert list(_grids(out)) == ["sub000/grid_t01.npz", "sub000/grid_t02.npz"]
    spacing = np.asarray(load_transform(out / "sub000/grid_t01.npz")[0].control_spacing)
    voxel = np.linalg.norm(nib.load(str(one / "sub000/image_t00.nii.gz")).affine[:3, :3], axis=0)
    assert np.allclose(spacing * voxel, 15.0)  # made with the new settings
    assert json.loads((out / "registration.json").read_text())["settings"]["control_spacing_mm"] == 15.0
    assert list(json.loads((out / "registration.json").read_text())["subjects"]) == ["sub000"]


def test_a_folder_of_the_older_version_is_refused_until_forced(capsys, tmp_path, lung):
    out = tmp_path / "registered"
    assert cli(capsys, "register", "--data", lung, "--out", out, *FAST)[0] == 0
    record = json.loads((out / "registration.json").read_text())
    del record["settings"]  # as the older version wrote it
    (out / "registration.json").write_text(json.dumps(record))
    made = _grids(out)
    code, err = cli(capsys, "register", "--data", lung, "--out", out, *FAST)
    assert code == 2 and len(err.splitlines()) == 1 and "made by an older medsynth that did not record their settings: rerun with --force" in err
    assert _grids(out) == made
    assert cli(capsys, "register", "--data", lung, "--out", out, *FAST, "--force")[0] == 0
    assert "settings" in json.loads((out / "registration.json").read_text())
    assert all(_grids(out)[name] != stamp for name, stamp in made.items())  # registered again


@pytest.mark.parametrize(("setting", "problem"), [
    ("control_spacing_mm=0", "--set control_spacing_mm=0: control_spacing_mm: must be > 0"),
    ("control_spacing_mm=[20, -5, 20]", "control_spacing_mm: must be > 0"),
    ("learning_rate=1e30", "--set learning_rate=1e30: learning_rate: Input should be less than or equal to 10"),
    ("learning_rate=nan", "learning_rate: Input should be a finite number"),
    ("iterations=[3, 0]", "--set iterations=[3, 0]: iterations: must be an int in 1..100000"),
    ("regularisation=-1", "regularisation: Input should be greater than or equal to 0"),
    ("lncc_kernel=4", "lncc_kernel: must be odd"),
    ("spacing=3", "unknown config key 'spacing'"),
])
def test_settings_out_of_bounds_are_one_line_naming_them(capsys, tmp_path, lung, setting, problem):
    fixed, moving = lung / "sub000/image_t01.nii.gz", lung / "sub000/image_t00.nii.gz"
    code, err = cli(capsys, "register", fixed, moving, "--out", tmp_path / "dvf.nii.gz", *FAST, "--set", setting)
    assert code == 2 and len(err.splitlines()) == 1 and problem in err, err
    code, err = cli(capsys, "register", "--data", lung, "--out", tmp_path / "out", *FAST, "--set", setting)
    assert code == 2 and problem in err
    assert not (tmp_path / "dvf.nii.gz").exists() and not (tmp_path / "out").exists()


def test_a_constant_image_is_refused_before_anything_is_written(capsys, tmp_path, lung):
    fixed = lung / "sub000/image_t01.nii.gz"
    template = nib.load(str(fixed))
    for value in (0.0, -1000.0):
        blank = tmp_path / f"blank{value:g}.nii.gz"
        nib.save(nib.Nifti1Image(np.full(template.shape, value, np.float32), template.affine), str(blank))
        for pair in ((fixed, blank), (blank, fixed)):
            code, err = cli(capsys, "register", *pair, "--out", tmp_path / "dvf.nii.gz", *FAST)
            assert code == 2 and len(err.splitlines()) == 1
            assert f"blank{value:g}.nii.gz: constant image (every voxel {value:g}): nothing to register" in err
            assert not (tmp_path / "dvf.nii.gz").exists()

    data = tmp_path / "lung"
    shutil.copytree(lung, data)
    nib.save(nib.Nifti1Image(np.zeros(template.shape, np.float32), template.affine), str(data / "sub001/image_t02.nii.gz"))
    code, err = cli(capsys, "register", "--data", data, "--out", tmp_path / "out", *FAST)
    assert code == 2 and "sub001/image_t02.nii.gz: constant image (every voxel 0): nothing to register" in err
    assert list(_grids(tmp_path / "out")) == ["sub000/grid_t01.npz", "sub000/grid_t02.npz", "sub001/grid_t01.npz"]  # the good ones
