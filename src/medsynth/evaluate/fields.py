"""Evaluation of generated deformation fields, shared by the motion recipes (``flow-cvae``, ``motion-ldm``).

Fields are channel-first displacements in **voxels** (MONAI's DDF, pull convention, see
:mod:`medsynth.motion.fields`); every distance is reported in **mm** through the one conversion
:func:`medsynth.data.fields.voxel_to_mm` with the field's 4x4 voxel-to-world affine, so anisotropic
and oblique grids weigh right. Masks are boolean ``(*S)`` (or ``(B, *S)``) on the field's grid.

Pure functions; :func:`field_report` assembles the metric dict a recipe writes to ``metrics.json``.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from scipy.stats import wasserstein_distance

from medsynth.data.fields import batched_field, mm_to_voxel, voxel_to_mm
from medsynth.data.io import spacing_of
from medsynth.motion.fields import epe_map_mm, jacobian_determinant  # epe_map_mm: re-exported

__all__ = [
    "ejection_fraction",
    "epe_map_mm",
    "epe_of_samples",
    "field_report",
    "jacobian_stats",
    "magnitude_wasserstein",
    "mean_flow_baseline",
    "nearest_training_field",
    "pairwise_diversity",
    "warped_volume_ml",
]

Affine = np.ndarray | torch.Tensor


def _affines(affine: Affine, batch: int) -> list[np.ndarray]:
    """One 4x4 array per batch item from a ``(4, 4)`` or ``(B, 4, 4)`` affine."""
    array = np.asarray(torch.as_tensor(affine).detach().cpu(), dtype=np.float64)
    if array.shape == (4, 4):
        return [array] * batch
    if array.shape == (batch, 4, 4):
        return list(array)
    raise ValueError(f"expected a 4x4 affine or one per field ({batch}, 4, 4), got shape {array.shape}")


def _masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``values`` ``(B, *S)`` over the last dims within ``mask`` (``(*S)`` or ``(B, *S)``): ``(B,)``."""
    flat = values.flatten(1)
    if mask is None:
        return flat.mean(dim=1)
    weight = torch.as_tensor(mask).to(values.device).bool().expand_as(values).flatten(1).to(values.dtype)
    return (flat * weight).sum(dim=1) / weight.sum(dim=1).clamp_min(1.0)


def _float_field(field: torch.Tensor) -> torch.Tensor:
    field = torch.as_tensor(field)
    return field if field.is_floating_point() else field.float()


def epe_of_samples(samples: torch.Tensor, truth: torch.Tensor, affine: Affine, mask: torch.Tensor | None = None) -> dict[str, float]:
    """End-point error of N samples of one condition against the true field.

    Args:
        samples: ``(N, 3, *S)`` voxels.
        truth: ``(3, *S)`` voxels.
        affine: the 4x4 affine of the grid.
        mask: ``(*S)`` bool region (None: every voxel).

    Returns:
        ``{"mean": mean over samples of the masked mean EPE, "best": the lowest sample's}`` in mm.
    """
    per_sample = _masked_mean(epe_map_mm(samples, truth[None], affine), mask)
    return {"mean": float(per_sample.mean()), "best": float(per_sample.min())}


def jacobian_stats(field: torch.Tensor, mask: torch.Tensor | None = None) -> dict[str, float]:
    """Statistics of ``det(I + grad u)`` (:func:`~medsynth.motion.fields.jacobian_determinant`) over all voxels in ``mask``.

    Args:
        field: ``(3, *S)`` or ``(B, 3, *S)`` voxels (all items pooled).
        mask: ``(*S)`` or ``(B, *S)`` bool, None for every voxel.

    Returns:
        ``folding_share`` (fraction of voxels with det <= 0), ``jacobian_min``, ``jacobian_max``,
        ``jacobian_mean``, ``jacobian_std`` (dimensionless).
    """
    field, _ = batched_field(_float_field(field))
    det = jacobian_determinant(field)  # (B, *S)
    if mask is not None:
        det = det[torch.as_tensor(mask).to(det.device).bool().expand_as(det)]
    det = det.flatten().double()
    if not det.numel():
        return {key: float("nan") for key in ("folding_share", "jacobian_min", "jacobian_max", "jacobian_mean", "jacobian_std")}
    return {"folding_share": float((det <= 0).double().mean()), "jacobian_min": float(det.min()), "jacobian_max": float(det.max()),
            "jacobian_mean": float(det.mean()), "jacobian_std": float(det.std(unbiased=False))}


def _magnitudes(fields: torch.Tensor, affine: Affine, mask: torch.Tensor | None) -> np.ndarray:
    field, _ = batched_field(_float_field(fields))
    magnitude = torch.linalg.vector_norm(voxel_to_mm(field, affine), dim=1)  # (B, *S) mm
    if mask is not None:
        magnitude = magnitude[torch.as_tensor(mask).to(magnitude.device).bool().expand_as(magnitude)]
    return magnitude.flatten().double().cpu().numpy()


def magnitude_wasserstein(generated: torch.Tensor, real: torch.Tensor, affine: Affine, mask_gen: torch.Tensor | None,
                          mask_real: torch.Tensor | None, affine_real: Affine | None = None) -> float:
    """Wasserstein-1 distance (mm) between the distributions of ``|u|`` in mm of generated and real fields.

    Args:
        generated: ``(N, 3, *S)`` or ``(3, *S)`` voxels; all voxels in ``mask_gen`` of all fields pooled.
        real: ``(M, 3, *S)`` or ``(3, *S)`` voxels.
        affine: ``(4, 4)`` or ``(N, 4, 4)`` affine(s) of the generated fields.
        mask_gen, mask_real: ``(*S)`` or per field ``(N, *S)`` / ``(M, *S)`` bool; None for every voxel.
        affine_real: affine(s) of the real fields; default ``affine``.
    """
    a = _magnitudes(generated, affine, mask_gen)
    b = _magnitudes(real, affine if affine_real is None else affine_real, mask_real)
    return float(wasserstein_distance(a, b)) if a.size and b.size else float("nan")


def pairwise_diversity(samples: torch.Tensor, affine: Affine, mask: torch.Tensor | None = None) -> float | None:
    """Mean end-point error (mm, within ``mask``) over all distinct pairs of ``samples`` ``(N, 3, *S)`` of one condition.

    0 for identical samples; None with fewer than two samples.
    """
    if len(samples) < 2:
        return None
    first, second = (list(side) for side in zip(*itertools.combinations(range(len(samples)), 2)))
    return float(_masked_mean(epe_map_mm(samples[first], samples[second], affine), mask).mean())


def warped_volume_ml(mask: torch.Tensor, field: torch.Tensor, affine: Affine) -> torch.Tensor:
    """Volume (ml) of the region that ``mask`` maps to under ``x -> x + u(x)``: ``sum mask det(I + grad u) |det A| / 1000``.

    The one implementation of "the volume a field implies" (the ED volume of an ES cavity for
    ``flow-cvae``, lung volume over breathing phases for ``motion-ldm``). Exact for fields whose
    gradient is constant (central differences), to first order otherwise.

    Args:
        mask: ``(*S)`` bool on the field's grid (or ``(B, *S)``).
        field: ``(3, *S)`` or ``(B, 3, *S)`` voxels.
        affine: 4x4 affine of the grid (``|det A[:3, :3]|`` = voxel volume in mm^3).

    Returns:
        0-d tensor (unbatched field) or ``(B,)`` in ml.
    """
    field, unbatched = batched_field(_float_field(field))
    det = jacobian_determinant(field).double()  # (B, *S)
    weight = torch.as_tensor(mask).to(det.device).bool().expand_as(det).double()
    voxel_ml = abs(float(np.linalg.det(_affines(affine, 1)[0][:3, :3]))) / 1000.0
    volume = (det * weight).flatten(1).sum(dim=1) * voxel_ml
    return volume[0] if unbatched else volume


def ejection_fraction(lv_mask: torch.Tensor, field: torch.Tensor, affine: Affine) -> torch.Tensor:
    """Ejection fraction implied by an ES -> ED field: ``1 - ESV / EDV``.

    ``ESV`` = volume of the ES LV blood pool ``lv_mask``; ``EDV`` = :func:`warped_volume_ml` of it
    (``x + u(x)`` carries ES points to their ED positions).

    Args:
        lv_mask: ``(*S)`` bool, LV blood pool of the ES frame.
        field: ``(3, *S)`` or ``(B, 3, *S)`` voxels on the ES grid.
        affine: 4x4 affine of the grid.

    Returns:
        0-d tensor or ``(B,)``, a fraction (dimensionless).
    """
    voxel_ml = abs(float(np.linalg.det(_affines(affine, 1)[0][:3, :3]))) / 1000.0
    esv = float(torch.as_tensor(lv_mask).bool().sum()) * voxel_ml
    return 1.0 - esv / warped_volume_ml(lv_mask, field, affine)


def nearest_training_field(generated: torch.Tensor, train: torch.Tensor, affine: Affine, mask: torch.Tensor | None = None,
                           train_affines: Affine | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The memorisation audit for fields: EPE (mm, within ``mask``) of each generated field to its nearest training field.

    Args:
        generated: ``(N, 3, *S)`` voxels on the condition's grid.
        train: ``(M, 3, *S)`` voxels, same grid shape.
        affine: 4x4 affine of the generated fields.
        mask: ``(*S)`` bool region on the generated grid (None: every voxel).
        train_affines: ``(4, 4)`` or ``(M, 4, 4)``; each training field is taken to mm with its own
            affine (default: ``affine``), so fields compare as world vectors.

    Returns:
        ``(N,)`` EPE in mm to the nearest training field, ``(N,)`` its index in ``train``.

    Note:
        Real held-out fields passed as ``generated`` give the reference: what a new real field scores.
    """
    generated_mm = voxel_to_mm(batched_field(_float_field(generated))[0], affine)
    train_mm = voxel_to_mm(batched_field(_float_field(train))[0], affine if train_affines is None else train_affines)
    distances = torch.stack([_masked_mean(torch.linalg.vector_norm(train_mm - g[None], dim=1), mask) for g in generated_mm])  # (N, M)
    best, index = distances.min(dim=1)
    return best, index


def mean_flow_baseline(train_flows: torch.Tensor, train_affines: Affine, target_shape: Sequence[int], target_affine: Affine) -> torch.Tensor:
    """The mean training field moved to a target frame: averaged in mm, converted to the target's voxels.

    Assumes the prepared data's common grid (voxel ``i`` of every case is the same place relative to
    its frame); it does not register the subjects.

    Args:
        train_flows: ``(M, 3, *S)`` voxels.
        train_affines: ``(4, 4)`` or ``(M, 4, 4)``.
        target_shape: the target's spatial shape ``S``.
        target_affine: 4x4 affine of the target frame.

    Returns:
        ``(3, *S)`` voxels of the target grid.

    Raises:
        ValueError: the training grids differ from the target's (shape, or voxel spacing by more than 1 %).
    """
    flows, _ = batched_field(_float_field(train_flows))
    if tuple(flows.shape[2:]) != tuple(target_shape):
        raise ValueError(f"training flows on a {tuple(flows.shape[2:])} grid, target on {tuple(target_shape)}: resample (prepare) them onto one grid")
    target = _affines(target_affine, 1)[0]
    spacing = spacing_of(target)
    for affine in _affines(train_affines, len(flows)):
        if not np.allclose(spacing_of(affine), spacing, rtol=0.01):
            raise ValueError(f"training flow spacing {spacing_of(affine).round(4).tolist()} mm differs from the target's {spacing.round(4).tolist()} mm")
    mean_mm = voxel_to_mm(flows, train_affines).mean(dim=0)
    return mm_to_voxel(mean_mm, target)


def _range(prefix: str, values: Sequence[float]) -> dict[str, object]:
    array = np.asarray(values, dtype=np.float64)
    if not array.size:
        return {}
    return {prefix: float(array.mean()), f"{prefix}_sd": float(array.std()), f"{prefix}_min": float(array.min()),
            f"{prefix}_max": float(array.max()), f"{prefix}_values": [float(v) for v in array]}


def field_report(
    samples: Sequence[torch.Tensor],
    truths: Sequence[torch.Tensor],
    affines: Sequence[Affine],
    masks: Mapping[str, Sequence[torch.Tensor]],
    train_flows: torch.Tensor,
    train_affines: Affine,
    *,
    primary: str | None = None,
    prefix: str = "flow",
    lv_masks: Sequence[torch.Tensor] | None = None,
    train_lv_masks: Sequence[torch.Tensor] | None = None,
) -> dict[str, object]:
    """Every field metric of issue 10 for generated samples of K held-out conditions.

    Args:
        samples: per held-out case, ``(N, 3, *S)`` generated voxel fields for its frame.
        truths: per case, ``(3, *S)`` the true field (a held-out real field).
        affines: per case, its frame's 4x4 affine.
        masks: region name -> per case ``(*S)`` bool mask (e.g. ``"myocardium"``, ``"heart"``).
        train_flows: ``(M, 3, *S)`` the training fields (voxels).
        train_affines: ``(4, 4)`` or ``(M, 4, 4)``.
        primary: the mask of the unsuffixed keys (default: the first of ``masks``); None masks = whole grid.
        prefix: ``"flow"`` (``flow_epe_mean_mm``, flow-cvae) or ``"field"`` (motion-ldm).
        lv_masks: per case ``(*S)`` bool LV blood pool of the condition (ES) frame: ejection fractions.
        train_lv_masks: per training field its LV mask: ``ejection_fraction_train`` and the range
            the generated ones are judged against.

    Returns:
        ``{p}_epe_mean_mm``, ``{p}_epe_best_of_n_mm``, ``{p}_epe_zero_mm``, ``{p}_epe_mean_flow_mm``
        (primary mask; the same with ``_<mask>`` for each mask; means over cases), ``folding_share``
        and ``jacobian_*`` of all generated fields over the whole grid (``folding_share_real`` of the
        truths), ``magnitude_w1_mm`` (|u| in the primary mask, generated vs truths), ``diversity_epe_mm``,
        ``memorisation_min_epe_mm`` / ``memorisation_mean_epe_mm`` (+ ``_real_reference``: the truths'
        nearest-training EPE), and with ``lv_masks`` ``ejection_fraction_generated`` /
        ``ejection_fraction_real`` (mean, ``_sd``, ``_min``, ``_max``, ``_values``) and
        ``ejection_fraction_generated_in_real_range`` (share inside [min, max] of all real ones).
        All distances in mm.
    """
    if not (len(samples) == len(truths) == len(affines)) or any(len(m) != len(samples) for m in masks.values()):
        raise ValueError("samples, truths, affines and every mask list need one entry per held-out case")
    names = list(masks)
    primary = primary if primary is not None else (names[0] if names else None)
    if primary is not None and primary not in masks:
        raise ValueError(f"primary mask {primary!r} is not one of {names}")
    regions: dict[str | None, Sequence[torch.Tensor | None]] = {name: masks[name] for name in names}
    if primary is None:
        regions[None] = [None] * len(samples)
    metrics: dict[str, object] = {}
    baselines = [mean_flow_baseline(train_flows, train_affines, truth.shape[1:], affine) for truth, affine in zip(truths, affines)]
    for name, region in regions.items():
        scores: dict[str, list[float]] = {"epe_mean_mm": [], "epe_best_of_n_mm": [], "epe_zero_mm": [], "epe_mean_flow_mm": []}
        for case, (generated, truth, affine) in enumerate(zip(samples, truths, affines)):
            epe = epe_of_samples(generated, truth, affine, region[case])
            scores["epe_mean_mm"].append(epe["mean"])
            scores["epe_best_of_n_mm"].append(epe["best"])
            scores["epe_zero_mm"].append(float(_masked_mean(epe_map_mm(torch.zeros_like(truth), truth, affine)[None], region[case])[0]))
            scores["epe_mean_flow_mm"].append(float(_masked_mean(epe_map_mm(baselines[case], truth, affine)[None], region[case])[0]))
        for key, values in scores.items():
            suffix = "" if name == primary else f"_{name}"
            metrics[f"{prefix}_{key}{suffix}"] = float(np.mean(values))
    jacobian = {key: [] for key in ("folding_share", "jacobian_min", "jacobian_max", "jacobian_mean", "jacobian_std")}
    for generated in samples:
        for key, value in jacobian_stats(generated).items():
            jacobian[key].append(value)
    metrics.update({"folding_share": float(np.mean(jacobian["folding_share"])), "jacobian_min": float(np.min(jacobian["jacobian_min"])),
                    "jacobian_max": float(np.max(jacobian["jacobian_max"])), "jacobian_mean": float(np.mean(jacobian["jacobian_mean"])),
                    "jacobian_std": float(np.mean(jacobian["jacobian_std"]))})
    metrics["folding_share_real"] = float(np.mean([jacobian_stats(truth)["folding_share"] for truth in truths]))
    main = regions[primary]
    generated_magnitudes = np.concatenate([_magnitudes(g, a, m) for g, a, m in zip(samples, affines, main)])
    real_magnitudes = np.concatenate([_magnitudes(t, a, m) for t, a, m in zip(truths, affines, main)])
    metrics["magnitude_w1_mm"] = float(wasserstein_distance(generated_magnitudes, real_magnitudes))
    diversity = [d for g, a, m in zip(samples, affines, main) if (d := pairwise_diversity(g, a, m)) is not None]
    metrics["diversity_epe_mm"] = float(np.mean(diversity)) if diversity else None
    nearest = torch.cat([nearest_training_field(g, train_flows, a, m, train_affines)[0] for g, a, m in zip(samples, affines, main)])
    reference = torch.cat([nearest_training_field(t[None], train_flows, a, m, train_affines)[0] for t, a, m in zip(truths, affines, main)])
    metrics.update({"memorisation_min_epe_mm": float(nearest.min()), "memorisation_mean_epe_mm": float(nearest.mean()),
                    "memorisation_min_epe_mm_real_reference": float(reference.min()),
                    "memorisation_mean_epe_mm_real_reference": float(reference.mean())})
    if lv_masks is not None:
        generated_ef = torch.cat([ejection_fraction(lv, g, a).reshape(-1) for lv, g, a in zip(lv_masks, samples, affines)]).tolist()
        real_ef = [float(ejection_fraction(lv, t, a)) for lv, t, a in zip(lv_masks, truths, affines)]
        metrics.update(_range("ejection_fraction_generated", generated_ef))
        metrics.update(_range("ejection_fraction_real", real_ef))
        every_real = list(real_ef)
        if train_lv_masks is not None:
            train_affine_list = _affines(train_affines, len(train_flows))
            train_ef = [float(ejection_fraction(lv, f, a)) for lv, f, a in zip(train_lv_masks, train_flows, train_affine_list)]
            metrics.update(_range("ejection_fraction_train", train_ef))
            every_real += train_ef
        low, high = min(every_real), max(every_real)
        metrics["ejection_fraction_generated_in_real_range"] = float(np.mean([low <= ef <= high for ef in generated_ef]))
    return metrics
