"""Downstream utility of generated motion, as a user would meet it: a few subjects with motion labels,
many static frames without, and a motion network to train.

The training subjects are split into a labelled pool L (their real pairs and fields) and an
unlabelled pool U (only their reference frame is used); the test set is the held-out subjects'
real pairs. The same small network (MONAI ``UNet``, 3D, input = (fixed, moving), output = the voxel
field), with the same budget (optimiser steps, batch size, architecture) and seed, is trained on

- (a) ``real_only``: L's real pairs;
- (b) ``classic``: L + each U frame warped by random smooth B-spline deformations whose mean
  magnitude follows the L fields' (:func:`medsynth.motion.augment.random_smooth_fields`), weighted by
  where the L fields move (:func:`~medsynth.motion.augment.motion_envelope`): a still background
  stays still, as in the real pairs;
- (c) ``with_generated``: L + each U frame warped by the generator's fields for it;
- (d) ``oracle``: L + each U frame warped by its own true field(s): what labelling U would give;
- (e) ``pca``: L + each U frame warped by samples of a PCA motion model of the L fields
  (:class:`PCAMotionModel`);

every arm's U pairs are made the same way from a frame and a field (:func:`pairs_from_frames`), so the
arms differ only in the motion. Each is scored by the end-point error in mm on the test pairs
(:func:`medsynth.evaluate.fields.epe_map_mm`), over several downstream seeds (mean and sd), and by the
gain share ``(a - x) / (a - d)``: the part of U's real labels that arm x replaces. Shared by
``flow-cvae`` and ``motion-ldm`` (:func:`motion_utility`). A plain PyTorch loop: a few hundred steps
of one small network need none of Lightning's checkpointing, logging or devices.

The budget (:data:`DOWNSTREAM_STEPS`) must let the network use the extra pairs: at 120-150 steps it was
under-trained and even the oracle did not beat real only, so every gain share was a ratio of noise.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import DiffusionLoss
from monai.networks.nets import UNet
from pydantic import Field

from medsynth.config import StrictModel
from medsynth.data.fields import mm_to_voxel, voxel_to_mm
from medsynth.errors import MedsynthError
from medsynth.evaluate.fields import epe_map_mm
from medsynth.motion.augment import mean_magnitude_mm, motion_envelope, random_smooth_fields
from medsynth.motion.fields import invert, warp_image
from medsynth.seeds import item_seed, seeded

__all__ = ["ARMS", "DOWNSTREAM_STEPS", "MotionPairs", "PCAMotionModel", "check_modes", "check_pools", "evaluate_motion_network", "motion_utility", "pairs_from_frames",
           "train_motion_network"]

ARMS = ("real_only", "classic", "with_generated", "oracle", "pca")
"""The protocol's arms (a), (b), (c), (d), (e), as they appear in the keys ``downstream_epe_<arm>_mm``."""

DOWNSTREAM_STEPS = 600
"""The protocol's budget: Adam steps of batch 4 per downstream training, the same in every arm (the one default; recipes'
``evaluate.downstream_steps`` = None reads it). Measured (BENCHMARKS.md, issue 18): at 120-150 steps the network was
under-trained and labelling U (the oracle) did not beat real only; at 600 steps, flow-cvae's cardiac phantom at 24^3,
L = 8: real only 0.660 +- 0.017 mm, oracle 0.551 +- 0.013 mm (2 seeds). On the lung phantom (32 x 32 x 8) the oracle
beats real only at no budget tried (150-1500 steps): warped pairs there differ from rendered ones."""

MotionPairs = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | np.ndarray]
"""``(fixed (N, 1, *S), moving (N, 1, *S), flow (N, 3, *S) voxels, affines (N, 4, 4))`` with
``warp_image(moving, flow) ~= fixed`` (pull convention: ``fixed(x) = moving(x + flow(x))``)."""


class MotionUtilitySettings(StrictModel):
    """The protocol's settings in a motion recipe's ``evaluate`` section (flow-cvae, motion-ldm); each recipe sets its
    own pool size default and adds how many generated motions it draws per unlabelled frame."""

    downstream_real_subjects: int = Field(4, ge=1, description="labelled pool L: the first training subjects, whose real pairs train the downstream network")
    downstream_unlabelled_subjects: int | None = Field(None, ge=1, description="unlabelled pool U: the next training subjects, only their "
                                                                              "reference frame (image or CT) used (None: all the rest)")
    pca_modes: int = Field(4, ge=0, description="principal modes of the PCA motion model of L's fields (at most L's fields - 1)")
    downstream_seeds: int = Field(1, ge=1, description="downstream trainings per arm, seeds seed .. seed + n - 1 (mean and sd)")
    downstream_steps: int | None = Field(None, ge=1, description="Adam steps per downstream training (None: the protocol's DOWNSTREAM_STEPS)")
    seed: int = 0


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


def train_motion_network(pairs: MotionPairs, *, steps: int = DOWNSTREAM_STEPS, seed: int, channels: Sequence[int] = (8, 16, 32), lr: float = 3e-3,
                         batch_size: int = 4, smoothness: float = 0.01, device: str | torch.device = "cpu") -> UNet:
    """Train the supervised motion network on ``pairs`` for ``steps`` Adam steps (cosine decay of ``lr`` to 0), deterministically from ``seed``.

    Loss: mean end-point error in mm (each pair's own affine) + ``smoothness`` x MONAI
    ``DiffusionLoss`` (mean squared first derivatives of the voxel field, VoxelMorph's regulariser).
    Weights are initialised under :func:`medsynth.seeds.seeded` (the caller's RNG is untouched); batches follow
    seeded permutations of the pairs (``torch.Generator``).

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
    with seeded(seed):
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


def check_modes(fields: int, modes: int, setting: str) -> None:
    """One line naming ``setting`` when a PCA of ``fields`` fields cannot have ``modes`` modes (at most ``fields - 1``)."""
    if not 0 <= modes <= fields - 1:
        raise MedsynthError(f"{setting}={modes}: a PCA of {fields} training field(s) has at most {max(fields - 1, 0)} mode(s)")


def check_pools(n_train: int, labelled: int, unlabelled: int | None, *, labelled_setting: str, unlabelled_setting: str,
                pca_modes: int = 0, fields_per_subject: int = 1, pca_setting: str = "pca_modes") -> tuple[int, int]:
    """The pool sizes (L, U) for ``n_train`` training subjects, or one line naming the setting that empties a pool
    or asks the PCA model of L's fields for too many modes; called before any work.

    Args:
        n_train: training subjects available.
        labelled: subjects of L (the first ``labelled`` training subjects).
        unlabelled: subjects of U (the next ones); None: all the rest.
        labelled_setting, unlabelled_setting, pca_setting: the settings' names, for the message.
        pca_modes: modes of the PCA model fitted on L's ``labelled * fields_per_subject`` fields.
    """
    if labelled < 1:
        raise MedsynthError(f"{labelled_setting}={labelled}: the labelled pool needs at least one subject")
    rest = n_train - labelled
    if rest < 1:
        raise MedsynthError(f"{labelled_setting}={labelled} leaves no unlabelled subject: the training split has {n_train} subject(s); "
                            f"the utility protocol needs both pools (lower {labelled_setting})")
    if unlabelled is not None and unlabelled < 1:
        raise MedsynthError(f"{unlabelled_setting}={unlabelled}: the unlabelled pool needs at least one subject")
    check_modes(labelled * fields_per_subject, pca_modes, pca_setting)
    return labelled, rest if unlabelled is None else min(unlabelled, rest)


class PCAMotionModel:
    """A linear (PCA) motion model: the mean field plus ``modes`` principal modes with Gaussian coefficients,
    a classical generative baseline (point distribution model; torch SVD, as nothing we stand on has one for fields).

    Fitted in mm (world vectors, so fields of different grids' spacings mix right) on fields of one shape;
    a sample is ``mean + sum_j c_j sd_j v_j`` with ``c_j ~ N(0, 1)`` and ``sd_j`` the mode's standard
    deviation over the training fields (singular value / sqrt(N - 1)).
    """

    def __init__(self, fields_mm: torch.Tensor, modes: int, setting: str = "modes"):
        """Args: fields_mm ``(N, 3, *S)`` mm; modes: principal modes kept (at most N - 1); setting: its name, for the message."""
        n = len(fields_mm)
        check_modes(n, modes, setting)
        flat = torch.as_tensor(fields_mm, dtype=torch.float64).flatten(1)
        self.shape = tuple(fields_mm.shape[1:])
        self.mean = flat.mean(0)
        _, singular, basis = torch.linalg.svd(flat - self.mean, full_matrices=False)
        self.components = basis[:modes]  # (modes, D), orthonormal rows
        self.sd = singular[:modes] / max(n - 1, 1) ** 0.5

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """``n`` fields ``(n, 3, *S)`` in mm, float32; the only randomness is ``generator``."""
        coefficients = torch.randn(n, len(self.sd), generator=generator, dtype=torch.float64) * self.sd
        return (self.mean + coefficients @ self.components).view(n, *self.shape).float()


def pairs_from_frames(frames: torch.Tensor, fields: torch.Tensor, affines: torch.Tensor,
                      frame_role: Literal["fixed", "moving"]) -> MotionPairs:
    """Training pairs made from frames and fields (see :data:`MotionPairs`, pull convention).

    Args:
        frames: ``(N, 1, *S)``, one per field.
        fields: ``(N, 3, *S)`` voxels.
        affines: ``(N, 4, 4)``.
        frame_role: ``"moving"``: the frame is the moving image, ``fixed = warp_image(frame, u)`` (motion-ldm:
            the reference CT warped onto phase t); ``"fixed"``: the frame is the fixed image,
            ``moving = warp_image(frame, invert(u))`` (flow-cvae: the ES frame and its synthetic ED).
    """
    with torch.no_grad():
        if frame_role == "moving":
            return warp_image(frames, fields), frames, fields, affines
        return frames, warp_image(frames, invert(fields)), fields, affines


Generate = Callable[[int], torch.Tensor]
"""The recipe's generator: index ``i`` of an unlabelled frame -> its generated fields ``(m, 3, *S)`` in voxels of its grid."""


def motion_utility(labelled: MotionPairs, frames: torch.Tensor, frame_affines: torch.Tensor, true_fields: Sequence[torch.Tensor],
                   test: MotionPairs, generate: Generate, *, per_frame: int, pca_modes: int, seeds: Sequence[int], steps: int | None,
                   frame_role: Literal["fixed", "moving"], seed: int = 0, channels: Sequence[int] = (8, 16, 32), lr: float = 3e-3,
                   batch_size: int = 4, smoothness: float = 0.01, test_mask: torch.Tensor | None = None,
                   pca_setting: str = "pca_modes", device: str | torch.device = "cpu") -> dict[str, object]:
    """The utility protocol (module doc): five arms, each trained once per downstream seed, scored on ``test``.

    Args:
        labelled: L's real pairs (see :data:`MotionPairs`); their fields also fit the PCA model and set the
            classic augmentation's magnitude (mean and sd over fields of the per-field mean ``|u|`` in mm) and
            where it moves (their envelope).
        frames: U's frames ``(U, 1, *S)``.
        frame_affines: their affines ``(U, 4, 4)``.
        true_fields: per U frame its true fields ``(m_i, 3, *S)`` voxels (the oracle).
        test: held-out real pairs.
        generate: the generator (see :data:`Generate`), called once per U frame.
        per_frame: fields per U frame of the classic and PCA arms (match the generator's count).
        pca_modes: principal modes of the PCA model (at most ``len(labelled) - 1``; else one line naming ``pca_setting``).
        seeds: downstream seeds (initialisation and batch order); every arm trains once per seed.
        steps: optimiser steps of every training (None: :data:`DOWNSTREAM_STEPS`).
        channels, lr, batch_size, smoothness, device: see :func:`train_motion_network`.
        frame_role: how a U frame and a field make a pair (:func:`pairs_from_frames`).
        seed: seed of the classic and PCA draws (U frame ``i`` draws with ``item_seed(seed, i)``).
        test_mask: ``(N_test, *S)`` or ``(*S)`` bool region of the test pairs to score in.

    Returns:
        ``downstream_epe_<arm>_mm`` (mean over seeds; ``_sd`` and ``_per_seed`` too with more than one seed) for the arms of
        :data:`ARMS`; ``downstream_gain_share_<generated|classic|pca>`` ``(a - x) / (a - d)`` of the mean EPEs
        (NaN when the oracle does not beat real only: no gain to share); ``downstream_epe_ratio`` (with
        generated / real only); ``downstream_epe_zero_mm``; ``downstream_n_labelled_pairs``,
        ``downstream_n_unlabelled``, ``downstream_n_<arm>`` (U pairs per arm); ``downstream_n_real`` and
        ``downstream_n_generated`` (L pairs, generated pairs); magnitudes (mean ``|u|`` mm) of the L fields
        and of each arm's U fields; ``downstream_seeds``, ``downstream_steps``.
    """
    real = _check(labelled, "labelled pairs")
    frames, frame_affines = torch.as_tensor(frames).float(), torch.as_tensor(frame_affines).double()
    if not len(real[0]) or not len(frames):
        raise MedsynthError(f"utility protocol: {len(real[0])} labelled pair(s) and {len(frames)} unlabelled frame(s); both pools need one")
    if len(true_fields) != len(frames) or len(frame_affines) != len(frames):
        raise ValueError(f"{len(frames)} unlabelled frames, {len(frame_affines)} affines and {len(true_fields)} true-field sets")
    if not seeds:
        raise ValueError("utility protocol: no downstream seed given")
    shape, steps = tuple(frames.shape[2:]), DOWNSTREAM_STEPS if steps is None else steps
    pca = PCAMotionModel(voxel_to_mm(real[2].double(), real[3]), pca_modes, pca_setting)  # refused before any work
    magnitudes, envelope = mean_magnitude_mm(real[2], real[3]), motion_envelope(real[2], real[3])
    spread = (float(magnitudes.mean()), float(magnitudes.std()) if len(magnitudes) > 1 else 0.0)

    fields: dict[str, list[torch.Tensor]] = {arm: [] for arm in ARMS[1:]}
    for i, affine in enumerate(frame_affines):
        draws = torch.Generator().manual_seed(item_seed(seed, i))
        fields["classic"].append(random_smooth_fields(per_frame, shape, affine, spread, draws, envelope=envelope))
        fields["pca"].append(mm_to_voxel(pca.sample(per_frame, draws).double(), affine).float())
        fields["oracle"].append(torch.as_tensor(true_fields[i]).float().reshape(-1, 3, *shape))
        generated = torch.as_tensor(generate(i)).float()
        if generated.ndim != 5 or tuple(generated.shape[1:]) != (3, *shape):
            raise ValueError(f"generator: fields for unlabelled frame {i} must be (m, 3, {', '.join(map(str, shape))}), got {tuple(generated.shape)}")
        fields["with_generated"].append(generated)
    datasets: dict[str, tuple[torch.Tensor, ...]] = {"real_only": real}
    for arm, per in fields.items():
        counts = torch.tensor([len(f) for f in per])
        extra = pairs_from_frames(frames.repeat_interleave(counts, 0), torch.cat(per), frame_affines.repeat_interleave(counts, 0), frame_role)
        datasets[arm] = tuple(torch.cat([a, b.to(a.dtype)]) for a, b in zip(real, extra))

    settings = {"steps": steps, "channels": channels, "lr": lr, "batch_size": batch_size, "smoothness": smoothness, "device": device}
    scores = {arm: [evaluate_motion_network(train_motion_network(datasets[arm], seed=s, **settings), test, levels=len(channels),
                                            mask=test_mask, batch_size=batch_size) for s in seeds] for arm in ARMS}
    mean = {arm: float(np.mean(values)) for arm, values in scores.items()}
    metrics: dict[str, object] = {f"downstream_epe_{arm}_mm": mean[arm] for arm in ARMS}
    if len(seeds) > 1:  # sd over seeds, and each seed's figure: arms trained with one seed pair up (paired differences)
        metrics.update({f"downstream_epe_{arm}_mm_sd": float(np.std(values, ddof=1)) for arm, values in scores.items()})
        metrics.update({f"downstream_epe_{arm}_mm_per_seed": [float(v) for v in values] for arm, values in scores.items()})
    gain = mean["real_only"] - mean["oracle"]
    for arm, key in (("with_generated", "generated"), ("classic", "classic"), ("pca", "pca")):
        metrics[f"downstream_gain_share_{key}"] = (mean["real_only"] - mean[arm]) / gain if gain > 0 else math.nan
    metrics.update({
        "downstream_epe_ratio": mean["with_generated"] / mean["real_only"] if mean["real_only"] > 0 else math.nan,
        "downstream_epe_zero_mm": evaluate_motion_network(None, test, mask=test_mask),
        "downstream_n_labelled_pairs": len(real[0]), "downstream_n_unlabelled": len(frames),
        **{f"downstream_n_{arm}": sum(len(f) for f in per) for arm, per in fields.items()},
        "downstream_n_real": len(real[0]), "downstream_n_generated": sum(len(f) for f in fields["with_generated"]),
        "downstream_magnitude_labelled_mm": spread[0],
        **{f"downstream_magnitude_{arm}_mm": float(mean_magnitude_mm(torch.cat(per), frame_affines.repeat_interleave(
            torch.tensor([len(f) for f in per]), 0)).mean()) for arm, per in fields.items()},
        "downstream_seeds": [int(s) for s in seeds], "downstream_steps": int(steps)})
    return metrics
