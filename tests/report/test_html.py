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
