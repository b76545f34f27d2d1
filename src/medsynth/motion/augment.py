"""Spatial augmentation of (frame, field) pairs that keeps the field true to the frames.

A random shift ``t`` (voxels) and per-axis zoom ``z`` resample every image of a pair with the
same map ``A(y) = c + (y - c) / z + t`` (``c`` the grid centre). If ``F(x) = G(x + u(x))``, then
``F' = F o A`` and ``G' = G o A`` satisfy ``F'(y) = G'(y + u'(y))`` with

    ``u'(y) = z * u(A(y))``

(the field resampled with the images and each vector component scaled by its axis' zoom), and
the voxel-to-world affine becomes ``affine @ A`` so that mm vectors stay the same physical
displacement. MONAI's random affine transforms resample fields as images without touching their
vectors, hence this one function.

:func:`random_smooth_fields` is the classic motion augmentation (SynthMorph trains registration networks
on nothing else): random cubic B-spline displacements, folding-free, whose mean magnitude in mm follows
a given distribution (e.g. that of the training fields).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from medsynth.data.fields import mm_to_voxel, voxel_to_mm
from medsynth.data.io import spacing_of
from medsynth.motion.bspline import BSplineTransform
from medsynth.motion.fields import jacobian_determinant


def shift_zoom_matrix(shape: Sequence[int], shift: Sequence[float], zoom: Sequence[float]) -> Tensor:
    """The 4x4 voxel map ``A`` (output voxel -> input voxel) of a shift and zoom, float64."""
    centre = (torch.as_tensor(list(shape), dtype=torch.float64) - 1) / 2
    z, t = torch.as_tensor(list(zoom), dtype=torch.float64), torch.as_tensor(list(shift), dtype=torch.float64)
    matrix = torch.eye(4, dtype=torch.float64)
    matrix[:3, :3] = torch.diag(1 / z)
    matrix[:3, 3] = centre - centre / z + t
    return matrix


def _resample(volume: Tensor, matrix: Tensor) -> Tensor:
    """``volume`` ``(C, X, Y, Z)`` sampled at ``A(y)`` (trilinear, border values)."""
    shape = torch.as_tensor(volume.shape[1:], dtype=torch.float64)
    # align_corners=True: normalised n = 2 y / (N - 1) - 1; grid_sample's last grid axis indexes the last array axis.
    scale = 2 / (shape - 1)
    linear = matrix[:3, :3] * scale[:, None] / scale[None, :]
    offset = scale * matrix[:3, 3] + linear.sum(1) - 1
    theta = torch.cat([linear.flip(0, 1), offset.flip(0)[:, None]], 1)[None].to(volume.dtype)
    grid = F.affine_grid(theta, [1, volume.shape[0], *volume.shape[1:]], align_corners=True)
    return F.grid_sample(volume[None], grid, mode="bilinear", padding_mode="border", align_corners=True)[0]


def shift_zoom_pair(images: Sequence[Tensor], flow: Tensor, affine: Tensor, shift: Sequence[float],
                    zoom: Sequence[float]) -> tuple[list[Tensor], Tensor, Tensor]:
    """Shift and zoom images and their field consistently (see the module doc).

    Args:
        images: volumes ``(C, X, Y, Z)`` on one grid (e.g. the fixed and the moving frame).
        flow: displacement in voxels ``(3, X, Y, Z)``, pull convention on that grid.
        affine: 4x4 voxel-to-world affine of the grid.
        shift: ``t`` in voxels per axis (content moves by ``-t``).
        zoom: ``z`` per axis (> 1 magnifies).

    Returns:
        The resampled images, the field ``z * u(A(y))`` in voxels and the affine ``affine @ A``.
    """
    matrix = shift_zoom_matrix(flow.shape[1:], shift, zoom)
    zooms = torch.as_tensor(list(zoom), dtype=flow.dtype).view(3, 1, 1, 1)
    new_affine = torch.as_tensor(affine, dtype=torch.float64) @ matrix
    return [_resample(image, matrix) for image in images], _resample(flow, matrix) * zooms, new_affine


def augment_pair(sample: dict[str, Any], shift: float, zoom: float, noise_std: float = 0.0) -> dict[str, Any]:
    """A random shift in [-shift, shift] voxels and zoom in [1 - zoom, 1 + zoom] per axis of a prepared flow-pair item.

    ``image`` (and ``moving``, when present), ``flow`` and ``affine`` are transformed together with
    :func:`shift_zoom_pair`; Gaussian noise of ``noise_std`` is added to the frames (clipped to [0, 1]).
    A ``label`` is dropped (not resampled). Draws from torch's global RNG (restored on resume).
    """
    shifts = ((torch.rand(3) * 2 - 1) * shift).tolist()
    zooms = (1 + (torch.rand(3) * 2 - 1) * zoom).tolist()
    keys = [key for key in ("image", "moving") if key in sample]
    images, flow, affine = shift_zoom_pair([sample[key] for key in keys], sample["flow"], sample["affine"], shifts, zooms)
    out = {key: value for key, value in sample.items() if key != "label"}
    for key, image in zip(keys, images):
        out[key] = (image + noise_std * torch.randn(image.shape)).clamp(0, 1) if noise_std > 0 else image
    return {**out, "flow": flow, "affine": affine}


def random_smooth_fields(n: int, shape: Sequence[int], affine: Tensor, magnitude_mm: tuple[float, float], generator: torch.Generator,
                         control_mm: float | None = None, shrink: float = 0.8, envelope: Tensor | None = None) -> Tensor:
    """``n`` random smooth, folding-free displacements ``(n, 3, *shape)`` in voxels of a grid with ``affine``.

    Each is a cubic B-spline (:class:`~medsynth.motion.bspline.BSplineTransform`) whose control-point
    values are i.i.d. standard normal in mm per world axis, with control points every ``control_mm``
    (default: half the grid's smallest extent in mm), rescaled so that its mean ``|u|`` over
    the grid (mm) is a draw of ``N(magnitude_mm[0], magnitude_mm[1])`` (floored at a tenth of the
    mean). With an ``envelope`` the spline is multiplied by it before that rescaling, so the motion sits
    where the envelope is large (e.g. where the training fields move: :func:`motion_envelope`) and a
    still background stays still. A draw whose Jacobian determinant is <= 0 anywhere is shrunk by
    ``shrink`` until it is not, so the distribution's upper tail may be capped for fields too large to
    stay folding-free.

    Args:
        n: fields to draw.
        shape: ``(X, Y, Z)``.
        affine: 4x4 voxel-to-world affine of the grid (spacing and direction: mm vectors are world vectors).
        magnitude_mm: (mean, sd) of the per-field mean ``|u|`` in mm.
        generator: the only randomness (a seeded ``torch.Generator``).
        control_mm: control-point spacing in mm.
        shrink: factor applied to a folding draw.
        envelope: ``(*shape)`` non-negative weight of the displacement per voxel (None: 1 everywhere).
    """
    affine = torch.as_tensor(affine, dtype=torch.float64)
    weight = 1.0 if envelope is None else torch.as_tensor(envelope, dtype=torch.float64)
    spacing = torch.from_numpy(spacing_of(affine.numpy()))  # mm per voxel along each array axis
    extent = spacing * (torch.as_tensor(list(shape), dtype=torch.float64) - 1)
    control = float(extent.min()) / 2 if control_mm is None else control_mm
    steps = tuple(max(1.0, control / float(s)) for s in spacing)  # control spacing in voxels per axis
    grid = BSplineTransform.grid_shape(shape, steps)
    mean, sd = (float(v) for v in magnitude_mm)
    fields = []
    for _ in range(n):
        coefficients = torch.randn(3, *grid, generator=generator, dtype=torch.float64)
        spline_mm = BSplineTransform(coefficients, steps, tuple(shape), affine.numpy()).spline_field()[0] * weight  # values in mm (see below)
        # spline_field scales by 1/step (a voxel field of the sampled grid); at full resolution step = 1, so values stay in mm.
        target = max(mean + sd * float(torch.randn((), generator=generator, dtype=torch.float64)), 0.1 * mean)
        field = mm_to_voxel(spline_mm * (target / float(torch.linalg.vector_norm(spline_mm, dim=0).mean().clamp_min(1e-12))), affine)
        while float(jacobian_determinant(field).min()) <= 0:
            field = field * shrink
        fields.append(field.float())
    return torch.stack(fields) if fields else torch.zeros(0, 3, *shape)


def motion_envelope(fields: Tensor, affines: Tensor) -> Tensor:
    """Where a set of fields moves: the root mean square over fields of ``|u|`` (mm) per voxel, divided by its maximum.

    Args:
        fields: ``(N, 3, *S)`` voxels, on one grid shape.
        affines: ``(N, 4, 4)``.

    Returns:
        ``(*S)`` float64 in [0, 1] (all zero when no field moves).
    """
    rms = torch.linalg.vector_norm(voxel_to_mm(torch.as_tensor(fields).double(), torch.as_tensor(affines)), dim=1).square().mean(0).sqrt()
    return rms / rms.max().clamp_min(1e-12)


def mean_magnitude_mm(fields: Tensor, affines: Tensor) -> Tensor:
    """Mean ``|u|`` in mm over the grid of each field ``(N, 3, *S)`` voxels with its affine ``(N, 4, 4)``: ``(N,)``."""
    return torch.linalg.vector_norm(voxel_to_mm(torch.as_tensor(fields).double(), torch.as_tensor(affines)), dim=1).flatten(1).mean(1)
