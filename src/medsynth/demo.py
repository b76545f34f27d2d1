"""``medsynth demo``: each recipe's whole chain on a phantom, sized to finish in minutes on a CPU.

A demo is data (:class:`Demo`: the phantom and its options, the prepare settings, the
recipe and its shipped config, the sample calls), derived from the recipe's own
``tiny_example`` with the demo's sizes on top (:data:`DEMO_SIZES`), so every recipe of
``RECIPES`` has one; :func:`run_demo` runs any of them: phantom -> prepare -> train ->
sample -> evaluate -> report, then prints the recipe's headline metrics beside their
references. This module sits above :mod:`medsynth.api`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from medsynth import api
from medsynth.console import console, step
from medsynth.errors import MedsynthError
from medsynth.recipes import RECIPES, get_recipe
from medsynth.report.headline import headlines, rounded


@dataclass(frozen=True)
class SampleCall:
    """One ``api.sample`` call of a demo.

    ``condition`` is a file of the phantom's folder (relative to it); ``out`` a folder under
    the run's ``samples/`` (default: the samples folder itself).
    """

    n: int | None = None
    mode: str = "random"
    condition: str | None = None
    out: str | None = None


@dataclass(frozen=True)
class Demo:
    """One recipe's demo: what to make, how to prepare it, what to train and sample."""

    recipe: str
    config: str | None  # a shipped config name (configs/<name>.yaml)
    phantom: str
    n: int  # images per class (cilia) or subjects
    size: int | tuple[int, ...]  # the phantom's grid: one side, or (X, Y, Z)
    summary: str  # the phantom step's line
    phantom_options: dict[str, Any] = field(default_factory=dict)
    prepare: dict[str, Any] = field(default_factory=dict)  # api.prepare settings (``recipe`` fills the rest)
    samples: tuple[SampleCall, ...] = (SampleCall(),)
    seed: int = 0  # of the phantom, the prepared split and the samples
    register: dict[str, Any] | None = None  # api.register settings: the phantom is registered and its fields train the recipe
    overrides: tuple[str, ...] = ()  # config overrides of the training run (the demo's size)
    baseline: tuple[str, ...] | None = None  # overrides of a second run on the same data (diffae: the DDIM baseline)
    reconstruction: tuple[str, ...] | None = None  # evaluate --reconstruction of the phantom's held-out subjects, with these overrides


MERGED = ("phantom_options", "prepare")  # DEMO_SIZES settings laid over the tiny example's; the others replace it

# Each shipped demo's own sizes: only what differs from its recipe's ``tiny_example`` (the phantom, config and the
# rest come from there). ``overrides`` replace the tiny example's (those make a test run tiny; a demo sets its own).
# A recipe of RECIPES with no entry here gets a demo from its tiny example alone.
DEMO_SIZES: dict[str, dict[str, Any]] = {
    # Cilia phantom -> prepare (64 px) -> train cvae (configs/cvae-tiny.yaml) -> sample -> evaluate -> report.
    "cvae": dict(
        n=160, size=64, summary="cilia phantom (5 classes)", prepare={"size": 64}, overrides=(),
        samples=(SampleCall(n=16), SampleCall(n=49, mode="grid"), SampleCall(n=8, mode="interpolate")),
    ),
    # Coronary phantom -> prepare (the recipe's defaults: HU window -1000..1000 -> [0, 1], crop) -> train the
    # sdm low-res stage (configs/sdm-tiny.yaml) -> sample held-out label maps and one label-map file.
    "sdm": dict(
        n=40, size=24, summary="coronary phantom (CTCA-like, 9 labels)", overrides=(),
        samples=(SampleCall(n=4), SampleCall(condition="labelsTr/coronary_000.nii.gz", out="condition")),
    ),
    # Cardiac phantom flow pairs (ES frame + exact ES->ED field) at 32^3 -> prepare (the recipe's defaults: HU window ->
    # [0, 1]) -> train flow-cvae (configs/flow-cvae-tiny.yaml) -> prior flows on held-out frames, a 5 x 5 latent grid.
    "flow-cvae": dict(
        n=28, size=32, summary="cardiac phantom (flow pairs)", prepare={"size": 32},
        # the utility protocol's five downstream arms (issue 18) at its own budget (DOWNSTREAM_STEPS, 600 steps each)
        overrides=(),
        samples=(SampleCall(n=8), SampleCall(n=25, mode="grid")),
    ),
    # Lung 4D CT phantom (6 phases, 48 x 48 x 12) -> B-spline registration of every phase to end-inhale -> prepare (HU window to [0, 1])
    # -> train motion-ldm's three stages (configs/motion-ldm-tiny.yaml) on the registered fields -> every phase of
    # two samples for each held-out CT, with 4D CT, fields and movies.
    "motion-ldm": dict(
        n=12, size=(48, 48, 12), summary="lung 4D CT phantom (6 phases)", phantom_options={"frames": 6},
        register={"pairs": "reference", "config": "register-demo"}, samples=(SampleCall(n=2),),
        overrides=("evaluate.downstream_steps=300",),  # five downstream arms (issue 18) within the 15-minute budget
    ),
    # Cardiac cine-MRI phantom in the UK Biobank layout (12 subjects, 32 px planes, ED/ES, thin truth at 4x through-plane)
    # -> 2D slices (32 px) -> train diffae and its DDIM baseline (model.semantic=false) -> random, interpolate, autoencode ->
    # evaluate, with every reconstruction method on a held-out subject (ED and ES) at demo settings (10 DDIM steps,
    # 4 Adam iterations for latent) -> report with a figure per method and the optimisation curves.
    "diffae": dict(
        n=12, size=32, summary="cardiac cine-MRI phantom (UK Biobank layout)", phantom_options={"hr_factor": 4}, prepare={"size": 32},
        # diffae-tiny's own model ([32, 64, 64] + attention) took 5 min per 15 epochs on this CPU: a smaller model here,
        # 40 epochs (32 encoder + UNet, about 2 min per run); one held-out subject (ED and ES) at 10 DDIM steps, inverted
        # with 20 fixed-point refinements per step (50.0 dB round trips against 44.9 with the default 10).
        overrides=("model.channels=[16, 32, 32]", "model.attention_levels=[false, false, false]", "model.encoder_channels=[8, 16, 32]",
                   "model.semantic_dim=32", "model.stage_epochs=32", "train.max_epochs=40", "sample.steps=10", "evaluate.steps=10",
                   "sample.inversion_iterations=20", "evaluate.n_generated=32"),
        baseline=("model.semantic=false",),
        samples=(SampleCall(n=16), SampleCall(n=2, mode="interpolate"), SampleCall(n=8, mode="autoencode")),
        reconstruction=("evaluate.reconstruction_subjects=1", "evaluate.segmenter_epochs=15", "evaluate.reconstruct.steps=10",
                        "evaluate.reconstruct.iterations=4"),
    ),
}


def demo_of(name: str) -> Demo:
    """Recipe ``name``'s demo: its ``tiny_example`` (phantom, options, prepare settings, config, overrides) with the
    entry of :data:`DEMO_SIZES` on top; the prepare step always takes the recipe's ``prepare_defaults``.

    Raises:
        MedsynthError: no such recipe, or it declares no tiny example.
    """
    example = get_recipe(name).tiny_example
    if example is None:
        raise MedsynthError(f"recipe '{name}' declares no tiny_example, so it has no demo")
    prepare = dict(example.prepare)
    seed = int(prepare.pop("seed", 0))  # the demo's one seed: phantom, split and samples
    derived = Demo(recipe=name, config=example.config, phantom=example.phantom, n=example.n, size=example.size,
                   summary=f"{example.phantom} phantom", phantom_options=dict(example.phantom_options),
                   prepare={"recipe": name, **prepare}, seed=seed, overrides=tuple(example.overrides))
    own = dict(DEMO_SIZES.get(name, {}))
    for key in MERGED:
        own[key] = {**getattr(derived, key), **own.get(key, {})}
    return replace(derived, **own)


class _Demos(Mapping[str, Demo]):
    """Every recipe's demo by name, derived when asked for (:func:`demo_of`): the names are ``RECIPES``' at that time,
    so a newly registered recipe is listed (the CLI's choices) without an edit here."""

    def __getitem__(self, name: str) -> Demo:
        if name not in RECIPES:
            raise KeyError(name)
        return demo_of(name)

    def __iter__(self) -> Iterator[str]:
        return iter(list(RECIPES))

    def __len__(self) -> int:
        return len(RECIPES)


DEMOS: Mapping[str, Demo] = _Demos()


def run_demo(name: str = "cvae", out: str | Path = "demo-output", force: bool = False, progress: bool = True) -> Path:
    """Run demo ``name`` into ``out`` and return its report; the phantom is kept unless ``force``."""
    if name not in DEMOS:
        raise MedsynthError(f"no demo for recipe '{name}' (demos: {', '.join(DEMOS)})")
    demo, out, start = DEMOS[name], Path(out), time.time()
    raw, prepared, run_dir = out / demo.phantom, out / f"{demo.phantom}-prepared", out / f"{demo.recipe}-run"
    step("demo", f"1/6 {demo.summary}")
    if force or not raw.is_dir() or not any(raw.iterdir()):
        api.phantom(demo.phantom, raw, n=demo.n, seed=demo.seed, size=demo.size, progress=progress, force=force, **demo.phantom_options)
    overrides = list(demo.overrides)
    if demo.register is not None:  # registered grids are kept like the phantom: a rerun skips them
        step("demo", f"1/6 register the phases ({demo.register.get('pairs', 'reference')} pairs)")
        registration = out / f"{demo.phantom}-registration"
        api.register(data=raw, out=registration, progress=progress, force=force, **demo.register)
        overrides.append(f"data.registration={registration.resolve()}")
    step("demo", "2/6 prepare")
    api.prepare(raw, prepared, seed=demo.seed, progress=progress, **demo.prepare)
    step("demo", f"3/6 train {demo.recipe}")
    run = api.train(demo.recipe, data=prepared, config=demo.config, overrides=overrides, out=run_dir, force=True, progress=progress)
    evaluate_overrides = list(demo.reconstruction or ())
    if demo.baseline is not None:  # the same data and settings, the baseline's switches on top
        step("demo", f"3/6 train the {demo.recipe} baseline ({', '.join(demo.baseline)})")
        baseline = api.train(demo.recipe, data=prepared, config=demo.config, overrides=[*overrides, *demo.baseline],
                             out=out / f"{demo.recipe}-baseline-run", force=True, progress=progress)
        evaluate_overrides.append(f"evaluate.ddim_run={baseline.path.resolve()}")
    step("demo", "4/6 sample (" + ", ".join(call.mode if call.condition is None else "a label-map file" for call in demo.samples) + ")")
    for call in demo.samples:
        api.sample(run.path, n=call.n, mode=call.mode, condition=raw / call.condition if call.condition else None,
                   out=run.samples / call.out if call.out else None, seed=demo.seed, force=True, progress=progress)
    step("demo", "5/6 evaluate" + (" (+ reconstruction of the held-out subjects by every method)" if demo.reconstruction is not None else ""))
    metrics = api.evaluate(run.path, progress=progress, reconstruction=raw if demo.reconstruction is not None else None,
                           overrides=evaluate_overrides)
    step("demo", "6/6 report")
    report = api.report(run.path)
    shown: dict[str, Any] = {}
    for headline in headlines(metrics, get_recipe(demo.recipe).headline_metrics):
        shown[headline.name] = rounded(headline.value)
        if headline.reference_name:
            shown[headline.reference_name] = rounded(headline.reference)
    console.print(json.dumps(shown, indent=2))
    console.print(f"[bold green]done[/] in {time.time() - start:.0f} s: metrics {run.metrics_path}")
    print(report)
    return report
