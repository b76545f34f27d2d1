"""The procedural cilia phantom: determinism, layout, class-specific structure, separability."""

from __future__ import annotations

import dataclasses

import imageio.v3 as iio
import numpy as np
import pytest
from scipy import ndimage
from skimage.transform import resize

from medsynth.data.phantoms.cilia import (
    CILIA_CLASSES,
    RING_RADIUS,
    CiliumParams,
    make_cilia_dataset,
    render_cilium,
    sample_cilium_params,
)
from medsynth.errors import MedsynthError


def sample(cls: str, seed: int, size: int = 64) -> CiliumParams:
    return sample_cilium_params(cls, np.random.default_rng(seed), size)


def centred(params: CiliumParams) -> CiliumParams:
    """The same section, round and centred, so pixel radius maps to axoneme radius."""
    return dataclasses.replace(params, ellipticity=1.0, shift=(0.0, 0.0))


def axoneme_radius(params: CiliumParams, size: int) -> np.ndarray:
    """Distance of every pixel from the centre in axoneme units (centred params), (size, size)."""
    c = np.arange(size) + 0.5 - size / 2
    return np.hypot(c[:, None], c[None, :]) / (params.radius * size)


def share_in(change: np.ndarray, r: np.ndarray, lo: float, hi: float) -> float:
    """Fraction of the squared change that lies in the band lo <= r < hi."""
    energy = change.astype(np.float64) ** 2
    return float(energy[(r >= lo) & (r < hi)].sum() / energy.sum())


def without(params: CiliumParams, part: str) -> CiliumParams:
    return dataclasses.replace(params, doublets=tuple(dataclasses.replace(d, **{part: False}) for d in params.doublets))


def polar_features(image: np.ndarray) -> np.ndarray:
    """Rotation-invariant features: angular FFT magnitudes (harmonics 0-18) on 24 rings."""
    size = image.shape[0]
    image = (image - image.mean()) / image.std()
    r = np.linspace(0, 0.47 * size, 24)[:, None]
    t = np.linspace(0, 2 * np.pi, 64, endpoint=False)[None, :]
    polar = ndimage.map_coordinates(image, [size / 2 - 0.5 + r * np.sin(t), size / 2 - 0.5 + r * np.cos(t)], order=1)
    return np.abs(np.fft.rfft(polar, axis=1))[:, :19].ravel() / 64


def test_sampling_and_render_are_deterministic():
    a, b, other = sample("normal", 3), sample("normal", 3), sample("normal", 4)
    assert a == b and a != other
    image = render_cilium(a, 64)
    assert np.array_equal(image, render_cilium(b, 64))
    assert not np.array_equal(image, render_cilium(other, 64))


@pytest.mark.parametrize("size", [64, 224])
@pytest.mark.parametrize("cls", CILIA_CLASSES)
def test_render_shape_range_and_contrast(cls, size):
    params = centred(sample(cls, 5, size))
    image = render_cilium(params, size)
    assert image.shape == (size, size) and image.dtype == np.float32
    assert 0.0 <= image.min() and image.max() <= 1.0
    r = axoneme_radius(params, size)
    membrane, outside = image[np.abs(r - 0.98) < 0.03].mean(), image[r > 1.1].mean()
    assert membrane < outside - 0.15  # dark membrane on a light background, at the sampled radius
    assert (r[0, size // 2] > 1.1) and image[r < 1].std() > 0.05  # fills the frame, structured inside


def test_sizes_render_the_same_section():
    params = sample("normal", 6, 224)
    small = render_cilium(params, 64)
    large = resize(render_cilium(params, 224), (64, 64), anti_aliasing=True)
    assert np.corrcoef(small.ravel(), large.ravel())[0, 1] > 0.9


def test_axoneme_fills_most_of_the_frame():
    radii = [sample(cls, k).radius * sample(cls, k).ellipticity for cls in CILIA_CLASSES for k in range(20)]
    assert 0.37 <= min(radii) and max(radii) <= 0.45


@pytest.mark.parametrize("defect, part, band", [("oda_defect", "oda", (0.68, 0.92)),
                                                ("ida_defect", "ida", (0.5, 0.75))])
def test_arm_defects_change_only_their_arm_ring(defect, part, band):
    for seed in range(3):
        normal = centred(sample("normal", seed))
        defective = centred(sample(defect, seed))
        # Same seed, same nuisance and layout: the class is the only difference.
        assert defective == dataclasses.replace(without(normal, part), cls=defect)
        change = render_cilium(defective, 64) - render_cilium(normal, 64)
        assert change.min() >= -1e-6 and change.max() > 0.25  # arms gone: clearly lighter, nowhere darker
        assert share_in(change, axoneme_radius(normal, 64), *band) > 0.9


def test_other_arm_ring_is_untouched():
    normal = centred(sample("normal", 1))
    r = axoneme_radius(normal, 64)
    no_oda = render_cilium(without(normal, "oda"), 64) - render_cilium(normal, 64)
    no_ida = render_cilium(without(normal, "ida"), 64) - render_cilium(normal, 64)
    assert share_in(no_oda, r, 0.5, 0.66) < 0.02 and share_in(no_ida, r, 0.76, 0.92) < 0.02


def test_cp_defect_changes_the_centre():
    for seed in range(4):
        normal = centred(sample("normal", seed))
        change = render_cilium(dataclasses.replace(normal, central_pair=()), 64) - render_cilium(normal, 64)
        assert change.max() > 0.2 and share_in(change, axoneme_radius(normal, 64), 0.0, 0.35) > 0.95
    for seed in range(20):
        params = sample("cp_defect", seed)
        singlets = len(params.central_pair)
        transposed = [d for d in params.doublets if np.hypot(d.x, d.y) < 0.1]
        assert singlets < 2 and (singlets, len(params.doublets) - len(transposed)) in {(0, 9), (1, 9), (0, 8)}
        assert not (transposed and singlets)


def test_disarranged_breaks_the_ninefold_symmetry():
    def ninefold(params: CiliumParams) -> float:
        """Angular harmonic 9 relative to the mean on the doublet ring (centred params)."""
        image = render_cilium(centred(params), 128)
        r = RING_RADIUS * params.radius * 128
        t = np.linspace(0, 2 * np.pi, 256, endpoint=False)
        ring = np.mean([ndimage.map_coordinates(image, [63.5 + s * np.sin(t), 63.5 + s * np.cos(t)], order=1)
                        for s in r + np.linspace(-2, 2, 5)], axis=0)
        spectrum = np.abs(np.fft.rfft(ring - ring.mean()))
        return float(spectrum[9] / spectrum[1:30].sum())

    normal = [ninefold(sample("normal", s)) for s in range(6)]
    disarranged = [ninefold(sample("disarranged", s)) for s in range(6)]
    assert max(disarranged) < min(normal)
    for seed in range(10):
        ring = [d for d in sample("disarranged", seed).doublets if np.hypot(d.x, d.y) > 0.45]
        gaps = np.diff(np.sort(np.arctan2([d.y for d in ring], [d.x for d in ring])))
        assert len(ring) < 9 and gaps.std() > 0.1


def test_classes_are_separable_by_rotation_invariant_features():
    n_train, n_test = 32, 16
    features, labels = [], []
    for ci, cls in enumerate(CILIA_CLASSES):
        for k in range(n_train + n_test):
            params = sample_cilium_params(cls, np.random.default_rng([123, ci, k]), 64)
            features.append(polar_features(render_cilium(params, 64)))
            labels.append(ci)
    x, y = np.array(features), np.array(labels)
    train = np.tile(np.arange(n_train + n_test) < n_train, len(CILIA_CLASSES))
    x = (x - x[train].mean(0)) / (x[train].std(0) + 1e-6)
    # Linear discriminant with a shrunk shared covariance: a simple, robust classifier.
    means = np.stack([x[train & (y == c)].mean(0) for c in range(len(CILIA_CLASSES))])
    residual = x[train] - means[y[train]]
    weights = np.linalg.solve(residual.T @ residual / len(residual) + 0.3 * np.eye(x.shape[1]), means.T)
    predicted = (x @ weights - 0.5 * (means * weights.T).sum(1)).argmax(1)
    assert (predicted[~train] == y[~train]).mean() >= 0.9


def test_dataset_layout_and_determinism(tmp_path):
    out = make_cilia_dataset(tmp_path / "a", n_per_class=2, size=32, seed=0)
    assert out == tmp_path / "a"
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    assert files == sorted(f"{c}/{c}_{k}.png" for c in CILIA_CLASSES for k in range(2))
    image = iio.imread(out / "normal" / "normal_0.png")
    assert image.shape == (32, 32) and image.dtype == np.uint8 and image.std() > 10
    again = make_cilia_dataset(tmp_path / "b", n_per_class=2, size=32, seed=0)
    other = make_cilia_dataset(tmp_path / "c", n_per_class=2, size=32, seed=1)
    for name in files:
        assert (out / name).read_bytes() == (again / name).read_bytes()
        assert (out / name).read_bytes() != (other / name).read_bytes()


def test_dataset_image_matches_its_seed(tmp_path):
    out = make_cilia_dataset(tmp_path, n_per_class=2, size=32, seed=7)
    params = sample_cilium_params("cp_defect", np.random.default_rng([7, CILIA_CLASSES.index("cp_defect"), 1]), 32)
    expected = (np.clip(render_cilium(params, 32), 0, 1) * 255 + 0.5).astype(np.uint8)
    assert np.array_equal(iio.imread(out / "cp_defect" / "cp_defect_1.png"), expected)


def test_errors(tmp_path):
    with pytest.raises(ValueError, match="normal, disarranged, oda_defect, ida_defect, cp_defect"):
        sample_cilium_params("ciliopathy", np.random.default_rng(0), 64)
    with pytest.raises(MedsynthError, match="at least 1"):
        make_cilia_dataset(tmp_path, n_per_class=0)
    with pytest.raises(MedsynthError, match="at least 32"):
        make_cilia_dataset(tmp_path, n_per_class=1, size=16)
    assert not any(tmp_path.iterdir())


def test_prepare_keeps_the_clinical_class_order(tmp_path):
    from medsynth.data.prepare import prepare_dataset
    from medsynth.runs import read_structured

    make_cilia_dataset(tmp_path / "raw", n_per_class=2, size=32, seed=0)
    prepared = prepare_dataset(tmp_path / "raw", tmp_path / "prepared", size=32, normalize="none", progress=False)
    assert read_structured(prepared / "dataset.json")["classes"] == list(CILIA_CLASSES)  # not alphabetical
