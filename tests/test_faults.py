"""Fault injection through the CLI: every failure is one line, the right exit status, no traceback,
no file changed that should not be, nothing executed from a pickle.

A tiny cvae (32 px cilia, channels [8, 16], one epoch) is prepared and trained once per module;
each case works on a copy of that run. Cases that need a second process (a concurrent training,
Ctrl-C, a killed lock holder, two DDP ranks) start ``python -m medsynth.cli`` or a small lock holder.
"""

from __future__ import annotations

import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from medsynth import api
from medsynth.cli import main
from medsynth.config import read_yaml
from medsynth.runs import TEMP_SUFFIX

SRC = Path(__file__).resolve().parents[1] / "src"
TINY = ["--config", "cvae-tiny", "--set", "model.channels=[8, 16]", "--set", "model.strides=[2, 2]", "--set", "model.latent_size=4",
        "--set", "model.embed_dim=4", "--set", "train.batch_size=8", "--set", "train.num_threads=1", "--no-progress"]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("faults")
    raw = api.phantom("cilia", root / "raw", n=6, seed=0, size=32, progress=False)
    return api.prepare(raw, root / "prepared", recipe="cvae", progress=False, size=32, normalize="none", seed=0)


@pytest.fixture(scope="module")
def trained(prepared, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("trained") / "run"
    assert main(["train", "cvae", "--data", str(prepared), *TINY, "--set", "train.max_epochs=1", "--out", str(out)]) == 0
    return out


@pytest.fixture
def run(trained, tmp_path) -> Path:
    """A fresh copy of the trained run for one case."""
    return Path(shutil.copytree(trained, tmp_path / "run"))


def cli(capsys, *argv: str) -> tuple[int, str]:
    """``medsynth ARGV`` in this process: the exit status and medsynth's lines on stderr (Lightning's
    own notices, which go to its logger, are left out)."""
    code = main([str(arg) for arg in argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, "\n".join(line for line in err.splitlines() if line.startswith("medsynth"))


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (TensorBoard logs aside) and its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file() and "tb" not in p.parts}


def popen(*argv: str, cwd: Path | None = None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}
    # Ctrl-C as a terminal sends it, also when the suite itself runs in the background (`make test &`), where the
    # shell starts it with SIGINT ignored and a child would inherit that
    return subprocess.Popen([sys.executable, "-m", "medsynth.cli", *map(str, argv)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, cwd=cwd, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def wait_for(condition, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert process.poll() is None, f"process ended early: {process.communicate()[1][-2000:]}"
        assert time.time() < deadline, "timed out"
        time.sleep(0.1)


class Bomb:
    """A pickle that would create ``marker`` when unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


# -- corrupt, truncated and pickled weights and checkpoints -------------------------------------------


def test_truncated_weights_are_one_line_in_sample_evaluate_report(capsys, run):
    weights = run / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    before = snapshot(run)
    for command in ("sample", "evaluate", "report"):
        code, err = cli(capsys, command, run)
        assert code == 2 and err.startswith(f"medsynth: error: {weights}: cannot read weights") and len(err.splitlines()) == 1, err
    assert snapshot(run) == before and not (run / "samples").exists() and not (run / ".lock").exists()


def test_truncated_and_pickled_checkpoints_refuse_resume_and_change_nothing(capsys, run, tmp_path):
    last = run / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[:5000])
    before = snapshot(run)
    code, err = cli(capsys, "train", "--resume", run, "--set", "train.max_epochs=2")
    assert code == 2 and err.startswith(f"medsynth: error: {last}: truncated or corrupt checkpoint") and len(err.splitlines()) == 1
    assert snapshot(run) == before and not (run / "prev_config.yaml").exists()

    marker = tmp_path / "EXECUTED"
    last.write_bytes(pickle.dumps({"state_dict": Bomb(marker), "epoch": 0}))
    (run / "model.safetensors").write_bytes(pickle.dumps(Bomb(marker)))
    before = snapshot(run)
    code, err = cli(capsys, "train", "--resume", run, "--set", "train.max_epochs=2")
    assert code == 2 and err == f"medsynth: error: {last}: holds objects other than tensors (refused: never unpickled)"
    code, err = cli(capsys, "sample", run)
    assert code == 2 and "model.safetensors: cannot read weights" in err and len(err.splitlines()) == 1
    code, err = cli(capsys, "train", "cvae", "--data", read_yaml(run / "config.yaml")["data_dir"], *TINY, "--init", last,
                    "--out", tmp_path / "finetune")
    assert code == 2 and str(last) in err and len(err.splitlines()) == 1
    assert not marker.exists() and snapshot(run) == before and not (tmp_path / "finetune").exists()


# -- bad arguments and unavailable devices: nothing written ---------------------------------------------


@pytest.mark.parametrize(("argv", "words"), [
    (["--devices", "abc"], "train.devices='abc'"),
    (["--set", "train.accelerator=gpu"], "train.accelerator='gpu'"),
    (["--strategy", "nonsense"], "train.strategy='nonsense'"),
    (["--set", "train.lr=inf"], "--set train.lr=inf: train.lr: Input should be a finite number"),
    (["--set", "train.seed=99999999999999999"], "--set train.seed=99999999999999999: train.seed"),
])
def test_failed_starts_write_nothing(capsys, prepared, tmp_path, argv, words):
    out = tmp_path / "new"
    code, err = cli(capsys, "train", "cvae", "--data", prepared, *TINY, *argv, "--out", out)
    assert code == 2 and words in err and len(err.splitlines()) == 1, err
    assert not out.exists()


def test_failed_resume_keeps_config_and_prev_config(capsys, run):
    (run / "prev_config.yaml").write_text("recipe: cvae\n")  # as an earlier resume left it
    before = snapshot(run)
    for argv in (["--devices", "abc"], ["--set", "train.accelerator=gpu"], ["--set", "train.lr=-1"]):
        code, err = cli(capsys, "train", "--resume", run, *argv)
        assert code == 2 and len(err.splitlines()) == 1, err
    assert snapshot(run) == before


def test_sample_seed_out_of_range_is_one_line(capsys, run):
    with pytest.raises(SystemExit) as exit_:
        main(["sample", str(run), "--seed", "99999999999999999"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "seed 99999999999999999 is out of range" in err and len(err.strip().splitlines()) == 1


# -- nothing non-finite reaches a file --------------------------------------------------------------------


def test_divergence_stops_at_the_step_and_keeps_the_last_finite_checkpoint(capsys, prepared, tmp_path):
    out = tmp_path / "diverged"
    code, err = cli(capsys, "train", "cvae", "--data", prepared, *TINY, "--set", "train.lr=1e6", "--set", "train.checkpoint_every_n_steps=1",
                    "--out", out)
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("medsynth: error: training diverged: ") and " at step " in err and "learning rate is likely too high" in err
    assert f"kept the last finite checkpoint {out / 'checkpoints' / 'last.ckpt'} (epoch 0); no weights exported" in err
    checkpoint = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] >= 1 and all(torch.isfinite(t).all() for t in checkpoint["state_dict"].values())
    assert not (out / "model.safetensors").exists() and not (out / ".lock").exists()


def test_resume_removes_stale_checkpoint_temp_files(capsys, run):
    stale = run / "checkpoints" / f".last.ckpt.killed{TEMP_SUFFIX}"  # left by a kill during a checkpoint save
    stale.write_bytes(b"half a checkpoint")
    config = (run / "config.yaml").read_bytes()
    assert main(["train", "--resume", str(run), "--set", "train.max_epochs=2", "--set", "train.lr=0.5"]) == 0
    assert "--resume restores the optimiser and its learning-rate schedule from the checkpoint, so train.lr=0.5 does not apply" in \
        capsys.readouterr().err
    assert not stale.exists() and (run / "prev_config.yaml").read_bytes() == config
    assert read_yaml(run / "config.yaml")["train"]["max_epochs"] == 2


def test_sample_refuses_non_finite_outputs_and_keeps_earlier_samples(capsys, run):
    code, _ = cli(capsys, "sample", run, "--n", "2")
    earlier = snapshot(run / "samples")
    weights = run / "model.safetensors"
    save_file({k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in load_file(weights).items()}, weights)
    code, err = cli(capsys, "sample", run, "--n", "2", "--force")
    assert code == 2 and "hold NaN or infinity; nothing was written" in err and len(err.splitlines()) == 1
    assert snapshot(run / "samples") == earlier


# -- item 6: say what was done -----------------------------------------------------------------------------


def test_sample_force_replaces_the_previous_request_and_grid_says_its_count(capsys, run):
    assert cli(capsys, "sample", run, "--n", "3")[0] == 0
    assert cli(capsys, "sample", run, "--n", "1", "--force")[0] == 0
    classes = read_yaml(run / "config.yaml")["model"]["classes"]
    assert sorted(str(p.relative_to(run / "samples" / "random")) for p in (run / "samples" / "random").glob("*/*.png")) == \
        sorted(f"{c}/{c}_000.png" for c in classes)
    code = main(["sample", str(run), "--mode", "grid", "--n", "5"])
    err = capsys.readouterr().err
    assert code == 0 and f"grid: 2 x 2 = 4 images per class, {4 * len(classes)} in all" in err
    assert len(list((run / "samples" / "grid").glob("*/*.png"))) == 4 * len(classes)
    assert not list((run / "samples").glob(".staging-*"))


def test_cvae_refuses_condition(capsys, run, tmp_path):
    code, err = cli(capsys, "sample", run, "--condition", tmp_path / "missing.nii.gz")
    assert code == 2 and err == "medsynth: error: sample: --condition is not used by recipe 'cvae' (cvae is conditioned on classes: use --class NAME)"


# -- one process per run folder ---------------------------------------------------------------------------


def test_concurrent_training_is_refused_with_the_holders_pid_and_ctrl_c_exits_130(capsys, prepared, tmp_path):
    out = tmp_path / "busy"
    first = popen("train", "cvae", "--data", prepared, *TINY, "--set", "train.max_epochs=1000000", "--out", out)  # still running at the Ctrl-C, however slow the checks
    try:
        wait_for(lambda: (out / "checkpoints" / "last.ckpt").exists(), first)
        for argv in (["train", "cvae", "--data", prepared, *TINY, "--out", out, "--force"], ["train", "--resume", out], ["sample", out]):
            code, err = cli(capsys, *argv)
            assert code == 2 and err == (f"medsynth: error: {out}: busy: process {first.pid} is writing this run (lock {out / '.lock'}); "
                                         "wait for it to finish or stop it"), err
        first.send_signal(signal.SIGINT)
        _, stderr = first.communicate(timeout=60)
    finally:
        first.kill()
    assert first.returncode == 130 and "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1] == f"medsynth: interrupted; continue with `medsynth train --resume {out}`"
    assert not (out / ".lock").exists() and not (out / "model.safetensors").exists()


def test_a_killed_lock_holder_is_taken_over(capsys, run):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from medsynth.runs import Run\n"
                               "with Run(sys.argv[1]).lock():\n    print('held', flush=True); time.sleep(600)", str(run)],
                              stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(SRC)})
    try:
        assert holder.stdout.readline().strip() == "held"
        code, err = cli(capsys, "evaluate", run)
        assert code == 2 and f"busy: process {holder.pid}" in err
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (run / ".lock").read_text().strip() == str(holder.pid)  # the killed holder's file stays behind
    code = main(["sample", str(run), "--n", "1"])
    err = capsys.readouterr().err
    assert code == 0 and f"took over the lock left by process {holder.pid}, which no longer runs" in err
    assert not (run / ".lock").exists()


# -- several processes --------------------------------------------------------------------------------------


def test_two_cpu_processes_train_and_resume_one_complete_run(prepared, tmp_path):
    process = popen("train", "cvae", "--data", prepared, *TINY, "--set", "train.max_epochs=1", "--devices", "2", "--strategy", "ddp",
                    "--set", "train.accelerator=cpu", cwd=tmp_path)
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-3000:]
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1 and stdout.strip() == str(Path("runs") / runs[0].name)  # one folder, printed once (rank 0)
    run = runs[0]
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "config.yaml", "model.safetensors", "tb", "train.log"]
    assert all(torch.isfinite(t).all() for t in load_file(run / "model.safetensors").values())
    train = read_yaml(run / "config.yaml")["train"]
    assert train["effective_batch_size"] == 2 * train["batch_size"] and train["lr_scaling"] == "none"
    config = (run / "config.yaml").read_bytes()
    process = popen("train", "--resume", run, "--set", "train.max_epochs=2", "--devices", "2", "--strategy", "ddp", "--no-progress",
                    cwd=tmp_path)
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-3000:]
    assert (run / "prev_config.yaml").read_bytes() == config and read_yaml(run / "config.yaml")["train"]["max_epochs"] == 2
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 1 and len(list((tmp_path / "runs").iterdir())) == 1
