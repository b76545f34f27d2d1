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
