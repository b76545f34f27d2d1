"""Faults of `medsynth reconstruct` (and of loading a run's weights) through the CLI: every refusal is one line
before any work, naming the setting, the file or the distance; nothing is written.

Cases use a tiny cardiac view phantom (2 subjects, 24 px, 2 frames: the LAX views of one subject and the SAX
stack of the other are the "another subject" case), fake run folders (a config.yaml is all `reconstruct` reads
before loading a prior) and, for the weights, a cvae run made without training (a checkpoint of its untrained
module).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medsynth import api
from medsynth.cli import main
from medsynth.config import dump_config
from medsynth.data.phantoms.cardiac_views import make_cardiac_phantom
from medsynth.inverse import ReconstructSettings
from medsynth.inverse import reconstruct as reconstruction
from medsynth.inverse.reconstruct import BASELINES, METHOD_SPECS, estimate_bytes, lax_distance_mm
from medsynth.recipes import get_recipe
from medsynth.training import DIVERGED_NAME


@pytest.fixture(scope="module")
def subjects(tmp_path_factory) -> Path:
    return make_cardiac_phantom(tmp_path_factory.mktemp("views"), n=2, seed=0, size=24, frames=2, modality="mri", views=True,
                                hr_factor=2)


def cli(capsys, *argv) -> tuple[int, str]:
    """``medsynth ARGV`` in this process: the exit status and medsynth's lines on stderr (no progress bars)."""
    code = main([str(arg) for arg in argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, "\n".join(line for line in err.splitlines() if line.startswith(("medsynth", "reconstruct")) or ": no model" in line)


def _inputs(subjects: Path, sax_of: str = "sub000", lax_of: str = "sub000") -> list[str]:
    return ["--sax", str(subjects / sax_of / "sa.nii.gz"), "--lax", str(subjects / lax_of / "la_2ch.nii.gz"),
            str(subjects / lax_of / "la_4ch.nii.gz")]


def _fake_run(folder: Path, recipe: str, **extra) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(json.dumps({"recipe": recipe, **extra}))
    return folder


# 1. settings: bounded, and read by the chosen method ------------------------------------------------------------

def test_every_setting_is_read_by_some_method_and_the_baselines_read_none():
    read = {key for spec in METHOD_SPECS.values() for key in spec.reads}
    assert read == set(ReconstructSettings.model_fields)
    assert all(not METHOD_SPECS[name].reads and METHOD_SPECS[name].step_size is None for name in BASELINES)
    assert {METHOD_SPECS["pnp"].step_size, METHOD_SPECS["latent"].step_size} == {"pnp_lr", "lr"}


@pytest.mark.parametrize(("method", "setting", "expected"), [
    ("pnp", "iterations=2", "reconstruct --set iterations: not used by method 'pnp' (its iterations are pnp_iterations)"),
    ("latent", "pnp_lr=0.1", "reconstruct --set pnp_lr: not used by method 'latent' (its learning rate is lr)"),
    ("pnp", "steps=3", "reconstruct --set steps: not used by method 'pnp' (it reads pnp_iterations"),
    ("cubic", "iterations=2", "reconstruct --set iterations: not used by method 'cubic' (the interpolation baselines take no settings; "
                              "iterations is read by 'latent')"),
    ("pnp", "iteration=2", "reconstruct --set iteration: no such setting (method 'pnp' reads pnp_iterations, pnp_lr"),
    ("pnp", "seed=99999999999999999999", "reconstruct --set: seed: Input should be less than or equal to 4294967295"),
    ("pnp", "pnp_lr=1e38", "reconstruct --set: pnp_lr: Input should be less than or equal to 10"),
    ("pnp", "pnp_lr=1e400", "reconstruct --set: pnp_lr: Input should be a finite number"),
    ("latent", "lax_weight=-1", "reconstruct --set: lax_weight: Input should be greater than or equal to 0"),
    ("latent", "percentiles=[60, 40]", "reconstruct --set: percentiles: needs 0 <= low < high <= 100"),
])
def test_a_setting_the_method_does_not_read_or_out_of_bounds_is_refused_before_any_work(subjects, tmp_path, capsys, method,
                                                                                       setting, expected):
    code, err = cli(capsys, "reconstruct", "-", *_inputs(subjects), "--method", method, "--set", setting,
                    "--out", tmp_path / "x.nii.gz")
    assert code == 2 and err.startswith(f"medsynth: error: {expected}") and len(err.splitlines()) == 1, err
    assert list(tmp_path.iterdir()) == []


def test_the_help_example_names_keys_of_the_default_method(capsys):
    with pytest.raises(SystemExit):
        main(["reconstruct", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps the help
    latent_part = text.split("--set KEY=VALUE")[-1].split("latent:")[1].split(";")[0]
    assert {part.split("=")[0].strip() for part in latent_part.split(",")} <= set(METHOD_SPECS["latent"].reads)


# 2. a run of the wrong recipe -------------------------------------------------------------------------------------

def test_a_run_of_another_recipe_is_refused_for_every_method_and_a_prior_is_not_loaded_for_a_baseline(subjects, tmp_path, capsys):
    flow = _fake_run(tmp_path / "flow", "flow-cvae")
    for method in ("cubic", "pnp"):
        code, err = cli(capsys, "reconstruct", flow, *_inputs(subjects), "--method", method, "--out", tmp_path / "x.nii.gz")
        assert code == 2 and "a run of recipe 'flow-cvae'" in err and len(err.splitlines()) == 1, err
    assert "give '-' or no run" in cli(capsys, "reconstruct", flow, *_inputs(subjects), "--method", "linear",
                                       "--out", tmp_path / "x.nii.gz")[1]
    ddim = _fake_run(tmp_path / "ddim", "ddim")  # there is no recipe 'ddim': the DDIM baseline is a diffae run
    assert "unknown recipe 'ddim'" in cli(capsys, "reconstruct", ddim, *_inputs(subjects), "--method", "pnp",
                                           "--out", tmp_path / "x.nii.gz")[1]
    assert not (tmp_path / "x.nii.gz").exists()
    diffae = _fake_run(tmp_path / "diffae", "diffae", model={"semantic": False, "image_size": 24})  # no weights: never loaded
    code, err = cli(capsys, "reconstruct", diffae, *_inputs(subjects), "--method", "linear", "--factor", "2", "--no-progress",
                    "--out", tmp_path / "x.nii.gz")
    assert code == 0 and "uses no prior" in err and (tmp_path / "x.nii.gz").exists()


# 3. an output that is not a NIfTI ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["x.png", "x.npy", "x"])
def test_an_out_that_is_not_a_nifti_is_refused_before_any_work(subjects, tmp_path, capsys, name):
    code, err = cli(capsys, "reconstruct", "-", *_inputs(subjects), "--method", "cubic", "--out", tmp_path / name)
    assert code == 2 and "must be a NIfTI file" in err and len(err.splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


# 4. LAX views that miss the stack, or come from another subject -------------------------------------------------------

def test_a_lax_plane_that_misses_the_stack_is_refused_with_its_distance(subjects, tmp_path, capsys):
    sa = nib.load(str(subjects / "sub000/sa.nii.gz"))
    la = nib.load(str(subjects / "sub000/la_2ch.nii.gz"))
    assert lax_distance_mm(sa.affine, sa.shape, la.affine, la.shape) == 0.0
    # a plane parallel to the SAX slices, its pixels above the stack's voxels, 37.5 mm beyond the last slice
    normal = sa.affine[:3, 2] / np.linalg.norm(sa.affine[:3, 2])
    beyond = np.array(sa.affine, dtype=np.float64)
    beyond[:3, 3] += (sa.shape[2] - 1) * sa.affine[:3, 2] + 37.5 * normal
    plane = (sa.shape[0], sa.shape[1], 1, sa.shape[3])
    assert lax_distance_mm(sa.affine, sa.shape, beyond, plane) == pytest.approx(37.5, abs=1e-6)
    beyond[:3, 3] -= 37.5 * normal  # on the last slice: inside
    assert lax_distance_mm(sa.affine, sa.shape, beyond, plane) == pytest.approx(0.0, abs=1e-6)
    beyond[:3, 3] += 37.5 * normal
    away = tmp_path / "away.nii.gz"
    nib.save(nib.Nifti1Image(np.ones(plane, dtype=np.float32), beyond), str(away))
    code, err = cli(capsys, "reconstruct", "-", "--sax", subjects / "sub000/sa.nii.gz", "--lax", away, "--method", "linear",
                    "--out", tmp_path / "x.nii.gz")
    assert code == 2 and str(away) in err and "does not intersect the SAX stack" in err and "37.5 mm" in err, err
    assert not (tmp_path / "x.nii.gz").exists()


def test_lax_views_of_another_subject_are_warned_with_their_correlation(subjects, tmp_path, capsys):
    code, err = cli(capsys, "reconstruct", "-", *_inputs(subjects), "--method", "linear", "--factor", "2", "--no-progress",
                    "--out", tmp_path / "own.nii.gz")
    assert code == 0 and "warning" not in err
    own = json.loads((tmp_path / "own_history.json").read_text())["lax_correlation"]
    code, err = cli(capsys, "reconstruct", "-", *_inputs(subjects, lax_of="sub001"), "--method", "linear", "--factor", "2",
                    "--no-progress", "--out", tmp_path / "other.nii.gz")
    other = json.loads((tmp_path / "other_history.json").read_text())["lax_correlation"]
    # measured (seed 0, 24 px): own views r = 0.99 on both frames; the other subject's 0.69 - 0.80
    assert min(min(values) for values in own.values()) > 0.95
    assert max(max(values) for values in other.values()) < reconstruction.LAX_WARN_CORRELATION
    warnings = [line for line in err.splitlines() if "warning" in line]
    assert code == 0 and len(warnings) == 2 and all("correlation 0." in line and "another subject" in line for line in warnings)


# 5. memory and factor bounds, the one line at the start, progress ----------------------------------------------------

def test_a_factor_above_the_bound_or_an_estimate_above_free_memory_is_refused_before_any_work(subjects, tmp_path, capsys,
                                                                                              monkeypatch):
    code, err = cli(capsys, "reconstruct", "-", *_inputs(subjects), "--method", "cubic", "--factor", "1000000",
                    "--out", tmp_path / "x.nii.gz")
    assert code == 2 and "--factor 1000000 is above the bound 64" in err
    monkeypatch.setattr(reconstruction, "available_bytes", lambda: 10_000)
    code, err = cli(capsys, "reconstruct", "-", *_inputs(subjects), "--method", "cubic", "--factor", "8",
                    "--out", tmp_path / "x.nii.gz")
    assert code == 2 and "needs about" in err and "but 9.8 KiB is available" in err and "lower --factor" in err, err
    assert list(tmp_path.iterdir()) == []


def test_the_estimate_grows_with_the_fine_grid_and_the_start_line_names_it(subjects, tmp_path, capsys):
    settings = ReconstructSettings()
    cubic = estimate_bytes((24, 24), 17, 2, "cubic", settings)
    assert cubic == 4 * 24 * 24 * 17 * (3 * 2 + METHOD_SPECS["cubic"].copies)  # 3 T results + the working copies, float32
    assert estimate_bytes((24, 24), 33, 2, "cubic", settings) > cubic
    assert estimate_bytes((24, 24), 17, 2, "latent", settings) > estimate_bytes((24, 24), 17, 2, "pnp", settings) > cubic
    code = main(["reconstruct", "-", *_inputs(subjects), "--method", "cubic", "--factor", "4", "--out", str(tmp_path / "x.nii.gz")])
    err = capsys.readouterr().err
    starts = [line for line in err.splitlines() if line.startswith("reconstruct: method cubic")]
    assert code == 0 and len(starts) == 1 and "--factor 4" in starts[0] and "needs about" in starts[0] and "available" in starts[0]
    assert "reconstruct cubic" in err  # the progress bar (no --no-progress)


# 6. weights: the checkpoint used is named; a diverged run is refused ---------------------------------------------------

@pytest.fixture
def unfinished_run(tmp_path) -> Path:
    """A cvae run with a checkpoint of epoch 3 and no model.safetensors (its untrained module: made in a second)."""
    recipe = get_recipe("cvae")
    config = recipe.config_class.model_validate({"recipe": "cvae", "train": {"num_threads": 1}, "model": {
        "spatial_dims": 2, "in_shape": [1, 16, 16], "classes": ["a", "b"], "latent_size": 4, "channels": [8, 16], "strides": [2, 2],
        "embed_dim": 4}})
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    dump_config(config, run / "config.yaml")
    module = recipe.build_module(config)
    torch.save({"state_dict": module.state_dict(), "epoch": 3, "global_step": 12}, run / "checkpoints/last.ckpt")
    return run


def test_a_run_without_exported_weights_names_its_checkpoint_and_a_diverged_one_is_refused(unfinished_run, tmp_path, capsys):
    code, err = cli(capsys, "sample", unfinished_run, "--n", "1", "--out", tmp_path / "s", "--no-progress")
    assert code == 0
    assert f"{unfinished_run}: no model.safetensors (training did not finish); using {unfinished_run}/checkpoints/last.ckpt " \
           "from epoch 3" in err
    written = sorted(p.name for p in (tmp_path / "s").rglob("*") if p.is_file())
    (unfinished_run / DIVERGED_NAME).write_text(json.dumps({"message": "training diverged: the loss is nan at step 13 (epoch 3)",
                                                            "checkpoint_step": 12}))
    code, err = cli(capsys, "sample", unfinished_run, "--n", "1", "--out", tmp_path / "s", "--force", "--no-progress")
    assert code == 2 and len(err.splitlines()) == 1
    assert "training diverged (the loss is nan at step 13 (epoch 3))" in err and "last finite checkpoint" in err
    assert sorted(p.name for p in (tmp_path / "s").rglob("*") if p.is_file()) == written  # the earlier samples stay
    # a later checkpoint (a resumed training) is not the diverged one
    (unfinished_run / DIVERGED_NAME).write_text(json.dumps({"message": "training diverged", "checkpoint_step": 4}))
    assert cli(capsys, "sample", unfinished_run, "--n", "1", "--out", tmp_path / "s2", "--no-progress")[0] == 0


def test_a_real_divergence_leaves_its_record(tmp_path):
    """What fit() writes when FiniteGuard stops a training: the record weights_of reads."""
    from medsynth.errors import DivergedError
    from medsynth.runs import Run
    from medsynth.training import fit

    class Diverging:
        is_global_zero, interrupted = True, False

        def fit(self, *args, **kwargs):
            raise DivergedError("training diverged: the loss is nan at step 7 (epoch 1)")

    run = Run(tmp_path / "run")
    run.path.mkdir()
    with pytest.raises(DivergedError, match="no checkpoint was written"):
        fit(Diverging(), None, None, run)
    record = json.loads((run.path / DIVERGED_NAME).read_text())
    assert record == {"message": "training diverged: the loss is nan at step 7 (epoch 1)", "checkpoint_step": None}


# 7. a non-finite result names the method's step size -------------------------------------------------------------------

class NaNPrior:
    """A slice prior whose denoiser returns NaN (as a prior with NaN weights does)."""

    semantic, image_size = True, 24

    def encode_semantic(self, x):
        return x.flatten(1)[:, :4]

    def invert(self, x, z_sem, steps):
        return x

    def decode(self, z_sem, x_t, steps):
        return x_t * float("nan")

    def denoise(self, x, z_sem, timestep, noise):
        return x * float("nan")


@pytest.mark.parametrize(("method", "setting"), [("pnp", "pnp_lr (now 0.0005)"), ("latent", "lr (now 5e-05)")])
def test_a_non_finite_result_is_refused_naming_the_methods_step_size(subjects, tmp_path, capsys, monkeypatch, method, setting):
    run = _fake_run(tmp_path / "diffae", "diffae", model={"image_size": 24})
    monkeypatch.setattr(api, "load_run", lambda path: (None, None, NaNPrior()))
    iterations = "pnp_iterations=1" if method == "pnp" else "iterations=1"
    code, err = cli(capsys, "reconstruct", run, *_inputs(subjects), "--method", method, "--factor", "2", "--set", iterations,
                    "--set", "steps=1" if method == "latent" else "pnp_timestep=1", "--no-progress", "--out", tmp_path / "x.nii.gz")
    assert code == 2 and "hold NaN or infinity; nothing was written" in err and f"lower {setting}" in err, err
    assert not (tmp_path / "x.nii.gz").exists() and not (tmp_path / "x_history.json").exists()
    shutil.rmtree(run)
