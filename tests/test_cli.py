"""Bad input at the command line: one line on stderr naming the problem, exit status 2."""

from __future__ import annotations

import subprocess
import sys

import pytest

from medsynth.cli import main


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().err


def test_unknown_recipe(capsys, tmp_path):
    code, err = run_cli(capsys, "train", "gan", "--data", str(tmp_path))
    assert code == 2 and err.strip() == "medsynth: error: unknown recipe 'gan' (known: " + err.split("(known: ")[1].strip()
    assert len(err.strip().splitlines()) == 1


def test_resume_on_a_folder_that_is_not_a_run(capsys, tmp_path):
    code, err = run_cli(capsys, "train", "--resume", str(tmp_path))
    assert code == 2 and "not a medsynth run" in err and str(tmp_path) in err


def test_sample_missing_run(capsys, tmp_path):
    code, err = run_cli(capsys, "sample", str(tmp_path / "missing"))
    assert code == 2 and "missing" in err


def test_unknown_config_key(capsys, tmp_path):
    code, err = run_cli(capsys, "train", "cvae", "--data", str(tmp_path), "--set", "train.epochs=3")
    assert code == 2 and "unknown config key 'train.epochs'" in err


def test_prepare_unsupported_layout(capsys, tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    code, err = run_cli(capsys, "prepare", str(tmp_path), "--out", str(tmp_path / "out"))
    assert code == 2 and str(tmp_path) in err


def test_console_script_has_no_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "medsynth.cli", "train", "--resume", str(tmp_path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_register_and_render_commands(capsys, tmp_path):
    from medsynth.data.phantoms.lung import make_lung_dataset
    from medsynth.motion.fields import load_field

    subject = make_lung_dataset(tmp_path / "lung", n=1, size=24, seed=0) / "sub000"
    field = tmp_path / "field.nii.gz"
    code, err = run_cli(capsys, "register", str(subject / "image_t05.nii.gz"), str(subject / "image_t00.nii.gz"),
                        "--out", str(field), "--set", "levels=1", "--set", "iterations=5")
    assert code == 0 and "folding" in err
    loaded = load_field(field)
    assert loaded.shape[0] == 3 and loaded.affine.shape == (4, 4)
    code, _ = run_cli(capsys, "render", str(subject), "--out", str(tmp_path / "movie.gif"), "--style", "magnitude")
    assert code == 0 and (tmp_path / "movie.gif").stat().st_size > 0
    code, err = run_cli(capsys, "register", str(subject / "image_t05.nii.gz"), str(tmp_path / "nope.nii.gz"), "--out", str(field))
    assert code == 2 and "nope.nii.gz" in err
