"""Are generated images worth training on? cvae and sdm through train-on-synthetic and the augmentation test.

Each variant trains its generator on a phantom pool (phantoms are free), then ``medsynth evaluate`` runs the
utility tests of :mod:`medsynth.evaluate.image_utility` with several task-network seeds. The table gives each
arm as mean ± sd over the seeds, the gain shares, TSTR against its real reference and ``spectrum_ratio_high``.

    .venv/bin/python benchmarks/bench_image_utility.py cvae [--n 160] [--size 64] [--epochs 80] [--variants elbo adversarial]
    .venv/bin/python benchmarks/bench_image_utility.py sdm [--n 60] [--size 48] [--epochs 40]

Variants (cvae): ``elbo`` is the original's loss (configs/cvae-tiny.yaml); ``adversarial`` adds the patch-GAN
term (``model.adversarial_weight``). Results go to ``--json`` and are printed as a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from medsynth import api

CVAE_VARIANTS = {
    "elbo": [],
    "adversarial": ["model.adversarial_weight=0.05", "model.adversarial_start_epoch=20"],
}
ARMS = ("real_only", "classic", "with_generated", "oracle")


def _row(name: str, metrics: dict, measure: str) -> str:
    def shown(key: str) -> str:
        value, sd = metrics.get(key), metrics.get(f"{key}_sd")
        if value is None:
            return "–"
        return f"{value:.3f} ± {sd:.3f}" if sd is not None else f"{value:.3f}"

    cells = [shown(f"downstream_{measure}_{arm}") for arm in ARMS]
    cells += [shown("downstream_gain_share_generated"), shown("downstream_gain_share_classic"),
              f"{shown(f'tstr_{measure}')} / {shown(f'tstr_{measure}_real_reference')}",
              f"{shown('spectrum_ratio_high')} ({shown('spectrum_ratio_high_real_reference')})"]
    return f"| {name} | " + " | ".join(cells) + " |"


def _header(measure: str) -> str:
    return ("| variant | (a) real only | (b) classic aug. | (c) + generated | (d) oracle | gain share generated | gain share classic | "
            f"TSTR {measure} / real reference | spectrum_ratio_high (real ref.) |\n|" + "---|" * 9)


def cvae(args: argparse.Namespace) -> dict:
    work = Path(args.work)
    raw = api.phantom("cilia", work / "cilia", n=args.n, seed=0, size=args.size, progress=False)
    prepared = api.prepare(raw, work / "cilia-prepared", recipe="cvae", size=args.size, seed=0, progress=False)
    results = {}
    for variant in args.variants:
        start = time.time()
        run = api.train("cvae", data=prepared, config="cvae-tiny", out=work / f"cvae-{variant}", force=True, progress=False,
                        overrides=[f"train.max_epochs={args.epochs}", *CVAE_VARIANTS[variant],
                                   f"evaluate.utility_seeds={list(range(args.seeds))}"])
        trained = time.time() - start
        metrics = api.evaluate(run.path)
        api.report(run.path)
        results[variant] = {**metrics, "train_seconds": trained, "evaluate_seconds": time.time() - start - trained}
        print(_row(variant, metrics, "accuracy"), flush=True)
    return results


def sdm(args: argparse.Namespace) -> dict:
    work = Path(args.work)
    raw = api.phantom("coronary", work / "coronary", n=args.n, seed=0, size=args.size, progress=False)
    prepared = api.prepare(raw, work / "coronary-prepared", recipe="sdm", seed=0, progress=False)
    start = time.time()
    run = api.train("sdm", data=prepared, config="sdm-tiny", out=work / "sdm-run", force=True, progress=False,
                    overrides=[f"train.max_epochs={args.epochs}", f"evaluate.utility_seeds={list(range(args.seeds))}"])
    trained = time.time() - start
    metrics = api.evaluate(run.path)
    api.report(run.path)
    print(_row(f"sdm {args.size}^3", metrics, "dice"), flush=True)
    return {"sdm": {**metrics, "train_seconds": trained, "evaluate_seconds": time.time() - start - trained}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", choices=["cvae", "sdm"])
    parser.add_argument("--work", default="/tmp/bench-image-utility")
    parser.add_argument("--n", type=int, default=None, help="cilia images per class (160) or coronary subjects (60)")
    parser.add_argument("--size", type=int, default=None, help="cilia px (64) or coronary voxels a side (48)")
    parser.add_argument("--epochs", type=int, default=None, help="generator epochs (cvae 80, sdm 40)")
    parser.add_argument("--seeds", type=int, default=3, help="task-network seeds")
    parser.add_argument("--variants", nargs="+", default=list(CVAE_VARIANTS), choices=list(CVAE_VARIANTS))
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    defaults = {"cvae": (160, 64, 80), "sdm": (60, 48, 40)}[args.recipe]
    args.n, args.size, args.epochs = (given or default for given, default in zip((args.n, args.size, args.epochs), defaults))
    print(_header("accuracy" if args.recipe == "cvae" else "dice"), flush=True)
    results = cvae(args) if args.recipe == "cvae" else sdm(args)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
