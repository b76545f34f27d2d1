"""The `medsynth` command: parses arguments, calls :mod:`medsynth.api`, prints errors as one line."""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence

from medsynth import __version__
from medsynth.errors import MedsynthError


# Notices from inside MONAI and Lightning that a user can do nothing about; they would bury
# medsynth's own one-line results (e.g. a registration's quality line under 12 lines of them).
_HARMLESS_WARNINGS = (
    r"monai\.networks\.blocks\.Warp: Using PyTorch native grid_sample",
    r"Using a non-tuple sequence for multidimensional indexing is deprecated",  # MONAI's BendingEnergyLoss
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",  # Lightning's _pytree
)


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(v) for v in text.replace("x", ",").split(",") if v)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medsynth", description="Conditional generative synthesis of medical images and motion.")
    parser.add_argument("--version", action="version", version=f"medsynth {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("phantom", help="write a procedural phantom dataset with exact ground truth")
    p.add_argument("kind", choices=["cilia", "cardiac", "lung", "coronary"])
    p.add_argument("--out", required=True)
    p.add_argument("--n", type=int, default=10, help="images per class (cilia) or subjects")
    p.add_argument("--size", type=int, default=None, help="image size in voxels")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--frames", type=int, default=None, help="cardiac: frames per cycle")
    p.add_argument("--modality", choices=["ct", "mri"], default=None, help="cardiac: contrast")
    p.add_argument("--flow-pairs", action="store_true", help="cardiac: also write template_img_N.npy + flow_N.npy pairs")

    p = sub.add_parser("prepare", help="import a dataset and prepare it for training")
    p.add_argument("src")
    p.add_argument("--out", required=True)
    p.add_argument("--recipe", default=None, help="fill the settings not given with the recipe's (sdm: --normalize ct --crop)")
    p.add_argument("--size", type=int, default=None, help="square/cubic output size")
    p.add_argument("--keep-aspect", action="store_true", default=None, help="pad instead of stretching to the size")
    p.add_argument("--crop", action="store_true", default=None, help="crop/pad to the size around the label foreground, keeping the spacing")
    p.add_argument("--spacing", type=_floats, default=None, help="target spacing in mm, e.g. 1.5,1.5,2")
    p.add_argument("--orientation", default=None, help="reorient 3D images, e.g. RAS")
    p.add_argument("--normalize", choices=["percentile", "zscore", "ct", "none"], default=None, help="default: percentile")
    p.add_argument("--ct-window", type=float, nargs=2, default=None, metavar=("LO", "HI"), help="HU window for --normalize ct")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--force", action="store_true")
    p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser("train", help="train a recipe (or continue a run with --resume)")
    p.add_argument("recipe", nargs="?", default=None)
    p.add_argument("--data", default=None, help="prepared dataset folder")
    p.add_argument("--config", default=None, help="YAML file or shipped config name (e.g. cvae-224)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", default=None, help="run directory (default runs/RECIPE-TIME)")
    p.add_argument("--resume", default=None, metavar="RUN")
    p.add_argument("--devices", default=None, help="shortcut for --set train.devices=...")
    p.add_argument("--strategy", default=None, help="shortcut for --set train.strategy=... (e.g. ddp)")
    p.add_argument("--force", action="store_true", help="start over in an existing run directory")
    p.add_argument("--stage", choices=["low", "high"], default=None, help="sdm: shortcut for --set model.stage=...")
    p.add_argument("--init", default=None, metavar="CKPT", help="start from these weights (a run, .safetensors or .ckpt)")

    p = sub.add_parser("sample", help="generate from a trained run")
    p.add_argument("run")
    p.add_argument("--n", type=int, default=None, help="samples per class or per label map (default 16; 1 with --condition)")
    p.add_argument("--class", dest="class_name", default=None)
    p.add_argument("--condition", default=None, help="conditioning file or folder")
    p.add_argument("--mode", default="random", choices=["random", "grid", "plane", "interpolate"])
    p.add_argument("--out", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (>= 0)")
    p.add_argument("--steps", type=int, default=None, help="sampler steps")
    p.add_argument("--sampler", default=None, help="ddpm | ddim | dpmpp | rflow")

    p = sub.add_parser("register", help="B-spline registration: FIXED MOVING --out FIELD, or --data DIR --out DIR")
    p.add_argument("fixed", nargs="?", default=None)
    p.add_argument("moving", nargs="?", default=None)
    p.add_argument("--out", required=True, help="field NIfTI (pair) or output folder (dataset)")
    p.add_argument("--data", default=None, help="dataset mode: a phase-series dataset or folder of 4D NIfTIs")
    p.add_argument("--reference-phase", type=int, default=0)
    p.add_argument("--config", default=None, help="YAML of registration settings")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="e.g. control_spacing_mm=15, diffeomorphic=true, similarity=mi")

    p = sub.add_parser("render", help="GIF movie of a 4D sequence or field, or a still figure")
    p.add_argument("frames", help="4D NIfTI, folder of 3D frames, or one 3D image")
    p.add_argument("--out", required=True, help=".gif (movie) or .png (with --still)")
    p.add_argument("--field", default=None, help="field file(s) in mm (one per frame, or one)")
    p.add_argument("--still", action="store_true")
    p.add_argument("--views", default="axial,coronal,sagittal")
    p.add_argument("--slices", type=int, default=1)
    p.add_argument("--anchor", choices=["middle", "first", "last"], default="middle")
    p.add_argument("--style", choices=["quiver", "magnitude"], default="quiver")
    p.add_argument("--fps", type=float, default=5.0)

    p = sub.add_parser("evaluate", help="compute metrics.json for a run")
    p.add_argument("run")
    p.add_argument("--data", default=None)

    p = sub.add_parser("report", help="write report.html for a run")
    p.add_argument("run")

    p = sub.add_parser("demo", help="phantom -> prepare -> train -> sample -> evaluate -> report")
    p.add_argument("recipe", nargs="?", default="cvae")
    p.add_argument("--out", default="demo-output")
    p.add_argument("--force", action="store_true")
    return parser


def run_command(args: argparse.Namespace) -> None:
    from medsynth import api

    if args.command == "phantom":
        options = {key: value for key, value in (("frames", args.frames), ("modality", args.modality)) if value is not None}
        if args.flow_pairs:
            options["flow_pairs"] = True
        print(api.phantom(args.kind, args.out, n=args.n, seed=args.seed, size=args.size, **options))
    elif args.command == "prepare":
        given = {"size": args.size, "keep_aspect": args.keep_aspect, "crop": args.crop, "spacing": args.spacing,
                 "orientation": args.orientation, "normalize": args.normalize, "seed": args.seed,
                 "ct_window": tuple(args.ct_window) if args.ct_window else None}
        settings = {key: value for key, value in given.items() if value is not None}
        print(api.prepare(args.src, args.out, recipe=args.recipe, force=args.force, progress=not args.no_progress, **settings))
    elif args.command == "train":
        overrides = list(args.overrides)
        overrides += [f"train.devices={args.devices}"] if args.devices else []
        overrides += [f"train.strategy={args.strategy}"] if args.strategy else []
        overrides += [f"model.stage={args.stage}"] if args.stage else []
        print(api.train(args.recipe, data=args.data, config=args.config, overrides=overrides, out=args.out,
                        resume=args.resume, force=args.force, init=args.init).path)
    elif args.command == "sample":
        settings = {"guidance": args.guidance, "steps": args.steps, "sampler": args.sampler}
        paths = api.sample(args.run, n=args.n, mode=args.mode, class_name=args.class_name, condition=args.condition,
                           out=args.out, seed=args.seed, force=args.force,
                           overrides=[f"sample.{key}={value}" for key, value in settings.items() if value is not None])
        print(f"{len(paths)} files written under {paths[0].parent.parent if paths else args.out}")
    elif args.command == "register":
        api.register(args.fixed, args.moving, out=args.out, data=args.data, config=args.config,
                     overrides=args.overrides, reference_phase=args.reference_phase)
    elif args.command == "render":
        print(api.render(args.frames, args.out, field=args.field, still=args.still, views=tuple(args.views.split(",")),
                         slices=args.slices, anchor=args.anchor, style=args.style, fps=args.fps))
    elif args.command == "evaluate":
        import json

        print(json.dumps(api.evaluate(args.run, data=args.data), indent=2))
    elif args.command == "report":
        print(api.report(args.run))
    elif args.command == "demo":
        api.demo(args.recipe, out=args.out, force=args.force)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for message in _HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=message)
    try:
        run_command(args)
    except MedsynthError as exc:
        print(f"medsynth: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("medsynth: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
