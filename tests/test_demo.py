"""Demos come from each recipe's ``tiny_example`` plus the demo's own sizes (medsynth.demo): the five shipped demos are
derived exactly as they were written out by hand before (the literals below), and a recipe with no demo entry gets a
demo from its tiny example alone."""

from __future__ import annotations

import pytest

from medsynth import demo
from medsynth.data.prepare import PrepareConfig
from medsynth.demo import Demo, SampleCall
from medsynth.recipes import RECIPES, LazyRecipe, get_recipe
from medsynth.recipes.base import TinyExample

# demo.DEMOS as written out by hand before the demos were derived from the recipes (commit 050f169)
BEFORE = {
    "cvae": dict(
        recipe="cvae", config="cvae-tiny", phantom="cilia", n=160, size=64, summary="cilia phantom (5 classes)",
        phantom_options={}, prepare={"size": 64, "normalize": "none"},
        samples=(SampleCall(n=16), SampleCall(n=49, mode="grid"), SampleCall(n=8, mode="interpolate")),
        seed=0, register=None, overrides=(), baseline=None, reconstruction=None,
    ),
    "sdm": dict(
        recipe="sdm", config="sdm-tiny", phantom="coronary", n=40, size=24, summary="coronary phantom (CTCA-like, 9 labels)",
        phantom_options={}, prepare={"recipe": "sdm"},
        samples=(SampleCall(n=4), SampleCall(condition="labelsTr/coronary_000.nii.gz", out="condition")),
        seed=0, register=None, overrides=(), baseline=None, reconstruction=None,
    ),
    "flow-cvae": dict(
        recipe="flow-cvae", config="flow-cvae-tiny", phantom="cardiac", n=28, size=32, summary="cardiac phantom (flow pairs)",
        phantom_options={"flow_pairs": True}, prepare={"recipe": "flow-cvae", "size": 32},
        samples=(SampleCall(n=8), SampleCall(n=25, mode="grid")),
        seed=0, register=None, overrides=(), baseline=None, reconstruction=None,
    ),
    "motion-ldm": dict(
        recipe="motion-ldm", config="motion-ldm-tiny", phantom="lung", n=12, size=(48, 48, 12), summary="lung 4D CT phantom (6 phases)",
        phantom_options={"frames": 6}, prepare={"recipe": "motion-ldm", "ct_window": (-1000.0, 500.0)},
        samples=(SampleCall(n=2),), seed=0, register={"pairs": "reference", "config": "register-demo"},
        overrides=("evaluate.downstream_steps=300",), baseline=None, reconstruction=None,
    ),
    "diffae": dict(
        recipe="diffae", config="diffae-tiny", phantom="cardiac", n=12, size=32, summary="cardiac cine-MRI phantom (UK Biobank layout)",
        phantom_options={"modality": "mri", "views": True, "frames": 2, "hr_factor": 4}, prepare={"recipe": "diffae", "size": 32},
        samples=(SampleCall(n=16), SampleCall(n=2, mode="interpolate"), SampleCall(n=8, mode="autoencode")), seed=0, register=None,
        overrides=("model.channels=[16, 32, 32]", "model.attention_levels=[false, false, false]", "model.encoder_channels=[8, 16, 32]",
                   "model.semantic_dim=32", "model.stage_epochs=32", "train.max_epochs=40", "sample.steps=10", "evaluate.steps=10",
                   "sample.inversion_iterations=20", "evaluate.n_generated=32"),
        baseline=("model.semantic=false",),
        reconstruction=("evaluate.reconstruction_subjects=1", "evaluate.segmenter_epochs=15", "evaluate.reconstruct.steps=10",
                        "evaluate.reconstruct.iterations=4"),
    ),
}


def prepare_config(settings: dict, seed: int) -> PrepareConfig:
    """What ``api.prepare(raw, out, seed=seed, **settings)`` hands to prepare_dataset: the recipe's defaults under the settings."""
    settings = dict(settings)
    recipe = settings.pop("recipe", None)
    defaults = get_recipe(recipe).prepare_defaults if recipe is not None else {}
    return PrepareConfig(**{**defaults, **settings, "seed": seed})


@pytest.mark.parametrize("name", list(BEFORE))
def test_each_shipped_demo_is_derived_as_it_was_written_out(name):
    derived, expected = demo.DEMOS[name], BEFORE[name]
    assert isinstance(derived, Demo)
    for key, value in expected.items():
        if key != "prepare":
            assert getattr(derived, key) == value, key
    # The prepare step sees the same settings (the recipe's defaults beneath the demo's): the same prepared dataset.
    made, before = prepare_config(derived.prepare, derived.seed), prepare_config(expected["prepare"], expected["seed"])
    assert made == before and made.digest() == before.digest()


def test_every_recipe_has_a_demo_and_the_cli_offers_it(capsys):
    from medsynth.cli import main

    assert list(demo.DEMOS) == list(RECIPES)
    assert "class-diffusion" in demo.DEMOS  # no entry in demo.DEMO_SIZES: its tiny example alone
    with pytest.raises(SystemExit) as refused:
        main(["demo", "nope"])
    err = capsys.readouterr().err
    assert refused.value.code == 2 and "invalid choice: 'nope'" in err
    assert "(choose from " + ", ".join(repr(name) for name in RECIPES) + ")" in err


def test_a_new_recipe_gets_a_demo_from_its_tiny_example_alone(monkeypatch):
    example = TinyExample(phantom="cilia", n=3, size=16, phantom_options={"noise": 0.1}, prepare={"size": 16, "seed": 4},
                          config="cvae-tiny", overrides=("model.latent_size=2",))

    class Sixth:
        name, tiny_example = "sixth", example

    lazy = LazyRecipe("medsynth.recipes.cvae", "CVAERecipe")
    lazy._recipe = Sixth()  # what the lazy entry loads: the fixture recipe
    monkeypatch.setitem(RECIPES, "sixth", lazy)
    made = demo.DEMOS["sixth"]
    assert "sixth" in list(demo.DEMOS)
    assert (made.recipe, made.config, made.phantom, made.n, made.size) == ("sixth", "cvae-tiny", "cilia", 3, 16)
    assert made.phantom_options == {"noise": 0.1} and made.overrides == ("model.latent_size=2",)
    assert made.prepare == {"recipe": "sixth", "size": 16} and made.seed == 4  # the tiny example's split seed is the demo's seed
    assert made.samples == (SampleCall(),) and made.summary == "cilia phantom"
    assert made.register is None and made.baseline is None and made.reconstruction is None


def test_a_demo_of_an_unknown_recipe_is_one_line(tmp_path):
    from medsynth.errors import MedsynthError

    assert "nope" not in demo.DEMOS
    with pytest.raises(MedsynthError, match="no demo for recipe 'nope'"):
        demo.run_demo("nope", out=tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
