"""Fixtures shared by the recipe tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from medsynth import api
from medsynth.data.phantoms.cilia import make_cilia_dataset


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """Cilia, 6 images a class at 32 px, prepared as cvae and class-diffusion read them (module-scoped, per test file)."""
    root = tmp_path_factory.mktemp("cilia")
    make_cilia_dataset(root / "raw", n_per_class=6, size=32, seed=0)
    return api.prepare(root / "raw", root / "prepared", size=32, normalize="none", seed=0, progress=False)
