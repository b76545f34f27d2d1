"""GIF movies and stills of sequences and fields."""

from __future__ import annotations

import imageio.v3 as iio
import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from medsynth.data.fields import mm_to_voxel
from medsynth.data.phantoms.cardiac import make_cardiac_dataset
from medsynth.motion.registration import BSplineTransform
from medsynth.motion.render import load_fields, load_frames, render_movie, render_still, slice_indices, write_motion
from oblique_geometry import oblique_affine, world

FRAMES = 3


@pytest.fixture(scope="module")
def subject(tmp_path_factory):
    out = make_cardiac_dataset(tmp_path_factory.mktemp("cardiac"), n=1, frames=FRAMES, size=(24, 24, 16), seed=0)
    return out / "sub000"


def test_slice_indices():
    assert slice_indices(40, 1) == [20]
    assert slice_indices(40, 3, "middle") == [14, 20, 26]
    assert slice_indices(40, 2, "first") == [0, 10]
    assert slice_indices(40, 2, "last") == [29, 39]
    assert slice_indices(3, 5) == [0, 1, 2]  # never outside the axis


def test_movie_of_a_sequence_with_its_field_magnitude(tmp_path, subject):
    out = render_movie(subject, tmp_path / "beat.gif", field=subject, views=("axial", "coronal"), slices=2, style="magnitude", fps=4)
    movie = iio.imread(out, index=None)
    assert movie.shape[0] == FRAMES and movie.ndim == 4
    assert iio.immeta(out)["duration"] == pytest.approx(250)  # 4 frames per second
    assert not np.array_equal(movie[0], movie[1])  # the heart beats
    still = render_movie(subject, tmp_path / "one_view.gif", views=("sagittal",), slices=1)
    assert iio.imread(still, index=None).shape[1] < movie.shape[1]  # one row of panels instead of two


def test_movie_of_a_field_over_the_cycle_with_arrows(tmp_path, subject):
    images, affine = load_frames(subject)
    fields = load_fields(subject)
    assert images.shape == (FRAMES, 24, 24, 16) and fields.shape == (FRAMES, 3, 24, 24, 16)
    reference = images[:1]  # one image, the field over the cycle drawn on it
    out = render_movie(reference, tmp_path / "field.gif", field=torch.from_numpy(fields), style="quiver", slices=1, anchor="first", fps=10)
    assert iio.imread(out, index=None).shape[0] == FRAMES


def test_registration_grids_render_with_a_zero_reference_phase(tmp_path, subject):
    images, affine = load_frames(subject)
    grid_dir = tmp_path / "grids" / "sub000"
    transform = BSplineTransform(torch.full((3, 8, 8, 7), 0.5), (4.0, 4.0, 3.0), (24, 24, 16), affine)
    transform.save(grid_dir / "grid_t01.npz")
    transform.save(grid_dir / "grid_t02.npz")
    fields = load_fields(grid_dir)
    assert fields.shape == (FRAMES, 3, 24, 24, 16)
    assert fields[0].max() == 0 and np.allclose(fields[1], 0.5, atol=1e-5)


def test_still_figure_of_a_field_over_an_image(tmp_path, subject):
    out = render_still(subject / "image_t00.nii.gz", tmp_path / "field.png", field=subject / "dvf_t01.nii.gz", views=("axial", "coronal", "sagittal"), slices=3)
    picture = iio.imread(out)
    assert picture.ndim == 3 and picture.shape[0] > 100
    with pytest.raises(ValueError, match="view"):
        render_still(subject / "image_t00.nii.gz", tmp_path / "bad.png", views=("oblique",))


def test_write_motion_keeps_an_oblique_anisotropic_geometry_in_world_space(tmp_path):
    """Issue 11's "Geometry": fields written for an oblique, anisotropic CT load in nibabel with its affine, hold
    the world translation in mm, and warp the CT in world space (pull: phase(p) = CT(p + d))."""
    shape, affine = (12, 10, 7), oblique_affine((1.3, 0.8, 2.5))
    a, b = np.array([0.7, -1.1, 2.3]), 40.0
    index = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)  # (X, Y, Z, 3)
    points = world(affine, index)  # voxel centres, mm
    ct = torch.from_numpy(points @ a + b).float()[None]  # (1, X, Y, Z): linear in world coordinates
    moves = {0: np.zeros(3), 2: np.array([2.0, -1.5, 3.0])}  # mm, per phase
    fields = torch.stack([mm_to_voxel(torch.from_numpy(d)[:, None, None, None].expand(3, *shape), affine) for d in moves.values()]).float()
    written = write_motion(tmp_path, MetaTensor(ct, affine=torch.from_numpy(affine)), fields, phases=list(moves), views=("axial", "coronal"), style="magnitude")
    assert [p.name for p in written] == ["field_t00.nii.gz", "field_t02.nii.gz", "image_t00.nii.gz", "image_t02.nii.gz",
                                         "image_4d.nii.gz", "movie_axial.gif", "movie_coronal.gif"]
    for number, (phase, d) in enumerate(moves.items()):
        field = nib.load(tmp_path / f"field_t{phase:02d}.nii.gz")
        assert np.allclose(field.affine, affine)
        assert field.shape == (*shape, 1, 3)  # a NIfTI vector image
        assert np.allclose(np.asarray(field.dataobj)[..., 0, :], d, atol=1e-4)  # world mm, not voxels
        image = nib.load(tmp_path / f"image_t{phase:02d}.nii.gz")
        assert np.allclose(image.affine, affine)
        # Away from the border (where x + u(x) leaves the grid and is clamped) trilinear sampling of a linear image is exact.
        sampled = index + fields[number].permute(1, 2, 3, 0).numpy()  # where each voxel reads the CT, in its voxels
        inside = np.all((sampled >= 0) & (sampled <= np.array(shape) - 1), -1)
        assert inside.sum() > 0.3 * inside.size
        expected = (points + d) @ a + b
        assert np.allclose(np.asarray(image.dataobj)[inside], expected[inside], atol=1e-3)
    series = nib.load(tmp_path / "image_4d.nii.gz")
    assert series.shape == (*shape, 2) and np.allclose(series.affine, affine)
    assert np.allclose(np.asarray(series.dataobj)[..., 1], np.asarray(nib.load(tmp_path / "image_t02.nii.gz").dataobj))
    movie = iio.imread(tmp_path / "movie_axial.gif", index=None)
    assert movie.shape[0] == 2 and not np.array_equal(movie[0], movie[1])
    frames, read_affine = load_frames(tmp_path)  # the folder is a sequence render reads
    assert frames.shape == (2, *shape) and np.allclose(read_affine, affine, atol=1e-5)


def test_still_of_the_jacobian_determinant(tmp_path, subject):
    out = render_still(subject / "image_t00.nii.gz", tmp_path / "jacobian.png", field=subject / "dvf_t01.nii.gz",
                       views=("axial",), style="jacobian")
    picture = iio.imread(out)
    assert out.suffix == ".png" and picture.ndim == 3 and picture.shape[0] > 100
    arrows = iio.imread(render_still(subject / "image_t00.nii.gz", tmp_path / "arrows.png", field=subject / "dvf_t01.nii.gz",
                                     views=("axial",), style="quiver"))
    assert picture.shape != arrows.shape or not np.array_equal(picture, arrows)  # a colour map, not arrows
    with pytest.raises(ValueError, match="style must be 'quiver', 'magnitude' or 'jacobian'"):
        render_still(subject / "image_t00.nii.gz", tmp_path / "bad.png", field=subject / "dvf_t01.nii.gz", style="curl")
    assert not (tmp_path / "bad.png").exists()
