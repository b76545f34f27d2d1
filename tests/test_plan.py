"""The planner: its estimate against a CPU measurement, ``train --dry-run``, ``medsynth plan`` and its refusals."""

from __future__ import annotations

import json
import re

import pytest

from medsynth import api
from medsynth.cli import main
from medsynth.config import CONFIG_DIR, load_config, read_yaml
from medsynth.errors import MedsynthError
from medsynth.plan import GPUS, count_steps, device_bytes, estimate, examples, measure_cpu
from medsynth.recipes import get_recipe

# One tiny case per recipe (motion-ldm: an autoencoder and the LDM; benchmarks/bench_plan.py runs every stage at
# three sizes): a step of 20-100 MB of gradients and activations in fp32, so
# that the allocator's few hundred KB of noise stay far below the 20 % the estimate must meet.
TINY = [
    {"recipe": "cvae", "config": "cvae-tiny", "size": [96, 96], "stage": "cvae", "batch_size": 8},
    {"recipe": "sdm", "config": "sdm-tiny", "size": [16, 16, 16], "stage": "low", "batch_size": 2},
    {"recipe": "flow-cvae", "config": "flow-cvae-tiny", "size": [32, 32, 32], "stage": "cvae", "batch_size": 2},
    {"recipe": "motion-ldm", "config": "motion-ldm-tiny", "size": [64, 64, 16], "stage": "image-ae", "batch_size": 2},
    {"recipe": "motion-ldm", "config": "motion-ldm-tiny", "size": [64, 64, 16], "stage": "ldm", "batch_size": 2},
    # gradient checkpointing (MONAI's, around the whole encoder and decoder) frees the forward's tensors: 40 MB, not 60
    {"recipe": "motion-ldm", "config": "motion-ldm-tiny", "size": [48, 48, 12], "stage": "image-ae", "batch_size": 2,
     "overrides": ["model.image_ae.use_checkpoint=true"]},
    {"recipe": "diffae", "config": "diffae-tiny", "size": [32, 32], "stage": "autoencoder", "batch_size": 8},
]
GPU_CONFIGS = ["cvae-224", "cvae-448", "sdm-low-64", "sdm-high-128", "flow-cvae-86", "motion-ldm-256", "diffae-128"]


def _config(case):
    return load_config(get_recipe(case["recipe"]).config_class, case["config"], case.get("overrides", ()), base={"recipe": case["recipe"]})


def test_estimate_agrees_with_measured_cpu_memory():
    """Gradients + saved activations (the estimate, on fake tensors) against the resident-memory high-water mark of
    the same step above the memory before it (measured, real tensors, fp32): within 20 % for every recipe."""
    from concurrent.futures import ThreadPoolExecutor

    cases = [{"overrides": []} | case | {"precision": "32"} for case in TINY]
    with ThreadPoolExecutor(1) as pool:
        measuring = pool.submit(measure_cpu, cases)  # its own process, while the estimates are counted here
        counts = [count_steps(next(e for e in examples(_config(case), case["size"]) if e.stage == case["stage"]),
                              [case["batch_size"]], "32", sample=False)[0] for case in cases]
        measured = measuring.result()
    for case, counted, result in zip(cases, counts, measured):
        assert result["step_bytes"] > 15e6, (case, result)  # large enough to judge at 20 %
        ratio = counted.step_bytes / result["step_bytes"]
        assert 0.8 <= ratio <= 1.2, f"{case['config']} {case['stage']}: estimated {counted.step_bytes}, measured {result['step_bytes']}"


def test_counts_are_linear_in_the_batch_and_bf16_halves_activations():
    example = examples(_config(TINY[0]), [64, 64])[0]
    one, two, four = count_steps(example, [1, 2, 4], "32")
    assert four.train_step_flops == pytest.approx(one.train_step_flops + 3 * (two.train_step_flops - one.train_step_flops), rel=1e-6)
    assert four.activation_bytes == pytest.approx(one.activation_bytes + 3 * (two.activation_bytes - one.activation_bytes), rel=1e-3)
    assert four.weight_bytes == one.weight_bytes and four.grad_bytes == one.grad_bytes
    assert four.optimizer_bytes == 2 * four.weight_bytes  # AdamW: two fp32 moments
    mixed = count_steps(example, [4], "bf16-mixed")[0]
    assert mixed.train_step_flops == four.train_step_flops
    assert 0.4 < mixed.activation_bytes / four.activation_bytes < 0.8  # bf16 activations, some fp32 kept (losses, casts)


@pytest.mark.parametrize(("recipe", "config", "size", "spread"), [
    ("sdm", "sdm-tiny", [16], [16, 16, 16]),  # data_format.spatial_dims 3: one size is a cube
    ("diffae", "diffae-tiny", [32], [32, 32]),  # 2: a square
    ("cvae", "cvae-tiny", [32, 32, 32], [32, 32, 32]),  # None (the data decides): 2 or 3 sizes as given
])
def test_one_size_is_spread_over_the_recipes_spatial_dims(recipe, config, size, spread):
    chosen = examples(_config({"recipe": recipe, "config": config}), size)
    assert get_recipe(recipe).input_size(chosen[0].config) == spread


@pytest.mark.parametrize(("recipe", "config", "size", "words"), [
    ("sdm", "sdm-tiny", [16, 16], "sdm: --size [16, 16]: one or three sizes (X Y Z)"),
    ("diffae", "diffae-tiny", [32, 32, 32], "diffae: --size [32, 32, 32]: one or two sizes (X Y)"),
    ("diffae", "diffae-tiny", [32, 16], "diffae: --size [32, 16]: slices are square"),
    ("cvae", "cvae-tiny", [32], "cvae: --size [32]: 2 or 3 sizes"),
])
def test_a_size_the_recipe_cannot_take_is_refused_in_one_line(recipe, config, size, words):
    with pytest.raises(MedsynthError, match=re.escape(words)):
        examples(_config({"recipe": recipe, "config": config}), size)


def test_a_recipe_without_plan_examples_is_refused_in_one_line():
    from medsynth.recipes.base import Recipe

    class Bare(get_recipe("cvae").__class__):  # a recipe that declares no plan examples (the base's default)
        name = "bare"
        plan_examples = Recipe.plan_examples

    with pytest.raises(MedsynthError, match="^recipe 'bare' declares no plan examples"):
        Bare().plan_examples(_config(TINY[0]), [32, 32])


@pytest.mark.parametrize("name", GPU_CONFIGS)
def test_shipped_gpu_config_fits_an_h100_in_bf16(name):
    recipe = read_yaml(CONFIG_DIR / f"{name}.yaml")["recipe"]
    result = estimate(load_config(get_recipe(recipe).config_class, name), sample=False)
    assert result.precision == "bf16-mixed"
    assert device_bytes(result.worst.peak_bytes) <= GPUS["h100-80gb"].memory_bytes, result.table()


def test_dry_run_writes_nothing_and_prints_json(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "cvae", "--config", "cvae-224", "--dry-run", "--out", str(out)]) == 0  # the size the config states
    assert not out.exists() and "cvae at 224x224, batch 32, bf16-mixed" in capsys.readouterr().out
    assert main(["train", "sdm", "--config", "sdm-tiny", "--dry-run", "--json", "--size", "16", "--out", str(out),
                 "--set", "train.batch_size=2", "--set", "sample.batch_size=4", "--set", "sample.guidance=1"]) == 0
    assert not out.exists()
    shown = json.loads(capsys.readouterr().out)
    assert shown["size"] == [16, 16, 16] and shown["batch_size"] == 2 and shown["precision"] == "32"
    # a training step of 2 volumes is ~3 forward passes of 2 (backward ~2x forward); a sampling call of 4 items
    # with guidance is 8 forward passes (conditional and null) on the same grid
    assert shown["params"] > 1e4 and 0.6 < shown["train_step_flops"] / shown["sample_step_flops"] < 0.9
    assert shown["peak_memory_bytes"] > 0 and set(shown["projected_step_seconds"]) == set(GPUS)
    # the projection is FLOPs over the stated fraction of the peak
    h100 = GPUS["h100-80gb"]
    assert shown["projected_step_seconds"]["h100-80gb"] == pytest.approx(
        shown["train_step_flops"] / (h100.bf16_tflops * 1e12 * shown["efficiency"]))


@pytest.fixture(scope="module")
def cilia(tmp_path_factory):
    root = tmp_path_factory.mktemp("plan")
    api.phantom("cilia", root / "raw", n=2, size=64, progress=False)  # cvae-224's five halvings leave 2 x 2
    return api.prepare(root / "raw", root / "prepared", recipe="cvae", size=64, normalize="none", seed=0, progress=False)


def test_plan_writes_a_config_that_trains(cilia, tmp_path, capsys):
    plan_path = tmp_path / "plan.yaml"
    assert main(["plan", str(cilia), "--recipe", "cvae", "--memory", "24GB", "--hours", "1", "--out", str(plan_path)]) == 0
    printed = capsys.readouterr().out
    assert "H100" in printed and str(plan_path) in printed
    planned = read_yaml(plan_path)
    assert planned["train"]["precision"] == "bf16-mixed" and planned["train"]["batch_size"] == 32  # cvae-224's batch fits
    assert planned["train"]["max_epochs"] >= 1 and "data_dir" not in planned
    run = tmp_path / "run"
    assert main(["train", "cvae", "--data", str(cilia), "--config", str(plan_path), "--out", str(run), "--no-progress",
                 "--set", "train.max_epochs=1", "--set", "train.num_threads=1"]) == 0  # as planned (bf16-mixed), one epoch
    assert (run / "model.safetensors").exists()


def test_plan_shrinks_the_batch_to_the_budget(cilia, tmp_path):
    """A budget one byte over what batch 5 needs: the plan takes batch 5 and accumulates 7 for cvae-224's 32."""
    config = get_recipe("cvae").resolve_config(load_config(get_recipe("cvae").config_class, "cvae-224", base={"data_dir": str(cilia)}))
    budget = device_bytes(estimate(config, batch_size=5, precision="bf16-mixed", sample=False).worst.peak_bytes) + 1
    made = api.plan(cilia, "cvae", tmp_path / "plan.yaml", memory=f"{budget / 1e6}MB")
    assert (made.estimate.batch_size, made.accumulate) == (5, 7)
    assert read_yaml(tmp_path / "plan.yaml")["train"]["accumulate_grad_batches"] == 7


@pytest.mark.parametrize(("argv", "words"), [
    (["--gpu", "h900"], "unknown GPU 'h900'"),
    (["--memory", "200MB"], "does not fit 200MB"),
    (["--memory", "lots"], "--memory 'lots'"),
])
def test_plan_refusals(cilia, tmp_path, capsys, argv, words):
    out = tmp_path / "plan.yaml"
    assert main(["plan", str(cilia), "--recipe", "cvae", "--out", str(out), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert words in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert not out.exists()


def test_plan_refuses_a_dataset_without_fingerprint(cilia, tmp_path, capsys):
    import shutil

    old = tmp_path / "old"
    shutil.copytree(cilia, old)
    (old / "fingerprint.json").unlink()
    assert main(["plan", str(old), "--recipe", "cvae", "--out", str(tmp_path / "plan.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert "fingerprint.json" in err and "re-run `medsynth prepare`" in err and len(err.splitlines()) == 1
