"""Reconstruction on the cine acquisition: every method on held-out subjects, with a prior trained at 64 px (issue 20).

Two benchmarks:

``prior`` (the issue's benchmark): the cardiac phantom's cine acquisition (``phantom cardiac --modality mri
--views``: 64 px planes, SAX stacks of 7-9 slabs 8 mm thick and 10 mm apart, three LAX views, thin truth at factor 8) for
``--n`` subjects; ``prepare --recipe diffae --size 64`` (their thin slices); DiffAE (``configs/diffae-bench-64.yaml``)
and its DDIM baseline (``model.semantic=false``) trained side by side, one thread each, within the 60-minute budget;
then ``medsynth evaluate --reconstruction`` on the held-out subjects (ED and ES) by every method, and the report.
Prints the table (PSNR and SSIM whole and in the heart, myocardium/LV/RV Dice and HD95, EF error, seconds per
volume), the prior's contribution per learned method, the interpolation and random-sample keys, and the CPU time::

    .venv/bin/python benchmarks/bench_reconstruct.py prior --work /tmp/bench-recon [--n 112] [--epochs 10 --stage-epochs 8 --ddim-epochs 8] [--reuse]

``tune``: ``diffpir``'s starting timestep and relaxation and ``pnp``'s prior weight, chosen on validation subjects
(PSNR in the heart), for the ``prior`` benchmark's ``--set`` (``evaluate.reconstruct.*``)::

    .venv/bin/python benchmarks/bench_reconstruct.py tune /tmp/bench-recon/diffae-run /tmp/bench-recon/cardiac

``settings``: reconstruction settings against each other on one trained diffae run, what each choice costs or
buys (after ``medsynth demo diffae --out demo-output``)::

    .venv/bin/python benchmarks/bench_reconstruct.py settings demo-output/diffae-run demo-output/cardiac --subject sub002

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
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from medsynth.data.cine import cine_frame, lax_views
from medsynth.evaluate.cardiac import psnr
from medsynth.inverse import ReconstructSettings, reconstruct_stack
from medsynth.inverse.evaluation import EVAL_METHODS
from medsynth.inverse.prior import to_unit, unit_range
from medsynth.recipes import get_recipe
from medsynth.runs import Run
from medsynth.training import load_module


def settings(args: argparse.Namespace) -> None:
    """The settings comparison (module docstring) on one run and subject."""
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


# -- prior: the benchmark ----------------------------------------------------------------------------------

TABLE_METHODS = ("nearest", "linear", "cubic", "pnp", "pnp_sax_only", "data_terms", "diffpir", "diffpir_sax_only",
                 "diffpir_no_prior")
SLOW = ("diffae_lax", "diffae_sax_only", "ddim_lax")  # the original's latent optimisation (Adam through the decoder)
ORIGINAL = ("diffae_lax", "ddim_lax")  # of those, scored on the first held-out subject


def _train(recipe_args: list[str], log: Path) -> subprocess.Popen:
    """``medsynth train`` in its own process (one thread), its output to ``log``."""
    return subprocess.Popen([str(Path(sys.executable).parent / "medsynth"), "train", *recipe_args, "--no-progress", "--force"],
                            stdout=log.open("w"), stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})


def _cell(metrics: dict, key: str, digits: int = 2) -> str:
    value = metrics.get(key)
    return "–" if value is None else f"{value:.{digits}f}"


def save_figure(run: Path, path: Path) -> None:
    """The report's section figure (truth, cubic and every method through the first held-out case) as a PNG."""
    from medsynth.inverse.evaluation import reconstruction_figures

    figures = reconstruction_figures(run / "samples" / "reconstruction")
    if figures:
        path.parent.mkdir(parents=True, exist_ok=True)
        figures[0][1].savefig(path, dpi=90, bbox_inches="tight")


def prior(args: argparse.Namespace) -> None:
    """phantom -> prepare -> DiffAE and DDIM side by side -> evaluate --reconstruction -> report -> table."""
    from medsynth import api

    work, began = Path(args.work), time.perf_counter()
    raw = work / "cardiac"
    if not (raw / f"sub{args.n - 1:03d}").is_dir():
        api.phantom("cardiac", raw, n=args.n, seed=0, size=64, progress=False, force=True, modality="mri", views=True, frames=2)
    prepared = api.prepare(raw, work / "cardiac-prepared", recipe="diffae", size=64, seed=0, progress=False)
    data_seconds = time.perf_counter() - began
    common = ["diffae", "--data", str(prepared), "--config", "diffae-bench-64"]
    runs = {"diffae": work / "diffae-run", "ddim": work / "ddim-run"}
    jobs = [] if args.reuse else [_train([*common, "--out", str(runs["diffae"]), "--set", f"train.max_epochs={args.epochs}",
                    "--set", f"model.stage_epochs={args.stage_epochs}"], work / "train-diffae.log"),
            _train([*common, "--out", str(runs["ddim"]), "--set", "model.semantic=false",
                    "--set", f"train.max_epochs={args.ddim_epochs}"],
                   work / "train-ddim.log")]
    if any(job.wait() != 0 for job in jobs):
        raise SystemExit(f"training failed: see {work}/train-*.log")
    trained = time.perf_counter()
    train_cpu = resource.getrusage(resource.RUSAGE_CHILDREN).ru_utime
    torch.set_num_threads(1)
    # Every method but the original's latent optimisation on --subjects held-out subjects (ED and ES each); that one
    # (diffae_lax, ddim_lax: DDIM inversion of every fine slice with fixed-point refinements, then Adam through the
    # decoder, minutes per 64 px volume on one thread) on the first of them, below.
    fast = [m for m in EVAL_METHODS if m not in SLOW]
    metrics = api.evaluate(runs["diffae"], reconstruction=raw, progress=False,
                           overrides=[f"evaluate.ddim_run={runs['ddim'].resolve()}", f"evaluate.reconstruction_subjects={args.subjects}",
                                      "evaluate.reconstruction_methods=[" + ", ".join(fast) + "]", *args.overrides])
    report = api.report(runs["diffae"])
    save_figure(runs["diffae"], Path(args.figure))
    evaluated = time.perf_counter()
    original = original_methods(runs, raw, metrics["reconstruction_subjects"][:1])
    total_cpu = resource.getrusage(resource.RUSAGE_SELF).ru_utime + resource.getrusage(resource.RUSAGE_CHILDREN).ru_utime
    (work / "bench-reconstruct.json").write_text(json.dumps({"metrics": metrics, "original": original}, indent=1, default=str))
    print(f"\n{args.n} subjects, held out: {', '.join(metrics.get('reconstruction_subjects', []))}; "
          f"data {data_seconds / 60:.1f} min, training {(trained - began - data_seconds) / 60:.1f} min wall "
          f"({train_cpu / 60:.1f} CPU min, two processes), evaluation {(evaluated - trained) / 60:.1f} min wall, "
          f"all {(time.perf_counter() - began) / 60:.1f} min wall, {total_cpu / 60:.1f} CPU min; report {report}\n")
    print_table(metrics)
    print(f"\nThe original's latent optimisation on {original['reconstruction_subjects'][0]} (ED and ES):\n")
    print("| method | PSNR | PSNR heart | SSIM | prior's contribution (dB) | s / volume |\n|" + "---|" * 6)
    for m in ("cubic", *ORIGINAL):
        contribution = (f"{original[f'reconstruction_psnr_{m}'] - original[f'reconstruction_psnr_{m}_no_prior']:+.2f}"
                        if f"reconstruction_psnr_{m}_no_prior" in original else "–")
        print(f"| {m} | {_cell(original, f'reconstruction_psnr_{m}')} | {_cell(original, f'reconstruction_psnr_heart_{m}')} | "
              f"{_cell(original, f'reconstruction_ssim_{m}', 3)} | {contribution} | {_cell(original, f'reconstruction_seconds_{m}', 1)} |")


def original_methods(runs: dict[str, Path], raw: Path, subjects: list[str]) -> dict:
    """``diffae_lax`` and ``ddim_lax`` (with cubic and their no-prior row) on ``subjects``: PSNR and SSIM only (the
    segmenter here is a token one, one epoch on two subjects, so its Dice is not reported)."""
    from medsynth.inverse.evaluation import reconstruction_metrics
    from medsynth.training import load_module

    recipe = get_recipe("diffae")
    diffae, ddim = (load_module(Run.open(runs[name]), recipe).eval() for name in ("diffae", "ddim"))
    train = sorted(p.name for p in raw.iterdir() if p.is_dir() and p.name not in subjects)[:2]
    return reconstruction_metrics(diffae, raw, ddim, ["cubic", *ORIGINAL, "data_terms"], diffae.config.evaluate.reconstruct,
                                  held_out=subjects, train=train, segmenter_epochs=1, seed=0)


def print_table(metrics: dict) -> None:
    """The issue's table: one row per method (the truth's segmentation first: the ceiling)."""
    print("| method | PSNR | PSNR heart | SSIM | SSIM heart | Dice myo / LV / RV | HD95 myo (mm) | EF error (pp) | "
          "prior's contribution (dB, heart) | s / volume |\n|" + "---|" * 10)
    print(f"| truth (segmenter's ceiling) | | | | | {_cell(metrics, 'reconstruction_dice_myo_truth', 3)} / "
          f"{_cell(metrics, 'reconstruction_dice_lv_truth', 3)} / {_cell(metrics, 'reconstruction_dice_rv_truth', 3)} | "
          f"{_cell(metrics, 'reconstruction_hd95_truth_myo')} | | | |")
    for m in TABLE_METHODS:
        if f"reconstruction_psnr_{m}" not in metrics:
            continue
        contribution = "–"
        if f"reconstruction_psnr_{m}_no_prior" in metrics:
            contribution = (f"{metrics[f'reconstruction_psnr_{m}'] - metrics[f'reconstruction_psnr_{m}_no_prior']:+.2f} "
                            f"({metrics[f'reconstruction_psnr_heart_{m}'] - metrics[f'reconstruction_psnr_heart_{m}_no_prior']:+.2f})")
        print(f"| {m} | {_cell(metrics, f'reconstruction_psnr_{m}')} | {_cell(metrics, f'reconstruction_psnr_heart_{m}')} | "
              f"{_cell(metrics, f'reconstruction_ssim_{m}', 3)} | {_cell(metrics, f'reconstruction_ssim_heart_{m}', 3)} | "
              f"{_cell(metrics, f'reconstruction_dice_myo_{m}', 3)} / {_cell(metrics, f'reconstruction_dice_lv_{m}', 3)} / "
              f"{_cell(metrics, f'reconstruction_dice_rv_{m}', 3)} | {_cell(metrics, f'reconstruction_hd95_{m}_myo')} | "
              f"{_cell(metrics, f'reconstruction_ef_error_{m}')} | {contribution} | {_cell(metrics, f'reconstruction_seconds_{m}', 1)} |")
    for key in ("interpolation_psnr_codes", "random_mmd", "random_mmd_real_reference"):
        print(f"{key}: {_cell(metrics, key, 3)}")


def tune(args: argparse.Namespace) -> None:
    """The prior-based methods' settings chosen on validation subjects (never the held-out ones the benchmark scores):
    ``diffpir`` over its starting timestep and relaxation, ``pnp`` over its prior weight; prints PSNR whole and in the
    heart (mean over the subjects' ED and ES) per setting, best last."""
    from medsynth.data.cine import HR_LABEL_NAME, HR_NAME, SAX_NAME, lax_views
    from medsynth.data.manifest import Manifest
    from medsynth.evaluate.cardiac import heart_mask

    torch.set_num_threads(1)
    module = load_module(Run.open(args.run), get_recipe("diffae")).eval()
    splits = {case.subject: case.split for case in Manifest.load(module.config.data_dir).cases}
    subjects = sorted(s for s, split in splits.items() if split == "val")[: args.subjects]
    base = module.config.evaluate.reconstruct
    cases = {f"diffpir t_start {t} relax {r:g}": ("diffpir", {"diffpir_t_start": t, "diffpir_relax": r})
             for t in args.t_start for r in args.relax}
    cases |= {f"pnp pnp_weight {w:g}": ("pnp", {"pnp_weight": w}) for w in args.pnp_weight}
    cases["cubic"] = ("cubic", {})
    scores: dict[str, list[tuple[float, float]]] = {name: [] for name in cases}
    for subject in subjects:
        folder = args.data / subject
        for t in (0, 1):
            sax, sax_affine = cine_frame(folder / SAX_NAME, t)
            truth, _ = cine_frame(folder / HR_NAME, t)
            mask = heart_mask(cine_frame(folder / HR_LABEL_NAME, t)[0] > 0)
            lax = [cine_frame(path, t) for _, path in sorted(lax_views(folder).items())]
            factor = (truth.shape[2] - 1) // (sax.shape[2] - 1)
            for name, (method, update) in cases.items():
                volume, _, _ = reconstruct_stack(module, (sax, sax_affine), lax, factor, method, base.model_copy(update=update))
                scores[name].append((psnr(volume, truth), psnr(volume, truth, mask)))
    print(f"validation subjects {', '.join(subjects)} (ED and ES): PSNR whole / heart")
    for name, values in sorted(scores.items(), key=lambda item: np.mean([v[1] for v in item[1]])):
        print(f"{name:36s} {np.mean([v[0] for v in values]):6.2f} / {np.mean([v[1] for v in values]):6.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    one = commands.add_parser("prior", help="the issue's benchmark: train the 64 px priors, score every method")
    one.add_argument("--work", default="/tmp/bench-recon")
    one.add_argument("--n", type=int, default=112, help="phantom subjects (70 %% train, 10 %% val, 20 %% test)")
    one.add_argument("--epochs", type=int, default=10, help="DiffAE epochs in all (encoder + UNet, then the latent DDIM)")
    one.add_argument("--stage-epochs", type=int, default=8, help="DiffAE epochs of the encoder + UNet")
    one.add_argument("--ddim-epochs", type=int, default=8, help="epochs of the DDIM baseline")
    one.add_argument("--subjects", type=int, default=3, help="held-out subjects reconstructed (ED and ES each)")
    one.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="evaluation settings, e.g. evaluate.reconstruct.diffpir_t_start=40 (from `tune`)")
    one.add_argument("--figure", default="docs/bench-reconstruct-64.png", help="where the sections figure goes")
    one.add_argument("--reuse", action="store_true", help="evaluate the runs already trained in --work (no training)")
    three = commands.add_parser("tune", help="choose diffpir's and pnp's settings on validation subjects")
    three.add_argument("run")
    three.add_argument("data", type=Path, help="the UK Biobank-layout phantom folder (with sa_hr truth)")
    three.add_argument("--subjects", type=int, default=2)
    three.add_argument("--t-start", type=int, nargs="+", default=[5, 10, 20, 40], help="diffpir_t_start values")
    three.add_argument("--relax", type=float, nargs="+", default=[0.05, 0.1, 0.3], help="diffpir_relax values")
    three.add_argument("--pnp-weight", type=float, nargs="*", default=[0.0, 2.0, 8.0], help="pnp_weight values")
    two = commands.add_parser("settings", help="reconstruction settings against each other on one run")
    two.add_argument("run")
    two.add_argument("data", type=Path)
    two.add_argument("--subject", default="sub002")
    two.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    {"prior": prior, "tune": tune, "settings": settings}[args.command](args)


if __name__ == "__main__":
    main()
