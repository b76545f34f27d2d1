"""Planes and stacks read from oblique, anisotropic NIfTI affines: every pixel where the affine puts it."""

from __future__ import annotations

import numpy as np
import pytest

from medsynth.errors import MedsynthError
from medsynth.inverse.planes import (
    Plane,
    fine_stack_affine,
    fine_stack_shape,
    pixel_points,
    planes_of_stack,
    stack_slice_axis,
)
from oblique_geometry import oblique_affine, world


def test_single_plane_round_trips_through_its_affine():
    affine = oblique_affine((1.8, 1.3, 6.0))
    plane = Plane.from_affine(affine, (20, 14, 1, 25))  # a 4D LAX cine: (X, Y, 1, T)
    assert plane.size == (20, 14) and plane.pixel_size == pytest.approx((1.8, 1.3)) and plane.thickness == pytest.approx(6.0)
    np.testing.assert_allclose(plane.affine, affine, atol=1e-12)
    assert _same(Plane.from_affine(plane.affine, (20, 14, 1)), plane)
    i, j = np.meshgrid(np.arange(20), np.arange(14), indexing="ij")
    np.testing.assert_allclose(pixel_points(plane), world(affine, np.stack([i, j, 0 * i], -1)), atol=1e-9)
    np.testing.assert_allclose(plane.normal, affine[:3, 2] / 6.0, atol=1e-12)


def _same(a: Plane, b: Plane) -> bool:
    return (np.allclose(a.origin, b.origin, atol=1e-9) and np.allclose(a.u, b.u, atol=1e-12) and np.allclose(a.v, b.v, atol=1e-12)
            and np.allclose(a.pixel_size, b.pixel_size) and a.size == b.size and np.isclose(a.thickness, b.thickness))


def test_slice_axis_in_the_middle_and_a_given_thickness():
    affine = oblique_affine((1.4, 7.0, 0.9), axis=(0.3, 0.2, 1.0), angle=-65.0)
    plane = Plane.from_affine(affine, (9, 1, 11), thickness=5.0)
    assert plane.size == (9, 11) and plane.thickness == 5.0
    i, k = np.meshgrid(np.arange(9), np.arange(11), indexing="ij")
    np.testing.assert_allclose(pixel_points(plane), world(affine, np.stack([i, 0 * i, k], -1)), atol=1e-9)
    back = Plane.from_affine(plane.affine, (9, 11, 1))
    assert _same(back, plane)
    np.testing.assert_allclose(pixel_points(back), pixel_points(plane), atol=1e-9)


def test_an_image_without_a_single_slice_is_refused():
    with pytest.raises(MedsynthError, match="size 1"):
        Plane.from_affine(np.eye(4), (4, 5, 6))


def test_stack_planes_put_every_pixel_on_its_voxel():
    affine = oblique_affine((1.5, 9.0, 1.25))  # slice axis = the largest spacing, here the second
    shape = (7, 5, 6, 3)
    assert stack_slice_axis(affine) == 1
    planes = planes_of_stack(affine, shape)
    assert len(planes) == 5 and all(p.thickness == pytest.approx(9.0) and p.size == (7, 6) for p in planes)
    for k, plane in enumerate(planes):
        i, j = np.meshgrid(np.arange(7), np.arange(6), indexing="ij")
        np.testing.assert_allclose(pixel_points(plane), world(affine, np.stack([i, 0 * i + k, j], -1)), atol=1e-9)
    assert stack_slice_axis(oblique_affine((2.0, 2.0, 2.0))) == 2  # ties: the third axis


@pytest.mark.parametrize("factor", [2, 3, 8])
def test_every_observed_slice_sits_on_its_fine_slice(factor):
    """Oblique stack, anisotropic pixels: slice k of the stack is fine slice k * factor to 1e-6 mm."""
    affine = oblique_affine((1.7, 1.2, 8.5))
    shape = (6, 5, 4)
    fine = fine_stack_affine(affine, factor)
    fine_shape = fine_stack_shape(affine, shape, factor)
    assert fine_shape == (6, 5, 3 * factor + 1)
    np.testing.assert_allclose(fine[:3, :2], affine[:3, :2], atol=1e-12)  # in-plane axes unchanged
    assert np.linalg.norm(fine[:3, 2]) == pytest.approx(8.5 / factor)
    i, j, k = np.meshgrid(np.arange(6), np.arange(5), np.arange(4), indexing="ij")
    observed = world(affine, np.stack([i, j, k], -1))
    on_fine = world(fine, np.stack([i, j, k * factor], -1))
    assert np.abs(observed - on_fine).max() < 1e-6
    assert np.abs(world(fine, [0, 0, fine_shape[2] - 1]) - world(affine, [0, 0, 3])).max() < 1e-6  # last slice too


def test_bad_factor():
    with pytest.raises(ValueError, match="factor"):
        fine_stack_affine(np.eye(4), 0)
    with pytest.raises(ValueError, match="factor"):
        fine_stack_affine(np.eye(4), 2.5)
