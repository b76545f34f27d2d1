"""Deformation-field arithmetic and io against analytic ground truth."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.losses import BendingEnergyLoss
from monai.networks.layers import GaussianFilter

from medsynth.errors import BadInputError
from medsynth.motion.fields import (
    bending_energy,
    compose,
    end_point_error,
    folding_share,
    integrate_velocity,
    invert,
    jacobian_determinant,
    load_field,
    mm_to_voxel,
    resample_field,
    save_field,
    voxel_to_mm,
    warp_image,
    warp_labels,
)

# Oblique, anisotropic voxel-to-world affine (rotation about two axes times spacing 0.8, 1.3, 2.5 mm).
_R = torch.linalg.matrix_exp(torch.tensor([[0.0, -0.3, 0.2], [0.3, 0.0, -0.1], [-0.2, 0.1, 0.0]], dtype=torch.float64)).numpy()
OBLIQUE = np.eye(4)
OBLIQUE[:3, :3] = _R @ np.diag([0.8, 1.3, 2.5])
OBLIQUE[:3, 3] = [-40.0, 12.5, 7.0]


def smooth_field(shape: tuple[int, ...], amplitude: float, seed: int = 0) -> torch.Tensor:
    """A smooth random field ``(n, *shape)`` in voxels with max |u| = ``amplitude``."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(1, len(shape), *shape, generator=generator, dtype=torch.float64)
    field = GaussianFilter(len(shape), sigma=4.0)(noise)[0]
    return field * amplitude / field.abs().max()


def smooth_image(shape: tuple[int, ...]) -> torch.Tensor:
    grids = torch.meshgrid(*[torch.linspace(0, 2 * np.pi, s, dtype=torch.float64) for s in shape], indexing="ij")
    return (sum(torch.sin(g * (i + 1) / 2) for i, g in enumerate(grids)))[None]


@pytest.mark.parametrize("shape", [(20, 18), (16, 18, 14)])
def test_zero_field_is_identity(shape):
    image = smooth_image(shape)
    labels = (image > 0.3).long() + (image > 1.0).long()
    zero = torch.zeros(len(shape), *shape, dtype=torch.float64)
    assert torch.allclose(warp_image(image, zero), image, atol=1e-9)
    assert torch.equal(warp_labels(labels, zero), labels)
    assert jacobian_determinant(zero).allclose(torch.ones(shape, dtype=torch.float64))
    assert folding_share(zero) == 0.0


def test_constant_shift_samples_the_next_voxel():
    image = torch.arange(5 * 6 * 7, dtype=torch.float64).reshape(1, 5, 6, 7)
    shift = torch.zeros(3, 5, 6, 7, dtype=torch.float64)
    shift[0] = 1.0  # warp samples the moving image at x + u(x)
    assert torch.allclose(warp_image(image, shift)[:, :-1], image[:, 1:])


@pytest.mark.parametrize("shape", [(24, 22), (20, 22, 18)])
def test_composition_with_inverse_is_identity(shape):
    u = smooth_field(shape, amplitude=2.0)
    v = invert(u)
    interior = (slice(None), *[slice(3, -3) for _ in shape])
    assert compose(u, v)[interior].abs().max() < 1e-6  # the fixed point solves this side exactly
    assert compose(v, u)[interior].abs().max() < 0.1  # the other side up to interpolation error
    assert compose(v, u)[interior].abs().mean() < 0.05 * u[interior].abs().mean()


def linear_field(matrix: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """``u(x) = (M - I) x``: warping by it samples the image at ``M x``."""
    index = torch.stack(torch.meshgrid(*[torch.arange(s, dtype=torch.float64) for s in shape], indexing="ij"))
    return torch.einsum("ij,j...->i...", matrix - torch.eye(len(shape), dtype=torch.float64), index)


def test_composition_of_linear_maps_is_their_product():
    shape = (16, 18, 14)
    a = torch.tensor([[1.05, 0.02, 0.0], [0.0, 0.97, 0.03], [0.01, 0.0, 1.02]], dtype=torch.float64)
    b = torch.tensor([[0.98, 0.0, 0.02], [0.03, 1.01, 0.0], [0.0, -0.02, 1.0]], dtype=torch.float64)
    # warp(warp(I, a), b)(x) = I(A B x): the composed field is (A B - I) x, exactly, away from the border.
    composed = compose(linear_field(a, shape), linear_field(b, shape))
    assert torch.allclose(composed[:, 2:12, 2:12, 2:10], linear_field(a @ b, shape)[:, 2:12, 2:12, 2:10], atol=1e-9)
    assert not torch.allclose(linear_field(a, shape) + linear_field(b, shape), linear_field(a @ b, shape), atol=1e-3)


def test_composed_field_equals_warping_twice():
    shape = (24, 20, 22)
    image = smooth_image(shape)
    a, b = smooth_field(shape, 2.0, seed=1), smooth_field(shape, 2.0, seed=2)
    twice = warp_image(warp_image(image, a), b)
    interior = (slice(None), slice(3, -3), slice(3, -3), slice(3, -3))
    error = (warp_image(image, compose(a, b)) - twice)[interior].abs().mean()
    assert error < 0.03 * image.abs().mean()
    assert error < 0.6 * (warp_image(image, a + b) - twice)[interior].abs().mean()  # adding fields is only first-order right


def test_batched_and_unbatched_fields_agree():
    u = smooth_field((12, 14, 10), 1.0)
    assert torch.allclose(jacobian_determinant(u[None])[0], jacobian_determinant(u))
    assert torch.allclose(voxel_to_mm(u[None], OBLIQUE)[0], voxel_to_mm(u, OBLIQUE))
    with pytest.raises(ValueError):
        jacobian_determinant(torch.zeros(4, 5, 6, 7, 8, 9))


def test_scaling_and_squaring_of_a_small_velocity_is_diffeomorphic():
    velocity = smooth_field((20, 22, 18), amplitude=3.0)
    displacement = integrate_velocity(velocity)
    assert jacobian_determinant(displacement).min() > 0
    assert folding_share(displacement) == 0.0
    # exp(v) composed with exp(-v) is the identity.
    back = compose(displacement, integrate_velocity(-velocity))
    assert back[:, 3:-3, 3:-3, 3:-3].abs().max() < 0.1


def test_jacobian_of_an_affine_field():
    matrix = torch.tensor([[1.2, 0.1, 0.0], [0.0, 0.9, 0.2], [0.1, 0.0, 1.1]], dtype=torch.float64)
    u = linear_field(matrix, (8, 9, 10))
    assert torch.allclose(jacobian_determinant(u), torch.linalg.det(matrix).expand(8, 9, 10))
    assert bending_energy(u) < 1e-20  # affine maps do not bend
    mirror = linear_field(torch.diag(torch.tensor([-1.0, 1.0, 1.0], dtype=torch.float64)), (8, 9, 10))
    assert folding_share(mirror) == 1.0  # x -> -x: det = -1 everywhere


def test_bending_energy_matches_monai_and_scales_with_spacing():
    u = smooth_field((14, 16, 12), 2.0)[None]
    assert torch.allclose(bending_energy(u), BendingEnergyLoss()(u))
    # A quadratic u_0 = x_0^2 in mm on an isotropic 2 mm grid has d2u/dx2 = 2 mm^-1 everywhere.
    index = torch.arange(10, dtype=torch.float64) * 2.0
    quadratic = torch.zeros(1, 3, 10, 10, 10, dtype=torch.float64)
    quadratic[0, 0] = (index**2)[:, None, None] / 2.0  # voxels of 2 mm
    assert torch.isclose(bending_energy(quadratic, spacing=(2.0, 2.0, 2.0)), torch.tensor(4.0 / 3, dtype=torch.float64))


def test_voxel_mm_round_trip_with_oblique_anisotropic_affine():
    u = smooth_field((10, 12, 8), 2.0)
    mm = voxel_to_mm(u, OBLIQUE)
    assert torch.allclose(mm_to_voxel(mm, OBLIQUE), u, atol=1e-10)
    unit = torch.zeros(3, 3, 3, 3, dtype=torch.float64)
    unit[1] = 1.0  # one voxel along the second array axis
    assert np.allclose(voxel_to_mm(unit, OBLIQUE)[:, 0, 0, 0].numpy(), OBLIQUE[:3, 1])
    assert end_point_error(u + unit[:, :1, :1, :1].expand_as(u), u, OBLIQUE) == pytest.approx(1.3)


def test_field_file_is_a_mm_vector_image_with_the_image_affine(tmp_path):
    u = smooth_field((10, 12, 8), 2.0).float()
    path = save_field(u, tmp_path / "dvf.nii.gz", OBLIQUE)
    image = nib.load(str(path))
    assert image.shape == (10, 12, 8, 1, 3)
    assert image.header.get_intent()[0] == "vector"
    assert np.allclose(image.affine, OBLIQUE, atol=1e-5)
    data = np.asarray(image.dataobj)[:, :, :, 0, :]
    expected = np.einsum("ij,jxyz->xyzi", OBLIQUE[:3, :3], u.numpy())
    assert np.allclose(data, expected, atol=1e-4)  # stored in mm, world RAS
    loaded = load_field(path)
    assert loaded.shape == (3, 10, 12, 8)
    assert torch.allclose(loaded.as_tensor(), u, atol=1e-4)
    assert np.allclose(np.asarray(loaded.affine), OBLIQUE, atol=1e-5)


def test_bad_field_files_name_the_file(tmp_path):
    two = tmp_path / "two_components.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((6, 6, 6, 1, 2), np.float32), np.eye(4)), str(two))
    with pytest.raises(BadInputError, match="two_components.nii.gz: .*3 components"):
        load_field(two)
    nan = tmp_path / "nan_field.nii.gz"
    data = np.zeros((6, 6, 6, 1, 3), np.float32)
    data[2, 2, 2, 0, 1] = np.nan
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(nan))
    with pytest.raises(BadInputError, match="nan_field.nii.gz: .*NaN"):
        load_field(nan)


def test_one_affine_per_field_converts_each_field_with_its_own_and_end_point_error_agrees():
    from medsynth.data.fields import mm_to_voxel, voxel_to_mm
    from medsynth.motion.fields import end_point_error, epe_map_mm

    field = torch.randn(2, 3, 4, 5, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    affines = np.stack([np.diag([1.0, 2.0, 3.0, 1.0]), np.array([[0.0, 2, 0, 5], [1.5, 0, 0, 0], [0, 0, -1, 3], [0, 0, 0, 1]])])
    both = voxel_to_mm(field, affines)
    for k in range(2):
        assert torch.allclose(both[k], voxel_to_mm(field[k], affines[k]))
    assert torch.allclose(mm_to_voxel(both, affines), field)
    errors = epe_map_mm(field, torch.zeros_like(field), affines)
    assert torch.allclose(errors, torch.linalg.vector_norm(both, dim=1))
    assert abs(end_point_error(field[0], torch.zeros_like(field[0]), affines[0]) - float(errors[0].mean())) < 1e-9
    with pytest.raises(ValueError, match="one per field"):
        voxel_to_mm(field, affines[:1].repeat(3, axis=0))


def test_resampled_field_keeps_the_world_map_on_an_oblique_anisotropic_grid():
    # A world-affine displacement d(p) = M p + c is exactly linear, so trilinear resampling keeps it:
    # on the target grid, voxel q must move to the world point A_t q + M (A_t q) + c.
    rotation = torch.linalg.matrix_exp(torch.tensor([[0.0, -0.3, 0.1], [0.3, 0.0, -0.2], [-0.1, 0.2, 0.0]], dtype=torch.float64))
    source = np.eye(4)
    source[:3, :3] = np.diag([2.0, 1.5, 4.0])
    source[:3, 3] = [-20.0, -15.0, -30.0]
    target = np.eye(4)
    target[:3, :3] = rotation.numpy() @ np.diag([1.2, 1.8, 3.0])
    target[:3, 3] = [-8.0, -6.0, -12.0]
    matrix, offset = np.array([[0.02, 0.01, 0.0], [0.0, -0.03, 0.01], [0.01, 0.0, 0.02]]), np.array([1.0, -2.0, 0.5])

    def world_points(affine, shape):
        index = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=0).reshape(3, -1)
        return affine[:3, :3] @ index + affine[:3, 3:4]

    shape, target_shape = (24, 28, 12), (10, 12, 6)
    displacement_mm = (matrix @ world_points(source, shape) + offset[:, None]).reshape(3, *shape)
    ddf = mm_to_voxel(torch.from_numpy(displacement_mm), source)
    moved = resample_field(ddf, source, target_shape, target)
    expected_mm = matrix @ world_points(target, target_shape) + offset[:, None]
    got_mm = voxel_to_mm(moved, target).reshape(3, -1).numpy()
    assert moved.shape == (3, *target_shape)
    np.testing.assert_allclose(got_mm, expected_mm, atol=1e-6)
    torch.testing.assert_close(resample_field(ddf, source, shape, source), ddf)
