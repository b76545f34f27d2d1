"""report.html opens with the recipe's headline metrics beside their references; the full table comes below."""

from __future__ import annotations

import json

from medsynth.report.headline import headlines, reference_of
from medsynth.report.html import figure_html, image_grid, save_figure, write_report
from medsynth.runs import Run

METRICS = {
    "classifier_accuracy_real": 0.9,
    "classifier_accuracy_generated": 0.7,
    "memorisation_max_ssim": 0.61,
    "memorisation_max_ssim_real_reference": 0.58,
    "mmd_classifier_features": 22.86,
    "classifier_accuracy_generated_per_class": {"normal": 0.5},
}


def test_references_are_the_real_reference_or_the_real_score():
    assert reference_of("memorisation_max_ssim", METRICS) == "memorisation_max_ssim_real_reference"
    assert reference_of("classifier_accuracy_generated", METRICS) == "classifier_accuracy_real"
    assert reference_of("classifier_accuracy_real", METRICS) is None
    found = headlines(METRICS, ("classifier_accuracy_generated", "missing", "memorisation_max_ssim"))
    assert [(h.name, h.value, h.reference) for h in found] == [("classifier_accuracy_generated", 0.7, 0.9),
                                                               ("memorisation_max_ssim", 0.61, 0.58)]


def test_report_opens_with_headline_then_sections_then_all_metrics(tmp_path):
    run = Run.create(tmp_path / "run")
    run.metrics_path.write_text(json.dumps(METRICS))
    page = write_report(run, "title", [("Recipe figures", "<p>figure</p>")],
                        headline=("classifier_accuracy_generated", "memorisation_max_ssim")).read_text()
    order = [page.index(text) for text in ("Headline metrics", "Recipe figures", "All metrics")]
    assert order == sorted(order)
    top = page[order[0]:order[1]]
    assert "classifier_accuracy_generated" in top and "classifier_accuracy_real" in top and "0.7" in top and "0.9" in top
    assert "memorisation_max_ssim_real_reference" in top and "0.58" in top
    assert "mmd_classifier_features" not in top and "mmd_classifier_features" in page[order[2]:]


def test_figures_render_without_pyplot(tmp_path):
    fig = image_grid([__import__("numpy").zeros((1, 8, 8))] * 3, ncols=2, titles=["a", "b", "c"])
    assert figure_html(fig).startswith("<img") and save_figure(fig, tmp_path / "grid.png").stat().st_size > 0


def _log(folder, scalars: dict[str, list[tuple[int, float]]]) -> None:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(folder))
    for tag, points in scalars.items():
        for step, value in points:
            writer.add_scalar(tag, value, step)
    writer.close()


def test_curves_overlay_train_and_val_shade_stages_and_mark_a_resume(tmp_path):
    import time

    from medsynth.report.curves import read_curves, training_curves

    tb = tmp_path / "tb"
    _log(tb, {"train/image-ae_loss": [(0, 1.0), (5, 0.5)], "val/image-ae_loss": [(5, 0.6)],
              "train/ldm_loss": [(10, 100.0), (15, 0.1)], "val/loss": [(5, 0.6), (15, 0.2)], "epoch": [(0, 0.0)]})
    time.sleep(1.1)  # a resumed process writes a second events file
    _log(tb, {"train/ldm_loss": [(20, 0.05)], "train/lr": [(20, 1e-3)]})
    curves = read_curves(tb)
    assert set(curves.quantities) == {"loss", "lr"}  # the stage prefix is not a quantity; "epoch" is bookkeeping
    assert set(curves.quantities["loss"]) == {"train (image-ae)", "val (image-ae)", "train (ldm)", "val"}
    assert [stage for stage, *_ in curves.stages] == ["image-ae", "ldm"] and curves.stages[1][1:] == (10, 20)
    assert curves.resumes == [20]
    figure = training_curves(tb)
    loss_axis = next(ax for ax in figure.axes if ax.get_title() == "loss")
    assert loss_axis.get_yscale() == "log" and len(loss_axis.get_lines()) >= 4  # 0.05 .. 100 spans decades
    assert figure.get_figwidth() * 90 / 2 >= 400  # two panels in a row, each >= 400 px at the report's dpi


def test_overlapping_prefixes_are_not_stages(tmp_path):
    from medsynth.report.curves import read_curves

    _log(tmp_path, {"train/recon_mse": [(0, 1.0), (9, 0.5)], "train/kl_mse": [(0, 1.0), (9, 0.5)]})
    curves = read_curves(tmp_path)
    assert curves.stages == [] and set(curves.quantities) == {"recon_mse", "kl_mse"}


def test_utility_reconstruction_and_fold_charts_come_from_the_keys(tmp_path):
    from medsynth.report.html import MIN_CELL_PX, embedded_images

    metrics = {"downstream_epe_real_only_mm": 1.0, "downstream_epe_real_only_mm_sd": 0.1, "downstream_epe_classic_mm": 0.9,
               "downstream_epe_with_generated_mm": 0.8, "downstream_epe_with_generated_mm_per_seed": [0.7, 0.8, 0.9],
               "downstream_epe_oracle_mm": 0.7, "downstream_seeds": 3,
               "reconstruction_methods": ["cubic", "pnp"], "reconstruction_psnr_heart_cubic": 30.0,
               "reconstruction_psnr_heart_pnp": 31.0, "reconstruction_psnr_heart_pnp_no_prior": 30.5,
               "loss_mean": 0.5, "loss_sd": 0.1, "loss_per_fold": [0.4, 0.6]}
    run = Run.create(tmp_path / "run")
    run.metrics_path.write_text(json.dumps(metrics))
    page = write_report(run, "t", []).read_text()
    alts = [alt for alt, *_ in embedded_images(page)]
    assert any(alt.startswith("Downstream epe") and "3 seeds" in alt for alt in alts)
    assert "Reconstruction: PSNR in the heart (dB) per method" in alts
    assert any(alt.startswith("Cross-validation") for alt in alts)
    assert all(shown >= MIN_CELL_PX for *_, shown in embedded_images(page))


def test_small_pictures_are_shown_upscaled_by_a_whole_factor(tmp_path):
    import numpy as np

    from medsynth.report.html import embedded_images, file_html

    path = save_figure(image_grid([np.zeros((1, 8, 8))]), tmp_path / "one.png")
    (alt, width, _, shown), = embedded_images(file_html(path))
    assert width >= 128 and shown >= 480 and shown % width == 0


def test_field_and_downstream_headlines_sit_beside_their_baselines():
    metrics = {"flow_epe_mean_mm": 1.2, "flow_epe_mean_flow_mm": 1.5, "flow_epe_zero_mm": 3.0,
               "downstream_epe_with_generated_mm": 0.8, "downstream_epe_real_only_mm": 0.9, "field_epe_mean_mm": 2.0, "field_epe_zero_mm": 4.0}
    assert reference_of("flow_epe_mean_mm", metrics) == "flow_epe_mean_flow_mm"
    assert reference_of("field_epe_mean_mm", metrics) == "field_epe_zero_mm"
    assert reference_of("downstream_epe_with_generated_mm", metrics) == "downstream_epe_real_only_mm"
