"""Plane and slice-stack operators: adjoint (dot-product) tests, exact values on volumes that are
linear in world coordinates, a plane on a volume slice returns that slice, and a thick slice is the
profile-weighted average of the fine slices it covers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medsynth.inverse.operators import PlaneOperator, SliceStackOperator, slice_profile
from medsynth.inverse.planes import Plane, fine_stack_affine, fine_stack_shape, pixel_points, planes_of_stack
from oblique_geometry import oblique_affine, rotation, world

VOLUME_SHAPE = (9, 10, 8)
VOLUME_AFFINE = oblique_affine((1.3, 1.1, 2.5))


def _randn(*shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _oblique_plane(thickness=4.0):
    """A 14 x 12 plane with 1.2 x 0.9 mm pixels through the volume's centre, tilted against every axis."""
    centre = world(VOLUME_AFFINE, (np.asarray(VOLUME_SHAPE) - 1) / 2)
    turn = rotation((0.4, 1.0, -0.7), 58.0)
    u, v = turn[:, 0], turn[:, 1]
    origin = centre - 6.5 * 1.2 * u - 5.5 * 0.9 * v
    return Plane(tuple(origin), tuple(u), tuple(v), (1.2, 0.9), (14, 12), thickness)


def _linear_volume(coef=(0.7, -1.3, 0.4), offset=2.0):
    """f(p) = coef . p + offset at every voxel centre, (1, 1, X, Y, Z), and f itself."""
    index = np.stack(np.meshgrid(*[np.arange(n) for n in VOLUME_SHAPE], indexing="ij"), -1)
    f = lambda p: np.asarray(p) @ np.asarray(coef) + offset  # noqa: E731
    return torch.from_numpy(f(world(VOLUME_AFFINE, index)))[None, None], f


def _dot_test(op, in_shape, out_shape):
    x, y = _randn(2, 3, *in_shape, seed=1), _randn(2, 3, *out_shape, seed=2)
    lhs, rhs = (op(x) * y).sum().item(), (x * op.adjoint(y)).sum().item()
    assert abs(lhs - rhs) <= 1e-5 * abs(lhs)


@pytest.mark.parametrize("profile", ["box", "gaussian"])
def test_plane_operator_adjoint(profile):
    op = PlaneOperator(VOLUME_AFFINE, VOLUME_SHAPE, _oblique_plane(), profile_samples=5, profile=profile)
    mask = op.mask()
    assert mask.shape == (14, 12) and 0 < mask.sum() < mask.numel()  # the plane leaves the volume
    _dot_test(op, VOLUME_SHAPE, (14, 12))


@pytest.mark.parametrize("profile", ["box", "gaussian"])
def test_slice_stack_operator_adjoint(profile):
    stack_affine, stack_shape = oblique_affine((1.5, 1.25, 6.0)), (6, 5, 4)
    fine, fine_shape = fine_stack_affine(stack_affine, 4), fine_stack_shape(stack_affine, stack_shape, 4)
    op = SliceStackOperator(fine, fine_shape, stack_affine, stack_shape, profile)
    assert bool(op.mask().all())
    _dot_test(op, fine_shape, stack_shape)


def test_adjoint_is_differentiable_in_the_image():
    """d<A^T y, x>/dy = A x."""
    op = PlaneOperator(VOLUME_AFFINE, VOLUME_SHAPE, _oblique_plane(), profile_samples=3)
    x, y = _randn(1, 1, *VOLUME_SHAPE, seed=3), _randn(1, 1, 14, 12, seed=4).requires_grad_()
    (op.adjoint(y) * x).sum().backward()
    torch.testing.assert_close(y.grad, op(x))


@pytest.mark.parametrize(("profile", "samples"), [("box", 1), ("box", 5), ("gaussian", 7)])
def test_linear_volume_on_an_oblique_plane_equals_the_analytic_values(profile, samples):
    """Trilinear interpolation is exact on a linear function, and a symmetric profile averages it to its centre."""
    volume, f = _linear_volume()
    plane = _oblique_plane()
    op = PlaneOperator(VOLUME_AFFINE, VOLUME_SHAPE, plane, profile_samples=samples, profile=profile)
    full = op.coverage() == 1
    assert full.sum() >= 20 and bool((full <= op.mask()).all())
    image = op(volume)[0, 0]
    expected = torch.from_numpy(f(pixel_points(plane)))
    torch.testing.assert_close(image[full], expected[full], rtol=0, atol=1e-9)
    assert bool((image[op.coverage() == 0] == 0).all())  # zero outside


def test_plane_on_a_volume_slice_returns_that_slice():
    volume = _randn(2, 2, *VOLUME_SHAPE, seed=5)
    planes = planes_of_stack(VOLUME_AFFINE, VOLUME_SHAPE)  # slice axis 2 (largest spacing)
    for k in (0, 3, VOLUME_SHAPE[2] - 1):
        op = PlaneOperator(VOLUME_AFFINE, VOLUME_SHAPE, planes[k], profile_samples=1)
        assert bool(op.mask().all())
        torch.testing.assert_close(op(volume), volume[..., k], rtol=0, atol=1e-12)
    # a plane across the first array axis: the image's pixel (j, k) is voxel (i, j, k)
    one = VOLUME_AFFINE.copy()
    one[:3, 3] = world(VOLUME_AFFINE, (4, 0, 0))
    op = PlaneOperator(VOLUME_AFFINE, VOLUME_SHAPE, Plane.from_affine(one, (1, 10, 8)), profile_samples=1)
    torch.testing.assert_close(op(volume), volume[:, :, 4], rtol=0, atol=1e-12)


def test_a_thick_slice_is_the_trapezoid_average_of_its_fine_slices():
    """Factor 4, box profile of one slice spacing: weights (1/2, 1, 1, 1, 1/2) / 4 on fine slices 4k-2 .. 4k+2;
    the first and last slices average the half that exists, (1, 1, 1/2) / 2.5."""
    stack_affine, stack_shape = oblique_affine((1.5, 1.25, 6.0), axis=(2.0, 0.3, -1.0), angle=71.0), (6, 5, 4, 2)
    fine, fine_shape = fine_stack_affine(stack_affine, 4), fine_stack_shape(stack_affine, stack_shape[:3], 4)
    volume = _randn(1, 2, *fine_shape, seed=6)
    stack = SliceStackOperator(fine, fine_shape, stack_affine, stack_shape)(volume)
    assert stack.shape == (1, 2, 6, 5, 4)
    interior = torch.tensor([0.5, 1, 1, 1, 0.5], dtype=torch.float64) / 4
    for k in (1, 2):
        torch.testing.assert_close(stack[..., k], (volume[..., 4 * k - 2:4 * k + 3] * interior).sum(-1), rtol=0, atol=1e-10)
    edge = torch.tensor([1, 1, 0.5], dtype=torch.float64) / 2.5
    torch.testing.assert_close(stack[..., 0], (volume[..., 0:3] * edge).sum(-1), rtol=0, atol=1e-10)
    torch.testing.assert_close(stack[..., 3], (volume[..., 10:13] * edge.flip(0)).sum(-1), rtol=0, atol=1e-10)


def test_gaussian_stack_profile_keeps_a_linear_volume():
    stack_affine, stack_shape = VOLUME_AFFINE.copy(), (9, 10, 3)
    stack_affine[:3, 2] *= 2  # slices 5 mm apart: the volume is this stack refined by 2
    volume, f = _linear_volume()
    op = SliceStackOperator(VOLUME_AFFINE, VOLUME_SHAPE, stack_affine, stack_shape, "gaussian", thickness=3.0)
    full = op.coverage() == 1
    index = np.stack(np.meshgrid(*[np.arange(n) for n in stack_shape], indexing="ij"), -1)
    expected = torch.from_numpy(f(world(stack_affine, index)))
    assert full.sum() > 0
    torch.testing.assert_close(op(volume)[0, 0][full], expected[full], rtol=0, atol=1e-9)


def test_profiles_and_bad_arguments():
    offsets, weights = slice_profile(6.0, 5, "box")
    np.testing.assert_allclose(offsets, [-3, -1.5, 0, 1.5, 3])
    np.testing.assert_allclose(weights, [0.125, 0.25, 0.25, 0.25, 0.125])
    offsets, weights = slice_profile(6.0, 3, "gaussian")
    assert weights.sum() == pytest.approx(1) and weights[0] == pytest.approx(weights[1] / 16)  # FWHM 6 mm: 1/2 at +-3 mm, 1/16 at +-6 mm
    with pytest.raises(ValueError, match="profile"):
        slice_profile(2.0, 3, "sinc")
    with pytest.raises(ValueError, match="volume shape"):
        PlaneOperator(VOLUME_AFFINE, (9, 10, 1), _oblique_plane())
    op = PlaneOperator(VOLUME_AFFINE, VOLUME_SHAPE, _oblique_plane())
    with pytest.raises(ValueError, match="expected a volume"):
        op(torch.zeros(1, 1, 9, 10, 7))
    with pytest.raises(ValueError, match="expected an image"):
        op.adjoint(torch.zeros(1, 1, 14, 11))


def test_bf16_volumes_are_sampled_with_float32_coordinates():
    op = PlaneOperator(VOLUME_AFFINE, VOLUME_SHAPE, _oblique_plane(), profile_samples=3)
    volume = _randn(1, 1, *VOLUME_SHAPE, seed=7).bfloat16()
    image = op(volume)
    assert image.dtype == torch.bfloat16
    torch.testing.assert_close(image, op(volume.float()).bfloat16(), rtol=0, atol=0)
