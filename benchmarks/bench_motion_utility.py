"""The motion utility protocol (issue 18) for ``flow-cvae`` and ``motion-ldm``, as a user would run it.

The generator is trained on a large phantom pool (phantom seed 0, ``--n-generator`` subjects); the
protocol runs on *other* subjects (phantom seed 1, ``--n-protocol`` subjects), so the generator has
never seen the unlabelled pool's motion: their training split is divided into the labelled pool L
(``--labelled`` subjects) and the unlabelled pool U (the rest), their test split is the test set.
Every arm (real only, classic augmentation, generated, oracle, PCA) trains the same downstream network
over ``--seeds`` seeds (:func:`medsynth.evaluate.downstream.motion_utility`, through ``medsynth
evaluate RUN --data PROTOCOL``). Prints each phase's wall time, the metrics as JSON and the table
rows of BENCHMARKS.md.

    .venv/bin/python benchmarks/bench_motion_utility.py flow-cvae --work /tmp/mu-flow [--size 24 --epochs 40]
    .venv/bin/python benchmarks/bench_motion_utility.py motion-ldm --work /tmp/mu-ldm [--epochs 30]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from medsynth import api

ARMS = ("real_only", "classic", "pca", "with_generated", "oracle")
SHOWN = ("flow_epe_mean_mm", "flow_epe_mean_flow_mm", "ejection_fraction_generated", "ejection_fraction_real", "folding_share",
         "lung_volume_ratio_generated", "lung_volume_ratio_real", "diaphragm_excursion_generated_mm", "diaphragm_excursion_real_mm",
         "downstream_magnitude_labelled_mm", "downstream_magnitude_classic_mm", "downstream_magnitude_pca_mm",
         "downstream_magnitude_with_generated_mm", "downstream_magnitude_oracle_mm", "downstream_n_labelled", "downstream_n_unlabelled",
         "downstream_n_real", "downstream_n_generated", "downstream_n_oracle", "downstream_seeds", "downstream_steps", "downstream_epe_zero_mm")

SETUPS = {
    # cardiac flow pairs (ES frame + exact ES->ED field); the demo's config
    "flow-cvae": {"phantom": "cardiac", "options": {"flow_pairs": True}, "config": "flow-cvae-tiny", "per_frame": "generated_per_frame",
                  "prepare": lambda size: {"size": size}, "train": []},
    # lung 4D CT, 6 phases, the phantom's exact fields (no registration); the demo's config
    "motion-ldm": {"phantom": "lung", "options": {"frames": 6}, "config": "motion-ldm-tiny", "per_frame": "generated_per_subject",
                   "prepare": lambda size: {"ct_window": (-1000.0, 500.0)}, "train": []},
}


def dataset(recipe: str, work: Path, name: str, n: int, seed: int, size, test_fraction: float) -> Path:
    """The phantom prepared for ``recipe`` (kept from an earlier call into the same ``work``: phantoms are deterministic)."""
    setup, prepared = SETUPS[recipe], work / f"{name}-prepared"
    if (prepared / "dataset.json").exists():
        return prepared
    raw = api.phantom(setup["phantom"], work / f"{name}-raw", n=n, seed=seed, size=size, progress=False, **setup["options"])
    return api.prepare(raw, work / f"{name}-prepared", recipe=recipe, progress=False, seed=seed, test_fraction=test_fraction,
                       **setup["prepare"](size))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", choices=sorted(SETUPS))
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--n-generator", type=int, default=120, help="phantom subjects the generator trains on (seed 0)")
    parser.add_argument("--n-protocol", type=int, default=36, help="phantom subjects of the protocol (seed 1): L + U + test")
    parser.add_argument("--size", type=int, nargs="+", default=None, help="phantom grid (flow-cvae: 24; motion-ldm: 32 32 8)")
    parser.add_argument("--epochs", type=int, default=None, help="generator epochs (flow-cvae: 40; motion-ldm: 30)")
    parser.add_argument("--stage-epochs", type=int, nargs=2, default=[5, 6], help="motion-ldm: image autoencoder and field VAE epochs")
    parser.add_argument("--labelled", type=int, default=8, help="subjects of the labelled pool L")
    parser.add_argument("--k", type=int, default=None, help="generated motions per unlabelled frame (flow-cvae: 3; motion-ldm: 1)")
    parser.add_argument("--pca-modes", type=int, default=4)
    parser.add_argument("--seeds", type=int, default=3, help="downstream seeds per arm")
    parser.add_argument("--steps", type=int, default=None, help="downstream optimiser steps per training (default: the protocol's DOWNSTREAM_STEPS)")
    parser.add_argument("--reuse-run", action="store_true", help="evaluate WORK/run again instead of training it")
    args = parser.parse_args()
    recipe, work = args.recipe, args.work
    size = (args.size[0] if len(args.size) == 1 else tuple(args.size)) if args.size else (24 if recipe == "flow-cvae" else (32, 32, 8))
    epochs = args.epochs or (40 if recipe == "flow-cvae" else 30)
    k = args.k or (3 if recipe == "flow-cvae" else 1)
    clock, times = time.time(), {}

    generator_data = dataset(recipe, work, "generator", args.n_generator, 0, size, test_fraction=0.05)
    protocol_data = dataset(recipe, work, "protocol", args.n_protocol, 1, size, test_fraction=0.25)
    times["data_s"], clock = round(time.time() - clock), time.time()
    overrides = [f"train.max_epochs={epochs}", "train.num_threads=1"]
    if recipe == "motion-ldm":
        overrides.append(f"model.stage_epochs=[{args.stage_epochs[0]}, {args.stage_epochs[1]}]")
    if not (args.reuse_run and (work / "run" / "model.safetensors").exists()):  # else: evaluate the generator of an earlier call again
        api.train(recipe, data=generator_data, config=SETUPS[recipe]["config"], overrides=overrides, out=work / "run", force=True,
                  progress=False)
    times["train_s"], clock = round(time.time() - clock), time.time()
    metrics = api.evaluate(work / "run", data=protocol_data, overrides=[
        f"evaluate.downstream_real_subjects={args.labelled}", f"evaluate.{SETUPS[recipe]['per_frame']}={k}",
        f"evaluate.pca_modes={args.pca_modes}", f"evaluate.downstream_seeds={args.seeds}",
        f"evaluate.downstream_steps={'null' if args.steps is None else args.steps}"])
    times["evaluate_s"] = round(time.time() - clock)

    shown = {key: metrics.get(key) for key in SHOWN if key in metrics}
    epe = {arm: (metrics.get(f"downstream_epe_{arm}_mm"), metrics.get(f"downstream_epe_{arm}_mm_sd")) for arm in ARMS}
    gains = {key: metrics.get(f"downstream_gain_share_{key}") for key in ("classic", "pca", "generated")}
    per_seed = {arm: metrics.get(f"downstream_epe_{arm}_mm_per_seed") for arm in ARMS}
    paired = {arm: (float(np.mean(d)), float(np.std(d, ddof=1))) for arm in ARMS if per_seed[arm] and len(per_seed[arm]) > 1
              for d in [np.subtract(per_seed["with_generated"], per_seed[arm])] if arm != "with_generated"}
    print(json.dumps({"recipe": recipe, "size": size, "epochs": epochs, "n_generator": args.n_generator, "n_protocol": args.n_protocol,
                      "k": k, "times": times, "epe_mean_sd": epe, "gain_share": gains, "epe_per_seed": per_seed,
                      "generated_minus_arm_paired_mean_sd": paired, **shown}, indent=1))
    print("| arm | EPE on test pairs (mm), mean ± sd | gain share |")
    print("|---|---|---|")
    for arm in ARMS:
        mean, sd = epe[arm]
        gain = {"classic": gains["classic"], "pca": gains["pca"], "with_generated": gains["generated"]}.get(arm)
        print(f"| {arm} | {mean:.3f} ± {sd if sd is not None else float('nan'):.3f} | {'' if gain is None else f'{gain:.2f}'} |")


if __name__ == "__main__":
    main()
