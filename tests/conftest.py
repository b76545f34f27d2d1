"""Shared fixtures: tests run on tiny sizes with few threads, deterministically."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("PYTHONHASHSEED", "0")


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)  # tiny test tensors: threads only add overhead
    yield
