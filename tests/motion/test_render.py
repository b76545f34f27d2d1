"""GIF movies and stills of sequences and fields."""

from __future__ import annotations

import imageio.v3 as iio
import numpy as np
import pytest
import torch

from medsynth.data.phantoms.cardiac import make_cardiac_dataset
from medsynth.motion.registration import BSplineTransform
from medsynth.motion.render import load_fields, load_frames, render_movie, render_still, slice_indices

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
