"""Image io: every format keeps its geometry; every bad file is refused by name."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from medsynth.data.io import LPS_TO_RAS, load_image, lps_to_ras, save_image, spacing_of
from medsynth.errors import BadInputError

# An oblique (rotated about z) affine with anisotropic spacing.
OBLIQUE = np.array([
    [0.8 * np.cos(0.3), -1.1 * np.sin(0.3), 0.0, -40.5],
    [0.8 * np.sin(0.3), 1.1 * np.cos(0.3), 0.0, 12.25],
    [0.0, 0.0, 2.5, 7.0],
    [0.0, 0.0, 0.0, 1.0],
])


def _corners(shape: tuple[int, ...]) -> np.ndarray:
    """Homogeneous voxel coordinates of the outer corners of a 3D grid, ``(4, 8)``."""
    extent = [(-0.5, n - 0.5) for n in shape]
    grid = np.array(np.meshgrid(*extent, indexing="ij")).reshape(3, -1)
    return np.vstack([grid, np.ones(grid.shape[1])])


def test_nifti_round_trip_keeps_voxels_and_affine(tmp_path: Path) -> None:
    array = np.random.default_rng(0).normal(size=(1, 6, 5, 4)).astype(np.float32)
    path = save_image(array, tmp_path / "a.nii.gz", affine=OBLIQUE)
    image = load_image(path)
    assert image.shape == (1, 6, 5, 4)
    np.testing.assert_allclose(image.affine.numpy(), OBLIQUE, atol=1e-5)
    np.testing.assert_array_equal(image.numpy(), array)
    np.testing.assert_allclose(spacing_of(image.affine)[:3], [0.8, 1.1, 2.5], atol=1e-6)


@pytest.mark.parametrize("shape", [(3, 4, 5, 6), (2, 4, 5), (1, 4, 5, 6), (1, 4, 5), (2, 4, 5, 6)],
                         ids=["3d-vector", "2d-multichannel", "3d-single", "2d-single", "3d-two-channel"])
@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
def test_nifti_round_trip_keeps_channels_first(tmp_path: Path, shape: tuple[int, ...], suffix: str) -> None:
    array = np.random.default_rng(1).normal(size=shape).astype(np.float32)
    path = save_image(array, tmp_path / f"image{suffix}", affine=OBLIQUE)
    image = load_image(path)
    assert image.shape == shape
    np.testing.assert_array_equal(image.numpy(), array)
    np.testing.assert_allclose(image.affine.numpy(), OBLIQUE, atol=1e-5)


def test_2d_vector_nifti_is_what_itk_reads_as_2d(tmp_path: Path) -> None:
    array = np.random.default_rng(3).normal(size=(2, 4, 5)).astype(np.float32)
    itk = sitk.ReadImage(str(save_image(array, tmp_path / "flow2d.nii.gz")))
    assert (itk.GetDimension(), itk.GetNumberOfComponentsPerPixel(), itk.GetSize()) == (2, 2, (4, 5))


def test_save_image_is_atomic_and_leaves_no_temporary(tmp_path: Path) -> None:
    for name in ("a.nii.gz", "a.nii", "a.png", "a.npy", "a.npz"):
        save_image(np.zeros((1, 4, 5), np.float32), tmp_path / name)
    save_image(np.ones((1, 4, 5), np.float32), tmp_path / "a.nii.gz")  # replaced, not appended to
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.nii", "a.nii.gz", "a.npy", "a.npz", "a.png"]
    np.testing.assert_array_equal(load_image(tmp_path / "a.nii.gz").numpy(), np.ones((1, 4, 5)))
    # nibabel can read what the in-memory writer compressed
    assert nib.load(str(tmp_path / "a.nii.gz")).shape == (4, 5)


def test_lps_to_ras_is_one_sign_flip_and_its_own_inverse() -> None:
    affine = OBLIQUE.copy()
    flipped = lps_to_ras(affine)
    np.testing.assert_array_equal(flipped[:2], -affine[:2])
    np.testing.assert_array_equal(flipped[2:], affine[2:])
    np.testing.assert_array_equal(lps_to_ras(flipped), affine)
    np.testing.assert_array_equal(LPS_TO_RAS @ LPS_TO_RAS, np.eye(4))


@pytest.mark.parametrize("suffix", [".mha", ".nrrd"])
def test_itk_files_keep_world_coordinates(tmp_path: Path, suffix: str) -> None:
    array = np.random.default_rng(2).normal(size=(4, 5, 6)).astype(np.float32)  # ITK order (Z, Y, X)
    itk = sitk.GetImageFromArray(array)
    itk.SetSpacing((0.7, 1.3, 2.0))
    itk.SetOrigin((-12.0, 30.5, 4.0))
    rotation = sitk.VersorTransform((0.2, 0.5, 0.1), 0.4).GetMatrix()
    itk.SetDirection(rotation)
    sitk.WriteImage(itk, str(tmp_path / f"a{suffix}"))

    image = load_image(tmp_path / f"a{suffix}")
    assert image.shape == (1, 6, 5, 4)  # (C, X, Y, Z)
    np.testing.assert_array_equal(image.numpy()[0], array.transpose(2, 1, 0))
    corners = _corners(image.shape[1:])
    lps = np.array([itk.TransformContinuousIndexToPhysicalPoint(tuple(c)) for c in corners[:3].T]).T
    ras = lps * np.array([[-1.0], [-1.0], [1.0]])
    np.testing.assert_allclose((image.affine.numpy() @ corners)[:3], ras, atol=1e-4)

    # Written as NIfTI by us, nibabel sees the same world coordinates.
    nifti = nib.load(str(save_image(image, tmp_path / "a.nii.gz")))
    np.testing.assert_allclose((nifti.affine @ corners)[:3], ras, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(nifti.dataobj), array.transpose(2, 1, 0))


def test_png_reads_scaled_as_image_and_raw_as_label(tmp_path: Path) -> None:
    import imageio.v3 as iio

    pixels = np.array([[0, 1, 2], [255, 128, 0]], dtype=np.uint8)
    iio.imwrite(tmp_path / "a.png", pixels)
    image = load_image(tmp_path / "a.png")
    assert image.shape == (1, 2, 3)
    np.testing.assert_allclose(image.numpy()[0], pixels / 255.0, atol=1e-7)
    np.testing.assert_array_equal(load_image(tmp_path / "a.png", dtype=np.int64).numpy()[0], pixels)
    np.testing.assert_array_equal(load_image(save_image(image, tmp_path / "b.png")).numpy(), image.numpy())


def test_colour_pictures_become_grey_by_luminance_or_keep_their_channels(tmp_path: Path) -> None:
    import imageio.v3 as iio

    rgba = np.zeros((2, 3, 4), np.uint8)
    rgba[0, 0] = (255, 255, 255, 255)  # white
    rgba[0, 1] = (255, 0, 0, 128)  # red, half transparent: alpha is dropped
    rgba[0, 2] = (0, 255, 0, 255)
    rgba[1, 0] = (0, 0, 255, 255)
    iio.imwrite(tmp_path / "c.png", rgba)
    grey = load_image(tmp_path / "c.png")
    assert grey.shape == (1, 2, 3) and grey.meta["colour"] == "RGBA -> grey (BT.601 luminance), alpha dropped"
    np.testing.assert_allclose(grey.numpy()[0, 0, 0], 1.0, atol=1e-6)
    np.testing.assert_allclose(grey.numpy()[0, 0, 1], 0.299 * grey.numpy()[0, 0, 0], atol=1e-6)  # ITU-R BT.601
    np.testing.assert_allclose([grey.numpy()[0, 0, 2], grey.numpy()[0, 1, 0]], [0.587, 0.114], atol=1e-6)
    colour = load_image(tmp_path / "c.png", keep_color=True)
    assert colour.shape == (3, 2, 3) and colour.meta["colour"] == "RGBA -> RGB channels, alpha dropped"
    np.testing.assert_allclose(colour.numpy(), np.moveaxis(rgba[..., :3], -1, 0) / 255.0, atol=1e-7)
    # Grey stored as RGB (e.g. a label map) stays exact and needs no word.
    labels = np.repeat(np.array([[0, 1, 2], [3, 2, 1]], np.uint8)[..., None], 3, axis=-1)
    iio.imwrite(tmp_path / "l.png", labels)
    label = load_image(tmp_path / "l.png", dtype=np.int64)
    np.testing.assert_array_equal(label.numpy()[0], labels[..., 0])
    assert "colour" not in label.meta


def test_numpy_files(tmp_path: Path) -> None:
    volume = np.random.default_rng(3).normal(size=(6, 7, 8)).astype(np.float32)
    np.save(tmp_path / "v.npy", volume)
    assert load_image(tmp_path / "v.npy").shape == (1, 6, 7, 8)
    image = load_image(save_image(load_image(tmp_path / "v.npy"), tmp_path / "v.npz", affine=OBLIQUE))
    np.testing.assert_array_equal(image.numpy()[0], volume)
    np.testing.assert_allclose(image.affine.numpy(), OBLIQUE)
    np.savez(tmp_path / "case.npz", image=volume[None], label=np.ones((1, 6, 7, 8), np.int16), affine=OBLIQUE)
    assert load_image(tmp_path / "case.npz", dtype=np.int64, key="label").numpy().sum() == 6 * 7 * 8


def test_truncated_nifti_is_refused_by_name(tmp_path: Path) -> None:
    path = tmp_path / "cut.nii"
    nib.save(nib.Nifti1Image(np.zeros((16, 16, 16), np.float32), OBLIQUE), str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(BadInputError, match="cut.nii"):
        load_image(path)


def test_nan_voxels_unsupported_files_and_fractional_labels_are_refused(tmp_path: Path) -> None:
    volume = np.zeros((4, 4, 4), np.float32)
    volume[1, 2, 3] = np.nan
    nib.save(nib.Nifti1Image(volume, np.eye(4)), str(tmp_path / "nan.nii.gz"))
    with pytest.raises(BadInputError, match=r"nan\.nii\.gz: 1 voxel"):
        load_image(tmp_path / "nan.nii.gz")
    (tmp_path / "scan.xyz").write_text("?")
    with pytest.raises(BadInputError, match=r"scan\.xyz: unsupported"):
        load_image(tmp_path / "scan.xyz")
    nib.save(nib.Nifti1Image(np.full((4, 4, 4), 0.5, np.float32), np.eye(4)), str(tmp_path / "soft.nii.gz"))
    with pytest.raises(BadInputError, match=r"soft\.nii\.gz: holds non-integer"):
        load_image(tmp_path / "soft.nii.gz", dtype=np.int64)


def test_series_is_written_as_a_4d_scan_with_time_last(tmp_path: Path) -> None:
    frames = np.arange(3 * 4 * 5 * 2, dtype=np.float32).reshape(3, 4, 5, 2)  # (T, X, Y, Z)
    affine = np.diag([1.5, 2.0, 3.0, 1.0])
    path = save_image(frames, tmp_path / "ct_4d.nii.gz", affine=affine, series=True)
    image = nib.load(str(path))
    assert image.shape == (4, 5, 2, 3)
    np.testing.assert_array_equal(np.asarray(image.dataobj)[..., 1], frames[1])
    np.testing.assert_allclose(image.affine, affine)
    read = load_image(path)
    assert tuple(read.shape) == (3, 4, 5, 2)  # read back channel-first: one channel per phase
