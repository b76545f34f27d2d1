"""Are generated images worth training on? cvae and sdm through train-on-synthetic and the augmentation test.

Each variant trains its generator on a phantom pool (phantoms are free), then ``medsynth evaluate`` runs the
utility tests of :mod:`medsynth.evaluate.image_utility` with several task-network seeds. The table gives each
arm as mean ± sd over the seeds, the gain shares, TSTR against its real reference and ``spectrum_ratio_high``.

    .venv/bin/python benchmarks/bench_image_utility.py cvae [--n 160] [--size 64] [--epochs 80] [--variants elbo adversarial]
    .venv/bin/python benchmarks/bench_image_utility.py sdm [--n 32] [--size 48] [--sdm-config sdm-bench-48] [--sdm-set KEY=VALUE ...]
    .venv/bin/python benchmarks/bench_image_utility.py class-diffusion [--n 160] [--size 64] [--epochs 30]

Variants (cvae): ``elbo`` is the original's loss (configs/cvae-tiny.yaml); ``adversarial`` adds the patch-GAN
term (``model.adversarial_weight``). ``class-diffusion`` trains the class-conditional diffusion model
(configs/class-diffusion-tiny.yaml) on the same cilia pool and scores it by the same tests.
Results go to ``--json`` and are printed as a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import resource
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


def cilia(args: argparse.Namespace) -> Path:
    """The cilia pool both class-conditional recipes train on, prepared as ``prepare --recipe cvae`` does."""
    work = Path(args.work)
    raw = api.phantom("cilia", work / "cilia", n=args.n, seed=0, size=args.size, progress=False)
    return api.prepare(raw, work / "cilia-prepared", recipe="cvae", size=args.size, seed=0, progress=False)


def cvae(args: argparse.Namespace) -> dict:
    work = Path(args.work)
    prepared = cilia(args)
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


def class_diffusion(args: argparse.Namespace) -> dict:
    work = Path(args.work)
    prepared = cilia(args)
    start = time.time()
    run = api.train("class-diffusion", data=prepared, config="class-diffusion-tiny", out=work / "class-diffusion", force=True,
                    progress=False, overrides=[f"train.max_epochs={args.epochs}", f"evaluate.utility_seeds={list(range(args.seeds))}"])
    trained = time.time() - start
    metrics = api.evaluate(run.path)
    api.report(run.path)
    print(_row("class-diffusion", metrics, "accuracy"), flush=True)
    return {"class-diffusion": {**metrics, "train_seconds": trained, "evaluate_seconds": time.time() - start - trained}}


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process and its waited-for children (all threads)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def sdm(args: argparse.Namespace) -> dict:
    """sdm on the coronary phantom at ``--size``^3 with ``--sdm-config`` (sdm-bench-48: the low stage on the whole
    volume, so generation and every utility test sit on the ``--size``^3 grid); wall and CPU seconds per phase."""
    work = Path(args.work)
    wall, cpu = time.time(), _cpu_seconds()
    raw = api.phantom("coronary", work / "coronary", n=args.n, seed=0, size=args.size, progress=False)
    prepared = api.prepare(raw, work / "coronary-prepared", recipe="sdm", seed=0, progress=False)
    times = {"data_seconds": time.time() - wall, "data_cpu_seconds": _cpu_seconds() - cpu}
    overrides = [*([f"train.max_epochs={args.epochs}"] if args.epochs else []), f"evaluate.utility_seeds={list(range(args.seeds))}",
                 *args.sdm_set]
    wall, cpu = time.time(), _cpu_seconds()
    run = api.train("sdm", data=prepared, config=args.sdm_config, out=work / "sdm-run", force=True, progress=False, overrides=overrides)
    times |= {"train_seconds": time.time() - wall, "train_cpu_seconds": _cpu_seconds() - cpu}
    print(f"trained in {times['train_seconds']:.0f} s wall, {times['train_cpu_seconds']:.0f} s CPU", flush=True)
    wall, cpu = time.time(), _cpu_seconds()
    metrics = api.evaluate(run.path, progress=False)
    times |= {"evaluate_seconds": time.time() - wall, "evaluate_cpu_seconds": _cpu_seconds() - cpu}
    api.report(run.path)
    print(_row(f"sdm {args.size}^3", metrics, "dice"), flush=True)
    print(", ".join(f"{key} {value:.0f}" for key, value in times.items()), flush=True)
    return {"sdm": {**metrics, **times, "config": args.sdm_config, "overrides": overrides, "run": str(run.path)}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", choices=["cvae", "sdm", "class-diffusion"])
    parser.add_argument("--work", default="/tmp/bench-image-utility")
    parser.add_argument("--n", type=int, default=None, help="cilia images per class (160) or coronary subjects (32)")
    parser.add_argument("--size", type=int, default=None, help="cilia px (64) or coronary voxels a side (48)")
    parser.add_argument("--epochs", type=int, default=None, help="generator epochs (cvae 80, sdm: its config's, class-diffusion 30)")
    parser.add_argument("--seeds", type=int, default=3, help="task-network seeds")
    parser.add_argument("--variants", nargs="+", default=list(CVAE_VARIANTS), choices=list(CVAE_VARIANTS))
    parser.add_argument("--sdm-config", default="sdm-bench-48", help="sdm: the generator's config (name or file)")
    parser.add_argument("--sdm-set", nargs="*", default=[], metavar="KEY=VALUE", help="sdm: config overrides, as train --set")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    defaults = {"cvae": (160, 64, 80), "sdm": (32, 48, None), "class-diffusion": (160, 64, 30)}[args.recipe]
    args.n, args.size, args.epochs = (given or default for given, default in zip((args.n, args.size, args.epochs), defaults))
    print(_header("dice" if args.recipe == "sdm" else "accuracy"), flush=True)
    results = {"cvae": cvae, "sdm": sdm, "class-diffusion": class_diffusion}[args.recipe](args)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
