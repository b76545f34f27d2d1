"""Reconstruction settings against each other on one trained diffae run: what each choice costs or buys.

Usage (after ``medsynth demo diffae --out demo-output``)::

    python benchmarks/bench_reconstruct.py demo-output/diffae-run demo-output/cardiac --subject sub002

For the subject's ED and ES frames (SAX + every LAX view, factor from its thin-slice truth) it prints
the PSNR (dB, whole volume, against ``sa_hr.nii.gz``) and seconds of: cubic interpolation; the DDIM
round trip of the observed SAX slices at the reconstruction's steps for 0/5/10/20 fixed-point
refinements per inversion step; ``latent`` started from the cubic interpolation (``init:
interpolation``) and from the original's slerp, with 0 and 4 Adam iterations at several learning
rates; ``pnp`` with its prior term (``pnp_weight``) on and off, at two denoising timesteps; ``diffpir`` with the
exact and the relaxed projection, from three starting timesteps, and without its prior.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from medsynth.data.cine import cine_frame, lax_views
from medsynth.evaluate.reconstruction import psnr
from medsynth.inverse import ReconstructSettings, reconstruct_stack
from medsynth.inverse.prior import to_unit, unit_range
from medsynth.recipes import get_recipe
from medsynth.runs import Run
from medsynth.training import load_module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run")
    parser.add_argument("data", type=Path)
    parser.add_argument("--subject", default="sub002")
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(1)
    module = load_module(Run.open(args.run), get_recipe("diffae")).eval()
    folder = args.data / args.subject
    base = ReconstructSettings(steps=args.steps, iterations=0)
    rows: dict[str, list[float]] = {}
    for t in (0, 1):
        sax, sax_affine = cine_frame(folder / "sa.nii.gz", t)
        truth, _ = cine_frame(folder / "sa_hr.nii.gz", t)
        lax = [cine_frame(path, t) for _, path in sorted(lax_views(folder).items())]
        factor = (truth.shape[2] - 1) // (sax.shape[2] - 1)
        lo, hi = unit_range(sax)
        observed = to_unit(torch.from_numpy(sax).float(), lo, hi).permute(2, 0, 1)[:, None]
        for iterations in (0, 5, 10, 20):
            module.config.sample.inversion_iterations = iterations
            back = module.autoencode(observed, args.steps, batch_size=len(observed))
            rows.setdefault(f"round trip of the SAX slices, {iterations} fixed-point refinements", []).append(
                float(10 * np.log10(4.0 / ((back - observed) ** 2).mean())))
        module.config.sample.inversion_iterations = 20
        cases = {"cubic": ("cubic", base)}
        for init in ("interpolation", "slerp"):
            cases[f"latent, init {init}, 0 iterations"] = ("latent", base.model_copy(update={"init": init}))
        for lr in (5e-5, 3e-4, 2e-2):
            cases[f"latent, init interpolation, 4 iterations, lr {lr:g}"] = ("latent", base.model_copy(update={"iterations": 4, "lr": lr}))
        for timestep in (10, 100):
            for weight in (0.0, 2.0):
                cases[f"pnp, timestep {timestep}, pnp_weight {weight:g}"] = (
                    "pnp", base.model_copy(update={"pnp_timestep": timestep, "pnp_weight": weight}))
        for relax in (1.0, 0.1):  # diffpir: the exact projection and the default's relaxed one, prior on and off
            for t_start in (5, 20, 60):
                cases[f"diffpir, relax {relax:g}, t_start {t_start}"] = (
                    "diffpir", base.model_copy(update={"diffpir_relax": relax, "diffpir_t_start": t_start}))
            cases[f"diffpir, relax {relax:g}, prior off"] = ("diffpir", base.model_copy(update={"diffpir_relax": relax, "diffpir_prior": False}))
        for name, (method, settings) in cases.items():
            start = time.perf_counter()
            volume, _, _ = reconstruct_stack(module, (sax, sax_affine), lax, factor, method, settings)
            rows.setdefault(name, []).append(psnr(volume, truth))
            rows.setdefault(f"{name} seconds", []).append(time.perf_counter() - start)
    print(f"{args.subject}, ED and ES, {args.steps} DDIM steps")
    for name, values in rows.items():
        if not name.endswith("seconds"):
            seconds = rows.get(f"{name} seconds")
            print(f"{name:64s} ED {values[0]:6.2f} dB  ES {values[1]:6.2f} dB" + (f"  {np.mean(seconds):6.1f} s" if seconds else ""))


if __name__ == "__main__":
    main()
