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

Run: ``.venv/bin/python benchmarks/bench_registration.py [--threads 2] [--json results.json]``

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
import json
import time
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
import torch
from monai.data import MetaTensor

from medsynth.data.phantoms.cardiac import render_cardiac, sample_cardiac_params, subject_rng
from medsynth.data.phantoms.lung import render_lung, sample_lung_params
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for torch and ITK")
    parser.add_argument("--spacing", type=float, default=20.0, help="control-point spacing (mm) for every method")
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--skip-textbook", action="store_true", help="leave out SimpleITK's slow textbook setting")
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
    for pair in phantom_pairs():
        zero = torch.zeros_like(pair.truth)
        row = {"pair": pair.name, "method": "zero field", "epe_body_mm": end_point_error(zero, pair.truth, pair.fixed.affine, pair.body), "epe_moving_mm": end_point_error(zero, pair.truth, pair.fixed.affine, pair.moving_tissue), "folding": 0.0, "seconds": 0.0}
        results.append(row)
        print(json.dumps(row), flush=True)
        for method, run in methods.items():
            field, seconds = run(pair)
            row = {
                "pair": pair.name,
                "method": method,
                "epe_body_mm": end_point_error(field, pair.truth, pair.fixed.affine, pair.body),
                "epe_moving_mm": end_point_error(field, pair.truth, pair.fixed.affine, pair.moving_tissue),
                "folding": folding_share(field),
                "seconds": seconds,
            }
            results.append(row)
            print(json.dumps(row), flush=True)

    print(f"\n{args.threads} threads, OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}, control spacing {args.spacing:g} mm\n")
    print("| pair | method | EPE body (mm) | EPE moving tissue (mm) | folding (%) | time (s) | vs zero field | SimpleITK time / this |")
    print("|---|---|---|---|---|---|---|---|")
    for row in results:
        same = [r for r in results if r["pair"] == row["pair"]]
        zero = same[0]["epe_body_mm"]
        ratios = ", ".join(f"{r['seconds'] / row['seconds']:.0f}x {r['method'].split()[-1]}" for r in same if r["method"].startswith("SimpleITK")) if row["method"].startswith("medsynth") else ""
        print(f"| {row['pair']} | {row['method']} | {row['epe_body_mm']:.3f} | {row['epe_moving_mm']:.3f} | {100 * row['folding']:.3f} | {row['seconds']:.1f} | {row['epe_body_mm'] / zero:.2f} | {ratios} |")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"threads": args.threads, "spacing_mm": args.spacing, "results": results}, handle, indent=1)


if __name__ == "__main__":
    main()
