"""motion/augment: a shifted and zoomed pair keeps its field true (analytic images and fields)."""

from __future__ import annotations

import torch

from medsynth.motion.augment import shift_zoom_matrix, shift_zoom_pair
from medsynth.motion.fields import voxel_to_mm, warp_image

SHAPE = (24, 20, 16)


def grid() -> torch.Tensor:
    return torch.stack(torch.meshgrid(*[torch.arange(s, dtype=torch.float64) for s in SHAPE], indexing="ij"))


def test_identity_changes_nothing():
    image, flow = torch.rand(1, *SHAPE, dtype=torch.float64), torch.randn(3, *SHAPE, dtype=torch.float64)
    (out,), out_flow, affine = shift_zoom_pair([image], flow, torch.eye(4, dtype=torch.float64), (0, 0, 0), (1, 1, 1))
    assert torch.allclose(out, image, atol=1e-9) and torch.allclose(out_flow, flow, atol=1e-9)
    assert torch.equal(affine, torch.eye(4, dtype=torch.float64))


def test_a_linear_field_is_resampled_and_scaled_per_axis():
    x = grid()
    centre = torch.tensor([(s - 1) / 2 for s in SHAPE], dtype=torch.float64).view(3, 1, 1, 1)
    m = torch.tensor([[0.05, 0.02, 0.0], [-0.01, 0.03, 0.02], [0.0, 0.01, -0.04]], dtype=torch.float64)
    flow = torch.einsum("ij,j...->i...", m, x - centre) + torch.tensor([0.5, -0.3, 0.2], dtype=torch.float64).view(3, 1, 1, 1)
    shift, zoom = (1.5, -2.0, 0.5), (1.2, 0.9, 1.1)
    _, out, _ = shift_zoom_pair([], flow, torch.eye(4, dtype=torch.float64), shift, zoom)
    a = shift_zoom_matrix(SHAPE, shift, zoom)
    mapped = torch.einsum("ij,j...->i...", a[:3, :3], x) + a[:3, 3].view(3, 1, 1, 1)  # A(y)
    expected = torch.tensor(zoom, dtype=torch.float64).view(3, 1, 1, 1) * (
        torch.einsum("ij,j...->i...", m, mapped - centre) + torch.tensor([0.5, -0.3, 0.2], dtype=torch.float64).view(3, 1, 1, 1))
    inside = (mapped >= 0).all(0) & (mapped <= torch.tensor(SHAPE, dtype=torch.float64).view(3, 1, 1, 1) - 1).all(0)
    assert inside.float().mean() > 0.5
    assert torch.allclose(out[:, inside], expected[:, inside], atol=1e-9)


def test_warping_stays_consistent_and_mm_vectors_are_physical():
    x = grid()
    image = lambda p: torch.sin(p[0] / 5.0) * torch.cos(p[1] / 6.0) + 0.5 * torch.sin(p[2] / 4.0)  # noqa: E731
    flow = torch.stack([2.5 * torch.sin(x[1] / 6.0), 2.0 * torch.cos(x[2] / 5.0), 1.5 * torch.sin(x[0] / 7.0)])
    moving = image(x)[None]
    fixed = image(x + flow)[None]  # fixed(x) = moving(x + u(x)) exactly
    affine = torch.tensor([[0.8, 0.1, 0, -10], [0, 1.2, 0.2, 5], [0.05, 0, 2.0, 3], [0, 0, 0, 1]], dtype=torch.float64)
    (fixed2, moving2), flow2, affine2 = shift_zoom_pair([fixed, moving], flow, affine, (1.0, -1.5, 0.5), (1.15, 0.9, 1.1))
    warped = warp_image(moving2[None], flow2[None])[0]
    interior = (slice(None), slice(4, -4), slice(4, -4), slice(3, -3))
    error = (warped - fixed2)[interior].abs().mean()
    unscaled = flow2 / torch.tensor([1.15, 0.9, 1.1], dtype=torch.float64).view(3, 1, 1, 1)  # resampled, vectors not scaled
    assert error < 0.01  # trilinear interpolation error only
    assert (warp_image(moving2[None], unscaled[None])[0] - fixed2)[interior].abs().mean() > 2 * error
    # the physical (mm) displacement at a point is unchanged: affine' u'(y) == affine u(A(y))
    a = shift_zoom_matrix(SHAPE, (1.0, -1.5, 0.5), (1.15, 0.9, 1.1))
    y = torch.tensor([10, 9, 8], dtype=torch.float64)
    source = (a[:3, :3] @ y + a[:3, 3])
    assert torch.allclose(affine2[:3, :3] @ flow2[:, 10, 9, 8], affine[:3, :3] @ torch.stack(
        [2.5 * torch.sin(source[1] / 6.0), 2.0 * torch.cos(source[2] / 5.0), 1.5 * torch.sin(source[0] / 7.0)]), atol=0.05)
    assert torch.allclose(affine2 @ torch.cat([y, torch.ones(1, dtype=torch.float64)]),
                          affine @ torch.cat([source, torch.ones(1, dtype=torch.float64)]))
    assert voxel_to_mm(flow2, affine2).shape == flow2.shape
