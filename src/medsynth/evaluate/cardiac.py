"""Judging a reconstructed fine SAX volume against its ground truth: intensities, segmentation, function.

- Intensities: PSNR and SSIM of the whole volume and inside a region (the dilated heart labels),
  both sides mapped to [0, 1] by the truth's own range (:func:`unit_scale`), so every method is
  judged in the same units. PSNR is capped at :data:`PSNR_CAP` (a perfect reconstruction).
- Segmentation: a small 2D MONAI ``UNet`` trained here on the high-resolution training slices
  (:func:`train_slice_segmenter`; :mod:`.segmentation`'s trainer is 3D) is applied slice by slice
  to a reconstruction (:func:`segment_volume`); Dice and HD95 (mm) per structure against the true
  labels (:func:`structure_scores`).
- Function: LV blood-pool volumes (ml) at end-diastole and end-systole and the ejection fraction
  (:func:`lv_volume_ml`, :func:`ejection_fraction`).

Volumes are numpy arrays (X, Y, Z) on one grid with one affine (mm); labels are class indices
(0 background) with :data:`STRUCTURES` naming the classes a cardiac SAX segmentation holds.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from monai.losses import DiceCELoss
from monai.metrics import DiceMetric, HausdorffDistanceMetric
from scipy.ndimage import binary_dilation

from medsynth.evaluate import metrics
from medsynth.evaluate.segmentation import Segmenter
from medsynth.seeds import seeded
from medsynth.training import fit_minibatches

__all__ = ["PSNR_CAP", "STRUCTURES", "class_indices", "ejection_fraction", "heart_mask", "lv_volume_ml", "psnr",
           "segment_volume", "ssim", "structure_classes", "structure_scores", "train_slice_segmenter", "unit_scale"]

PSNR_CAP = 100.0  # dB: what a reconstruction equal to the truth scores (no error -> no finite PSNR)
# Short names of the structures of a cardiac SAX segmentation -> their label names (UK Biobank / phantom / ACDC names).
STRUCTURES = {"lv": "lv_blood_pool", "myo": "lv_myocardium", "rv": "rv_blood_pool"}


def unit_scale(truth: np.ndarray) -> tuple[float, float]:
    """(lo, hi): the truth's min and max, which :func:`psnr` and :func:`ssim` map to 0 and 1 on both sides."""
    lo, hi = float(np.min(truth)), float(np.max(truth))
    return lo, (hi if hi > lo else lo + 1.0)


def psnr(recon: np.ndarray, truth: np.ndarray, mask: np.ndarray | None = None) -> float:
    """PSNR (dB) of ``recon`` against ``truth`` (same shape, same units) with the truth's range as the peak,
    over the voxels of ``mask`` (bool, default all); :data:`PSNR_CAP` where they agree exactly.
    (Our own: MONAI's ``PSNRMetric`` has no mask.)"""
    lo, hi = unit_scale(truth)
    diff = (np.asarray(recon, np.float64) - np.asarray(truth, np.float64)) / (hi - lo)
    mse = float(np.mean(diff[mask] ** 2 if mask is not None else diff ** 2))
    return PSNR_CAP if mse <= 10 ** (-PSNR_CAP / 10) else float(-10 * np.log10(mse))


def ssim(recon: np.ndarray, truth: np.ndarray, mask: np.ndarray | None = None, win_size: int = 7) -> float:
    """Mean SSIM (:func:`medsynth.evaluate.metrics.ssim`, a window of ``win_size`` on every axis, shrunk to the smallest
    axis, odd) of volumes (X, Y, Z) mapped to [0, 1] by the truth's range; over the windows centred in ``mask`` when
    given."""
    lo, hi = unit_scale(truth)

    def unit(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy((np.asarray(a, np.float64) - lo) / (hi - lo)).float()[None, None]

    return float(metrics.ssim(unit(recon), unit(truth), win_size, mask, fit="isotropic")[0])


def class_indices(labels: np.ndarray, values: Sequence[int]) -> np.ndarray:
    """Label values -> class indices: ``values[i]`` -> i (values not listed -> 0, background)."""
    out = np.zeros(labels.shape, np.int64)
    for index, value in enumerate(values):
        if index:
            out[labels == value] = index
    return out


def structure_classes(label_names: Mapping[int, str]) -> dict[str, int]:
    """Short structure name (``lv``, ``myo``, ``rv``) -> class index, for classes ordered by label value
    (background first), as :func:`class_indices` numbers them; structures absent from the names are left out."""
    ordered = sorted(label_names)
    by_name = {label_names[value]: index for index, value in enumerate(ordered)}
    return {short: by_name[name] for short, name in STRUCTURES.items() if name in by_name}


def heart_mask(labels: np.ndarray, dilation: int = 2) -> np.ndarray:
    """Every labelled voxel (> 0), dilated by ``dilation`` voxels (3D cross): the heart region."""
    mask = np.asarray(labels) > 0
    return binary_dilation(mask, iterations=dilation) if dilation > 0 and mask.any() else mask


def lv_volume_ml(labels: np.ndarray, lv_class: int, voxel_mm3: float) -> float:
    """Volume of the LV blood pool (ml): voxels of class ``lv_class`` times the voxel volume (mm^3) / 1000."""
    return float(np.count_nonzero(np.asarray(labels) == lv_class)) * voxel_mm3 / 1000.0


def ejection_fraction(edv_ml: float, esv_ml: float) -> float:
    """Ejection fraction (%): 100 (EDV - ESV) / EDV (NaN for an empty EDV)."""
    return float("nan") if edv_ml <= 0 else 100.0 * (edv_ml - esv_ml) / edv_ml


def structure_scores(pred: np.ndarray, truth: np.ndarray, classes: Mapping[str, int], spacing: Sequence[float] | None = None,
                     hd95: bool = True) -> dict[str, float]:
    """Dice (MONAI ``DiceMetric``) and, with ``hd95``, the 95th-percentile Hausdorff distance (MONAI, in mm with
    ``spacing``) per structure of label maps of one shape (2D or 3D).

    Returns:
        ``dice_<name>`` and ``hd95_<name>`` for each ``name`` of ``classes``: Dice 1 where the structure is
        absent from both, NaN where it is absent from one (HD95) or both (HD95).
    """
    pred_t, truth_t = torch.as_tensor(np.asarray(pred)).long(), torch.as_tensor(np.asarray(truth)).long()
    result: dict[str, float] = {}
    for name, index in classes.items():
        p, t = (pred_t == index)[None, None].float(), (truth_t == index)[None, None].float()
        if not p.any() and not t.any():
            result[f"dice_{name}"] = 1.0
            if hd95:
                result[f"hd95_{name}"] = float("nan")
            continue
        result[f"dice_{name}"] = float(DiceMetric(include_background=True, ignore_empty=False)(p, t).item())
        if hd95:
            if p.any() and t.any():
                metric = HausdorffDistanceMetric(include_background=True, percentile=95)
                with warnings.catch_warnings():  # MONAI 1.5 warns about an argument its own metric passes
                    warnings.filterwarnings("ignore", message=".*always_return_as_numpy", category=FutureWarning)
                    result[f"hd95_{name}"] = float(metric(p, t, spacing=list(spacing) if spacing is not None else None).item())
            else:
                result[f"hd95_{name}"] = float("nan")
    return result


# -- a 2D segmenter of SAX slices -----------------------------------------------------------------------


def train_slice_segmenter(slices: torch.Tensor, labels: torch.Tensor, num_classes: int, epochs: int = 20, batch_size: int = 16,
                          lr: float = 1e-2, seed: int = 0, channels: Sequence[int] = (8, 16, 32)) -> Segmenter:
    """Train a 2D :class:`~medsynth.evaluate.segmentation.Segmenter` of slices with MONAI's Dice + cross-entropy loss
    (Adam, cosine schedule, no augmentation).

    Args:
        slices: (N, 1, H, W) in the volumes' units; labels: (N, H, W) class indices.

    Returns:
        The segmenter in eval mode; the global torch RNG is left as it was.
    """
    with seeded(seed):
        generator = torch.Generator().manual_seed(seed)
        slices = slices.float()
        model = Segmenter(num_classes, channels, float(slices.mean()), float(slices.std().clamp_min(1e-6)), spatial_dims=2)
        loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
        optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        steps = epochs * -(-len(slices) // batch_size)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(1, steps))

        def loss_of(pick: torch.Tensor) -> torch.Tensor:
            return loss_fn(model(model.normalise(slices[pick])), labels[pick][:, None].long())

        return fit_minibatches(model, loss_of, len(slices), epochs=epochs, batch_size=batch_size, optimizer=optimizer,
                               scheduler=scheduler, generator=generator)


@torch.no_grad()
def segment_volume(model: Segmenter, volume: np.ndarray, axis: int = 2, batch_size: int = 32) -> np.ndarray:
    """Class indices (X, Y, Z) of a volume (X, Y, Z), segmented slice by slice along ``axis``."""
    stack = torch.from_numpy(np.moveaxis(np.asarray(volume, np.float32), axis, 0).copy())[:, None]  # (S, 1, H, W)
    labels = torch.cat([model(model.normalise(part)).argmax(1) for part in stack.split(batch_size)])
    return np.moveaxis(labels.numpy(), 0, axis)
