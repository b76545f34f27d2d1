"""A sixth recipe added by one file (tests/recipes/staged_fixture.py) and its entry in ``RECIPES``: the CLI offers its
declared stages to ``train --stage``, it trains stage by stage through the shared stage code, and it passes the
contract tests (tests/recipes/test_contract.py's, collected here again on it)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import recipes.test_contract as contract
from medsynth import api
from medsynth.cli import build_parser, main
from medsynth.data.datasets import load_split, stack_items
from medsynth.errors import BadInputError, MedsynthError
from medsynth.recipes import RECIPES, get_recipe
from medsynth.training import load_module
from recipes.staged_fixture import ENTRY, NAME, GaussianPrior

TESTS = Path(__file__).resolve().parents[1]

# The contract's fixtures and tests, collected here again: this module's `name` gives them the fixture recipe.
prepared, run, metrics = contract.prepared, contract.run, contract.metrics
globals().update({key: test for key, test in vars(contract).items() if key.startswith("test_")})


@pytest.fixture(scope="module")
def name(tmp_path_factory) -> str:
    """The fixture recipe, registered in ``RECIPES`` for this module, and in the ``medsynth train`` processes the resume
    test starts (a ``sitecustomize`` on their PYTHONPATH registers it there)."""
    site = tmp_path_factory.mktemp("site")
    (site / "sitecustomize.py").write_text("from recipes.staged_fixture import register\n\nregister()\n")
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(RECIPES, NAME, ENTRY)
        patch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(site), str(TESTS), os.environ.get("PYTHONPATH")) if p))
        yield NAME


def weights(trained, prefix: str) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_file(str(trained.weights_path)).items() if k.startswith(prefix)}


def same_autoencoder(a, b) -> bool:
    """Whether two runs hold bit-identical autoencoder weights."""
    first, second = weights(a, "autoencoder."), weights(b, "autoencoder.")
    return bool(first) and first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_the_cli_offers_its_declared_stages(name, capsys, monkeypatch):
    assert get_recipe(name).stage_choices() == ("all", "autoencoder", "prior")
    assert build_parser("train").parse_args(["train", name, "--stage", "prior"]).stage == "prior"
    monkeypatch.setenv("COLUMNS", "1000")  # argparse wraps the help at the terminal's width
    with pytest.raises(SystemExit):
        build_parser("train").parse_args(["train", "--help"])
    shown = capsys.readouterr().out
    assert f"{name}: all|autoencoder|prior" in shown and "sdm: low|high" in shown
    assert main(["train", "cvae", "--data", "nowhere", "--stage", "prior"]) == 2  # not a cvae stage: one line, before any read
    assert capsys.readouterr().err.strip() == ("medsynth: error: train --stage prior: recipe 'cvae' has no stage 'prior': "
                                               "it has no stages (no --stage)")


def test_the_demo_list_offers_it_from_its_tiny_example(name):
    from medsynth.demo import DEMOS

    example = get_recipe(name).tiny_example
    assert name in DEMOS and build_parser("demo").parse_args(["demo", name]).recipe == name
    demo = DEMOS[name]
    assert (demo.phantom, demo.n, demo.size, demo.config) == (example.phantom, example.n, example.size, example.config)


def test_trains_stage_by_stage(name, prepared, tmp_path):  # noqa: F811 (the contract's fixture)
    recipe, example = get_recipe(name), get_recipe(name).tiny_example
    settings = [*example.overrides, "train.max_epochs=4"]  # the autoencoder 2 epochs, then the prior 2
    both = api.train(name, data=prepared, overrides=settings, out=tmp_path / "all", progress=False)
    alone = api.train(name, data=prepared, overrides=[*example.overrides, "train.max_epochs=2"], out=tmp_path / "autoencoder",
                      stage="autoencoder", progress=False)
    # The first two epochs of `all` are the autoencoder's alone (same schedule, data order, weights); then it is frozen.
    assert same_autoencoder(both, alone)
    assert not torch.equal(weights(alone, "prior.")["prior.mean"], weights(both, "prior.")["prior.mean"])

    with pytest.raises(MedsynthError, match="model.autoencoder_run"):  # the prior alone needs the autoencoder's run
        api.train(name, data=prepared, overrides=settings, out=tmp_path / "none", stage="prior", progress=False)
    prior = api.train(name, data=prepared, overrides=[*settings, f"model.autoencoder_run={alone.path}"], out=tmp_path / "prior",
                      stage="prior", progress=False)
    assert same_autoencoder(prior, alone)  # loaded from the autoencoder's run, and frozen
    module = load_module(prior.path, recipe)
    untrained = GaussianPrior(module.code_shape)
    with torch.no_grad():
        codes = module.autoencoder.encode(stack_items(load_split(prepared, "train"), "image").float())
        assert module.prior.nll(codes) < untrained.nll(codes)  # the prior stage fits the frozen codes (maximum likelihood)

    with pytest.raises(BadInputError, match="must be a run that trained the 'autoencoder' stage; this one trained prior"):
        api.train(name, data=prepared, overrides=[*settings, f"model.autoencoder_run={prior.path}"], out=tmp_path / "wrong",
                  stage="prior", progress=False)
    assert not (tmp_path / "none").exists() and not (tmp_path / "wrong").exists()  # refused before the first write
    assert recipe.ema_first_epoch(recipe.config_class(model={"autoencoder_epochs": 3})) == 3  # after the frozen autoencoder
    assert recipe.ema_first_epoch(recipe.config_class(model={"stage": "prior"})) == 0
