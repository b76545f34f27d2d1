"""Cubic B-spline free-form deformation: the control grid, its dense field and its file (MONAI has none).

Rueckert et al., IEEE TMI 1999. :class:`BSplineTransform` holds control-point values in voxels
of the fixed image; :meth:`BSplineTransform.save` / :func:`load_transform` are its ``.npz``
file, written through the one atomic writer. :mod:`medsynth.motion.registration` fits it.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from monai.data import MetaTensor

from medsynth.data.io import check_finite_output
from medsynth.errors import BadInputError
from medsynth.motion.fields import integrate_velocity
from medsynth.runs import atomic_write_bytes

__all__ = ["BSplineTransform", "load_transform"]


def _cubic_bspline_matrix(positions: torch.Tensor, spacing: float, count: int) -> torch.Tensor:
    """Weights ``(len(positions), count)`` of control points ``k`` at ``(k - 1) * spacing`` at each position.

    Uniform cubic B-spline basis (Rueckert et al. 1999, eq. 3): with ``t = x / spacing + 1``,
    ``i = floor(t)``, ``f = t - i``, control points ``i - 1 .. i + 2`` get ``B_0..B_3(f)``.
    """
    t = positions / spacing + 1.0
    i = torch.floor(t)
    f = t - i
    weights = torch.stack([(1 - f) ** 3 / 6, (3 * f**3 - 6 * f**2 + 4) / 6, (-3 * f**3 + 3 * f**2 + 3 * f + 1) / 6, f**3 / 6], dim=-1)
    index = (i.long()[:, None] - 1 + torch.arange(4, device=positions.device)).clamp(0, count - 1)
    return torch.zeros(len(positions), count, dtype=positions.dtype, device=positions.device).scatter_add_(1, index, weights)


@dataclass
class BSplineTransform:
    """A cubic B-spline displacement (or velocity) over the fixed image's grid.

    Attributes:
        coefficients: ``(3, Mx, My, Mz)`` control-point values in voxels of the fixed image
            (``(B, 3, Mx, My, Mz)``: B transforms of one grid, optimised jointly).
        control_spacing: control-point spacing in fixed voxels per axis; control point
            ``k`` of an axis sits at voxel ``(k - 1) * spacing``.
        shape: spatial shape ``(X, Y, Z)`` of the fixed image.
        affine: the fixed image's 4x4 affine.
        diffeomorphic: the B-spline field is a stationary velocity.
        integration_steps: scaling-and-squaring steps in diffeomorphic mode.
    """

    coefficients: torch.Tensor
    control_spacing: tuple[float, ...]
    shape: tuple[int, ...]
    affine: np.ndarray
    diffeomorphic: bool = False
    integration_steps: int = 7
    _bases: dict = field(default_factory=dict, init=False, repr=False, compare=False)  # (size, dtype, device) -> basis matrices

    @staticmethod
    def grid_shape(shape: Sequence[int], control_spacing: Sequence[float]) -> tuple[int, ...]:
        """Control points per axis covering voxels ``0 .. n - 1`` with cubic support."""
        return tuple(int(np.floor((n - 1) / s)) + 4 for n, s in zip(shape, control_spacing))

    def spline_field(self, size: Sequence[int] | None = None) -> torch.Tensor:
        """The B-spline field sampled on a ``size`` grid spanning the image (default: full resolution).

        Returns:
            ``(1, 3, *size)`` (``(B, 3, *size)`` for batched coefficients) in voxels of that grid (grid ``i`` sits at fixed voxel
            ``i * (n - 1) / (size - 1)``); a velocity in diffeomorphic mode.
        """
        size = tuple(self.shape if size is None else size)
        values = self.coefficients if self.coefficients.ndim == 5 else self.coefficients[None]
        bases, scale = self._level_bases(size, values)
        for axis, basis in enumerate(bases):  # separable tensor product, one axis at a time
            values = torch.movedim(torch.tensordot(values, basis, dims=([axis + 2], [1])), -1, axis + 2)
        return values * scale.reshape(1, 3, 1, 1, 1)

    def spline_blocks(self, size: Sequence[int], corners: torch.Tensor, edge: int) -> torch.Tensor:
        """The B-spline field on ``K`` cubic blocks of the ``size`` grid, computed only there.

        Separable as :meth:`spline_field`, on each block's own window of control points (the
        few with support on it), so the cost grows with the blocks, not with the image or grid.

        Args:
            size: the grid the blocks lie on (a pyramid level), as in :meth:`spline_field`.
            corners: ``(K, 3)`` integer first voxel of each block on that grid; a block must
                fit inside it (``corner + edge <= size`` on every axis).
            edge: block edge in voxels of that grid.

        Returns:
            ``(B, K, 3, edge, edge, edge)`` in voxels of the ``size`` grid (``B = 1`` for
            unbatched coefficients): block ``k`` equals
            ``spline_field(size)[:, :, x:x + edge, y:y + edge, z:z + edge]`` at its corner ``(x, y, z)``.
        """
        size = tuple(size)
        values = self.coefficients if self.coefficients.ndim == 5 else self.coefficients[None]
        bases, scale = self._level_bases(size, values)
        corners = corners.to(values.device)
        offsets = torch.arange(edge, device=values.device)
        rows, columns = [], []
        for axis, (basis, n, m, spacing) in enumerate(zip(bases, self.shape, size, self.control_spacing)):
            step = (n - 1) / max(m - 1, 1)
            count = basis.shape[1]
            # Control points with support on a block: i - 1 .. i + 2 around each voxel's i = floor(x / spacing + 1),
            # one more on each side against rounding (their weights are zero).
            span = min(count, int(np.floor((edge - 1) * step / spacing)) + 6)
            first = (torch.floor(corners[:, axis] * step / spacing + 1).long() - 2).clamp(0, count - span)  # (K,)
            column = first[:, None] + torch.arange(span, device=values.device)  # (K, span)
            rows.append(torch.gather(basis[corners[:, axis, None] + offsets], 2, column[:, None, :].expand(-1, edge, -1)))  # (K, edge, span)
            columns.append(column)
        window = values[:, :, columns[0][:, :, None, None], columns[1][:, None, :, None], columns[2][:, None, None, :]]  # (B, 3, K, s, s, s)
        values = torch.einsum("bckxyz,kix->bkciyz", window, rows[0])
        values = torch.einsum("bkciyz,kjy->bkcijz", values, rows[1])
        values = torch.einsum("bkcijz,klz->bkcijl", values, rows[2])
        return values * scale.reshape(1, 1, 3, 1, 1, 1)

    def _level_bases(self, size: tuple[int, ...], values: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Basis matrices ``(size[a], M_a)`` per axis of the ``size`` grid, and the voxel scale ``(3,)`` to that grid (cached)."""
        key = (size, values.dtype, values.device)
        if key not in self._bases:
            steps = [(n - 1) / max(m - 1, 1) for n, m in zip(self.shape, size)]
            bases = [
                _cubic_bspline_matrix(torch.arange(m, dtype=values.dtype, device=values.device) * step, spacing, count)
                for m, step, spacing, count in zip(size, steps, self.control_spacing, self.coefficients.shape[-3:])
            ]
            self._bases[key] = (bases, torch.as_tensor([1.0 / step for step in steps], dtype=values.dtype, device=values.device))
        return self._bases[key]

    def displacement(self, size: Sequence[int] | None = None) -> torch.Tensor:
        """Dense displacement ``(1, 3, *size)`` in voxels of the ``size`` grid.

        In diffeomorphic mode the velocity is integrated on a grid of half the resolution
        (at least 8 per axis; the velocity is a B-spline, smooth on that scale) and the
        displacement upsampled trilinearly, which makes scaling and squaring 8x cheaper.
        """
        size = tuple(self.shape if size is None else size)
        if not self.diffeomorphic:
            return self.spline_field(size)
        half = tuple(min(m, max(8, (m + 1) // 2)) for m in size)
        displacement = integrate_velocity(self.spline_field(half), self.integration_steps)
        scale = torch.as_tensor([(m - 1) / max(h - 1, 1) for m, h in zip(size, half)], dtype=displacement.dtype, device=displacement.device)
        return F.interpolate(displacement, size=size, mode="trilinear", align_corners=True) * scale.reshape(1, 3, 1, 1, 1)

    def dense_field(self) -> MetaTensor:
        """Full-resolution displacement ``(3, X, Y, Z)`` in voxels with the fixed image's affine."""
        with torch.no_grad():
            field = self.displacement()[0].float().cpu()
        return MetaTensor(field, affine=torch.as_tensor(self.affine, dtype=torch.float64))

    def save(self, path: str | Path, **extra: float | str) -> Path:
        """Write the control grid (and ``extra`` scalars/strings) to ``.npz`` atomically.

        Raises:
            NonFiniteOutputError: coefficients holding NaN or infinity; nothing is written.
        """
        arrays = {
            "coefficients": self.coefficients.detach().float().cpu().numpy(),
            "control_spacing": np.asarray(self.control_spacing, dtype=np.float64),
            "shape": np.asarray(self.shape, dtype=np.int64),
            "affine": np.asarray(self.affine, dtype=np.float64),
            "diffeomorphic": np.asarray(self.diffeomorphic),
            "integration_steps": np.asarray(self.integration_steps),
            **{key: np.asarray(value) for key, value in extra.items()},
        }
        check_finite_output(arrays["coefficients"], path)  # a diverged fit is refused, never written
        buffer = io.BytesIO()
        np.savez_compressed(buffer, **arrays)
        atomic_write_bytes(Path(path), buffer.getvalue())
        return Path(path)


def load_transform(path: str | Path) -> tuple[BSplineTransform, dict[str, float | str | list]]:
    """Read a control grid written by :meth:`BSplineTransform.save`: the transform and its extra entries (lists for sequences)."""
    path = Path(path)
    keys = {"coefficients", "control_spacing", "shape", "affine", "diffeomorphic", "integration_steps"}
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
    except FileNotFoundError:
        raise BadInputError(path, "file not found") from None
    except Exception as exc:  # zip and npy errors differ; all mean a broken file
        raise BadInputError(path, f"cannot read control grid ({type(exc).__name__})") from None
    if not keys <= set(arrays):
        raise BadInputError(path, f"not a medsynth control grid (missing {', '.join(sorted(keys - set(arrays)))})")
    if not np.isfinite(arrays["coefficients"]).all():
        raise BadInputError(path, "control grid holds NaN or Inf")
    transform = BSplineTransform(
        coefficients=torch.from_numpy(arrays["coefficients"]),
        control_spacing=tuple(float(v) for v in arrays["control_spacing"]),
        shape=tuple(int(v) for v in arrays["shape"]),
        affine=arrays["affine"],
        diffeomorphic=bool(arrays["diffeomorphic"]),
        integration_steps=int(arrays["integration_steps"]),
    )
    extra = {key: value.item() if value.ndim == 0 else value.tolist() for key, value in arrays.items() if key not in keys}
    return transform, extra
