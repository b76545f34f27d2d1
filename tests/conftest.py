"""Shared fixtures: tests run on tiny sizes with few threads, deterministically."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

os.environ.setdefault("PYTHONHASHSEED", "0")


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)  # tiny test tensors: threads only add overhead
    yield


def train_until_killed(cli_args: list[str], run: Path, timeout: float = 240) -> dict:
    """Run ``medsynth train CLI_ARGS --out RUN`` in a subprocess, SIGKILL it once ``last.ckpt`` holds a
    finished epoch, and return that checkpoint (what a resumed run starts from)."""
    command = [sys.executable, "-m", "medsynth.cli", "train", *cli_args, "--out", str(run)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    last = run / "checkpoints" / "last.ckpt"
    deadline = time.time() + timeout
    try:
        while time.time() < deadline and process.poll() is None:
            if last.exists() and torch.load(last, weights_only=True)["epoch"] >= 1:
                break
            time.sleep(0.05)
        assert process.poll() is None, "training ended before it could be killed"
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait()
    return torch.load(last, weights_only=True)
