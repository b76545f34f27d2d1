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


DEMOS: dict[str, Callable[..., Path]] = {"cvae": cvae_demo}
