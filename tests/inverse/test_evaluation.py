"""inverse/evaluation.py: a reconstruction equal to the truth scores the ceiling values (PSNR cap, SSIM 1, the truth's
own Dice, no volume or EF error), every learned row has its no-prior ablation, and bad requests are one line."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medsynth.data.cine import HR_LABEL_NAME, HR_NAME, INFO_NAME, SAX_NAME
from medsynth.errors import BadInputError, MedsynthError
from medsynth.evaluate.cardiac import PSNR_CAP
from medsynth.inverse.evaluation import EVAL_METHODS, reconstruction_figures, reconstruction_metrics

X, FINE, FACTOR = 16, 5, 2  # in-plane pixels, thin slices of the truth, thick = every second thin slice
LABELS = {"lv": 1, "myo": 2, "rv": 3}  # UK Biobank's label values


def _subject(folder: Path, lv_radius: tuple[float, float], shift: int) -> None:
    """A 2-frame (ED, ES) thin-slice truth whose intensity is linear in z between the stack's slices, and its thick
    stack (every second slice, slice spacing doubled): the linear interpolation of the stack is exactly the truth."""
    i, j = np.meshgrid(np.arange(X), np.arange(X), indexing="ij")
    labels, images = [], []
    for radius in lv_radius:  # per frame
        r = np.hypot(i - 7.5 - shift, j - 7.5)
        label = np.where(r < radius, LABELS["lv"], np.where(r < radius + 2, LABELS["myo"], 0))
        label[(i >= 12) & (np.abs(j - 7.5) < 3)] = LABELS["rv"]
        label3 = np.repeat(label[:, :, None], FINE, axis=2)
        # values 0 / 100 / 200 / 300 plus 4 per thin slice: every midpoint of two thick slices is an exact float32
        image = np.choose(label3, [0.0, 300.0, 100.0, 200.0]) + 4.0 * np.arange(FINE)
        labels.append(label3)
        images.append(image)
    hr_affine = np.diag([1.5, 1.5, 4.0, 1.0])
    hr_affine[:3, 3] = (-10.0, 5.0, 2.0)
    sax_affine = hr_affine.copy()
    sax_affine[2, 2] *= FACTOR
    folder.mkdir(parents=True)
    image4, label4 = np.stack(images, -1).astype(np.float32), np.stack(labels, -1).astype(np.int16)
    nib.save(nib.Nifti1Image(image4, hr_affine), str(folder / HR_NAME))
    nib.save(nib.Nifti1Image(label4, hr_affine), str(folder / HR_LABEL_NAME))
    nib.save(nib.Nifti1Image(image4[:, :, ::FACTOR], sax_affine), str(folder / SAX_NAME))
    (folder / INFO_NAME).write_text("ED: 1\nES: 2\n")


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ukbb")
    for k, shift in enumerate((0, 1, -1)):
        _subject(root / f"s{k}", (4.0 - 0.3 * k, 2.0), shift)
    return root


def test_a_reconstruction_equal_to_the_truth_scores_the_ceiling(cohort, tmp_path):
    metrics = reconstruction_metrics(None, cohort, methods=["nearest", "linear"], held_out=["s2"], train=["s0", "s1"],
                                     segmenter_epochs=1, out=tmp_path)
    assert metrics["reconstruction_factor"] == FACTOR and metrics["reconstruction_cases"] == 2  # ED and ES of s2
    assert metrics["reconstruction_subjects"] == ["s2"] and metrics["reconstruction_methods"] == ["nearest", "linear"]
    # linear is exact on this truth: the PSNR cap, SSIM 1, and the segmentation scores of the truth itself
    assert metrics["reconstruction_psnr_linear"] == PSNR_CAP and metrics["reconstruction_psnr_heart_linear"] == PSNR_CAP
    assert metrics["reconstruction_ssim_linear"] == pytest.approx(1.0, abs=1e-6)
    for s in LABELS:
        truth_dice, linear_dice = metrics[f"reconstruction_dice_{s}_truth"], metrics[f"reconstruction_dice_{s}_linear"]
        assert linear_dice == truth_dice or (np.isnan(linear_dice) and np.isnan(truth_dice))
    for key in ("edv_error", "esv_error", "ef_error"):
        assert metrics[f"reconstruction_{key}_linear"] == 0.0
    # nearest copies thick slices: below the cap, and below linear
    assert 0 < metrics["reconstruction_psnr_nearest"] < PSNR_CAP and metrics["reconstruction_ssim_nearest"] < 1.0
    assert "reconstruction_psnr_truth" not in metrics  # the truth is scored by its segmentation only
    # what is kept for the report: the first case's truth and volumes, and one figure of them (no latent method: no curves)
    with np.load(tmp_path / "volumes.npz") as kept:
        assert sorted(kept.files) == ["linear", "nearest", "truth"]
        np.testing.assert_array_equal(kept["linear"], kept["truth"])
    assert json.loads((tmp_path / "histories.json").read_text()) == {}
    assert [title.split(":")[0] for title, _ in reconstruction_figures(tmp_path)] == ["Reconstruction"]


def test_every_learned_row_has_its_no_prior_ablation_differing_only_by_the_prior():
    switches = {"pnp": {"pnp_weight": 0.0}, "diffpir": {"diffpir_prior": False}, "latent": {"pnp_weight": 0.0}}
    for name, spec in EVAL_METHODS.items():
        if spec.prior is None or spec.no_prior is None:
            continue
        ablation = EVAL_METHODS[spec.no_prior]
        assert ablation.lax == spec.lax and ablation.no_prior is None, name
        assert ablation.overrides == switches[spec.method], name  # latent's ablation: the same terms in voxels (pnp, weight 0)
        assert ablation.method == ("pnp" if spec.method == "latent" else spec.method), name
    assert all(spec.prior is None for name, spec in EVAL_METHODS.items() if name in ("nearest", "linear", "cubic"))


def test_an_unknown_method_and_a_cohort_without_truth_are_refused_in_one_line(cohort, tmp_path):
    with pytest.raises(MedsynthError, match="unknown method.*bicubic") as info:
        reconstruction_metrics(None, cohort, methods=["linear", "bicubic"])
    assert "\n" not in str(info.value)
    with pytest.raises(BadInputError, match=f"no held-out subject with {HR_NAME}") as info:
        reconstruction_metrics(None, cohort, methods=["linear"], held_out=["nobody"], train=["s0"], out=tmp_path / "out")
    assert "\n" not in str(info.value) and str(cohort) in str(info.value)
    assert not (tmp_path / "out").exists()  # refused before anything was written
