"""What the step benchmarks share: the median CPU time of a training step and the process's peak memory."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch


def peak_rss_mb() -> float:
    """This process's peak resident memory (Linux ``VmHWM``), MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def median_step_cpu_s(parameters: Iterable[torch.nn.Parameter], loss_of: Callable[[], torch.Tensor], steps: int, lr: float) -> float:
    """Median CPU seconds of one step (zero_grad, ``loss_of().backward()``, AdamW) over ``steps`` after two warm-up steps."""
    optimizer = torch.optim.AdamW(parameters, lr=lr)
    times = []
    for step in range(steps + 2):
        start = time.process_time()
        optimizer.zero_grad()
        loss_of().backward()
        optimizer.step()
        if step >= 2:
            times.append(time.process_time() - start)
    return round(statistics.median(times), 4)
