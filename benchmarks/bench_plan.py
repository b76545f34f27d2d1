"""medsynth plan (issue 22): the estimator against CPU measurement, and the shipped GPU configs' estimates.

``measure``: for every recipe (every stage of motion-ldm, both of sdm) at three sizes, the estimate of a training
step's memory (gradients + saved activations, counted on fake tensors) against the measured one (the resident-memory
high-water mark of the step above the memory before it, after a warm-up step, fp32, one thread, each size in a fresh
process: :func:`medsynth.plan.measure_cpu`), and the FLOP rate (estimated FLOPs / measured seconds, the median of
``--repeats`` steps): a correct FLOP count gives a rate that stays put across sizes. ``--precision bf16-mixed``
measures under CPU autocast instead.

``shipped``: each shipped GPU config at its stated size, bf16-mixed, batch as shipped: the table of BENCHMARKS.md.

``plan``: ``medsynth plan`` on each demo's prepared data (the demos' phantoms at their demo sizes) for
``--memory 24GB`` and ``--gpu h100-80gb``.

    .venv/bin/python benchmarks/bench_plan.py measure [--repeats 3] [--only cvae] [--stage high]
    .venv/bin/python benchmarks/bench_plan.py shipped
    .venv/bin/python benchmarks/bench_plan.py plan
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from medsynth.config import CONFIG_DIR, load_config, read_yaml
from medsynth.plan import GPUS, count_steps, device_bytes, estimate, examples, measure_cpu
from medsynth.recipes import get_recipe

# (recipe, config, overrides, stage, batch, three sizes): the tiny networks at growing sizes, a step of ~20 MB to
# ~1 GB; sdm high with patches of half the volume (the default), so that the patch grows with it
SWEEP = [
    ("cvae", "cvae-224", [], "cvae", 8, [[64, 64], [128, 128], [224, 224]]),
    ("sdm", "sdm-tiny", [], "low", 2, [[16] * 3, [24] * 3, [32] * 3]),
    ("sdm", "sdm-tiny-high", ["model.patch_size=null", "data.patches_per_volume=2"], "high", 1, [[32] * 3, [48] * 3, [64] * 3]),
    ("flow-cvae", "flow-cvae-tiny", [], "cvae", 2, [[32] * 3, [48] * 3, [64] * 3]),
    ("motion-ldm", "motion-ldm-tiny", [], "image-ae", 2, [[48, 48, 12], [64, 64, 16], [96, 96, 24]]),
    ("motion-ldm", "motion-ldm-tiny", [], "field-vae", 2, [[48, 48, 12], [64, 64, 16], [96, 96, 24]]),
    ("motion-ldm", "motion-ldm-tiny", [], "ldm", 2, [[48, 48, 12], [64, 64, 16], [96, 96, 24]]),
    ("motion-ldm", "motion-ldm-tiny", ["model.image_ae.use_checkpoint=true"], "image-ae", 2, [[48, 48, 12], [64, 64, 16], [96, 96, 24]]),
    ("diffae", "diffae-tiny", [], "autoencoder", 8, [[32, 32], [64, 64], [96, 96]]),
    ("class-diffusion", "class-diffusion-tiny", [], "diffusion", 8, [[64, 64], [128, 128], [192, 192]]),
]
GPU_CONFIGS = ["cvae-224", "cvae-448", "sdm-low-64", "sdm-high-128", "flow-cvae-86", "motion-ldm-256", "diffae-128"]
# The demos' data: (recipe, phantom, n, size, phantom options, prepare settings) as demo.py makes them.
DEMOS = [
    ("cvae", "cilia", 20, 64, {}, {"size": 64, "normalize": "none"}),
    ("sdm", "coronary", 6, 32, {}, {"size": 32, "ct_window": (-1000.0, 1000.0)}),
    ("flow-cvae", "cardiac", 4, 32, {"flow_pairs": "npy"}, {"size": 32}),
    ("motion-ldm", "lung", 4, (48, 48, 12), {"frames": 6}, {"ct_window": (-1000.0, 500.0)}),
    ("diffae", "cardiac", 4, 32, {"modality": "mri", "views": True, "frames": 2, "hr_factor": 4}, {"size": 32}),
]


def measure(args: argparse.Namespace) -> None:
    print(f"| recipe | stage | size | batch | estimated MB | measured MB | est./meas. | grads + saved MB | step s | GFLOP/step | GFLOP/s |"
          f"  ({args.precision})")
    print("|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for recipe, config_name, overrides, stage, batch, sizes in SWEEP:
        if (args.only and recipe not in args.only) or (args.stage and stage not in args.stage):
            continue
        config = load_config(get_recipe(recipe).config_class, config_name, overrides, base={"recipe": recipe})
        for size in sizes:
            case = {"recipe": recipe, "config": config_name, "overrides": overrides, "size": size, "stage": stage, "batch_size": batch,
                    "precision": args.precision, "repeats": args.repeats}
            measured = measure_cpu([case])[0]  # a fresh process per size
            example = next(e for e in examples(config, size) if e.stage == stage)
            counted = count_steps(example, [batch], args.precision, sample=False)[0]
            flops = counted.train_step_flops
            print(f"| {recipe} | {stage} | {'x'.join(map(str, size))} | {batch} | {counted.step_bytes / 1e6:.1f} | "
                  f"{measured['step_bytes'] / 1e6:.1f} | {counted.step_bytes / measured['step_bytes']:.3f} | "
                  f"{(counted.grad_bytes + counted.activation_bytes) / 1e6:.1f} | {measured['seconds']:.2f} | "
                  f"{flops / 1e9:.1f} | {flops / measured['seconds'] / 1e9:.1f} |", flush=True)


def shipped(args: argparse.Namespace) -> None:
    h100 = GPUS["h100-80gb"]
    print("| config | size | batch | params | weights+grads+AdamW GB | activations GB | peak GB | on the GPU GB | fits 80 GB | "
          "TFLOP/step | s/step H100 | s/item H100 | sampler calls x TFLOP/call |")
    print("|---|---|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---|")
    for name in GPU_CONFIGS:
        recipe = read_yaml(CONFIG_DIR / f"{name}.yaml")["recipe"]
        result = estimate(load_config(get_recipe(recipe).config_class, name))
        for c in result.stages:
            fixed = c.weight_bytes + c.grad_bytes + c.optimizer_bytes
            print(f"| {name} ({c.stage}) | {'x'.join(map(str, result.size))} | {c.batch_size} | {c.params / 1e6:.1f}M | {fixed / 1e9:.2f} | "
                  f"{c.activation_bytes / 1e9:.2f} | {c.peak_bytes / 1e9:.2f} | {device_bytes(c.peak_bytes) / 1e9:.1f} | "
                  f"{'yes' if device_bytes(c.peak_bytes) <= h100.memory_bytes else 'no'} | {c.train_step_flops / 1e12:.2f} | "
                  f"{c.train_step_flops / (h100.bf16_tflops * 1e12 * result.efficiency):.3f} | "
                  f"{c.sample_step_flops * c.sample_calls / c.sample_items / (h100.bf16_tflops * 1e12 * result.efficiency):.3g} | "
                  f"{c.sample_calls} x {c.sample_step_flops / 1e12:.3f} ({c.sample_items} items) |", flush=True)


def plan_demos(args: argparse.Namespace) -> None:
    from medsynth import api

    with tempfile.TemporaryDirectory() as tmp:
        for recipe, phantom, n, size, options, settings in DEMOS:
            if args.only and recipe not in args.only:
                continue
            raw, prepared = Path(tmp) / f"{recipe}-raw", Path(tmp) / f"{recipe}-prepared"
            api.phantom(phantom, raw, n=n, size=size, progress=False, **options)
            api.prepare(raw, prepared, recipe=recipe, progress=False, seed=0, **settings)
            for budget in ({"memory": "24GB"}, {"gpu": "h100-80gb"}):
                start = time.perf_counter()
                made = api.plan(prepared, recipe, Path(tmp) / f"{recipe}.yaml", force=True, **budget)
                e = made.estimate
                print(f"| {recipe} | {next(iter(budget.values()))} | {'x'.join(map(str, e.size))} | {e.batch_size} x {made.accumulate} | "
                      f"{e.worst.peak_bytes / 1e9:.2f} | {device_bytes(e.worst.peak_bytes) / 1e9:.1f} | "
                      f"{e.step_seconds(GPUS['h100-80gb']):.4f} | {time.perf_counter() - start:.0f} s |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    m = sub.add_parser("measure")
    m.add_argument("--repeats", type=int, default=3)
    m.add_argument("--precision", default="32", choices=["32", "bf16-mixed"])
    m.add_argument("--only", nargs="*", default=None, help="recipes")
    m.add_argument("--stage", nargs="*", default=None, help="stages")
    sub.add_parser("shipped")
    sub.add_parser("plan").add_argument("--only", nargs="*", default=None, help="recipes")
    args = parser.parse_args()
    {"measure": measure, "shipped": shipped, "plan": plan_demos}[args.command](args)


if __name__ == "__main__":
    main()
