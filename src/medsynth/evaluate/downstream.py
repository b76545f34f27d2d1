"""Downstream utility of generated motion: does adding generated (frame, warped frame, field) triples
to the real training pairs make a supervised motion network better on held-out real pairs?

The same small network (MONAI ``UNet``, 3D, input = (fixed, moving), output = the voxel field) is
trained twice with the same budget (optimiser steps, batch size, seed, architecture): on the real
pairs only, and on the real pairs plus the generated triples; both are scored by end-point error in
mm on the test pairs (:func:`medsynth.evaluate.fields.epe_map_mm`). Shared by ``flow-cvae`` and
``motion-ldm``. A plain PyTorch loop: a few hundred steps of one small network need none of
Lightning's checkpointing, logging or devices.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import DiffusionLoss
from monai.networks.nets import UNet

from medsynth.evaluate.fields import epe_map_mm

__all__ = ["MotionPairs", "downstream_motion_utility", "evaluate_motion_network", "train_motion_network"]

MotionPairs = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | np.ndarray]
"""``(fixed (N, 1, *S), moving (N, 1, *S), flow (N, 3, *S) voxels, affines (N, 4, 4))`` with
``warp_image(moving, flow) ~= fixed`` (pull convention: ``fixed(x) = moving(x + flow(x))``)."""


def _check(pairs: MotionPairs, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    fixed, moving, flow, affines = (torch.as_tensor(v) for v in pairs)
    n, spatial = len(fixed), tuple(fixed.shape[2:])
    if fixed.ndim != 5 or fixed.shape[1] != 1 or tuple(moving.shape) != tuple(fixed.shape):
        raise ValueError(f"{name}: fixed and moving must both be (N, 1, X, Y, Z), got {tuple(fixed.shape)} and {tuple(moving.shape)}")
    if tuple(flow.shape) != (n, 3, *spatial):
        raise ValueError(f"{name}: flow must be (N, 3, *S) = {(n, 3, *spatial)}, got {tuple(flow.shape)}")
    if tuple(affines.shape) != (n, 4, 4):
        raise ValueError(f"{name}: affines must be (N, 4, 4) = {(n, 4, 4)}, got {tuple(affines.shape)}")
    return fixed.float(), moving.float(), flow.float(), affines.double()


def _inputs(fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
    """``(N, 2, *S)``: each pair standardised by its joint mean and sd (intensities stay comparable within a pair)."""
    pair = torch.cat([fixed, moving], dim=1)
    mean = pair.mean(dim=tuple(range(1, pair.ndim)), keepdim=True)
    sd = pair.std(dim=tuple(range(1, pair.ndim)), keepdim=True).clamp_min(1e-6)
    return (pair - mean) / sd


def _build_network(channels: Sequence[int], norm: str = "INSTANCE") -> UNet:
    return UNet(spatial_dims=3, in_channels=2, out_channels=3, channels=tuple(channels), strides=(2,) * (len(channels) - 1), num_res_units=1, norm=norm)


def _predict(network: UNet, inputs: torch.Tensor, levels: int) -> torch.Tensor:
    """Run the network on inputs zero-padded to a multiple of ``2 ** (levels - 1)`` and crop back."""
    multiple = 2 ** (levels - 1)
    spatial = inputs.shape[2:]
    pad = [p for n in reversed(spatial) for p in (0, (-n) % multiple)]
    output = network(F.pad(inputs, pad))
    return output[(..., *[slice(0, n) for n in spatial])]


def train_motion_network(pairs: MotionPairs, *, steps: int, seed: int, channels: Sequence[int] = (8, 16, 32), lr: float = 3e-3,
                         batch_size: int = 4, smoothness: float = 0.01, device: str | torch.device = "cpu") -> UNet:
    """Train the supervised motion network on ``pairs`` for ``steps`` Adam steps (cosine decay of ``lr`` to 0), deterministically from ``seed``.

    Loss: mean end-point error in mm (each pair's own affine) + ``smoothness`` x MONAI
    ``DiffusionLoss`` (mean squared first derivatives of the voxel field, VoxelMorph's regulariser).
    Weights are initialised under ``torch.manual_seed(seed)`` inside ``torch.random.fork_rng`` (the
    caller's RNG is untouched); batches follow seeded permutations of the pairs (``torch.Generator``).

    Args:
        pairs: see :data:`MotionPairs`.
        steps: optimiser steps (the budget).
        seed: seed of initialisation and batch order.
        channels: UNet channels per level (stride 2 between levels).
        lr: Adam learning rate.
        batch_size: pairs per step.
        smoothness: weight of the diffusion regulariser.
        device: where to train.

    Returns:
        The trained ``UNet`` in eval mode.
    """
    fixed, moving, flow, affines = _check(pairs, "training pairs")
    if not len(fixed):
        raise ValueError("training pairs: none given")
    inputs = _inputs(fixed, moving).to(device)
    flow = flow.to(device)
    regulariser = DiffusionLoss()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        network = _build_network(channels).to(device)
    optimiser = torch.optim.Adam(network.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=max(steps, 1))  # decays to 0: the result at the budget's end is settled
    order = torch.Generator().manual_seed(seed)
    queue: list[int] = []
    network.train()
    for _ in range(steps):
        batch = []
        while len(batch) < min(batch_size, len(fixed)):  # seeded epochs: each pair once per permutation
            if not queue:
                queue = torch.randperm(len(fixed), generator=order).tolist()
            batch.append(queue.pop(0))
        prediction = _predict(network, inputs[batch], len(channels))
        loss = epe_map_mm(prediction, flow[batch], affines[batch]).mean() + smoothness * regulariser(prediction)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
    return network.eval()


@torch.no_grad()
def evaluate_motion_network(network: UNet | None, pairs: MotionPairs, *, levels: int = 3, mask: torch.Tensor | None = None,
                            batch_size: int = 4) -> float:
    """Mean over pairs of the mean end-point error (mm) of the network's field (``None``: the zero field).

    Args:
        network: a trained network, or None for the zero-field baseline.
        pairs: see :data:`MotionPairs`.
        levels: the network's number of levels (``len(channels)``).
        mask: ``(N, *S)`` or ``(*S)`` bool region to score in (None: every voxel).
        batch_size: pairs per forward pass.
    """
    fixed, moving, flow, affines = _check(pairs, "test pairs")
    device = next(network.parameters()).device if network is not None else torch.device("cpu")
    inputs = _inputs(fixed, moving)
    scores = []
    for start in range(0, len(fixed), batch_size):
        part = slice(start, start + batch_size)
        prediction = torch.zeros_like(flow[part]) if network is None else _predict(network, inputs[part].to(device), levels).cpu()
        error = epe_map_mm(prediction, flow[part], affines[part])  # (b, *S) mm
        if mask is None:
            scores.append(error.flatten(1).mean(dim=1))
        else:
            region = torch.as_tensor(mask).bool()
            region = (region[part] if region.ndim == error.ndim else region.expand_as(error)).to(error.dtype)
            scores.append((error * region).flatten(1).sum(dim=1) / region.flatten(1).sum(dim=1).clamp_min(1.0))
    return float(torch.cat(scores).mean())


def downstream_motion_utility(real_train: MotionPairs, generated: MotionPairs, test: MotionPairs, *, steps: int, seed: int,
                              channels: Sequence[int] = (8, 16, 32), lr: float = 3e-3, batch_size: int = 4, smoothness: float = 0.01,
                              test_mask: torch.Tensor | None = None, device: str | torch.device = "cpu") -> dict[str, float | int]:
    """Train the motion network on (a) ``real_train`` and (b) ``real_train`` + ``generated``, same budget; score both on ``test``.

    Args:
        real_train: real pairs, see :data:`MotionPairs`.
        generated: generated triples (fixed = the real frame, moving = the synthetic other phase,
            flow = the generated field); may hold zero items.
        test: held-out real pairs.
        steps, seed, channels, lr, batch_size, smoothness, device: see :func:`train_motion_network`.
        test_mask: ``(N_test, *S)`` or ``(*S)`` bool region of the test pairs to score in.

    Returns:
        ``downstream_epe_real_only_mm``, ``downstream_epe_with_generated_mm`` (mm on the test pairs),
        ``downstream_epe_ratio`` (with generated / real only; < 1 means the generated triples help),
        ``downstream_epe_zero_mm`` (the zero field), ``downstream_steps``, ``downstream_n_real``,
        ``downstream_n_generated``.
    """
    real = _check(real_train, "real training pairs")
    extra = _check(generated, "generated triples")
    if tuple(extra[0].shape[1:]) != tuple(real[0].shape[1:]) and len(extra[0]):
        raise ValueError(f"generated triples on a {tuple(extra[0].shape[2:])} grid, real pairs on {tuple(real[0].shape[2:])}")
    combined = tuple(torch.cat([a, b.to(a.dtype)]) for a, b in zip(real, extra))
    settings = {"steps": steps, "seed": seed, "channels": channels, "lr": lr, "batch_size": batch_size, "smoothness": smoothness, "device": device}
    scores = {}
    for key, pairs in (("real_only", real), ("with_generated", combined)):
        network = train_motion_network(pairs, **settings)
        scores[key] = evaluate_motion_network(network, test, levels=len(channels), mask=test_mask, batch_size=batch_size)
    ratio = scores["with_generated"] / scores["real_only"] if scores["real_only"] > 0 else math.nan
    return {"downstream_epe_real_only_mm": scores["real_only"], "downstream_epe_with_generated_mm": scores["with_generated"],
            "downstream_epe_ratio": ratio, "downstream_epe_zero_mm": evaluate_motion_network(None, test, mask=test_mask),
            "downstream_steps": int(steps), "downstream_n_real": len(real[0]), "downstream_n_generated": len(extra[0])}
