"""``medsynth demo``: each recipe's whole chain on a phantom, sized to finish in minutes on a CPU."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

from medsynth import api


def _step(message: str) -> None:
    api.console.print(f"[bold cyan]medsynth demo[/] {message}")


def cvae_demo(out: Path, force: bool = False) -> Path:
    """Cilia phantom -> prepare (64 px) -> train ``cvae`` (configs/cvae-tiny.yaml) -> sample -> evaluate -> report."""
    start = time.time()
    raw, prepared, run_dir = out / "cilia", out / "cilia-prepared", out / "cvae-run"
    _step("1/6 cilia phantom (5 classes)")
    if not (raw / "normal").exists() or force:
        api.phantom("cilia", raw, n=160, seed=0, size=64)
    _step("2/6 prepare")
    api.prepare(raw, prepared, size=64, normalize="none", seed=0)
    _step("3/6 train cvae")
    run = api.train("cvae", data=prepared, config="cvae-tiny", out=run_dir, force=True)
    _step("4/6 sample (random, grid, interpolate)")
    for mode, n in (("random", 16), ("grid", 49), ("interpolate", 8)):
        api.sample(run.path, n=n, mode=mode, seed=0, force=True)
    _step("5/6 evaluate")
    metrics = api.evaluate(run.path)
    _step("6/6 report")
    report = api.report(run.path)
    shown = {k: round(v, 3) for k, v in metrics.items() if k.startswith(("classifier_accuracy", "memorisation")) and isinstance(v, float)}
    api.console.print(json.dumps(shown, indent=2))
    api.console.print(f"[bold green]done[/] in {time.time() - start:.0f} s: metrics {run.metrics_path}")
    print(report)
    return report


def sdm_demo(out: Path, force: bool = False) -> Path:
    """Coronary phantom -> prepare (CT window) -> train ``sdm`` low stage (configs/sdm-tiny.yaml) -> sample -> evaluate -> report."""
    start = time.time()
    raw, prepared, run_dir = out / "coronary", out / "coronary-prepared", out / "sdm-run"
    _step("1/6 coronary phantom (CTCA-like, 9 labels)")
    if not (raw / "dataset.json").exists() or force:
        api.phantom("coronary", raw, n=40, seed=0, size=24)
    _step("2/6 prepare (HU window -1000..1000 -> [0, 1])")
    api.prepare(raw, prepared, recipe="sdm", seed=0, progress=False)  # the recipe's defaults: CT window, crop
    _step("3/6 train sdm, low-res stage")
    run = api.train("sdm", data=prepared, config="sdm-tiny", out=run_dir, force=True)
    _step("4/6 sample (held-out label maps; one label-map file)")
    api.sample(run.path, n=4, seed=0, force=True)
    api.sample(run.path, condition=raw / "labelsTr" / "coronary_000.nii.gz", out=run.samples / "condition", seed=0, force=True)
    _step("5/6 evaluate (segmenter trained on real volumes, intensities per label, memorisation)")
    metrics = api.evaluate(run.path)
    _step("6/6 report")
    report = api.report(run.path)
    shown = {key: round(metrics[key], 3) for key in ("segmenter_dice_real", "segmenter_dice_generated", "segmenter_dice_ratio",
                                                     "memorisation_max_ssim")}
    for kind in ("real", "generated"):
        shown[f"segmenter_dice_{kind}_coronary"] = round(metrics[f"segmenter_dice_{kind}_per_class"].get("coronary", float("nan")), 3)
    api.console.print(json.dumps(shown, indent=2))
    api.console.print(f"[bold green]done[/] in {time.time() - start:.0f} s: metrics {run.metrics_path}")
    print(report)
    return report


DEMOS: dict[str, Callable[..., Path]] = {"cvae": cvae_demo, "sdm": sdm_demo}
