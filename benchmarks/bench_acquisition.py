"""How much room the cine acquisition leaves cubic interpolation (issue 20): the cardiac phantom's views with and
without the acquisition's realism (Rician noise, coil shading, trabeculae), the interpolation baselines scored
against the thin-slice truth by :func:`medsynth.inverse.evaluation.reconstruction_metrics` (PSNR, myocardium Dice
and HD95 against the segmenter's ceiling on the truth).

    .venv/bin/python benchmarks/bench_acquisition.py --work /tmp/acq [--n 20] [--size 64] [--held-out 4]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from medsynth import api
from medsynth.inverse.evaluation import reconstruction_metrics

VARIANTS = {"now (the default)": {}, "before (noise-free, no shading, no trabeculae)": {"noise": 0.0, "shading": 0.0, "trabeculation": False}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--n", type=int, default=20)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--held-out", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("| acquisition | cubic PSNR | cubic PSNR heart | Dice myo cubic | Dice myo truth (ceiling) | gap | HD95 myo cubic / truth (mm) | s |")
    print("|---|---|---|---|---|---|---|---|")
    for index, (name, options) in enumerate(VARIANTS.items()):
        start, folder = time.time(), args.work / f"variant{index}"
        if not (folder / "dataset.json").exists():
            api.phantom("cardiac", folder, n=args.n, seed=0, size=args.size, progress=False, modality="mri", views=True, frames=2, **options)
        subjects = [f"sub{i:03d}" for i in range(args.n)]
        m = reconstruction_metrics(None, folder, methods=["cubic"], held_out=subjects[: args.held_out], train=subjects[args.held_out:])
        gap = m["reconstruction_dice_myo_truth"] - m["reconstruction_dice_myo_cubic"]
        print(f"| {name} | {m['reconstruction_psnr_cubic']:.1f} | {m['reconstruction_psnr_heart_cubic']:.1f} | "
              f"{m['reconstruction_dice_myo_cubic']:.3f} | {m['reconstruction_dice_myo_truth']:.3f} | {gap:.3f} | "
              f"{m['reconstruction_hd95_cubic_myo']:.1f} / {m['reconstruction_hd95_truth_myo']:.1f} | {time.time() - start:.0f} |", flush=True)


if __name__ == "__main__":
    main()
