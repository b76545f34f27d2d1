"""The generic LightningModule of every diffusion recipe: one training step, one sampling call.

A recipe subclasses :class:`DiffusionModule`, builds its network, schedule and loss, and supplies
``training_pair(batch, generator) -> (x_0, condition)``; the loss, logging, validation and the
guided, seeded sampling are here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from medsynth.config import RecipeConfig
from medsynth.diffusion.condition import Condition
from medsynth.diffusion.guidance import NullCondition, classifier_free_guidance
from medsynth.diffusion.objectives import DiffusionLoss
from medsynth.diffusion.samplers import Denoiser
from medsynth.diffusion.sampling import SamplerConfig, run_sampler
from medsynth.diffusion.schedule import FlowSchedule, NoiseSchedule
from medsynth.seeds import item_generators, item_noise
from medsynth.training import MedsynthModule


class DiffusionModule(MedsynthModule):
    """Denoising training and guided sampling around ``net(x_t, t, cond)``.

    Args:
        config: the recipe's config.
        net: the denoiser (attribute ``net``: state-dict keys ``net.*``).
        schedule: the noise or flow schedule.
        cond_drop_prob: share of training samples whose condition is replaced by ``null_cond``.
        null_cond: the null condition (see :mod:`medsynth.diffusion.guidance`); None: unconditional
            training, and sampling without guidance.
    """

    def __init__(self, config: RecipeConfig, net: nn.Module, schedule: NoiseSchedule | FlowSchedule,
                 cond_drop_prob: float = 0.0, null_cond: NullCondition | None = None):
        super().__init__(config)
        self.net = net
        self.schedule = schedule
        self.null_cond = null_cond
        self.loss = DiffusionLoss(schedule, cond_drop_prob=cond_drop_prob, null_cond=null_cond)

    def training_pair(self, batch: Any, generator: torch.Generator | None = None) -> tuple[Tensor, Any]:
        """(x_0 (B, C, *S) in the model's range, the batch's condition); random draws from ``generator``
        (None: the global RNG, which a resumed run restores)."""
        raise NotImplementedError(f"{type(self).__name__} must define training_pair(batch, generator)")

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x0, cond = self.training_pair(batch)
        loss, logs = self.loss(self.net, x0, cond)
        self.log_dict({f"train/{k}": v for k, v in logs.items()}, on_step=True, on_epoch=True, batch_size=len(x0))
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        # A private generator: the same t, noise and patches at every validation, and the global
        # RNG (which a resumed run restores) untouched.
        generator = torch.Generator(device=self.device).manual_seed(batch_idx)
        x0, cond = self.training_pair(batch, generator)
        loss, logs = self.loss(self.net, x0, cond, generator)
        self.log_dict({f"val/{k}": v for k, v in logs.items()}, prog_bar=True, on_epoch=True, batch_size=len(x0))

    def guided(self, guidance: float) -> Denoiser:
        """``net`` with classifier-free guidance of scale ``guidance`` (0, or no null condition: ``net``)."""
        if self.null_cond is None:
            return self.net
        return classifier_free_guidance(self.net, guidance, self.null_cond)

    def denoiser(self, settings: SamplerConfig) -> Denoiser:
        """The model the sampler calls: the guided net (a recipe wraps it, e.g. patch-wise)."""
        return self.guided(settings.guidance)

    @torch.no_grad()
    def generate(self, shape: Sequence[int], cond: Any, settings: SamplerConfig, seeds: Sequence[int]) -> Tensor:
        """Samples, one per seed, in sampler calls of ``settings.batch_size`` items.

        Item i's initial noise and per-step noise come from its own generator, so an item does
        not depend on the batch it is sampled in.

        Args:
            shape: one item's shape (C, *S).
            cond: the condition of all len(seeds) items (a tensor, a Condition or None), on the module's device.
            settings: sampler, steps, guidance, eta, batch size.
            seeds: one seed per item (:func:`medsynth.seeds.item_seeds`).

        Returns:
            x_0, shape (len(seeds), C, *S), not clamped.
        """
        self.eval()
        model, outputs = self.denoiser(settings), []
        for start in range(0, len(seeds), settings.batch_size):
            part = slice(start, start + settings.batch_size)
            generators = item_generators(seeds[part])  # on the CPU: the same numbers on every device
            noise = item_noise(shape, generators).to(self.device)
            # (map runs at once, in this iteration: the loop variable is bound correctly)
            part_cond = cond.map(lambda v: v[part]) if isinstance(cond, Condition) else None if cond is None else cond[part]  # noqa: B023
            outputs.append(run_sampler(model, noise, self.schedule, part_cond, settings, generators))
        return torch.cat(outputs)
