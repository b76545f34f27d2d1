"""Speed, memory and quality of the ``sdm`` recipe at its CPU sizes.

``step``: training-step time and peak memory of the low-res model (configs/sdm-tiny.yaml: whole
24^3 volumes, batch 2) and of the high-res model (configs/sdm-tiny-high.yaml: 16^3 patches of 32^3
volumes with their reference and position channels, batch 2 x 4 patches). Each model runs in a
fresh process on synthetic batches (the step's cost does not depend on the values); the time is
the median of the timed steps (forward, loss, backward, AdamW), the memory the growth of the
process's peak RSS from before the first step (CPU: activations, gradients, optimiser state) or ``torch.cuda.max_memory_allocated`` (GPU).

``sample``: sampling time per volume of a trained low-res run (default ``demo-output/sdm-run``,
made by ``medsynth demo sdm``) with DDPM (1000 steps), DDIM (50) and DPM-Solver++(2M) (20), all with
the run's guidance, from the same held-out label maps and seeds; the quality each reaches is the
Dice of the run's evaluation segmenter (trained on the real training split, as ``medsynth
evaluate`` does) on the samples against their label maps, beside its Dice on the real held-out
volumes. Also the patched high-res sampler's time per 32^3 volume (untrained weights: time only).

    .venv/bin/python benchmarks/bench_sdm.py step [--threads 2] [--steps 8]
    .venv/bin/python benchmarks/bench_sdm.py sample [--run demo-output/sdm-run] [--n 4] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from medsynth.config import load_config

NUM_CLASSES = 9  # the coronary phantom's labels, background included


def _module(config_name: str, shape: list[int], overrides: list[str] = ()):
    from medsynth.recipes.sdm import SDMConfig, SDMModule

    config = load_config(SDMConfig, config_name, list(overrides))
    model = config.model.model_copy(update={"image_shape": shape, "classes": [f"c{k}" for k in range(NUM_CLASSES)],
                                            "label_values": list(range(NUM_CLASSES))})
    return SDMModule(config.model_copy(update={"model": model}))


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def step_one(config_name: str, shape: list[int], steps: int, threads: int) -> dict:
    """Time ``steps`` training steps of one model (run in its own process)."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    module = _module(config_name, shape).to(device)
    batch_size = module.config.train.batch_size
    optimizer = torch.optim.AdamW(module.parameters(), lr=module.config.train.lr)
    generator = torch.Generator().manual_seed(0)
    batch = {"image": torch.rand(batch_size, 1, *shape, generator=generator).to(device),
             "label": torch.randint(0, NUM_CLASSES, (batch_size, 1, *shape), generator=generator).to(device)}

    def one_step() -> float:
        start = time.perf_counter()
        x0, cond = module.training_pair(batch)
        loss, _ = module.loss(module.net, x0, cond)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    before = _rss_mib()  # model, optimiser (no state yet) and batch in memory
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    one_step()  # warm-up: allocator, kernels, optimiser state
    times = [one_step() for _ in range(steps)]
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else _rss_mib() - before
    x0, _ = module.training_pair(batch)
    return {"config": config_name, "stage": module.config.model.stage, "input": list(x0.shape), "device": device,
            "threads": threads, "step_s_median": statistics.median(times), "step_s_min": min(times),
            "peak_mib": peak, "peak_kind": "cuda max allocated" if device == "cuda" else "peak RSS growth over the steps (activations, gradients, AdamW state)",
            "peak_rss_mib": _rss_mib(),
            "parameters": sum(p.numel() for p in module.parameters())}


def bench_steps(args: argparse.Namespace) -> list[dict]:
    results = []
    for config_name, shape in (("sdm-tiny", [24, 24, 24]), ("sdm-tiny-high", [32, 32, 32])):
        command = [sys.executable, __file__, "_step", config_name, json.dumps(shape), str(args.steps), str(args.threads)]
        out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        results.append(json.loads(out.strip().splitlines()[-1]))
        print(json.dumps(results[-1]), flush=True)
    return results


def bench_sample(args: argparse.Namespace) -> list[dict]:
    from monai.inferers import SlidingWindowSplitter

    from medsynth import api
    from medsynth.data.datasets import PreparedDataset
    from medsynth.evaluate.segmentation import dice_per_class, segment, train_segmenter
    from medsynth.recipes.sdm import downsample_image, downsample_labels

    torch.set_num_threads(args.threads)
    _, recipe, module = api.load_run(args.run)
    model, evaluate = module.config.model, module.config.evaluate
    data_dir = Path(module.config.data_dir)
    factor, classes = model.low_res_factor, model.classes

    def split(name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        items = [item for item in PreparedDataset(data_dir, split=name)]
        images = torch.stack([item["image"] for item in items])
        labels = module.classes_of(torch.stack([item["label"] for item in items]))
        return downsample_image(images, factor), downsample_labels(labels, len(classes), factor)[:, 0], labels

    def units(x01: torch.Tensor) -> torch.Tensor:
        return recipe.to_units(x01 * 2 - 1, module.config)

    train_x, train_y, _ = split("train")
    test_x, test_y, test_full = split("test")
    segmenter = train_segmenter(units(train_x), train_y, len(classes), epochs=evaluate.segmenter_epochs,
                                seed=evaluate.seed, channels=evaluate.segmenter_channels)
    real = dice_per_class(segment(segmenter, units(test_x)), test_y, len(classes), classes)
    results = [{"sampler": "real held-out volumes", "dice_mean_foreground": real["mean_foreground"], "dice_coronary": real.get("coronary")}]
    print(json.dumps(results[-1]), flush=True)
    order = [k % len(test_x) for k in range(args.n)]
    seeds = [1000 + k for k in range(args.n)]
    for sampler, steps in (("dpmpp", 20), ("ddim", 50), ("ddpm", 1000)):
        settings = module.config.sample.model_copy(update={"sampler": sampler, "steps": steps, "batch_size": args.n})
        start = time.perf_counter()
        volumes = (module.generate(test_full[order], seeds, settings) + 1) / 2
        seconds = (time.perf_counter() - start) / args.n
        dice = dice_per_class(segment(segmenter, units(volumes)), test_y[order], len(classes), classes)
        results.append({"sampler": sampler, "steps": steps, "guidance": settings.guidance, "volume": list(volumes.shape[2:]),
                        "n": args.n, "threads": args.threads, "s_per_volume": seconds,
                        "dice_mean_foreground": dice["mean_foreground"], "dice_coronary": dice.get("coronary")})
        print(json.dumps(results[-1]), flush=True)

    # The high-res stage's patched sampler at its CPU size: time only (untrained weights).
    high = _module("sdm-tiny-high", [32, 32, 32]).eval()
    settings = high.config.sample
    labels = torch.randint(0, NUM_CLASSES, (1, 1, 32, 32, 32), generator=torch.Generator().manual_seed(0))
    reference = torch.zeros(1, 1, 32, 32, 32)
    start = time.perf_counter()
    high.generate(labels, [0], settings, reference)
    patches = len(list(SlidingWindowSplitter(high.config.model.patch_size, settings.patch_overlap)(labels)))
    results.append({"sampler": f"dpmpp high-res patched ({patches} patches of {high.config.model.patch_size}, overlap {settings.patch_overlap})",
                    "steps": settings.steps, "guidance": settings.guidance, "volume": [32, 32, 32], "threads": args.threads,
                    "s_per_volume": time.perf_counter() - start, "note": "untrained weights: time only"})
    print(json.dumps(results[-1]), flush=True)
    return results


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_step":
        _, _, config_name, shape, steps, threads = sys.argv
        print(json.dumps(step_one(config_name, json.loads(shape), int(steps), int(threads))))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["step", "sample"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8, help="step: timed training steps per model")
    parser.add_argument("--run", default="demo-output/sdm-run", help="sample: a trained low-res sdm run")
    parser.add_argument("--n", type=int, default=4, help="sample: volumes per sampler")
    args = parser.parse_args()
    bench_steps(args) if args.what == "step" else bench_sample(args)


if __name__ == "__main__":
    main()
