"""Scoring every reconstruction method on the held-out subjects of a UK Biobank-layout folder with thin-slice truth.

For each held-out subject and its ED and ES frames (``Info.cfg``), the acquired ``sa.nii.gz`` (+ the
``la_*.nii.gz`` views) is reconstructed by every method of :data:`EVAL_METHODS` at the factor that puts the
fine grid on the truth's (``sa_hr.nii.gz``, ``sa_hr_gt.nii.gz``, as the cardiac phantom writes them), and
judged by :mod:`medsynth.evaluate.cardiac`: PSNR/SSIM (whole, heart), Dice/HD95 of a 2D segmenter
trained on the training subjects' thin slices, Dice on the LAX planes (labels resliced nearest-neighbour:
one-hot sampled by a :class:`~medsynth.inverse.operators.PlaneOperator`, argmax), EDV/ESV/EF errors and the
seconds per volume. The truth itself, segmented the same way, is scored as ``truth``: the segmenter's ceiling.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medsynth.data.cine import HR_LABEL_NAME, HR_NAME, SAX_NAME, cine_frame, import_ukbb, lax_views
from medsynth.data.io import load_image, spacing_of
from medsynth.data.splits import subject_splits
from medsynth.errors import BadInputError, MedsynthError
from medsynth.evaluate.cardiac import (
    class_indices,
    ejection_fraction,
    heart_mask,
    lv_volume_ml,
    psnr,
    segment_volume,
    ssim,
    structure_classes,
    structure_scores,
    train_slice_segmenter,
)
from medsynth.inverse.latent import ReconstructSettings
from medsynth.inverse.operators import PlaneOperator
from medsynth.inverse.planes import Plane
from medsynth.inverse.prior import SlicePrior
from medsynth.inverse.reconstruct import reconstruct_stack
from medsynth.runs import atomic_write_bytes, atomic_write_json

__all__ = ["EVAL_METHODS", "EvalMethod", "reconstruction_figures", "reconstruction_metrics"]

@dataclass(frozen=True)
class EvalMethod:
    """One scored row: ``reconstruct_stack``'s ``method`` with ``overrides`` of the settings, the prior it uses
    (``"diffae"``, ``"ddim"`` or ``None``), whether it sees the LAX views, and ``no_prior``: the row that is the same
    method without its prior (the prior's contribution is the difference)."""

    method: str
    prior: str | None = None
    lax: bool = False
    overrides: dict[str, Any] = field(default_factory=dict)
    no_prior: str | None = None


# The learned methods and, for each, the same fitting without the prior: ``pnp`` with its denoising term off is the
# SAX and LAX terms optimised in voxels from the cubic start (``data_terms``), which is also what ``latent`` is
# without its decoder (the same start, the same terms, no diffusion); ``diffpir`` without its denoiser keeps its
# schedule of data steps. ``codes_interpolation`` is the original's slerp/lerp of the observed slices' codes,
# decoded without optimisation (``interpolation_psnr_codes``: its PSNR on the slices between the observed ones).
EVAL_METHODS: dict[str, EvalMethod] = {
    "nearest": EvalMethod("nearest"), "linear": EvalMethod("linear"), "cubic": EvalMethod("cubic"),
    "diffae_lax": EvalMethod("latent", "diffae", True, no_prior="data_terms"),
    "diffae_sax_only": EvalMethod("latent", "diffae", False, no_prior="data_terms_sax_only"),
    "ddim_lax": EvalMethod("latent", "ddim", True, no_prior="data_terms"),
    "pnp": EvalMethod("pnp", "diffae", True, no_prior="data_terms"),
    "pnp_sax_only": EvalMethod("pnp", "diffae", False, no_prior="data_terms_sax_only"),
    "diffpir": EvalMethod("diffpir", "diffae", True, no_prior="diffpir_no_prior"),
    "diffpir_sax_only": EvalMethod("diffpir", "diffae", False, no_prior="diffpir_sax_only_no_prior"),
    "data_terms": EvalMethod("pnp", "diffae", True, {"pnp_weight": 0.0}),
    "data_terms_sax_only": EvalMethod("pnp", "diffae", False, {"pnp_weight": 0.0}),
    "diffpir_no_prior": EvalMethod("diffpir", "diffae", True, {"diffpir_prior": False}),
    "diffpir_sax_only_no_prior": EvalMethod("diffpir", "diffae", False, {"diffpir_prior": False}),
    "codes_interpolation": EvalMethod("latent", "diffae", False, {"init": "slerp", "iterations": 0}),
}
# rows that only serve another's measurement: scored, not drawn in the figure
ABLATIONS = {spec.no_prior for spec in EVAL_METHODS.values() if spec.no_prior} | {"codes_interpolation"}


def _labels(manifest_labels: dict[str, str]) -> dict[int, str]:
    return {int(k): v for k, v in manifest_labels.items()}


def _segmenter(data_dir: Path, subjects: Sequence[str], values: Sequence[int], epochs: int, seed: int) -> Any:
    """The 2D segmenter, trained on every thin slice (all frames) of the training subjects' truth."""
    slices, labels = [], []
    for subject in subjects:
        image, label = load_image(data_dir / subject / HR_NAME).numpy(), load_image(data_dir / subject / HR_LABEL_NAME).numpy()
        slices.append(np.moveaxis(image, 3, 1).reshape(-1, *image.shape[1:3]))  # (T * Z, X, Y)
        labels.append(class_indices(np.moveaxis(label, 3, 1).reshape(-1, *label.shape[1:3]), values))
    if not slices:
        raise MedsynthError(f"{data_dir}: no training subject with {HR_NAME} to train the segmenter on")
    x = torch.from_numpy(np.concatenate(slices)).float()[:, None]
    return train_slice_segmenter(x, torch.from_numpy(np.concatenate(labels)), len(values), epochs=epochs, seed=seed)


def _lax_labels(labels: np.ndarray, operator: PlaneOperator, num_classes: int) -> np.ndarray:
    """Class indices (X, Y, Z) resliced on a plane (nearest-neighbour: the one-hot sampled, argmax), (nu, nv)."""
    onehot = torch.from_numpy(np.eye(num_classes, dtype=np.float32)[labels]).permute(3, 0, 1, 2)[None]  # (1, C, X, Y, Z)
    return operator(onehot)[0].argmax(0).numpy()


@dataclass
class _Truth:
    """One held-out case's truth: volume and class indices (X, Y, Z), heart mask, spacing (mm), voxel volume (mm^3),
    the LAX planes' operators on the truth grid and the true labels resliced on each (with the plane's mask)."""

    volume: np.ndarray
    labels: np.ndarray
    heart: np.ndarray
    spacing: np.ndarray
    voxel_mm3: float
    operators: list[PlaneOperator]
    planes: list[tuple[np.ndarray, np.ndarray]]


def _score(case: _Truth, volume: np.ndarray, segmenter: Any, classes: dict[str, int], num_classes: int,
           intensities: bool = True) -> tuple[dict[str, float], float | None]:
    """One volume's scores against the case's truth, and its segmented LV volume (ml; None without an LV class)."""
    seg = segment_volume(segmenter, volume)
    row = structure_scores(seg, case.labels, classes, case.spacing)
    if intensities:
        row |= {"psnr": psnr(volume, case.volume), "ssim": ssim(volume, case.volume),
                "psnr_heart": psnr(volume, case.volume, case.heart), "ssim_heart": ssim(volume, case.volume, case.heart)}
    for op, (plane_truth, mask) in zip(case.operators, case.planes):
        plane = _lax_labels(seg, op, num_classes)
        for key, value in structure_scores(plane[mask], plane_truth[mask], classes, hd95=False).items():
            row[f"lax_{key}"] = row.get(f"lax_{key}", 0.0) + value / len(case.operators)
    return row, (lv_volume_ml(seg, classes["lv"], case.voxel_mm3) if "lv" in classes else None)


def reconstruction_metrics(prior: SlicePrior | None, data_dir: str | Path, ddim_prior: SlicePrior | None = None,
                           methods: Sequence[str] = tuple(EVAL_METHODS), settings: ReconstructSettings | None = None, *,
                           held_out: Sequence[str] | None = None, train: Sequence[str] | None = None, segmenter_epochs: int = 20,
                           seed: int = 0, out: Path | None = None) -> dict[str, Any]:
    """Reconstruct the held-out subjects of ``data_dir`` with every method and score them against the truth.

    Args:
        prior: the DiffAE prior (``diffae_*``, ``pnp``); ddim_prior: the DDIM baseline's (``ddim_lax``). A
            method whose prior is missing is skipped (listed under ``reconstruction_skipped``).
        data_dir: a UK Biobank-layout folder whose subjects have ``sa_hr.nii.gz`` and ``sa_hr_gt.nii.gz``.
        methods: names of :data:`EVAL_METHODS`.
        held_out, train: subjects to reconstruct and to train the segmenter on (default: the test / train
            split of :func:`~medsynth.data.splits.subject_splits` at 0.1 / 0.2, seed 0, prepare's defaults).
        out: folder for ``volumes.npz`` (the first case: truth and each method's volume, for figures) and
            ``histories.json`` (each latent method's losses per iteration, first case).

    Returns:
        Per method ``m``: ``reconstruction_{psnr,ssim}_m`` and ``reconstruction_{psnr,ssim}_heart_m``,
        ``reconstruction_dice_<s>_m``, ``reconstruction_hd95_m_<s>`` (mm) and ``reconstruction_lax_dice_<s>_m`` for s in
        lv/myo/rv, ``reconstruction_{edv,esv,ef}_error_m`` (ml, ml, percentage points, mean absolute over subjects),
        ``reconstruction_seconds_m`` (mean wall seconds per volume); the same segmentation scores for ``truth``;
        ``reconstruction_pnp_speedup`` (seconds of diffae_lax / pnp); for each learned method ``m``,
        ``reconstruction_psnr_m_no_prior`` and ``reconstruction_psnr_heart_m_no_prior`` (its ``no_prior`` row's);
        ``interpolation_psnr_codes`` (``codes_interpolation`` on the slices between the observed ones); counts and subjects.
    """
    data_dir, settings = Path(data_dir), settings or ReconstructSettings()
    unknown = [m for m in methods if m not in EVAL_METHODS]
    if unknown:
        raise MedsynthError(f"evaluate --reconstruction: unknown method(s) {', '.join(unknown)} (use: {', '.join(EVAL_METHODS)})")
    manifest = import_ukbb(data_dir)
    if held_out is None or train is None:
        splits = subject_splits(manifest, 0.1, 0.2, 0)
        held_out = held_out if held_out is not None else [s for s, split in splits.items() if split == "test"]
        train = train if train is not None else [s for s, split in splits.items() if split == "train"]
    held_out = [s for s in held_out if (data_dir / s / HR_NAME).is_file()]
    if not held_out:
        raise BadInputError(data_dir, f"no held-out subject with {HR_NAME} (the thin-slice truth) to evaluate reconstruction on")
    names = _labels(manifest.labels)
    values, classes = sorted(names), structure_classes(names)
    segmenter = _segmenter(data_dir, [s for s in train if (data_dir / s / HR_NAME).is_file()], values, segmenter_epochs, seed)
    priors = {"diffae": prior, "ddim": ddim_prior, None: None}
    chosen = [m for m in methods if EVAL_METHODS[m].prior is None or priors[EVAL_METHODS[m].prior] is not None]
    scores: dict[str, list[dict[str, float]]] = {m: [] for m in ["truth", *chosen]}
    lv_ml: dict[str, dict[tuple[str, str], float]] = {m: {} for m in ["truth", *chosen]}
    kept: dict[str, np.ndarray] = {}
    between_psnr: list[float] = []
    histories: dict[str, dict[str, list[float]]] = {}
    for subject in held_out:
        info = manifest.cine[subject]
        frames = {"ed": info["ed"], **({"es": info["es"]} if info.get("es") is not None and info["es"] != info["ed"] else {})}
        views = lax_views(data_dir / subject)
        for phase, t in frames.items():
            sax, sax_affine = cine_frame(data_dir / subject / SAX_NAME, t)
            truth, hr_affine = cine_frame(data_dir / subject / HR_NAME, t)
            truth_labels = class_indices(cine_frame(data_dir / subject / HR_LABEL_NAME, t)[0].astype(np.int64), values)
            factor = (truth.shape[2] - 1) // max(1, sax.shape[2] - 1)
            lax = [(name, *cine_frame(path, t)) for name, path in sorted(views.items())]
            operators = [PlaneOperator(hr_affine, truth.shape, Plane.from_affine(affine, image.shape), profile_samples=1)
                         for _, image, affine in lax]
            case = _Truth(truth, truth_labels, heart_mask(truth_labels), spacing_of(hr_affine),
                          float(abs(np.linalg.det(hr_affine[:3, :3]))), operators,
                          [(_lax_labels(truth_labels, op, len(values)), op.mask().numpy()) for op in operators])

            def score(method: str, volume: np.ndarray, seconds: float | None, case: _Truth = case, key: tuple[str, str] = (subject, phase)) -> None:
                row, lv = _score(case, volume, segmenter, classes, len(values), intensities=method != "truth")
                if seconds is not None:
                    row["seconds"] = seconds
                scores[method].append(row)
                if lv is not None:
                    lv_ml[method][key] = lv

            score("truth", truth, None)
            first = not kept
            if first:
                kept["truth"] = truth
            for method in chosen:
                spec = EVAL_METHODS[method]
                volume, affine, history = reconstruct_stack(
                    priors[spec.prior], (sax, sax_affine), [(image, a) for _, image, a in lax] if spec.lax else [], factor, spec.method,
                    settings.model_copy(update=spec.overrides), lax_names=[str(views[name]) for name, _, _ in lax] if spec.lax else None)
                if volume.shape != truth.shape or not np.allclose(affine, hr_affine, atol=1e-3):
                    raise BadInputError(data_dir / subject / HR_NAME, f"its grid {truth.shape} is not the factor-{factor} "
                                        f"reconstruction grid {volume.shape} of {SAX_NAME}")
                score(method, volume, history.seconds)
                if method == "codes_interpolation":  # the slices between the observed ones: what the codes' interpolation made
                    between = np.broadcast_to(np.arange(truth.shape[2]) % factor != 0, truth.shape)
                    between_psnr.append(psnr(volume, truth, between))
                if first and method not in ABLATIONS:
                    kept[method] = volume
                    if history.losses:
                        histories[method] = history.losses
    metrics = _summarise(scores, lv_ml, classes)
    metrics |= {"reconstruction_subjects": list(held_out), "reconstruction_cases": len(scores["truth"]),
                "reconstruction_factor": factor, "reconstruction_methods": chosen,
                "reconstruction_skipped": [m for m in methods if m not in chosen]}
    for method in chosen:
        ablation = EVAL_METHODS[method].no_prior
        for measure in ("psnr", "psnr_heart"):
            if ablation in chosen:
                metrics[f"reconstruction_{measure}_{method}_no_prior"] = metrics[f"reconstruction_{measure}_{ablation}"]
    if between_psnr:
        metrics["interpolation_psnr_codes"] = float(np.mean(between_psnr))
    seconds = metrics.get("reconstruction_seconds_diffae_lax"), metrics.get("reconstruction_seconds_pnp")
    if seconds[0] is not None and seconds[1]:
        metrics["reconstruction_pnp_speedup"] = seconds[0] / seconds[1]
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        np.savez_compressed(buffer, **kept)
        atomic_write_bytes(out / "volumes.npz", buffer.getvalue())
        atomic_write_json(out / "histories.json", histories)
    return metrics


def _summarise(scores: dict[str, list[dict[str, float]]], lv_ml: dict[str, dict[tuple[str, str], float]],
               classes: dict[str, int]) -> dict[str, Any]:
    """Means over cases (NaN-aware) of every score, the issue's key names, and the volume and EF errors over subjects."""
    metrics: dict[str, Any] = {}
    for method, rows in scores.items():
        for key in sorted({k for row in rows for k in row}):
            values = np.array([row.get(key, np.nan) for row in rows], dtype=np.float64)
            mean = float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")
            if key.startswith("hd95_"):  # the names: reconstruction_dice_myo_<m>, reconstruction_hd95_<m>_myo
                metrics[f"reconstruction_hd95_{method}_{key[5:]}"] = mean
            else:
                metrics[f"reconstruction_{key}_{method}"] = mean
        truth, own = lv_ml["truth"], lv_ml[method]
        if method == "truth" or not own:
            continue
        cases = [case for case in own if case in truth]
        for phase in ("ed", "es"):
            errors = [abs(own[c] - truth[c]) for c in cases if c[1] == phase]
            metrics[f"reconstruction_{phase}v_error_{method}"] = float(np.mean(errors)) if errors else float("nan")
        subjects = {c[0] for c in cases if (c[0], "es") in own}
        errors = [abs(ejection_fraction(own[(s, "ed")], own[(s, "es")]) - ejection_fraction(truth[(s, "ed")], truth[(s, "es")]))
                  for s in subjects]
        metrics[f"reconstruction_ef_error_{method}"] = float(np.mean(errors)) if errors else float("nan")
    return metrics


def reconstruction_figures(folder: Path) -> list[tuple[str, Any]]:
    """(title, matplotlib Figure) for the report from what :func:`reconstruction_metrics` kept in ``folder``: one
    figure of the truth and every method side by side (the middle X and Y through-plane sections, slice axis
    vertical, and the X section's difference from the truth; PSNR in the titles); the latent methods' losses per
    iteration. Empty when nothing was kept."""
    from matplotlib.figure import Figure

    figures: list[tuple[str, Any]] = []
    if not (folder / "volumes.npz").is_file():
        return figures
    with np.load(folder / "volumes.npz") as data:
        volumes = {name: data[name] for name in data.files}
    truth = volumes.pop("truth")
    lo, hi = float(truth.min()), float(truth.max())

    def sections(volume: np.ndarray) -> list[np.ndarray]:
        return [volume[volume.shape[0] // 2].T, volume[:, volume.shape[1] // 2].T]  # (Z, Y) and (Z, X)

    # One figure: the same sections through the truth and every method (cubic first), PSNR in the titles.
    order = sorted(volumes, key=lambda name: (name != "cubic", name))
    columns = [("truth", truth), *((name, volumes[name]) for name in order)]
    fig = Figure(figsize=(1.8 * len(columns), 1.9 * 3 + 0.3), layout="constrained")
    axes = fig.subplots(3, len(columns), squeeze=False)
    for column, (name, volume) in enumerate(columns):
        title = name if name == "truth" else f"{name}\n{psnr(volume, truth):.2f} dB"
        x_section, y_section = sections(volume)
        panels = [(x_section, lo, hi), (y_section, lo, hi), (np.abs(x_section - sections(truth)[0]), 0.0, hi - lo)]
        for row, (panel, vmin, vmax) in enumerate(panels):
            ax = axes[row, column]
            ax.imshow(panel, cmap="gray", vmin=vmin, vmax=vmax, aspect="auto", origin="lower", interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(title, fontsize=8)
            if column == 0:
                ax.set_ylabel(("x section", "y section", "|diff|, x section")[row], fontsize=8)
    figures.append(("Reconstruction: the same through-plane sections of the truth and every method (PSNR of the whole volume)", fig))
    histories = json.loads((folder / "histories.json").read_text()) if (folder / "histories.json").is_file() else {}
    if histories:
        fig = Figure(figsize=(3.2 * len(histories), 2.6))
        for ax, (method, losses) in zip(fig.subplots(1, len(histories), squeeze=False).flat, histories.items()):
            for name, values in losses.items():
                ax.semilogy(np.maximum(np.asarray(values, dtype=float), 1e-12), lw=1, label=name)
            ax.set_title(method, fontsize=9)
            ax.set_xlabel("iteration", fontsize=8)
            ax.legend(fontsize=6)
        fig.tight_layout()
        figures.append(("Reconstruction: optimisation curves (losses per Adam iteration, first held-out case)", fig))
    return figures
