"""Bad input at the command line: one line on stderr naming the problem, exit status 2."""

from __future__ import annotations

import argparse
import subprocess
import sys

import numpy as np
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


@pytest.mark.parametrize("argv, words", [
    (("phantom", "lung", "--frames", "1"), ("lung", "frames")),
    (("phantom", "cardiac", "--frames", "1"), ("cardiac", "frames")),
    (("phantom", "cilia", "--modality", "ct"), ("cilia", "modality")),
    (("phantom", "coronary", "--flow-pairs"), ("coronary", "flow_pairs")),
])
def test_phantom_options_are_checked_per_phantom(capsys, tmp_path, argv, words):
    code, err = run_cli(capsys, *argv, "--out", str(tmp_path / "out"), "--n", "1", "--size", "16")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert all(word in err for word in words)
    assert not (tmp_path / "out").exists()  # refused before anything is written


def test_phantom_lung_frames_are_breathing_phases(capsys, tmp_path):
    code, _ = run_cli(capsys, "phantom", "lung", "--out", str(tmp_path), "--n", "1", "--size", "8", "--frames", "3", "--no-progress")
    assert code == 0 and sorted(p.name for p in (tmp_path / "sub000").glob("image_t*")) == [f"image_t0{t}.nii.gz" for t in range(3)]


def test_every_flag_has_help():
    """Walk every command's parser: every argument (positional or flag) says what it is for."""
    from medsynth.cli import COMMANDS, build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(commands.choices) == set(COMMANDS)
    for name, sub in [("medsynth", parser), *commands.choices.items()]:
        for action in sub._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            assert action.help, f"{name} {action.option_strings or action.dest}: no help text"
        flags = {flag for action in sub._actions for flag in action.option_strings}
        if name in ("prepare", "train", "register", "sample", "evaluate", "demo"):
            assert "--no-progress" in flags, name


def test_choices_come_from_the_registries():
    from medsynth.cli import build_parser
    from medsynth.data.phantoms import PHANTOMS
    from medsynth.data.prepare import Normalize
    from medsynth.recipes import RECIPES, get_recipe

    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices

    def choices(command: str, dest: str) -> set:
        return set(next(a for a in commands[command]._actions if a.dest == dest).choices)

    assert choices("phantom", "kind") == set(PHANTOMS)
    assert choices("prepare", "normalize") == {mode.value for mode in Normalize}
    assert choices("prepare", "recipe") == set(RECIPES)
    assert choices("sample", "mode") == {mode for name in RECIPES for mode in get_recipe(name).sample_modes}


def test_sample_refuses_a_mode_the_runs_recipe_lacks(tmp_path):
    from medsynth import api
    from medsynth.errors import MedsynthError
    from medsynth.recipes import RECIPES, get_recipe

    name, mode = next((name, mode) for name in RECIPES for other in RECIPES for mode in get_recipe(other).sample_modes
                      if mode not in get_recipe(name).sample_modes)
    (tmp_path / "config.yaml").write_text(f"recipe: {name}\n")
    with pytest.raises(MedsynthError, match=f"recipe '{name}' has no mode '{mode}'"):
        api.sample(tmp_path, mode=mode)


_LIGHT = ("import sys; {code}; heavy = [m for m in ('lightning', 'medsynth.recipes.cvae', 'medsynth.recipes.sdm', "
          "'matplotlib.pyplot') if m in sys.modules]; assert not heavy, heavy")


@pytest.mark.parametrize("code", [
    "import medsynth.cli, medsynth.api, medsynth.report.html",
    "from medsynth.cli import main; assert main(['phantom', 'cilia', '--out', sys.argv[1], '--n', '1', '--size', '32', '--no-progress']) == 0",
])
def test_commands_that_train_nothing_start_without_lightning_or_recipes(tmp_path, code):
    result = subprocess.run([sys.executable, "-c", _LIGHT.format(code=code), str(tmp_path / "cilia")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr


def test_register_data_prints_each_quality_line_once(capsys, tmp_path):
    from medsynth.data.phantoms.lung import make_lung_dataset

    data = make_lung_dataset(tmp_path / "lung", n=1, size=(16, 16, 8), seed=0, frames=3)
    for extra in ((), ("--no-progress",)):
        out = tmp_path / f"fields{len(extra)}"
        code = main(["register", "--data", str(data), "--out", str(out), "--set", "levels=1", "--set", "iterations=3", *extra])
        captured = capsys.readouterr()
        lines = [line for line in (captured.out + captured.err).splitlines() if "folding" in line]
        assert code == 0 and len(lines) == 2, lines  # phases 1 and 2 against phase 0, one line each


def test_register_config_takes_a_file_or_a_shipped_name(capsys, tmp_path):
    code, err = run_cli(capsys, "register", "--data", str(tmp_path), "--out", str(tmp_path / "o"), "--config", "no-such-config")
    assert code == 2 and "shipped configs" in err and len(err.strip().splitlines()) == 1


def test_demo_is_data_run_by_one_function(monkeypatch, capsys, tmp_path):
    """run_demo calls the API in order with the demo's data and prints the recipe's headline metrics."""
    from medsynth import api, demo
    from medsynth.recipes import get_recipe
    from medsynth.runs import Run

    calls = []
    run = Run.create(tmp_path / "cvae-run")
    metrics = {"classifier_accuracy_real": 0.91, "classifier_accuracy_generated": 0.5, "memorisation_max_ssim": 0.4,
               "memorisation_max_ssim_real_reference": 0.3, "mmd_classifier_features": 9.0, "tstr_accuracy": 0.8,
               "downstream_accuracy_with_generated": 0.7, "spectrum_ratio_high": 0.6}
    monkeypatch.setattr(api, "phantom", lambda kind, out, **kw: calls.append(("phantom", kind, kw)) or out)
    monkeypatch.setattr(api, "prepare", lambda src, out, **kw: calls.append(("prepare", kw)) or out)
    monkeypatch.setattr(api, "train", lambda recipe, **kw: calls.append(("train", recipe, kw["config"])) or run)
    monkeypatch.setattr(api, "sample", lambda path, **kw: calls.append(("sample", kw["mode"], kw["n"])) or [])
    monkeypatch.setattr(api, "evaluate", lambda path, **kw: metrics)
    monkeypatch.setattr(api, "report", lambda path: run.report_path)
    demo.run_demo("cvae", out=tmp_path, progress=False)
    spec = demo.DEMOS["cvae"]
    assert calls[0] == ("phantom", spec.phantom, {"n": spec.n, "seed": 0, "size": spec.size, "progress": False, "force": False})
    assert calls[2] == ("train", "cvae", spec.config)
    assert [c[1:] for c in calls if c[0] == "sample"] == [(call.mode, call.n) for call in spec.samples]
    err = capsys.readouterr().err
    for name in get_recipe("cvae").headline_metrics:
        assert name in err
    assert "memorisation_max_ssim_real_reference" in err and "mmd_classifier_features" not in err


def test_phantom_cardiac_flow_pairs_in_both_layouts(capsys, tmp_path):
    for flag, written in ((("--flow-pairs",), "template_img_0.npy"), (("--flow-pairs", "nifti"), "sub000/flow_es_ed.nii.gz")):
        out = tmp_path / "-".join(flag)
        code = main(["phantom", "cardiac", *flag, "--out", str(out), "--n", "1", "--size", "8", "--frames", "2", "--no-progress"])
        assert code == 0 and (out / written).is_file()
    with pytest.raises(SystemExit) as refused:  # argparse: one line, exit 2
        main(["phantom", "cardiac", "--flow-pairs", "png", "--out", str(tmp_path / "x"), "--n", "1"])
    assert refused.value.code == 2 and "--flow-pairs" in capsys.readouterr().err


@pytest.mark.parametrize("flow_shape, frame_value, bad, problem", [
    ((2, 6, 5, 4), 0.0, "flow_0.npy", "has 2 channel(s)"),
    ((3, 6, 5, 5), 0.0, "flow_0.npy", "differs from its frame template_img_0.npy"),
    ((3, 6, 5, 4), np.nan, "template_img_0.npy", "NaN"),
])
def test_bad_flow_pairs_are_one_line(capsys, tmp_path, flow_shape, frame_value, bad, problem):
    src = tmp_path / "pairs"
    src.mkdir()
    frame = np.zeros((6, 5, 4), np.float32)
    frame[0, 0, 0] = frame_value
    np.save(src / "template_img_0.npy", frame)
    np.save(src / "flow_0.npy", np.zeros(flow_shape, np.float32))
    code, err = run_cli(capsys, "prepare", str(src), "--out", str(tmp_path / "out"), "--no-progress")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert str(src / bad) in err and problem in err


def test_debug_shows_the_traceback(capsys, tmp_path, monkeypatch):
    from medsynth.errors import BadInputError

    with pytest.raises(BadInputError):
        main(["--debug", "train", "--resume", str(tmp_path)])
    monkeypatch.setenv("MEDSYNTH_DEBUG", "1")
    with pytest.raises(BadInputError):
        main(["train", "--resume", str(tmp_path)])


@pytest.mark.parametrize(("raised", "code", "line"), [
    (RuntimeError("Overflow when unpacking long\nmore"), 2, "medsynth report: error: RuntimeError: Overflow when unpacking long (--debug shows the traceback)"),
    (OSError(28, "No space left on device"), 2, "medsynth report: error: OSError: [Errno 28] No space left on device (--debug shows the traceback)"),
    (KeyError("bug"), 1, "medsynth report: internal error: KeyError: 'bug' (please report it with the output of --debug)"),
    (KeyboardInterrupt(), 130, "medsynth: interrupted"),
])
def test_last_resort_handler_is_one_line(capsys, monkeypatch, tmp_path, raised, code, line):
    from medsynth import api

    def fail(run):
        raise raised

    monkeypatch.setattr(api, "report", fail)
    assert run_cli(capsys, "report", str(tmp_path)) == (code, line + "\n")


def test_a_bad_set_names_the_override(capsys, tmp_path):
    code, err = run_cli(capsys, "train", "cvae", "--data", str(tmp_path), "--config", "cvae-tiny", "--set", "train.batch_size=0")
    assert code == 2 and err.startswith("medsynth: error: --set train.batch_size=0: train.batch_size: Input should be greater")


def test_seeds_out_of_range_are_refused_by_the_parser(capsys, tmp_path):
    for argv in (["phantom", "cilia", "--out", str(tmp_path), "--seed", "-1"], ["sample", str(tmp_path), "--seed", "abc"]):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and "seed" in err and len(err.strip().splitlines()) == 1
