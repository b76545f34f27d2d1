"""``pnp``: the fast reconstruction method, regularisation by denoising with the slice prior in voxel space.

The fine volume V (1, 1, X, Y, N) starts at the stack's cubic through-plane interpolation and is
optimised directly (Adam, :func:`~medsynth.inverse.latent.run_adam`) against the same SAX and LAX
fidelity terms as ``latent`` (:func:`~medsynth.inverse.latent.data_terms`), with the prior's
regulariser added to V's gradient (RED, Romano et al. 2017, with a diffusion denoiser as in RED-diff,
Mardani et al. 2023):

    grad = grad(lax_weight * lax + sax_weight * sax) + pnp_weight * (V - D_t(V)) / numel(V)

where D_t renders every slice noised to the training timestep ``pnp_timestep`` (fresh seeded noise at
each iteration) and denoised in one step under its z_sem (encoded once from the start). Each iteration
costs one network evaluation per slice and no back-propagation through the network, against ``latent``'s
``steps`` forward and backward evaluations per slice, and it works in voxels, where a step of the
optimiser changes the volume by what it says rather than through the decoder's amplification of x_T.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import Tensor

from medsynth.inverse.latent import Measurements, ReconstructionHistory, ReconstructSettings, data_terms, run_adam
from medsynth.inverse.prior import SlicePrior, resize_slices

__all__ = ["denoise_volume", "optimise_volume"]


def denoise_volume(prior: SlicePrior, volume: Tensor, z_sem: Tensor | None, timestep: int, generator: torch.Generator,
                   batch: int) -> Tensor:
    """D_t(V): every slice of ``volume`` (1, 1, X, Y, N) in [-1, 1] noised to ``timestep`` and denoised in one step at
    the prior's size, back on the stack's grid, (1, 1, X, Y, N)."""
    in_plane = tuple(volume.shape[2:4])
    size = (int(prior.image_size), int(prior.image_size))
    slices = resize_slices(volume[0].permute(3, 0, 1, 2), size)  # (N, 1, s, s)
    noise = torch.randn(slices.shape, generator=generator).to(slices)
    parts = [prior.denoise(slices[k:k + batch], None if z_sem is None else z_sem[k:k + batch], timestep, noise[k:k + batch])
             for k in range(0, len(slices), batch)]
    return resize_slices(torch.cat(parts), in_plane).permute(1, 2, 3, 0).unsqueeze(0)  # type: ignore[arg-type]


def optimise_volume(prior: SlicePrior, start: Tensor, data: Measurements, settings: ReconstructSettings,
                    keep: Callable[[Tensor], None] | None = None,
                    tick: Callable[[], None] | None = None) -> tuple[Tensor, ReconstructionHistory]:
    """Optimise the fine volume from ``start`` (1, 1, X, Y, N) in [-1, 1] (module docstring); ``tick()`` after every
    iteration (a progress bar).

    Returns:
        The volume (1, 1, X, Y, N) in [-1, 1] units (no gradient) and the history (``total``, ``lax``, ``sax``,
        ``prior``: the mean squared denoising residual, per iteration).
    """
    began = time.perf_counter()
    history = ReconstructionHistory(method="pnp")
    volume = start.detach().clone().requires_grad_(True)
    generator = torch.Generator().manual_seed(settings.seed)
    with torch.no_grad():
        z_sem = prior.encode_semantic(resize_slices(start[0].permute(3, 0, 1, 2), (int(prior.image_size),) * 2))

    def loss_terms() -> dict[str, Tensor]:
        if keep is not None:
            keep(volume.detach())
        terms = data_terms(volume, data)
        total = settings.lax_weight * terms["lax"] + settings.sax_weight * terms["sax"]
        with torch.no_grad():
            residual = volume - denoise_volume(prior, volume, z_sem, settings.pnp_timestep, generator, settings.batch)
        # a term of value 0 whose gradient is the regulariser's: the total stays the data terms' (the early stop's)
        surrogate = settings.pnp_weight * torch.sum(volume * residual) / residual.numel()
        return {"total": total + surrogate - surrogate.detach(), **terms, "prior": torch.mean(residual ** 2)}

    run_adam([volume], settings.pnp_lr, settings.pnp_iterations, settings, history, loss_terms, tick=tick)
    result = volume.detach()
    if keep is not None:
        keep(result)
    history.seconds = time.perf_counter() - began
    return result, history
