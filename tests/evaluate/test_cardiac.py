"""Reconstruction evaluation: the metrics against ground truth, EF on an analytic LV, and `evaluate --reconstruction`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from medsynth import api
from medsynth.evaluate.cardiac import (
    PSNR_CAP,
    class_indices,
    ejection_fraction,
    heart_mask,
    lv_volume_ml,
    psnr,
    ssim,
    structure_classes,
    structure_scores,
)
from medsynth.recipes import get_recipe


def _volume(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 10, (12, 12, 9))


def test_a_perfect_reconstruction_scores_the_cap_and_ssim_one():
    truth = _volume()
    assert psnr(truth, truth) == PSNR_CAP
    assert ssim(truth, truth) == pytest.approx(1.0, abs=1e-5)
    labels = np.zeros(truth.shape, int)
    labels[5:7, 5:7, 4] = 1
    mask = heart_mask(labels)
    assert mask.sum() > labels.sum()  # dilated
    assert psnr(truth, truth, mask) == PSNR_CAP and ssim(truth, truth, mask) == pytest.approx(1.0, abs=1e-5)


def test_a_known_offset_gives_the_expected_psnr():
    truth = _volume()
    truth[0, 0, 0], truth[1, 0, 0] = 0.0, 10.0  # range exactly 10
    shifted = truth + 1.0  # error 1 everywhere: MSE 0.01 of the range squared -> 20 dB
    assert psnr(shifted, truth) == pytest.approx(20.0, abs=1e-9)
    mask = np.zeros(truth.shape, bool)
    mask[:3] = True
    half = truth.copy()
    half[mask] += 0.5  # error only inside the mask: 0.05 of the range -> 26.02 dB there, the cap outside
    assert psnr(half, truth, mask) == pytest.approx(-10 * np.log10(0.05**2), abs=1e-9)
    assert psnr(half, truth, ~mask) == PSNR_CAP
    assert ssim(shifted, truth) < 1.0


def test_dice_one_and_hd95_zero_for_the_truth_and_the_shift_in_mm():
    labels = np.zeros((16, 16, 8), int)
    labels[4:10, 4:10, 2:6] = 2  # myocardium class
    labels[6:8, 6:8, 2:6] = 1  # lv
    classes = {"lv": 1, "myo": 2, "rv": 3}
    perfect = structure_scores(labels, labels, classes, spacing=(1.0, 1.0, 2.0))
    assert perfect["dice_lv"] == perfect["dice_myo"] == perfect["dice_rv"] == 1.0
    assert perfect["hd95_lv"] == 0.0 and np.isnan(perfect["hd95_rv"])  # rv absent from both
    moved = np.roll(labels, 1, axis=2)  # one slice along z: 2 mm
    scores = structure_scores(moved, labels, classes, spacing=(1.0, 1.0, 2.0))
    assert scores["hd95_lv"] == pytest.approx(2.0)
    assert scores["dice_lv"] == pytest.approx(2 * 3 / 8)  # 3 of 4 slices overlap


def test_ejection_fraction_of_an_analytic_lv():
    # An LV blood pool as a box: 20 x 20 x 25 voxels of 1 x 1 x 2 mm at ED (20 ml), 20 x 20 x 10 at ES (8 ml): EF 60 %.
    ed, es = np.zeros((30, 30, 30), int), np.zeros((30, 30, 30), int)
    ed[5:25, 5:25, 0:25], es[5:25, 5:25, 0:10] = 8, 8
    values = [0, 7, 8, 9]
    classes = structure_classes({0: "background", 7: "rv_blood_pool", 8: "lv_blood_pool", 9: "lv_myocardium"})
    assert classes == {"lv": 2, "myo": 3, "rv": 1}
    edv = lv_volume_ml(class_indices(ed, values), classes["lv"], voxel_mm3=2.0)
    esv = lv_volume_ml(class_indices(es, values), classes["lv"], voxel_mm3=2.0)
    assert (edv, esv) == (pytest.approx(20.0), pytest.approx(8.0))
    assert ejection_fraction(edv, esv) == pytest.approx(60.0)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[Path, Path]:
    example = get_recipe("diffae").tiny_example
    root = tmp_path_factory.mktemp("receval")
    raw = api.phantom("cardiac", root / "raw", n=4, seed=0, size=32, progress=False, **example.phantom_options)
    prepared = api.prepare(raw, root / "prepared", recipe="diffae", progress=False, **example.prepare)
    run = api.train("diffae", data=prepared, config=example.config, overrides=[*example.overrides, "model.stage_epochs=1",
                    "train.max_epochs=2"], out=root / "run", progress=False)
    return run.path, raw


def test_evaluate_reconstruction_with_the_baselines_writes_every_key(tiny_run):
    run, raw = tiny_run
    metrics = api.evaluate(run, reconstruction=raw, progress=False,
                           overrides=["evaluate.reconstruction_methods=[nearest, linear, cubic]", "evaluate.segmenter_epochs=2"])
    saved = json.loads((run / "metrics.json").read_text())
    assert "autoencode_psnr" in saved
    for method in ("nearest", "linear", "cubic"):
        for key in ("psnr", "ssim", "psnr_heart", "ssim_heart", "dice_myo", "dice_lv", "lax_dice_myo", "seconds", "ef_error", "edv_error"):
            assert f"reconstruction_{key}_{method}" in saved
        assert f"reconstruction_hd95_{method}_myo" in saved
        assert 0 < metrics[f"reconstruction_psnr_{method}"] < PSNR_CAP
    # on the thin truth a linear interpolation of thick slices is closer than nearest-slice copying
    assert metrics["reconstruction_psnr_linear"] > metrics["reconstruction_psnr_nearest"]
    assert metrics["reconstruction_factor"] == 2 and metrics["reconstruction_cases"] >= 1
    assert metrics["reconstruction_methods"] == ["nearest", "linear", "cubic"]


def test_evaluate_reconstruction_runs_a_latent_method_and_reports_its_figures(tiny_run):
    run, raw = tiny_run
    metrics = api.evaluate(run, reconstruction=raw, progress=False, overrides=[
        "evaluate.reconstruction_methods=[cubic, pnp, ddim_lax, data_terms, diffpir, diffpir_no_prior, codes_interpolation]",
        "evaluate.segmenter_epochs=1", "evaluate.reconstruct.steps=2", "evaluate.reconstruct.pnp_iterations=2",
        "evaluate.reconstruct.diffpir_iterations=2"])
    assert metrics["reconstruction_methods"] == ["cubic", "pnp", "data_terms", "diffpir", "diffpir_no_prior", "codes_interpolation"]
    assert metrics["reconstruction_skipped"] == ["ddim_lax"]  # no evaluate.ddim_run given
    assert 0 < metrics["reconstruction_psnr_pnp"] < PSNR_CAP and metrics["reconstruction_seconds_pnp"] > 0
    # each learned method against itself without the prior: pnp's is the data terms alone, diffpir's its data steps alone
    assert metrics["reconstruction_psnr_pnp_no_prior"] == metrics["reconstruction_psnr_data_terms"]
    assert metrics["reconstruction_psnr_diffpir"] != metrics["reconstruction_psnr_diffpir_no_prior"]
    assert 0 < metrics["interpolation_psnr_codes"] < PSNR_CAP
    assert "reconstruction_dice_myo_truth" in metrics
    histories = json.loads((run / "samples" / "reconstruction" / "histories.json").read_text())
    assert len(histories["pnp"]["total"]) >= 1
    html = api.report(run).read_text()
    assert "the same through-plane sections of the truth and every method" in html and "optimisation curves" in html
    assert "Reconstruction: PSNR in the heart (dB) per method" in html  # the bar chart from metrics.json
