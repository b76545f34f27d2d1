"""Fault injection on what commands write, through the CLI: nothing non-finite reaches a file, an ``--out``
never clobbers an input, an existing ``--out`` needs ``--force`` (and ``phantom --force`` leaves nothing of
the old dataset), files follow the umask, and a newline in a file name cannot split the one-line error.

One tiny lung phantom (one subject, 24 x 24 x 12, two phases) is made per module; cases that change files
work on a copy of it.
"""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest

from medsynth import api
from medsynth.cli import main
from medsynth.data.io import load_image, save_image
from medsynth.motion import phase_series, registration
from test_faults import cli, snapshot

LUNG = ["lung", "--n", "1", "--size", "24", "24", "12", "--frames", "2", "--no-progress"]
FAST = ["--config", "register-demo", "--set", "iterations=[2,1]", "--no-progress"]


@pytest.fixture(scope="module")
def lung(tmp_path_factory) -> Path:
    return api.phantom("lung", tmp_path_factory.mktemp("outputs") / "lung", n=1, seed=0, size=(24, 24, 12), frames=2, progress=False)


@pytest.fixture
def phases(lung, tmp_path) -> tuple[Path, Path]:
    """The two phases of a copy of the phantom: FIXED, MOVING."""
    copy = Path(shutil.copytree(lung, tmp_path / "lung"))
    return copy / "sub000" / "image_t00.nii.gz", copy / "sub000" / "image_t01.nii.gz"


def stack(path: Path) -> Path:
    """A tiny SAX stack (8 x 8 px of 2 mm, 3 slices 8 mm apart), enough for reconstruct's header checks and baselines."""
    values = np.random.default_rng(0).random((1, 8, 8, 3), dtype=np.float32)
    return save_image(values, path, affine=np.diag([2.0, 2.0, 8.0, 1.0]))


def diverging(real):
    """``register_batch`` whose optimiser diverged: the fitted coefficients are NaN."""
    def fit(*args, **kwargs):
        results = real(*args, **kwargs)
        for transform, _ in results:
            transform.coefficients = transform.coefficients * float("nan")
        return results
    return fit


def test_a_diverged_registration_writes_nothing_and_names_learning_rate(capsys, monkeypatch, phases, tmp_path):
    fixed, moving = phases
    monkeypatch.setattr(registration, "register_batch", diverging(registration.register_batch))
    for out in (tmp_path / "f.nii.gz", tmp_path / "grid.npz"):  # the dense field and the control grid
        code, err = cli(capsys, "register", fixed, moving, "--out", out, *FAST, "--set", "learning_rate=0.3")
        assert code == 2 and len(err.splitlines()) == 1 and not out.exists()
        assert "hold NaN or infinity; nothing was written" in err and "lower learning_rate (now 0.3)" in err
        assert "folding" not in err
    monkeypatch.setattr(phase_series, "register_batch", diverging(phase_series.register_batch))
    out = tmp_path / "fields"
    code, err = cli(capsys, "register", "--data", fixed.parent.parent, "--out", out, *FAST)
    assert code == 2 and len(err.splitlines()) == 1 and "lower learning_rate (now 0.3)" in err
    assert not list(out.rglob("*.npz"))
    # the quality line of a non-finite result never claims a folding share (NaN has no det <= 0)
    line = registration.RegistrationResult("a", "b", out, "lncc", 0.5, float("nan"), 0.0, 1.0).line()
    assert "not finite" in line and "folding 0.000%" not in line


def test_an_out_that_is_an_input_is_refused_and_the_input_kept(capsys, phases, tmp_path):
    fixed, moving = phases
    sax = stack(tmp_path / "sa.nii.gz")
    (tmp_path / "hard.nii.gz").hardlink_to(moving)
    (tmp_path / "link.nii.gz").symlink_to(fixed)
    before = snapshot(tmp_path)
    cases = [
        (("register", fixed, moving, "--out", moving, *FAST), "--out is the input"),
        (("register", fixed, moving, "--out", tmp_path / "hard.nii.gz", "--force", *FAST), "--out is the input"),
        (("register", fixed, moving, "--out", tmp_path / "link.nii.gz", "--force", *FAST), "--out is the input"),
        (("register", "--data", fixed.parent.parent, "--out", fixed.parent, *FAST), "--out is inside the input folder"),
        (("reconstruct", "-", "--sax", sax, "--method", "linear", "--factor", "2", "--out", sax, "--force"), "--out is the input"),
        (("render", fixed, "--out", fixed, "--force"), "--out is the input"),
        (("prepare", fixed.parent.parent, "--out", fixed.parent, "--no-progress"), "--out is inside the input folder"),
        (("prepare", fixed.parent, "--out", fixed.parent.parent, "--no-progress"), "--out holds the input"),
    ]
    for argv, problem in cases:
        code, err = cli(capsys, *argv)
        assert code == 2 and len(err.splitlines()) == 1 and problem in err, (argv, err)
    assert snapshot(tmp_path) == before


def test_an_existing_out_needs_force(capsys, phases, tmp_path):
    fixed, moving = phases
    sax = stack(tmp_path / "sa.nii.gz")
    field, movie, volume = tmp_path / "f.nii.gz", tmp_path / "m.gif", tmp_path / "fine.nii.gz"
    commands = {field: ("register", fixed, moving, "--out", field, *FAST),
                movie: ("render", fixed.parent.parent / "sub000", "--out", movie),
                volume: ("reconstruct", "-", "--sax", sax, "--method", "linear", "--factor", "2", "--out", volume)}
    for out, argv in commands.items():
        out.write_bytes(b"earlier result")
        code, err = cli(capsys, *argv)
        assert code == 2 and len(err.splitlines()) == 1 and "already exists; pass --force" in err, err
        assert out.read_bytes() == b"earlier result"
        assert cli(capsys, *argv, "--force")[0] == 0
    assert load_image(field).shape == (3, 24, 24, 12)  # a mm field on the fixed image's grid
    assert movie.read_bytes()[:6] == b"GIF89a"
    assert load_image(volume).shape == (1, 8, 8, 5)  # (3 - 1) * 2 + 1 slices


def test_phantom_force_replaces_the_whole_dataset_and_only_a_phantom(capsys, tmp_path):
    out, fresh = tmp_path / "lung", tmp_path / "fresh"
    assert cli(capsys, "phantom", "lung", "--out", out, "--n", "2", "--size", "20", "20", "10", "--frames", "3", "--no-progress")[0] == 0
    before = snapshot(out)
    code, err = cli(capsys, "phantom", *LUNG, "--out", out)
    assert code == 2 and "already exists and is not empty; pass --force" in err and snapshot(out) == before
    assert cli(capsys, "phantom", *LUNG, "--out", out, "--force")[0] == 0
    assert cli(capsys, "phantom", *LUNG, "--out", fresh)[0] == 0
    # what --force leaves is what a fresh folder gets: no stale phase, size or subject of the old dataset
    assert snapshot(out) == snapshot(fresh) and sorted(p.name for p in tmp_path.iterdir()) == ["fresh", "lung"]
    mine = tmp_path / "notes"
    mine.mkdir()
    (mine / "thesis.txt").write_text("mine")
    code, err = cli(capsys, "phantom", *LUNG, "--out", mine, "--force")
    assert code == 2 and "not one" in err and (mine / "thesis.txt").read_text() == "mine" and len(list(mine.iterdir())) == 1


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_files_follow_the_umask(capsys, tmp_path, umask):
    old = os.umask(umask)
    try:
        assert cli(capsys, "phantom", *LUNG, "--out", tmp_path / "lung")[0] == 0
    finally:
        os.umask(old)
    modes = {stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "lung").rglob("*") if p.is_file()}
    assert modes == {0o666 & ~umask}


def test_a_newline_in_a_file_name_cannot_split_the_error_line(capsys, phases, tmp_path):
    fixed, _ = phases
    broken, existing = tmp_path / "phase\n1.nii.gz", tmp_path / "old\nfield.nii.gz"
    broken.write_bytes(b"not a NIfTI")
    existing.write_bytes(b"x")
    for argv, name in (((fixed, broken, "--out", tmp_path / "f.nii.gz"), broken),  # the reader's refusal
                       ((fixed, fixed, "--out", existing), existing)):  # the --out check's
        code = main(["register", *map(str, argv), *FAST])
        err = capsys.readouterr().err  # all of stderr: a split line would show as two
        assert code == 2 and err.count("\n") == 1 and err.startswith("medsynth: error: ") and repr(str(name)) in err, err
