"""The recipe contract: every entry of ``RECIPES`` passes the same checks at its tiniest size.

Each recipe declares its tiny example as data (``Recipe.tiny_example``, a
:class:`~medsynth.recipes.base.TinyExample`: phantom, prepare settings, config and overrides), so a
recipe added to ``RECIPES`` is run through phantom -> prepare -> train -> export/reload -> seeded
sampling -> evaluate -> report -> resume after a kill without more test code. A recipe without a
tiny example fails here. Phantom, preparation and training run once per recipe (module fixtures).
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import train_until_killed

from medsynth import api
from medsynth.config import read_yaml, validate_config
from medsynth.recipes import RECIPES, get_recipe
from medsynth.recipes.base import DataFormat, TinyExample, setting
from medsynth.report.html import MIN_CELL_PX, embedded_images

RESUME_EPOCHS = 6  # killed after its second epoch, so four are left to resume


def tiny_example(name: str) -> TinyExample:
    example = get_recipe(name).tiny_example
    if not isinstance(example, TinyExample):
        pytest.fail(f"recipe '{name}' declares no tiny_example (a medsynth.recipes.base.TinyExample): the contract tests need one")
    return example


def numbers(value: Any, key: str = "") -> list[tuple[str, float]]:
    """Every number in nested metrics, with its dotted key (None, strings and booleans are not numbers)."""
    if isinstance(value, dict):
        return [item for k, v in value.items() for item in numbers(v, f"{key}.{k}" if key else str(k))]
    if isinstance(value, (list, tuple)):
        return [item for k, v in enumerate(value) for item in numbers(v, f"{key}[{k}]")]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return [(key, float(value))]
    return []


@pytest.fixture(scope="module", params=list(RECIPES))
def name(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def prepared(name, tmp_path_factory) -> Path:
    example = tiny_example(name)
    root = tmp_path_factory.mktemp(name)
    raw = api.phantom(example.phantom, root / "raw", n=example.n, seed=0, size=example.size, **example.phantom_options)
    return api.prepare(raw, root / "prepared", recipe=name, progress=False, **example.prepare)


@pytest.fixture(scope="module")
def run(name, prepared, tmp_path_factory) -> Path:
    example = tiny_example(name)
    trained = api.train(name, data=prepared, config=example.config, overrides=[*example.overrides, "train.max_epochs=1"],
                        out=tmp_path_factory.mktemp(f"{name}-run") / "run", progress=False)
    return Path(trained.path)


@pytest.fixture(scope="module")
def metrics(run) -> dict[str, Any]:
    return api.evaluate(run)


def test_declares_a_tiny_example(name):
    tiny_example(name)


def test_declares_its_data_format_and_writes_in_its_units(name):
    recipe = get_recipe(name)
    assert isinstance(recipe.data_format, DataFormat), f"recipe '{name}' declares no data_format (a medsynth.recipes.base.DataFormat)"
    fmt, config = recipe.data_format, recipe.config_class()
    lo, hi = fmt.model_range
    ends = torch.tensor([lo, (lo + hi) / 2, hi])
    if fmt.window is None:  # the prepared [0, 1]
        assert torch.allclose(recipe.to_units(ends, config), torch.tensor([0.0, 0.5, 1.0]))
    else:  # HU through the run's window, wherever the config keeps it
        window = [-1000.0, 500.0]
        *path, last = fmt.window.split(".")
        setattr(setting(config, ".".join(path)) if path else config, last, window)
        assert torch.allclose(recipe.to_units(ends, config), torch.tensor([-1000.0, -250.0, 500.0]))


def test_trains_one_epoch_into_a_run(run):
    for file in ("config.yaml", "checkpoints/last.ckpt", "model.safetensors"):
        assert (run / file).is_file(), file
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 0


def test_exported_weights_reload_into_a_fresh_module(name, run):
    recipe = get_recipe(name)
    config = validate_config(recipe.config_class, read_yaml(run / "config.yaml"))
    fresh = recipe.build_module(config)
    weights = load_file(run / "model.safetensors")
    assert set(fresh.state_dict()) == set(weights)
    assert any(not torch.equal(tensor, weights[key]) for key, tensor in fresh.state_dict().items()), "trained = fresh weights"
    fresh.load_state_dict(weights, strict=True)
    for key, tensor in fresh.state_dict().items():
        assert tensor.dtype == weights[key].dtype and torch.equal(tensor, weights[key]), key
    with safe_open(run / "model.safetensors", framework="pt") as file:  # the weights carry their resolved config
        assert json.loads(file.metadata()["config"]) == config.model_dump(mode="json")


def test_one_seed_gives_byte_identical_files(run, tmp_path):
    first = api.sample(run, n=2, seed=3, out=tmp_path / "a")
    again = api.sample(run, n=2, seed=3, out=tmp_path / "b")
    other = api.sample(run, n=2, seed=4, out=tmp_path / "c")
    assert first and [p.relative_to(tmp_path / "a") for p in first] == [p.relative_to(tmp_path / "b") for p in again]
    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in again]
    assert [p.read_bytes() for p in first] != [p.read_bytes() for p in other]


# What a metric's name promises, for every recipe: (a word of the key, lowest, highest value).
METRIC_RANGES = (("accuracy", 0.0, 1.0), ("dice", 0.0, 1.0), ("folding", 0.0, 1.0), ("ssim", -1.0, 1.0), ("mm", 0.0, math.inf))
# Order statistics of one metric over items: a key with one of these words, and the same key with "mean" instead.
AT_MOST_THE_MEAN, AT_LEAST_THE_MEAN = ("min", "best_of_n"), ("max",)


def _with_mean(key: str, word: str) -> str:
    return f"_{key}_".replace(f"_{word}_", "_mean_", 1)[1:-1]


def test_evaluation_gives_the_headline_metrics_in_the_ranges_their_names_promise(name, run, metrics):
    found = numbers(metrics)
    assert found, "evaluate returned no numbers"
    assert [key for key, value in found if not math.isfinite(value)] == [], "not finite (return None for an undefined metric)"
    assert json.loads((run / "metrics.json").read_text()).keys() >= metrics.keys()
    assert set(get_recipe(name).headline_metrics) <= metrics.keys()
    values = dict(found)
    for key, value in found:
        words = key.replace(".", "_").split("_")
        for word, low, high in METRIC_RANGES:
            if word in words and "ratio" not in words:  # a ratio of two (segmenter_dice_ratio) may pass 1
                assert low <= value <= high, f"{key} = {value} outside [{low}, {high}]"
        assert not key.startswith(("n_", "downstream_n_")) or (value >= 0 and value == int(value)), f"{key} = {value}: not a count"
        for words_below, sign in ((AT_MOST_THE_MEAN, 1), (AT_LEAST_THE_MEAN, -1)):
            for word in words_below:
                mean = _with_mean(key, word)
                if mean != key and mean in values:  # min <= mean, best of n <= mean, max >= mean
                    assert sign * (values[mean] - value) >= -1e-9, f"{key} = {value} against {mean} = {values[mean]}"


def test_report_renders(name, run, metrics):
    report = api.report(run)
    assert report == run / "report.html" and report.is_file()
    page = report.read_text()
    assert name in page and "<table" in page
    assert "<h2>Data format</h2>" in page and html.escape(get_recipe(name).data_format.condition) in page
    images = embedded_images(page)  # each decodes, or this raises
    assert any(alt == "training curves" for alt, *_ in images)
    small = [(alt, shown) for alt, _, _, shown in images if shown < MIN_CELL_PX]
    assert small == [], "pictures shown narrower than a readable cell"


def test_resume_after_a_kill_continues_exactly(name, prepared, tmp_path):
    """Killed (SIGKILL) after an epoch and resumed, a run ends with the weights of an uninterrupted one."""
    example = tiny_example(name)
    killed = tmp_path / "killed"
    settings = [*example.overrides, f"train.max_epochs={RESUME_EPOCHS}"]
    args = [name, "--data", str(prepared), *(["--config", example.config] if example.config else []),
            *[arg for item in settings for arg in ("--set", item)]]
    killed_at = train_until_killed(args, killed)
    assert killed_at["epoch"] < RESUME_EPOCHS - 1 and not (killed / "model.safetensors").exists()

    resumed = api.train(resume=killed, progress=False)
    straight = api.train(name, data=prepared, config=example.config, overrides=settings, out=tmp_path / "straight", progress=False)
    steps_per_epoch = killed_at["global_step"] // (killed_at["epoch"] + 1)
    final = torch.load(Path(resumed.path) / "checkpoints" / "last.ckpt", weights_only=True)
    assert final["global_step"] == RESUME_EPOCHS * steps_per_epoch
    resumed_weights, straight_weights = load_file(str(resumed.weights_path)), load_file(str(straight.weights_path))
    assert resumed_weights.keys() == straight_weights.keys()
    assert all(torch.equal(resumed_weights[key], straight_weights[key]) for key in straight_weights)


def test_a_plan_of_its_data_trains_as_planned(name, prepared, tmp_path):
    """``medsynth plan`` on the recipe's own prepared data (from its tiny config, for a 24 GB card) writes a config that
    ``train`` takes as it is: one epoch, in the planned precision and batch."""
    example = tiny_example(name)
    made = api.plan(prepared, name, tmp_path / "plan.yaml", memory="24GB", config=example.config, overrides=example.overrides)
    planned = read_yaml(tmp_path / "plan.yaml")
    assert planned["train"]["batch_size"] == made.estimate.batch_size and planned["train"]["precision"] == made.estimate.precision
    run = api.train(name, data=prepared, config=tmp_path / "plan.yaml", overrides=["train.max_epochs=1"], out=tmp_path / "run",
                    progress=False)
    assert (Path(run.path) / "model.safetensors").is_file()
