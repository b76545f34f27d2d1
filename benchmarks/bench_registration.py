"""Benchmark: medsynth's B-spline FFD registration against SimpleITK's, on phantom pairs with known motion.

Pairs (the test size): a cardiac CT end-diastole -> end-systole pair (48 x 48 x 32) and a
lung 4D CT end-inhale -> end-exhale pair (48 x 48 x 24), subject 0 of
``medsynth phantom cardiac|lung --seed 0``. The moving image is frame 0, the fixed image
the other frame, so a recovered field compares directly with the phantom's exact field.

Methods, all with control points every ``--spacing`` mm (default 20):

- medsynth: :class:`~medsynth.motion.registration.RegistrationConfig` defaults, and the
  same in diffeomorphic mode.
- SimpleITK "textbook": ``ImageRegistrationMethod`` + ``BSplineTransformInitializer``,
  Mattes mutual information (50 bins) on every voxel, L-BFGS-B (100 iterations,
  gradient tolerance 1e-5), shrink factors 4/2/1 with smoothing 2/1/0 voxels.
- SimpleITK "tuned": mean squares (right for same-modality pairs) on 10% random samples,
  otherwise as the textbook setting.

Reported: mean end-point error (mm) against the exact field inside the body and inside
the moving tissue (body where the true motion is >= 1 mm), the same for the zero field,
folding share (Jacobian determinant <= 0) and wall time.

Real CT size (issue 21, ``--case ct``): the same lung subject end-inhale -> end-exhale at
256 x 256 x 141 voxels of 1.95 x 1.95 x 2 mm (a thoracic CT's grid; 500 x 500 x 282 mm, the
thorax in air), with the lung's end-point error added. Beside medsynth's defaults:

- elastix (``itk-elastix``; not a medsynth dependency: ``.venv/bin/pip install itk-elastix==0.25.4``,
  left out with a line saying so when absent): ``GetDefaultParameterMap("bspline", 3, 10.0)``
  (3 resolutions x 256 iterations of adaptive stochastic gradient descent on 2048 random samples,
  Mattes MI + bending energy, 10 mm final grid), the field from ``transformix`` (LPS, turned to RAS).
- SimpleITK "short": the tuned setting cut to this size (mean squares on 1 % random samples,
  L-BFGS-B 30 iterations per level); the textbook one would take hours.

medsynth and elastix alternate ``--repeats`` times (timings on a shared CPU are noisy: the ratio
of neighbouring runs is the figure to quote). Rendering the phantom takes minutes; ``--cache FILE.npz``
keeps it for the next run.

Run: ``.venv/bin/python benchmarks/bench_registration.py [--threads 2] [--case all|phantom|ct] [--json results.json]``

On a CPU shared with other jobs, torch's OpenMP threads spin while they wait for each
other and lose their cores (a registration took 18-28 s instead of 5 s with 2 threads on
the 2-core machine under load), so the script sets ``OMP_WAIT_POLICY=PASSIVE`` (unless set)
before torch loads. ITK uses its own thread pool and is not affected.
"""

# ruff: noqa: E402  (the OpenMP setting must come before torch is imported)
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import contextlib
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from monai.data import MetaTensor

from medsynth.data.phantoms._scene import render_sequence
from medsynth.data.phantoms.cardiac import render_cardiac, sample_cardiac_params, subject_rng
from medsynth.data.phantoms.lung import LUNG_CENTRE_MM, _lung_anatomy, _lung_motion, render_lung, sample_lung_params
from medsynth.motion.fields import end_point_error, folding_share, mm_to_voxel, voxel_to_mm
from medsynth.motion.registration import RegistrationConfig, register

_LPS = np.diag([-1.0, -1.0, 1.0])  # ITK world coordinates are LPS, NIfTI/MONAI RAS


@dataclass
class Pair:
    name: str
    fixed: MetaTensor  # (1, X, Y, Z)
    moving: MetaTensor
    truth: torch.Tensor  # (3, X, Y, Z) voxels: warp_image(moving, truth) == fixed
    body: torch.Tensor  # (X, Y, Z) bool
    moving_tissue: torch.Tensor  # body where |truth| >= 1 mm
    lung: torch.Tensor | None = None  # (X, Y, Z) bool, the CT-size case


def phantom_pairs() -> list[Pair]:
    seed = int(subject_rng(0, 0).integers(2**31))  # subject 0 of `medsynth phantom ... --seed 0`
    cardiac = sample_cardiac_params(seed)
    sequences = [
        ("cardiac ED->ES (48x48x32)", render_cardiac(cardiac, frames=10, modality="ct", size=(48, 48, 32)), cardiac.end_systole(10)),
        ("lung inhale->exhale (48x48x24)", render_lung(sample_lung_params(seed), phases=10, size=(48, 48, 24)), 5),
    ]
    pairs = []
    for name, sequence, t in sequences:
        affine = torch.as_tensor(sequence.affine)
        truth = torch.from_numpy(sequence.fields[t])
        body = torch.from_numpy(sequence.labels[t] > 0)
        moving_tissue = body & (torch.linalg.vector_norm(voxel_to_mm(truth, sequence.affine), dim=0) >= 1.0)
        pairs.append(Pair(name, MetaTensor(torch.from_numpy(sequence.images[t])[None], affine=affine), MetaTensor(torch.from_numpy(sequence.images[0])[None], affine=affine), truth, body, moving_tissue))
    return pairs


CT_SIZE, CT_SPACING_MM = (256, 256, 141), (1.95, 1.95, 2.0)


def ct_pair(cache: str | None = None) -> Pair:
    """The lung subject of :func:`phantom_pairs` on a thoracic CT's grid, end-inhale (moving) -> end-exhale (fixed)."""
    if cache and Path(cache).exists():
        arrays = dict(np.load(cache))
    else:
        seed = int(subject_rng(0, 0).integers(2**31))
        params = sample_lung_params(seed)
        spacing = np.asarray(CT_SPACING_MM)
        affine = np.diag([*spacing, 1.0])
        affine[:3, 3] = np.asarray(LUNG_CENTRE_MM) - spacing * (np.asarray(CT_SIZE) - 1) / 2
        # render_lung fixes its field of view (and renders all 10 phases); the CT grid is wider, so its parts are used here.
        motion = _lung_motion(params, 10)
        sequence = render_sequence(_lung_anatomy(params, float(spacing.max())), lambda points, t: motion(points, (0, 5)[t]), 2, CT_SIZE, affine)
        arrays = {"images": sequence.images, "labels": sequence.labels, "fields": sequence.fields, "affine": sequence.affine}
        if cache:
            np.savez(cache, **arrays)
    affine = torch.as_tensor(arrays["affine"])
    truth, labels = torch.from_numpy(arrays["fields"][1]), torch.from_numpy(arrays["labels"][1])
    body = labels > 0
    moving_tissue = body & (torch.linalg.vector_norm(voxel_to_mm(truth, arrays["affine"]), dim=0) >= 1.0)
    image = [MetaTensor(torch.from_numpy(arrays["images"][t])[None], affine=affine) for t in (1, 0)]
    return Pair("lung inhale->exhale CT size (256x256x141)", image[0], image[1], truth, body, moving_tissue, lung=labels == 2)


def run_medsynth(pair: Pair, config: RegistrationConfig) -> tuple[torch.Tensor, float]:
    start = time.perf_counter()
    transform, _ = register(pair.fixed, pair.moving, config)
    field = transform.dense_field().as_tensor()
    return field, time.perf_counter() - start


def _to_sitk(image: MetaTensor) -> sitk.Image:
    affine = np.asarray(image.affine, dtype=np.float64)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    result = sitk.GetImageFromArray(np.ascontiguousarray(image.numpy()[0].transpose(2, 1, 0)).astype(np.float32))
    result.SetSpacing(spacing.tolist())
    result.SetOrigin((_LPS @ affine[:3, 3]).tolist())
    result.SetDirection((_LPS @ affine[:3, :3] / spacing).flatten().tolist())
    return result


def run_elastix(pair: Pair, threads: int) -> tuple[torch.Tensor, float]:
    """elastix's default B-spline registration (10 mm grid) and transformix's field, in voxels (RAS)."""
    import itk

    fixed, moving = (itk.GetImageFromArray(sitk.GetArrayFromImage(_to_sitk(image))) for image in (pair.fixed, pair.moving))
    for image, source in ((fixed, pair.fixed), (moving, pair.moving)):
        reference = _to_sitk(source)
        image.SetSpacing(reference.GetSpacing())
        image.SetOrigin(reference.GetOrigin())
        image.SetDirection(itk.matrix_from_array(np.asarray(reference.GetDirection()).reshape(3, 3)))
    parameters = itk.ParameterObject.New()
    parameters.AddParameterMap(parameters.GetDefaultParameterMap("bspline", 3, 10.0))
    # number_of_threads > 1 segfaults with the default map's two metrics (ITKElastix issues 160, 295): ITK's global setting instead.
    itk.MultiThreaderBase.SetGlobalDefaultNumberOfThreads(threads)
    start = time.perf_counter()
    _, result = itk.elastix_registration_method(fixed, moving, parameter_object=parameters, log_to_console=False)
    with tempfile.TemporaryDirectory() as scratch, contextlib.chdir(scratch):  # transformix leaves deformationField.nii in the cwd
        field = itk.transformix_deformation_field(moving, result)
    seconds = time.perf_counter() - start
    lps = itk.GetArrayFromImage(field).transpose(2, 1, 0, 3)  # (X, Y, Z, 3) mm, LPS
    ras = torch.from_numpy(np.einsum("ij,xyzj->ixyz", _LPS, lps.astype(np.float64)))
    return mm_to_voxel(ras, pair.fixed.affine).float(), seconds


def run_simpleitk(pair: Pair, setting: str, spacing_mm: float) -> tuple[torch.Tensor, float]:
    fixed, moving = _to_sitk(pair.fixed), _to_sitk(pair.moving)
    extent = [size * spacing for size, spacing in zip(fixed.GetSize(), fixed.GetSpacing())]
    method = sitk.ImageRegistrationMethod()
    method.SetInterpolator(sitk.sitkLinear)
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    mesh = [max(1, round(e / spacing_mm)) for e in extent]  # control points every spacing_mm
    method.SetInitialTransform(sitk.BSplineTransformInitializer(fixed, mesh, 3), inPlace=True)
    method.SetOptimizerAsLBFGSB(gradientConvergenceTolerance=1e-5, numberOfIterations=100)
    method.SetShrinkFactorsPerLevel([4, 2, 1])
    method.SetSmoothingSigmasPerLevel([2, 1, 0])
    if setting == "textbook":
        method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=50)
        method.SetMetricSamplingStrategy(method.NONE)
    elif setting == "short":
        method.SetOptimizerAsLBFGSB(gradientConvergenceTolerance=1e-5, numberOfIterations=30)
        method.SetMetricAsMeanSquares()
        method.SetMetricSamplingStrategy(method.RANDOM)
        method.SetMetricSamplingPercentage(0.01, seed=1)
    else:
        method.SetMetricAsMeanSquares()
        method.SetMetricSamplingStrategy(method.RANDOM)
        method.SetMetricSamplingPercentage(0.1, seed=1)
    start = time.perf_counter()
    transform = method.Execute(fixed, moving)
    seconds = time.perf_counter() - start
    displacement = sitk.TransformToDisplacementField(transform, sitk.sitkVectorFloat64, fixed.GetSize(), fixed.GetOrigin(), fixed.GetSpacing(), fixed.GetDirection())
    lps = sitk.GetArrayFromImage(displacement).transpose(2, 1, 0, 3)  # (X, Y, Z, 3) mm, LPS
    ras = torch.from_numpy(np.einsum("ij,xyzj->ixyz", _LPS, lps).copy())
    return mm_to_voxel(ras, pair.fixed.affine).float(), seconds


def _row(pair: Pair, method: str, field: torch.Tensor, seconds: float) -> dict:
    row = {
        "pair": pair.name,
        "method": method,
        "epe_body_mm": end_point_error(field, pair.truth, pair.fixed.affine, pair.body),
        "epe_moving_mm": end_point_error(field, pair.truth, pair.fixed.affine, pair.moving_tissue),
        "folding": folding_share(field) if field.abs().max() > 0 else 0.0,
        "seconds": seconds,
    }
    if pair.lung is not None:
        row["epe_lung_mm"] = end_point_error(field, pair.truth, pair.fixed.affine, pair.lung)
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for torch, ITK and elastix")
    parser.add_argument("--spacing", type=float, default=20.0, help="control-point spacing (mm) for medsynth and SimpleITK on the phantom pairs")
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--skip-textbook", action="store_true", help="leave out SimpleITK's slow textbook setting")
    parser.add_argument("--case", choices=["all", "phantom", "ct"], default="all", help="the 48^3 phantom pairs, the CT-size pair, or both")
    parser.add_argument("--repeats", type=int, default=1, help="CT size: medsynth and elastix alternate this many times")
    parser.add_argument("--cache", help="CT size: keep the rendered pair in this .npz (read when it exists)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(args.threads)

    methods = {
        "medsynth": lambda pair: run_medsynth(pair, RegistrationConfig(control_spacing_mm=args.spacing)),
        "medsynth diffeomorphic": lambda pair: run_medsynth(pair, RegistrationConfig(control_spacing_mm=args.spacing, diffeomorphic=True)),
        "SimpleITK tuned": lambda pair: run_simpleitk(pair, "tuned", args.spacing),
    }
    if not args.skip_textbook:
        methods["SimpleITK textbook"] = lambda pair: run_simpleitk(pair, "textbook", args.spacing)
    results = []
    if args.case in ("all", "phantom"):
        for pair in phantom_pairs():
            results.append(_row(pair, "zero field", torch.zeros_like(pair.truth), 0.0))
            for method, run in methods.items():
                results.append(_row(pair, method, *run(pair)))
    if args.case in ("all", "ct"):
        pair = ct_pair(args.cache)
        results.append(_row(pair, "zero field", torch.zeros_like(pair.truth), 0.0))
        try:
            import itk  # noqa: F401  (only to know whether elastix is there)

            elastix = True
        except ImportError:
            elastix = False
            print("elastix left out: install it with .venv/bin/pip install itk-elastix==0.25.4", flush=True)
        for _ in range(args.repeats):  # alternating, so that both see the same load
            results.append(_row(pair, "medsynth", *run_medsynth(pair, RegistrationConfig())))
            if elastix:
                results.append(_row(pair, "elastix default B-spline", *run_elastix(pair, args.threads)))
        results.append(_row(pair, "SimpleITK short", *run_simpleitk(pair, "short", 20.0)))

    print(f"\n{args.threads} threads, OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}, control spacing {args.spacing:g} mm (phantom pairs)\n")
    print("| pair | method | EPE body (mm) | EPE moving tissue (mm) | EPE lung (mm) | folding (%) | time (s) | vs zero field | time of the others / this |")
    print("|---|---|---|---|---|---|---|---|---|")
    for index, row in enumerate(results):
        same = [r for r in results if r["pair"] == row["pair"]]
        zero = same[0]["epe_body_mm"]
        if row["method"] == "medsynth" and "epe_lung_mm" in row:  # CT size: against the elastix run next to it
            neighbour = results[index + 1] if index + 1 < len(results) and results[index + 1]["method"].startswith("elastix") else None
            ratios = f"{neighbour['seconds'] / row['seconds']:.1f}x elastix" if neighbour else ""
        elif row["method"].startswith("medsynth"):
            ratios = ", ".join(f"{r['seconds'] / row['seconds']:.0f}x {r['method'].split()[-1]}" for r in same if r["method"].startswith("SimpleITK"))
        else:
            ratios = ""
        lung = f"{row['epe_lung_mm']:.3f}" if "epe_lung_mm" in row else "–"
        print(f"| {row['pair']} | {row['method']} | {row['epe_body_mm']:.3f} | {row['epe_moving_mm']:.3f} | {lung} | {100 * row['folding']:.3f} | {row['seconds']:.1f} | {row['epe_body_mm'] / zero:.2f} | {ratios} |")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"threads": args.threads, "spacing_mm": args.spacing, "results": results}, handle, indent=1)


if __name__ == "__main__":
    main()
