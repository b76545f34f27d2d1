"""Respiratory motion against the real breathing: warped-image SSIM, the lung-volume curve, diaphragm excursion.

Used by ``motion-ldm`` beside :func:`medsynth.evaluate.fields.field_report`. A generated motion is
``P`` voxel fields ``u_t`` that warp the reference phase onto phase ``t`` (zero at the reference):
its lung at phase ``t`` is the reference lung warped by ``u_t``, its CT the reference warped by it.
The published anchor for the SSIM of a CT warped by generated respiratory motion to the real phase
is 0.92 +- 0.04.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from medsynth.data.fields import voxel_to_mm
from medsynth.evaluate.metrics import ssim
from medsynth.motion.fields import warp_image

__all__ = ["BreathingCase", "breathing_metrics", "lung_volume_curve", "superior_excursion_mm", "volume_ssim"]


def volume_ssim(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean SSIM of volumes ``(B, 1, *S)`` in [0, 1] (:func:`~medsynth.evaluate.metrics.ssim`, a window of 7 voxels,
    fewer on thin axes)."""
    return float(ssim(a.float(), b.float(), 7, fit="per_axis").mean())


def lung_volume_curve(lung_reference: torch.Tensor, fields: torch.Tensor) -> torch.Tensor:
    """Lung volume of each phase relative to the reference phase, ``(P,)``: the reference lung mask ``(*S)``
    warped by each field ``(P, 3, *S)`` (voxels; linear interpolation keeps partial volumes), summed."""
    mask = lung_reference.float()[None, None].expand(len(fields), 1, *lung_reference.shape)
    return warp_image(mask, fields.float()).flatten(1).sum(1) / mask[0].sum().clamp_min(1.0)


def superior_excursion_mm(field: torch.Tensor, affine: np.ndarray | torch.Tensor, region: torch.Tensor) -> float:
    """The diaphragm's excursion: the 95th percentile of the superior-inferior (world z, RAS) displacement
    magnitude (mm) of ``field`` ``(3, *S)`` voxels inside ``region`` ``(*S)`` (the lungs); NaN for an empty region."""
    si = voxel_to_mm(field.double(), affine)[2].abs()
    return float(torch.quantile(si[region.bool()].float(), 0.95)) if region.any() else float("nan")


@dataclass(frozen=True)
class BreathingCase:
    """One real subject's breathing: ``lungs`` ``(P, *S)`` bool lung masks of its phases, ``fields`` ``(P, 3, *S)``
    its real fields (true or registered; zero at the reference), its grid's ``affine`` and ``reference_phase``."""

    lungs: torch.Tensor
    fields: torch.Tensor
    affine: np.ndarray
    reference_phase: int = 0


def _range(values: Sequence[float]) -> tuple[float, float]:
    finite = [v for v in values if np.isfinite(v)]
    return (float(min(finite)), float(max(finite))) if finite else (float("nan"), float("nan"))


def breathing_metrics(held_out: Sequence[BreathingCase], generated: Sequence[torch.Tensor],
                      others: Sequence[BreathingCase] = ()) -> dict[str, object]:
    """Lung-volume curves and diaphragm excursion of generated motions against the real ones.

    Args:
        held_out: the real subjects the motions were generated for.
        generated: per held-out subject, ``(N, P, 3, *S)`` voxel fields of ``N`` generated motions.
        others: more real subjects (e.g. the training ones) for the range of real excursions.

    Returns:
        ``lung_volume_curve_generated`` / ``_real`` (mean over subjects, relative to the reference
        phase: the reference lung warped by the generated / the real fields), ``end_exhale_phase`` (the
        phase of smallest real lung volume), ``lung_volume_ratio_generated``
        / ``_real`` (the curves there), ``diaphragm_excursion_generated_mm`` / ``_real_mm`` (means at end-exhale),
        ``diaphragm_excursion_real_min_mm`` / ``_max_mm`` (over ``held_out`` and ``others``) and
        ``diaphragm_excursion_generated_in_real_range`` (share of generated motions inside that range).
    """
    # Both curves warp the same reference lung, by the real fields and by the generated ones: the same measure on
    # both sides (a thresholded label count differs from the interpolated sum by up to a slice: percents on 12 slices).
    real_curves = [lung_volume_curve(case.lungs[case.reference_phase], case.fields).double() for case in held_out]
    generated_curves = [torch.stack([lung_volume_curve(case.lungs[case.reference_phase], motion) for motion in motions]).mean(0).double()
                        for case, motions in zip(held_out, generated)]
    real_curve, generated_curve = torch.stack(real_curves).mean(0), torch.stack(generated_curves).mean(0)
    exhale = int(real_curve.argmin())
    excursions = [superior_excursion_mm(motion[exhale], case.affine, case.lungs[exhale]) for case, motions in zip(held_out, generated)
                  for motion in motions]
    real = [superior_excursion_mm(case.fields[exhale], case.affine, case.lungs[exhale]) for case in (*held_out, *others)]
    low, high = _range(real)
    return {"end_exhale_phase": exhale,
            "lung_volume_ratio_generated": float(generated_curve[exhale]), "lung_volume_ratio_real": float(real_curve[exhale]),
            "lung_volume_curve_generated": generated_curve.tolist(), "lung_volume_curve_real": real_curve.tolist(),
            "diaphragm_excursion_generated_mm": float(np.nanmean(excursions)), "diaphragm_excursion_real_mm": float(np.nanmean(real)),
            "diaphragm_excursion_real_min_mm": low, "diaphragm_excursion_real_max_mm": high,
            "diaphragm_excursion_generated_in_real_range": float(np.mean([low <= e <= high for e in excursions]))}
