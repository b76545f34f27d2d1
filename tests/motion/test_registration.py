"""B-spline FFD registration: accuracy on phantoms with known motion, batches, files, bad input."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.losses import LocalNormalizedCrossCorrelationLoss
from pydantic import ValidationError

from medsynth.data.io import save_image
from medsynth.data.phantoms.cardiac import render_cardiac, sample_cardiac_params
from medsynth.errors import BadInputError
from medsynth.motion.fields import end_point_error, load_field, voxel_to_mm, warp_image
from medsynth.motion.registration import (
    WINDOW,
    BSplineTransform,
    RegistrationConfig,
    _block_similarity,
    _lncc,
    _optimise,
    _sample_blocks,
    field_from_grid,
    load_transform,
    register,
    register_batch,
    register_pair,
)

FAST = RegistrationConfig(levels=2, iterations=(60, 30))
TINY = RegistrationConfig(levels=1, iterations=3)


@pytest.fixture(scope="module")
def cardiac_pair():
    """End-diastole (moving) and end-systole (fixed) of a phantom, and the exact field between them."""
    params = sample_cardiac_params(11)
    sequence = render_cardiac(params, frames=8, modality="ct", size=(32, 32, 24))
    es = params.end_systole(8)
    affine = torch.as_tensor(sequence.affine)
    fixed = MetaTensor(torch.from_numpy(sequence.images[es])[None], affine=affine)
    moving = MetaTensor(torch.from_numpy(sequence.images[0])[None], affine=affine)
    return fixed, moving, torch.from_numpy(sequence.fields[es]), torch.from_numpy(sequence.labels[es] > 0)


@pytest.fixture
def pair_files(tmp_path, cardiac_pair):
    fixed, moving, _, _ = cardiac_pair
    return save_image(fixed, tmp_path / "fixed.nii.gz"), save_image(moving, tmp_path / "moving.nii.gz")


def test_bspline_reproduces_constants_and_scales_to_coarse_grids():
    shape, spacing = (20, 17, 13), (4.0, 5.5, 3.0)
    coefficients = torch.ones(3, *BSplineTransform.grid_shape(shape, spacing)) * torch.tensor([1.5, -0.5, 2.0])[:, None, None, None]
    transform = BSplineTransform(coefficients, spacing, shape, np.eye(4))
    field = transform.spline_field()
    assert torch.allclose(field[0], coefficients[:, :1, :1, :1].expand(3, *shape), atol=1e-5)  # partition of unity
    coarse = transform.spline_field((10, 9, 7))  # in voxels of the coarse grid
    expected = torch.tensor([1.5 * 9 / 19, -0.5 * 8 / 16, 2.0 * 6 / 12])
    assert torch.allclose(coarse[0, :, 4, 4, 3], expected, atol=1e-5)


def test_registration_recovers_the_phantom_motion(cardiac_pair):
    fixed, moving, truth, body = cardiac_pair
    transform, quality = register(fixed, moving, FAST)
    field = transform.dense_field()
    zero = end_point_error(torch.zeros_like(truth), truth, fixed.affine, body)
    assert end_point_error(field, truth, fixed.affine, body) < 0.6 * zero
    assert quality["after"] < quality["before"]
    assert quality["folding"] == 0.0
    assert np.allclose(field.affine, fixed.affine)
    warped = warp_image(moving.as_tensor(), field.as_tensor())
    assert (warped - fixed).abs().mean() < 0.6 * (moving - fixed).abs().mean()


def test_diffeomorphic_mode_does_not_fold(cardiac_pair):
    fixed, moving, truth, body = cardiac_pair
    transform, quality = register(fixed, moving, FAST.model_copy(update={"diffeomorphic": True}))
    assert transform.diffeomorphic and quality["folding"] == 0.0
    assert end_point_error(transform.dense_field(), truth, fixed.affine, body) < 0.6 * end_point_error(torch.zeros_like(truth), truth, fixed.affine, body)


def test_pair_mode_field_file_is_a_mm_vector_image_with_the_fixed_affine(tmp_path, pair_files):
    fixed_path, moving_path = pair_files
    result = register_pair(fixed_path, moving_path, tmp_path / "grid.npz", TINY)
    assert result.output.exists() and result.notes == []
    assert "lncc" in result.line() and "folding" in result.line()
    transform, extra = load_transform(result.output)
    assert extra["fixed"] == str(fixed_path) and extra["after"] == pytest.approx(result.after)
    dense = field_from_grid(result.output, tmp_path / "dvf.nii.gz")
    image = nib.load(str(dense))
    assert image.shape == (32, 32, 24, 1, 3) and image.header.get_intent()[0] == "vector"
    assert np.allclose(image.affine, nib.load(str(fixed_path)).affine, atol=1e-5)
    in_mm = voxel_to_mm(transform.dense_field().as_tensor(), image.affine).numpy()
    assert np.allclose(np.moveaxis(np.asarray(image.dataobj)[:, :, :, 0, :], -1, 0), in_mm, atol=1e-4)
    assert torch.allclose(load_field(dense).as_tensor(), transform.dense_field().as_tensor(), atol=1e-4)


def test_pair_mode_resamples_other_grids_and_says_so(tmp_path, pair_files, cardiac_pair):
    fixed_path, _ = pair_files
    _, moving, _, _ = cardiac_pair
    shifted = np.array(moving.affine)
    shifted[:3, 3] += [6.0, -4.0, 3.0]  # same scanner, moved table
    moving_path = save_image(moving.numpy()[:, ::2, ::2, :], tmp_path / "moving_coarse.nii.gz", affine=shifted @ np.diag([2.0, 2.0, 1.0, 1.0]))
    result = register_pair(fixed_path, moving_path, tmp_path / "dvf.nii.gz", TINY)
    assert any("resampled onto the fixed grid" in note for note in result.notes)
    assert load_field(result.output).shape == (3, 32, 32, 24)


def test_pair_mode_refuses_bad_input(tmp_path, pair_files, cardiac_pair):
    fixed_path, moving_path = pair_files
    _, moving, _, _ = cardiac_pair
    far = np.array(moving.affine)
    far[:3, 3] += 5000.0
    elsewhere = save_image(moving, tmp_path / "elsewhere.nii.gz", affine=far)
    with pytest.raises(BadInputError, match="elsewhere.nii.gz: does not overlap"):
        register_pair(fixed_path, elsewhere, tmp_path / "dvf.nii.gz", TINY)
    sequence = save_image(np.stack([moving.numpy()[0]] * 2), tmp_path / "sequence.nii.gz", affine=moving.affine)
    with pytest.raises(BadInputError, match="sequence.nii.gz: .*2 channels or phases"):
        register_pair(fixed_path, sequence, tmp_path / "dvf.nii.gz", TINY)
    nan = moving.numpy().copy()
    nan[0, 3, 3, 3] = np.nan
    with pytest.raises(BadInputError, match="nan.nii.gz: .*NaN"):
        # written with nibabel: medsynth's own writer refuses NaN
        nib.save(nib.Nifti1Image(nan[0], np.asarray(moving.affine)), str(tmp_path / "nan.nii.gz"))
        register_pair(fixed_path, tmp_path / "nan.nii.gz", tmp_path / "dvf.nii.gz", TINY)
    with pytest.raises(BadInputError, match="dvf.mha"):
        register_pair(fixed_path, moving_path, tmp_path / "dvf.mha", TINY)
    assert not (tmp_path / "dvf.nii.gz").exists()


def test_config_is_strict():
    with pytest.raises(ValidationError):
        RegistrationConfig(control_spacing=10.0)
    with pytest.raises(ValueError, match="one per level"):
        RegistrationConfig(levels=3, iterations=(10, 10))


@pytest.mark.parametrize("similarity", ["lncc", "ncc"])
def test_a_batch_gives_each_pair_its_own_registration(cardiac_pair, similarity):
    fixed, moving, _, _ = cardiac_pair
    shifted = MetaTensor(torch.roll(moving.as_tensor(), 2, dims=1), affine=moving.affine)  # another motion, same grid
    config = FAST.model_copy(update={"similarity": similarity, "iterations": (20, 10)})
    joint = register_batch([fixed, fixed], [moving, shifted], config)
    for (transform, quality), pair in zip(joint, [(fixed, moving), (fixed, shifted)]):
        alone, alone_quality = register(*pair, config)
        assert transform.coefficients.shape == alone.coefficients.shape
        assert torch.allclose(transform.coefficients, alone.coefficients, atol=1e-4)
        assert quality["after"] == pytest.approx(alone_quality["after"], abs=1e-5)
    assert not torch.allclose(joint[0][0].coefficients, joint[1][0].coefficients, atol=1e-2)  # the pairs did differ


# --- speed at real size (issue 21): random blocks, separable evaluation, convergence stop, progress ---

# The fine level (32x32x24 > 4 x 6000 voxels) on 12 random 8^3 blocks per iteration, 150 iterations; the coarse one on every voxel.
SAMPLED = RegistrationConfig(levels=2, iterations=(60, 30), samples=6000)


def _cubic_bspline(u: torch.Tensor) -> torch.Tensor:
    """The centred uniform cubic B-spline B(u) (support |u| < 2), written out piece by piece."""
    a = u.abs()
    return torch.where(a < 1, (4 - 6 * a**2 + 3 * a**3) / 6, torch.where(a < 2, (2 - a) ** 3 / 6, torch.zeros_like(a)))


def test_separable_bspline_equals_the_dense_sum_and_blocks_equal_its_crops():
    shape, spacing = (14, 11, 9), (4.0, 3.5, 5.0)
    coefficients = torch.randn(3, *BSplineTransform.grid_shape(shape, spacing), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    transform = BSplineTransform(coefficients, spacing, shape, np.eye(4))
    # Dense: every voxel sums every control point k (at (k - 1) * spacing) weighted by B(x / spacing - k + 1) per axis.
    weights = [_cubic_bspline(torch.arange(n, dtype=torch.float64)[:, None] / s - torch.arange(m, dtype=torch.float64)[None] + 1) for n, s, m in zip(shape, spacing, coefficients.shape[1:])]
    dense = torch.einsum("cijk,xi,yj,zk->cxyz", coefficients, *weights)
    separable = transform.spline_field()[0]
    assert torch.allclose(separable, dense, atol=1e-5)
    corners = torch.tensor([[0, 0, 0], [6, 3, 1], [2, 5, 4]])
    blocks = transform.spline_blocks(shape, corners, 5)
    assert blocks.shape == (1, 3, 3, 5, 5, 5)
    for k, (x, y, z) in enumerate(corners.tolist()):
        assert torch.allclose(blocks[0, k], dense[:, x : x + 5, y : y + 5, z : z + 5], atol=1e-5)
    coarse, size = transform.spline_field((8, 6, 5)), (8, 6, 5)  # a pyramid level: every block of edge 3 on it
    corners = torch.stack(torch.meshgrid(*[torch.arange(n - 2) for n in size], indexing="ij"), -1).reshape(-1, 3)
    blocks = transform.spline_blocks(size, corners, 3)
    for k, (x, y, z) in enumerate(corners.tolist()):
        assert torch.allclose(blocks[0, k], coarse[0, :, x : x + 3, y : y + 3, z : z + 3], atol=1e-5)


def test_blocks_warp_and_lncc_equal_the_whole_image_values_and_lncc_equals_monais():
    generator = torch.Generator().manual_seed(1)
    image, fixed = torch.rand(2, 1, 20, 18, 16, generator=generator), torch.rand(2, 1, 20, 18, 16, generator=generator)
    ddf = 2 * torch.randn(2, 3, 20, 18, 16, generator=generator)
    corners, edge = torch.tensor([[0, 0, 0], [10, 8, 6], [4, 3, 2]]), 10
    crops = torch.stack([ddf[:, :, x : x + edge, y : y + edge, z : z + edge] for x, y, z in corners.tolist()], 1)  # (B, K, 3, E, E, E)
    warped = _sample_blocks(image, corners, edge, crops)
    whole = warp_image(image, ddf)
    lncc = LocalNormalizedCrossCorrelationLoss(3, kernel_size=5, reduction="none")(whole, fixed)  # the window inside a block: 2 voxels in
    for k, (x, y, z) in enumerate(corners.tolist()):
        assert torch.allclose(warped[:, :, k], whole[:, :, x : x + edge, y : y + edge, z : z + edge], atol=1e-5)
    expected = torch.stack([lncc[:, :, x + 2 : x + edge - 2, y + 2 : y + edge - 2, z + 2 : z + edge - 2] for x, y, z in corners.tolist()]).mean()
    config = RegistrationConfig()
    assert float(_block_similarity(None, config, warped, _sample_blocks(fixed, corners, edge))) == pytest.approx(float(expected), abs=1e-6)
    assert float(-_lncc(whole, fixed, 5).mean()) == pytest.approx(float(lncc.mean()), abs=1e-6)  # the whole image: MONAI's loss


def test_sampled_registration_is_the_same_bit_for_bit_for_one_seed_and_recovers_the_motion(cardiac_pair):
    fixed, moving, truth, body = cardiac_pair
    first, quality = register(fixed, moving, SAMPLED)
    again, _ = register(fixed, moving, SAMPLED)
    other, _ = register(fixed, moving, SAMPLED.model_copy(update={"seed": 1}))
    assert torch.equal(first.coefficients, again.coefficients)
    assert not torch.equal(first.coefficients, other.coefficients)  # the blocks do come from the seed
    zero = end_point_error(torch.zeros_like(truth), truth, fixed.affine, body)
    assert end_point_error(first.dense_field(), truth, fixed.affine, body) < 0.6 * zero  # the dense test's tolerance
    assert quality["after"] < quality["before"] and quality["folding"] == 0.0


def test_convergence_stop_stops_a_level_whose_loss_no_longer_falls():
    parameters = torch.zeros(3, requires_grad=True)

    def flat() -> torch.Tensor:  # a loss that cannot fall: stopped at the first check, after two windows
        return (parameters * 0).sum() + 1.0

    assert _optimise(parameters, flat, 100, RegistrationConfig(tolerance=1e-4)) == 2 * WINDOW
    assert _optimise(parameters, flat, 100, RegistrationConfig(tolerance=0)) == 100  # the default: off
    assert _optimise(parameters, flat, 100, RegistrationConfig(tolerance=1e-4), anneal=True) == 100  # sampled levels anneal instead
    target = torch.tensor([30.0, -20.0, 10.0])
    steps = _optimise(parameters, lambda: ((parameters - target) ** 2).sum(), 1000, RegistrationConfig(learning_rate=1.0, tolerance=1e-4))
    assert steps < 1000 and torch.allclose(parameters, target, atol=1.0)  # converged, then stopped


def test_progress_bar_per_level_and_seconds_per_level_in_the_line(tmp_path, pair_files, capsys):
    fixed_path, moving_path = pair_files
    result = register_pair(fixed_path, moving_path, tmp_path / "grid.npz", TINY.model_copy(update={"levels": 2, "iterations": 2}), progress=True)
    assert "level 2/2 32x32x24" in capsys.readouterr().err
    assert len(result.level_seconds) == 2 and f"(levels {result.level_seconds[0]:.1f} + " in result.line()
    _, extra = load_transform(result.output)
    assert extra["level_seconds"] == pytest.approx(result.level_seconds)
