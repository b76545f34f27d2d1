"""The `medsynth` command: parses arguments, calls :mod:`medsynth.api`, prints errors as one line.

:func:`main` is the one error boundary: a :class:`~medsynth.errors.MedsynthError` (bad input,
busy run, divergence) and any refusal from Lightning, torch or the OS end as one line on stderr
and exit status 2; Ctrl-C exits 130; anything else (a bug) is one line and status 1.
``--debug`` (or ``MEDSYNTH_DEBUG=1``) shows the traceback instead.

Choices come from the registries and enums (recipes, phantoms, samplers, normalisations,
sample modes). Only the chosen command's arguments are built, so a command imports only
what its choices need: ``phantom`` never imports torch's samplers or Lightning's recipes.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import NoReturn, get_args

from medsynth import __version__
from medsynth.errors import MedsynthError

# Notices from inside MONAI and Lightning that a user can do nothing about; they would bury
# medsynth's own one-line results (e.g. a registration's quality line under 12 lines of them).
_HARMLESS_WARNINGS = (
    r"monai\.networks\.blocks\.Warp: Using PyTorch native grid_sample",
    r"Using a non-tuple sequence for multidimensional indexing is deprecated",  # MONAI's BendingEnergyLoss
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",  # Lightning's _pytree
)


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (the usage is one ``--help`` away)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


SEED_MAX = 2**32 - 1  # NumPy's and Lightning's seed range


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid seed {text!r} (an integer 0 .. {SEED_MAX})") from None
    if not 0 <= value <= SEED_MAX:
        raise argparse.ArgumentTypeError(f"seed {value} is out of range (0 .. {SEED_MAX})")
    return value


def _phases(text: str) -> list[int] | None:
    if text.strip().lower() == "all":
        return None
    try:
        phases = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid phases {text!r} ('all' or comma-separated integers, e.g. 3,5)") from None
    if not phases:
        raise argparse.ArgumentTypeError("empty; give 'all' or phases such as 3,5")
    return phases


def _max_voxels(text: str) -> int:
    from medsynth.data.io import voxel_count

    value = voxel_count(text)
    if value is None:
        raise argparse.ArgumentTypeError(f"invalid voxel count {text!r} (a positive integer, e.g. {2**31})")
    return value


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(v) for v in text.replace("x", ",").split(",") if v)


def _no_progress(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-progress", action="store_true", help="no progress bars (for logs and scripts)")


def _phantom(p: argparse.ArgumentParser) -> None:
    from medsynth.data.phantoms import PHANTOMS, CardiacOptions

    p.add_argument("kind", choices=list(PHANTOMS), help="; ".join(f"{name}: {entry.summary}" for name, entry in PHANTOMS.items()))
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--n", type=int, default=10, help="images per class (cilia) or subjects")
    p.add_argument("--size", type=int, nargs="+", default=None, metavar="N",
                   help="image size in voxels: one side, or X Y Z for the 3D phantoms (default: the phantom's own)")
    p.add_argument("--seed", type=_seed, default=0, help="dataset seed: the same seed writes the same files")
    p.add_argument("--frames", type=int, default=None, help="cardiac: frames per cycle; lung: breathing phases per cycle (default 10)")
    modality = CardiacOptions.model_fields["modality"]
    p.add_argument("--modality", choices=get_args(modality.annotation), default=None, help=f"cardiac: {modality.description}")
    flow_pairs = CardiacOptions.model_fields["flow_pairs"]
    layouts = list(get_args(get_args(flow_pairs.annotation)[0]))  # Literal["npy", "nifti"] | None
    p.add_argument("--flow-pairs", nargs="?", const=layouts[0], default=None, choices=layouts, metavar="{" + ",".join(layouts) + "}",
                   help=f"cardiac: {flow_pairs.description}; bare --flow-pairs: {layouts[0]}")
    p.add_argument("--views", action="store_true", help=f"cardiac: {CardiacOptions.model_fields['views'].description}")
    p.add_argument("--force", action="store_true", help="replace the phantom dataset in an existing --out (only a phantom dataset)")
    _no_progress(p)


def _prepare(p: argparse.ArgumentParser) -> None:
    from medsynth.data.prepare import Normalize
    from medsynth.recipes import RECIPES

    p.add_argument("src", help="dataset folder (nnU-Net/MSD, class folders, phase series, flow pairs) or phantom output")
    p.add_argument("--out", required=True, help="prepared dataset folder")
    p.add_argument("--recipe", choices=list(RECIPES), default=None, help="fill the settings not given with the recipe's (sdm: --normalize ct --crop)")
    p.add_argument("--size", type=int, default=None, help="square/cubic output size")
    p.add_argument("--keep-aspect", action="store_true", default=None, help="pad instead of stretching to the size")
    p.add_argument("--crop", action="store_true", default=None, help="crop/pad to the size around the label foreground, keeping the spacing")
    p.add_argument("--spacing", type=_floats, default=None, help="target spacing in mm, e.g. 1.5,1.5,2")
    p.add_argument("--orientation", default=None, help="reorient 3D images, e.g. RAS")
    p.add_argument("--normalize", choices=[mode.value for mode in Normalize], default=None, help="intensity normalisation (default: percentile)")
    p.add_argument("--ct-window", type=float, nargs=2, default=None, metavar=("LO", "HI"), help="HU window for --normalize ct")
    p.add_argument("--series", default=None, metavar="UID",
                   help="DICOM folders holding several series: read this one (SeriesInstanceUID or SeriesDescription)")
    p.add_argument("--keep-color", action="store_true", default=None,
                   help="colour pictures keep their R, G, B channels (default: grey by ITU-R BT.601 luminance, one line says so)")
    p.add_argument("--seed", type=_seed, default=None, help="seed of the subject-wise split")
    p.add_argument("--force", action="store_true", help="replace a prepared dataset of another source or settings")
    _no_progress(p)


def _train(p: argparse.ArgumentParser) -> None:
    from medsynth.recipes import RECIPES, get_recipe

    names = ", ".join(RECIPES)
    p.add_argument("recipe", nargs="?", default=None, metavar="RECIPE", help=f"the recipe to train: {names}")
    p.add_argument("--data", default=None, help="prepared dataset folder")
    p.add_argument("--config", default=None, help="YAML file or shipped config name (e.g. cvae-224)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a config key, e.g. train.max_epochs=5 (repeatable)")
    p.add_argument("--out", default=None, help="run directory (default runs/RECIPE-TIME)")
    p.add_argument("--resume", default=None, metavar="RUN", help="continue this run from its last checkpoint")
    p.add_argument("--devices", default=None, help="shortcut for --set train.devices=...")
    p.add_argument("--strategy", default=None, help="shortcut for --set train.strategy=... (e.g. ddp)")
    p.add_argument("--num-nodes", type=int, default=None, help="shortcut for --set train.num_nodes=... (machines; torchrun or SLURM start them)")
    p.add_argument("--force", action="store_true", help="start over in an existing run directory")
    stages = {name: get_recipe(name).stage_choices() for name in RECIPES}  # from each recipe's declared stages
    p.add_argument("--stage", choices=list(dict.fromkeys(s for choices in stages.values() for s in choices)), default=None,
                   help="the stage to train, as model.stage (" + "; ".join(f"{name}: {'|'.join(c)}" for name, c in stages.items() if c) + ")")
    p.add_argument("--init", default=None, metavar="CKPT", help="start from these weights (a run, .safetensors or .ckpt)")
    p.add_argument("--folds", type=int, default=None, metavar="K",
                   help="K-fold cross-validation by subject: K runs in OUT/fold-<i>/ (K = number of subjects: leave-one-out)")
    p.add_argument("--dry-run", action="store_true", help="print the planner's estimate (memory, FLOPs, seconds per GPU) and write nothing")
    p.add_argument("--json", action="store_true", help="with --dry-run: the estimate as JSON")
    p.add_argument("--size", type=int, nargs="+", default=None, metavar="N",
                   help="with --dry-run: the input size (X Y [Z]) instead of the data's or the config's")
    _no_progress(p)


def _plan(p: argparse.ArgumentParser) -> None:
    from medsynth.plan import GPUS
    from medsynth.recipes import RECIPES

    p.add_argument("data", help="prepared dataset folder (with fingerprint.json)")
    p.add_argument("--recipe", required=True, choices=list(RECIPES), help="the recipe to plan")
    p.add_argument("--gpu", default=None, metavar="NAME", help=f"the GPU to fit (default h100-80gb): {', '.join(GPUS)}")
    p.add_argument("--memory", default=None, metavar="SIZE", help="a memory budget instead of --gpu, e.g. 24GB")
    p.add_argument("--hours", type=float, default=None, help="training time: sets the epochs from the projected step time")
    p.add_argument("--config", default=None, help="the config to start from (default the recipe's shipped GPU config)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a config key first")
    p.add_argument("--out", required=True, help="the planned config (YAML) to write")
    p.add_argument("--force", action="store_true", help="replace an existing --out")


def _sample(p: argparse.ArgumentParser) -> None:
    from medsynth.diffusion.sampling import SAMPLERS
    from medsynth.recipes import all_sample_modes

    p.add_argument("run", help="a trained run directory")
    p.add_argument("--n", type=int, default=None, help="samples per class or per label map (default 16; 1 with --condition)")
    p.add_argument("--class", dest="class_name", default=None, help="only this class (default: every class)")
    p.add_argument("--condition", default=None, help="conditioning file or folder")
    p.add_argument("--mode", default="random", choices=all_sample_modes(), help="how to sample; each recipe has its own modes (default random)")
    p.add_argument("--out", default=None, help="output folder (default RUN/samples)")
    p.add_argument("--seed", type=_seed, default=0, help="the same seed gives the same files")
    p.add_argument("--force", action="store_true", help="overwrite existing samples")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (>= 0)")
    p.add_argument("--steps", type=int, default=None, help="sampler steps")
    p.add_argument("--sampler", choices=list(SAMPLERS), default=None, help="diffusion sampler (default: the run's)")
    p.add_argument("--phases", type=_phases, default=None, help="motion recipes: 'all' or the phases to generate, e.g. 3,5")
    _no_progress(p)


def _register(p: argparse.ArgumentParser) -> None:
    p.add_argument("fixed", nargs="?", default=None, help="fixed image (pair mode)")
    p.add_argument("moving", nargs="?", default=None, help="moving image (pair mode)")
    p.add_argument("--out", required=True, help="field NIfTI (pair) or output folder (dataset)")
    p.add_argument("--data", default=None, help="dataset mode: a dataset.json of phases, a folder of 4D NIfTIs, or one folder per subject: one 4D NIfTI, "
                        "one DICOM series per phase, or a 3D file per phase")
    p.add_argument("--reference-phase", type=int, default=0, help="dataset mode: the phase the fields start from")
    p.add_argument("--pairs", choices=["reference", "consecutive"], default="reference",
                   help="dataset mode: register each phase to the reference phase, or to its neighbour towards it "
                        "(fields are then composed to reach a phase)")
    p.add_argument("--batch", type=int, default=1, help="dataset mode: pairs of one grid registered jointly (faster on a GPU)")
    p.add_argument("--devices", nargs="+", default=None, metavar="DEVICE",
                   help="dataset mode: share the registrations across devices, one worker each, e.g. cuda:0 cuda:1")
    p.add_argument("--config", default=None, help="YAML file or shipped config name of registration settings")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="e.g. control_spacing_mm=15, diffeomorphic=true, similarity=mi")
    p.add_argument("--landmarks", nargs=2, default=None, metavar=("FIXED_PTS", "MOVING_PTS"),
                   help="pair mode: corresponding points of FIXED and MOVING (point i of one is point i of the other); reports the "
                        "target registration error before and after (mean ± sd, max mm). An elastix/transformix point set (first line "
                        "'point': LPS mm, or 'index': 0-based voxels; then the count; then x y z per line) or a .csv of x,y,z in RAS mm "
                        "(optional header). Dataset mode reads <phase file stem>.pts/.csv beside each phase (<4D stem>_tNN beside a 4D file)")
    p.add_argument("--force", action="store_true", help="start over: replace an existing output")
    _no_progress(p)


def _render(p: argparse.ArgumentParser) -> None:
    p.add_argument("frames", help="4D NIfTI, folder of 3D frames, or one 3D image")
    p.add_argument("--out", required=True, help=".gif (movie) or .png (with --still)")
    p.add_argument("--field", default=None, help="field file(s) in mm (one per frame, or one)")
    p.add_argument("--still", action="store_true", help="a still figure of one frame instead of a movie")
    p.add_argument("--views", default="axial,coronal,sagittal", help="comma-separated views")
    p.add_argument("--slices", type=int, default=1, help="slices per view")
    p.add_argument("--anchor", choices=["middle", "first", "last"], default="middle", help="where the slices are taken")
    p.add_argument("--style", choices=["quiver", "magnitude", "jacobian"], default="quiver",
                   help="how a field is drawn: in-plane arrows, |u| in mm, or the Jacobian determinant (<= 0 folds)")
    p.add_argument("--fps", type=float, default=5.0, help="movie frames per second")
    p.add_argument("--force", action="store_true", help="replace an existing --out")


def _reconstruct(p: argparse.ArgumentParser) -> None:
    from medsynth.inverse.reconstruct import DEFAULT_METHOD, METHODS

    p.add_argument("run", nargs="?", default=None,
                   help="a trained diffae run (or its DDIM baseline): the prior of pnp, latent and diffpir; '-' or omitted for the baselines")
    p.add_argument("--sax", required=True, help="short-axis stack NIfTI, (X, Y, S) or (X, Y, S, T)")
    p.add_argument("--lax", nargs="*", default=[], metavar="LA", help="long-axis views (X, Y, 1[, T]), e.g. la_2ch.nii.gz la_4ch.nii.gz")
    p.add_argument("--factor", type=int, default=8, help="through-plane refinement: (S - 1) * factor + 1 slices (2 .. 64)")
    p.add_argument("--method", choices=list(METHODS), default=DEFAULT_METHOD,
                   help=f"{DEFAULT_METHOD} (default, posterior sampling: the best within a minute), pnp, latent (the original, slow) "
                        "or an interpolation baseline")
    p.add_argument("--prior-run", default=None, help="use this run's prior instead of RUN's (e.g. the DDIM baseline)")
    p.add_argument("--out", required=True, help="output NIfTI: the fine volume, (X, Y, Z[, T]) with the fine affine")
    p.add_argument("--keep-steps", action="store_true", help="also write the volume at every optimisation step (OUT_steps/)")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="settings of the method (others are refused), e.g. latent: iterations=50, lax_weight=6, steps=20; "
                        "pnp: pnp_iterations=20, pnp_lr=5e-4; diffpir: diffpir_iterations=10, diffpir_t_start=20")
    _no_progress(p)


def _evaluate(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="a trained run directory, or a fold set (each fold on its held-out subjects; mean and sd)")
    p.add_argument("--data", default=None, help="prepared dataset (default: the run's own)")
    p.add_argument("--reconstruction", default=None, metavar="DATA",
                   help="diffae: reconstruct the held-out subjects of this UK Biobank-layout folder (with sa_hr truth) by every method")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="settings for this evaluation, e.g. evaluate.ddim_run=RUN2")
    _no_progress(p)


def _report(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="a trained (and evaluated) run directory or fold set")


def _demo(p: argparse.ArgumentParser) -> None:
    from medsynth.demo import DEMOS

    p.add_argument("recipe", nargs="?", default="cvae", choices=list(DEMOS), help="whose demo to run (default cvae)")
    p.add_argument("--out", default="demo-output", help="output folder")
    p.add_argument("--force", action="store_true", help="remake the phantom too")
    _no_progress(p)


COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None]]] = {
    "phantom": ("write a procedural phantom dataset with exact ground truth", _phantom),
    "prepare": ("import a dataset and prepare it for training", _prepare),
    "train": ("train a recipe (or continue a run with --resume)", _train),
    "plan": ("fit a recipe's config to a prepared dataset and a GPU (estimated memory and time)", _plan),
    "sample": ("generate from a trained run", _sample),
    "register": ("B-spline registration: FIXED MOVING --out FIELD, or --data DIR --out DIR", _register),
    "render": ("GIF movie of a 4D sequence or field, or a still figure", _render),
    "reconstruct": ("a fine 3D SAX volume from a thick-slice SAX stack and LAX views", _reconstruct),
    "evaluate": ("compute metrics.json for a run", _evaluate),
    "report": ("write report.html for a run", _report),
    "demo": ("phantom -> prepare -> train -> sample -> evaluate -> report", _demo),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser of every command, or with ``command`` only that command's arguments (``""``: none)."""
    parser = _Parser(prog="medsynth", description="Conditional generative synthesis of medical images and motion.")
    parser.add_argument("--version", action="version", version=f"medsynth {__version__}", help="print the version and exit")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error (also MEDSYNTH_DEBUG=1)")
    _global_options(parser, None)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (summary, add_arguments) in COMMANDS.items():
        p = sub.add_parser(name, help=summary, description=summary)
        if command is None or command == name:
            add_arguments(p)
            _global_options(p, name)
    return parser


OUTSIDE_COMMANDS = ("prepare", "train", "sample", "evaluate")  # the commands that read a dataset.json's case paths


def _global_options(p: argparse.ArgumentParser, command: str | None) -> None:
    """``--max-voxels`` (before or after the command) and ``--allow-outside`` (commands that read datasets); a command's
    copy does not overwrite the value given before it (``SUPPRESS``). :func:`_environment` hands them down."""
    from medsynth.data.io import DEFAULT_MAX_VOXELS, MAX_VOXELS_VARIABLE
    from medsynth.data.manifest import ALLOW_OUTSIDE_VARIABLE

    default = None if command is None else argparse.SUPPRESS
    p.add_argument("--max-voxels", type=_max_voxels, default=default, metavar="N",
                   help=f"refuse image files whose header claims more voxels than N, before reading them "
                        f"(default {DEFAULT_MAX_VOXELS}; also {MAX_VOXELS_VARIABLE})")
    if command in OUTSIDE_COMMANDS:
        p.add_argument("--allow-outside", action="store_true", default=False,
                       help=f"let a dataset.json name files outside its folder (absolute, ../, symlinks out; also {ALLOW_OUTSIDE_VARIABLE}=1)")


@contextlib.contextmanager
def _environment(args: argparse.Namespace):
    """``--max-voxels`` and ``--allow-outside`` as the environment variables the readers consult (one place each:
    :func:`medsynth.data.io.max_voxels`, :func:`medsynth.data.manifest.outside_allowed`), for this command only."""
    from medsynth.data.io import MAX_VOXELS_VARIABLE
    from medsynth.data.manifest import ALLOW_OUTSIDE_VARIABLE

    wanted = {MAX_VOXELS_VARIABLE: str(args.max_voxels) if getattr(args, "max_voxels", None) is not None else None,
              ALLOW_OUTSIDE_VARIABLE: "1" if getattr(args, "allow_outside", False) else None}
    saved = {key: os.environ.get(key) for key, value in wanted.items() if value is not None}
    os.environ.update({key: value for key, value in wanted.items() if value is not None})
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def run_command(args: argparse.Namespace) -> None:
    from medsynth import api

    progress = not getattr(args, "no_progress", False)
    if args.command == "phantom":
        options = {key: value for key, value in (("frames", args.frames), ("modality", args.modality)) if value is not None}
        if args.flow_pairs:
            options["flow_pairs"] = args.flow_pairs
        if args.views:
            options["views"] = True
        size = args.size if args.size is None or len(args.size) > 1 else args.size[0]
        if isinstance(size, list) and len(size) != 3:
            raise MedsynthError(f"--size takes one side or X Y Z, got {len(size)} numbers")
        print(api.phantom(args.kind, args.out, n=args.n, seed=args.seed, size=tuple(size) if isinstance(size, list) else size,
                          progress=progress, force=args.force, **options))
    elif args.command == "prepare":
        given = {"size": args.size, "keep_aspect": args.keep_aspect, "crop": args.crop, "spacing": args.spacing,
                 "orientation": args.orientation, "normalize": args.normalize, "seed": args.seed,
                 "ct_window": tuple(args.ct_window) if args.ct_window else None, "series": args.series, "keep_color": args.keep_color}
        settings = {key: value for key, value in given.items() if value is not None}
        print(api.prepare(args.src, args.out, recipe=args.recipe, force=args.force, progress=progress, **settings))
    elif args.command == "train":
        overrides = list(args.overrides)
        overrides += [f"train.devices={args.devices}"] if args.devices else []
        overrides += [f"train.strategy={args.strategy}"] if args.strategy else []
        overrides += [f"train.num_nodes={args.num_nodes}"] if args.num_nodes is not None else []
        if args.dry_run:
            import json

            staged = [*overrides, f"model.stage={args.stage}"] if args.stage else overrides
            estimate = api.estimate(args.recipe, data=args.data, config=args.config, overrides=staged, size=args.size)
            print(json.dumps(estimate.as_dict(), indent=2) if args.json else estimate.table())
            return
        if args.json or args.size:
            raise MedsynthError("train: --json and --size go with --dry-run")
        run = api.train(args.recipe, data=args.data, config=args.config, overrides=overrides, out=args.out,
                        resume=args.resume, force=args.force, init=args.init, folds=args.folds, progress=progress, stage=args.stage)
        from medsynth.runs import is_rank_zero

        if is_rank_zero():  # the other ranks of a multi-process run print nothing
            print(run.path)
    elif args.command == "plan":
        made = api.plan(args.data, args.recipe, args.out, gpu=args.gpu, memory=args.memory, hours=args.hours, config=args.config,
                        overrides=args.overrides, force=args.force)
        print(made.estimate.table())
        print(made.path)
    elif args.command == "sample":
        settings = {"guidance": args.guidance, "steps": args.steps, "sampler": args.sampler}
        paths = api.sample(args.run, n=args.n, mode=args.mode, class_name=args.class_name, condition=args.condition,
                           out=args.out, seed=args.seed, force=args.force, progress=progress, phases=args.phases,
                           overrides=[f"sample.{key}={value}" for key, value in settings.items() if value is not None])
        print(f"{len(paths)} files written under {paths[0].parent.parent if paths else args.out}")
    elif args.command == "register":
        api.register(args.fixed, args.moving, out=args.out, data=args.data, config=args.config,
                     overrides=args.overrides, reference_phase=args.reference_phase, progress=progress,
                     pairs=args.pairs, batch=args.batch, devices=args.devices, force=args.force, landmarks=args.landmarks)
    elif args.command == "render":
        print(api.render(args.frames, args.out, field=args.field, still=args.still, views=tuple(args.views.split(",")),
                         slices=args.slices, anchor=args.anchor, style=args.style, fps=args.fps, force=args.force))
    elif args.command == "reconstruct":
        print(api.reconstruct(args.run, args.sax, args.lax, out=args.out, factor=args.factor, method=args.method,
                              prior_run=args.prior_run, keep_steps=args.keep_steps, overrides=args.overrides, force=args.force,
                              progress=progress))
    elif args.command == "evaluate":
        import json

        print(json.dumps(api.evaluate(args.run, data=args.data, progress=progress, reconstruction=args.reconstruction,
                                       overrides=args.overrides), indent=2))
    elif args.command == "report":
        print(api.report(args.run))
    elif args.command == "demo":
        from medsynth.demo import run_demo

        run_demo(args.recipe, out=args.out, force=args.force, progress=progress)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("MEDSYNTH_DEBUG", "") not in ("", "0")
    argv = [arg for arg in argv if arg != "--debug"]
    # the first word is the command (skipping the value of a global --max-voxels N)
    command = next((arg for i, arg in enumerate(argv) if not arg.startswith("-") and (i == 0 or argv[i - 1] != "--max-voxels")), None)
    args = build_parser(command if command in COMMANDS else "").parse_args(argv)
    for message in _HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=message)
    try:
        with _environment(args):
            run_command(args)
    except KeyboardInterrupt as exc:
        if debug:
            raise
        print(f"medsynth: {_interrupted(exc)}", file=sys.stderr)
        return 130
    except Exception as exc:
        if debug:
            raise
        code, line = _one_line(args.command, exc)
        from medsynth.runs import is_rank_zero

        if is_rank_zero() or not isinstance(exc, MedsynthError):  # rank 0 says what every rank met (same inputs, synced steps)
            print(line, file=sys.stderr)
        return code
    return 0


def _interrupted(exc: KeyboardInterrupt) -> str:
    from medsynth.errors import TrainingInterrupted

    if not isinstance(exc, TrainingInterrupted):
        return "interrupted"
    if exc.resumable:
        return f"interrupted; continue with `medsynth train --resume {exc.run}`"
    return f"interrupted before the first checkpoint of {exc.run}; start it again with --force"


def _one_line(command: str, exc: Exception) -> tuple[int, str]:
    """The one line and exit status of a failure: 2 for what the user can cause or meet (medsynth's
    own errors, refusals of Lightning, torch and the OS), 1 for anything else (a bug). Newlines and other
    control characters left in a message (a file name's) are escaped: the line stays one line."""
    from medsynth.errors import one_line

    if isinstance(exc, MedsynthError):
        return 2, one_line(f"medsynth: error: {exc}")
    text = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
    text = text if len(text) <= 300 else text[:297] + "..."
    kind = type(exc).__name__
    if isinstance(exc, (OSError, RuntimeError, ValueError, MemoryError)) or kind == "MisconfigurationException":
        return 2, one_line(f"medsynth {command}: error: {kind}: {text} (--debug shows the traceback)")
    return 1, one_line(f"medsynth {command}: internal error: {kind}: {text} (please report it with the output of --debug)")


if __name__ == "__main__":
    sys.exit(main())
