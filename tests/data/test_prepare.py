"""Preparation (geometry, normalisation, splits, cache, bad input) and the prepared datasets."""

from __future__ import annotations

import json
import os
from pathlib import Path

import imageio.v3 as iio
import nibabel as nib
import numpy as np
import pytest
import torch

from medsynth import api, runs
from medsynth.data import prepare as prepare_module
from medsynth.data.datasets import PreparedDataModule, PreparedDataset, load_prepared_info
from medsynth.data.io import load_image, save_image
from medsynth.data.manifest import Case, Manifest
from medsynth.data.prepare import PrepareConfig, prepare_dataset, split_subjects
from medsynth.errors import BadInputError, MedsynthError
from medsynth.runs import TEMP_SUFFIX

OBLIQUE = np.array([
    [0.8 * np.cos(0.3), -1.1 * np.sin(0.3), 0.0, -40.5],
    [0.8 * np.sin(0.3), 1.1 * np.cos(0.3), 0.0, 12.25],
    [0.0, 0.0, 2.5, 7.0],
    [0.0, 0.0, 0.0, 1.0],
])


def _nnunet(root: Path, n: int = 3, shape: tuple[int, ...] = (10, 8, 6), affine: np.ndarray = OBLIQUE) -> Path:
    """``n`` single-channel cases with a two-label map (a box of 1s in a 0 background)."""
    rng = np.random.default_rng(0)
    for folder in ("imagesTr", "labelsTr"):
        (root / folder).mkdir(parents=True)
    for k in range(n):
        nib.save(nib.Nifti1Image(rng.normal(100.0, 20.0, shape).astype(np.float32), affine), str(root / "imagesTr" / f"c{k}_0000.nii.gz"))
        label = np.zeros(shape, np.uint8)
        label[2:6, 2:5, 1:4] = 1
        nib.save(nib.Nifti1Image(label, affine), str(root / "labelsTr" / f"c{k}.nii.gz"))
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": {"background": 0, "organ": 1},
                                                   "numTraining": n, "file_ending": ".nii.gz"}))
    return root


def _pictures(root: Path, classes: tuple[str, ...] = ("a", "b"), n: int = 4, shape: tuple[int, int] = (12, 24)) -> Path:
    rng = np.random.default_rng(1)
    for name in classes:
        (root / name).mkdir(parents=True)
        for k in range(n):
            iio.imwrite(root / name / f"{name}_{k}.png", rng.integers(20, 230, shape, dtype=np.uint8))
    return root


def _npz(out: Path, case_id: str) -> dict[str, np.ndarray]:
    with np.load(out / "cases" / f"{case_id}.npz") as data:
        return dict(data)


def test_colour_pictures_get_one_line_per_dataset_or_keep_their_channels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(2)
    for name in ("a", "b"):
        (tmp_path / "raw" / name).mkdir(parents=True)
        for k in range(3):
            iio.imwrite(tmp_path / "raw" / name / f"{name}_{k}.png", rng.integers(0, 255, (8, 8, 4), dtype=np.uint8))
    lines: list[str] = []
    monkeypatch.setattr(prepare_module, "note", lines.append)
    out = prepare_dataset(tmp_path / "raw", tmp_path / "grey", normalize="none", progress=False)
    assert lines == ["prepare: 6 colour picture(s): RGBA -> grey (BT.601 luminance), alpha dropped; keep the channels with --keep-color"]
    assert _npz(out, "a_0")["image"].shape == (1, 8, 8)
    out = prepare_dataset(tmp_path / "raw", tmp_path / "colour", normalize="none", keep_color=True, progress=False)
    assert _npz(out, "a_0")["image"].shape == (3, 8, 8)
    assert lines[1:] == ["prepare: 6 colour picture(s): RGBA -> RGB channels, alpha dropped"]


# -- geometry -------------------------------------------------------------------------------


def test_oblique_nifti_round_trip_without_resampling_keeps_affine_and_voxels(tmp_path: Path) -> None:
    src = _nnunet(tmp_path / "raw")
    out = prepare_dataset(src, tmp_path / "prepared", normalize="none", progress=False)
    for k in range(3):
        prepared = out / "cases" / f"c{k}.npz"
        written = nib.load(str(save_image(load_image(prepared), tmp_path / f"c{k}.nii.gz")))
        original = nib.load(str(src / "imagesTr" / f"c{k}_0000.nii.gz"))
        np.testing.assert_allclose(written.affine, original.affine, atol=1e-5)
        np.testing.assert_array_equal(np.asarray(written.dataobj), np.asarray(original.dataobj))
        label = load_image(prepared, dtype=np.int64, key="label")
        np.testing.assert_array_equal(label.numpy()[0], np.asarray(nib.load(str(src / "labelsTr" / f"c{k}.nii.gz")).dataobj))
    assert (out / "stats.csv").read_text().splitlines()[0] == "id,subject,class,split,original_shape,original_spacing,prepared_shape,min,max,mean,std,p1,p99"
    fingerprint = json.loads((out / "fingerprint.json").read_text())
    assert fingerprint["n_cases"] == 3 and fingerprint["intensity"]["over"] == "foreground"
    assert fingerprint["original_spacing"]["median"] == pytest.approx([0.8, 1.1, 2.5])
    assert fingerprint["label_counts"] == {"background": 3 * (480 - 36), "organ": 3 * 36}


def test_spacing_and_orientation_resample_labels_as_integers(tmp_path: Path) -> None:
    out = prepare_dataset(_nnunet(tmp_path / "raw", n=1), tmp_path / "prepared", spacing=(1.5,), orientation="LPS", progress=False)
    case = _npz(out, "c0")
    assert nib.aff2axcodes(case["affine"]) == ("L", "P", "S")
    np.testing.assert_allclose(np.linalg.norm(case["affine"][:3, :3], axis=0), [1.5, 1.5, 1.5], atol=1e-6)
    assert case["label"].dtype == np.int16 and set(np.unique(case["label"])) == {0, 1}
    assert case["image"].dtype == np.float32 and 0.0 <= case["image"].min() and case["image"].max() <= 1.0


def test_resize_keeps_world_extent_and_keep_aspect_pads(tmp_path: Path) -> None:
    src = _pictures(tmp_path / "raw")
    out = prepare_dataset(src, tmp_path / "plain", size=8, progress=False)
    case = _npz(out, "a_0")
    assert case["image"].shape == (1, 8, 8)
    np.testing.assert_allclose(np.diag(case["affine"])[:2], [12 / 8, 24 / 8])
    out = prepare_dataset(src, tmp_path / "aspect", size=8, keep_aspect=True, progress=False)
    image = _npz(out, "a_0")["image"]
    assert image.shape == (1, 8, 8)
    # 12 x 24 -> 4 x 8, padded by 2 rows on each side with the image's darkest value.
    np.testing.assert_array_equal(image[0, :2], image.min())
    np.testing.assert_array_equal(image[0, -2:], image.min())
    assert image[0, 2:6].std() > 0


@pytest.mark.parametrize("size", [4, 12])
def test_crop_or_pad_around_the_foreground_keeps_voxels_spacing_and_world_positions(tmp_path: Path, size: int) -> None:
    src = _nnunet(tmp_path / "raw", n=1)  # 10 x 8 x 6, a 4 x 3 x 3 box of label 1 at [2:6, 2:5, 1:4]
    case = _npz(prepare_dataset(src, tmp_path / "out", size=size, crop=True, normalize="none", progress=False), "c0")
    source = nib.load(str(src / "imagesTr" / "c0_0000.nii.gz"))
    data = np.asarray(source.dataobj)
    assert case["image"].shape == (1, size, size, size)
    np.testing.assert_allclose(case["affine"][:3, :3], source.affine[:3, :3], atol=1e-6)  # same spacing and axes
    # Prepared voxel i lies where source voxel i + offset lies, with the same value (or padding outside the source).
    offset = (np.linalg.inv(source.affine) @ case["affine"])[:3, 3]
    np.testing.assert_allclose(offset, np.round(offset), atol=1e-6)
    index = np.stack(np.meshgrid(*[np.arange(size)] * 3, indexing="ij"), -1).reshape(-1, 3) + np.round(offset).astype(int)
    inside = ((index >= 0) & (index < data.shape)).all(axis=1)
    prepared = case["image"][0].reshape(-1)
    np.testing.assert_array_equal(prepared[inside], data[tuple(index[inside].T)])
    np.testing.assert_array_equal(prepared[~inside], data.min())
    assert case["label"].sum() == 36  # the whole foreground box is kept
    assert inside.all() == (size == 4)


def test_recipe_fills_the_settings_not_given(tmp_path: Path) -> None:
    src = _nnunet(tmp_path / "raw", n=1)
    settings = Manifest.load(api.prepare(src, tmp_path / "sdm", recipe="sdm", size=4, progress=False)).prepare["settings"]
    assert settings["normalize"] == "ct" and settings["crop"] is True
    settings = Manifest.load(api.prepare(src, tmp_path / "given", recipe="sdm", normalize="none", progress=False)).prepare["settings"]
    assert settings["normalize"] == "none"


@pytest.mark.parametrize("normalize", ["percentile", "zscore", "ct", "none"])
def test_normalisation(tmp_path: Path, normalize: str) -> None:
    src = tmp_path / "raw"
    src.mkdir()
    hu = np.linspace(-2000.0, 2000.0, 5 * 4 * 3, dtype=np.float32).reshape(5, 4, 3)
    nib.save(nib.Nifti1Image(hu, np.eye(4)), str(src / "ct.nii.gz"))
    Manifest(name="ct", spatial_dims=3, cases=[Case(id="ct", subject="s", image="ct.nii.gz")]).with_root(src).save(src)
    image = _npz(prepare_dataset(src, tmp_path / "out", normalize=normalize, ct_window=(-1000.0, 1000.0), progress=False), "ct")["image"]
    if normalize == "percentile":
        assert image.min() == 0.0 and image.max() == 1.0
    elif normalize == "zscore":
        assert abs(image.mean()) < 1e-5 and image.std() == pytest.approx(1.0, abs=1e-4)
    elif normalize == "ct":
        np.testing.assert_allclose(image[0], np.clip((hu + 1000.0) / 2000.0, 0.0, 1.0), atol=1e-6)
    else:
        np.testing.assert_array_equal(image[0], hu)


def test_flows_become_voxel_displacements_of_the_prepared_grid(tmp_path: Path) -> None:
    pairs = tmp_path / "pairs"
    pairs.mkdir()
    flow = np.zeros((3, 8, 8, 8), np.float32)
    flow[0] = 1.0  # one voxel along the first axis
    np.save(pairs / "template_img_0.npy", np.random.default_rng(0).random((8, 8, 8), dtype=np.float32))
    np.save(pairs / "flow_0.npy", np.moveaxis(flow, 0, -1))  # channel-last on disk
    np.save(pairs / "affine_0.npy", np.diag([2.0, 2.0, 2.0, 1.0]))
    case = _npz(prepare_dataset(pairs, tmp_path / "half", size=4, progress=False), "case_0")
    np.testing.assert_allclose(np.diag(case["affine"]), [4.0, 4.0, 4.0, 1.0])
    np.testing.assert_allclose(case["flow"][0], 0.5, atol=1e-5)  # 2 mm = half a 4 mm voxel
    np.testing.assert_allclose(case["flow"][1:], 0.0, atol=1e-6)

    # A NIfTI flow is millimetres in world (RAS) axes: one voxel along axis 0 of an oblique grid.
    src = tmp_path / "nifti"
    save_image(np.zeros((1, 6, 5, 4), np.float32), src / "img.nii.gz", affine=OBLIQUE)
    world = np.broadcast_to(OBLIQUE[:3, 0, None, None, None], (3, 6, 5, 4)).astype(np.float32)
    save_image(world, src / "dvf.nii.gz", affine=OBLIQUE)
    Manifest(name="n", spatial_dims=3, cases=[Case(id="c", subject="s", image="img.nii.gz", flow="dvf.nii.gz")]).with_root(src).save(src)
    voxels = _npz(prepare_dataset(src, tmp_path / "nifti-out", normalize="none", progress=False), "c")["flow"]
    np.testing.assert_allclose(voxels[:, 0, 0, 0], [1.0, 0.0, 0.0], atol=1e-5)


# -- splits ---------------------------------------------------------------------------------


def test_split_subjects_is_stratified_and_seeded() -> None:
    subjects = {f"{name}{k}": name for name, n in (("a", 3), ("b", 5), ("c", 10)) for k in range(n)}
    splits = split_subjects(subjects, val_fraction=0.1, test_fraction=0.2, seed=0)
    for name in "abc":
        assert {splits[s] for s in subjects if subjects[s] == name} == {"train", "val", "test"}
    assert splits == split_subjects(subjects, 0.1, 0.2, seed=0)
    assert splits != split_subjects(subjects, 0.1, 0.2, seed=1)
    assert set(split_subjects({"x": None, "y": None}, 0.1, 0.2, seed=0).values()) == {"train"}


def test_cases_of_one_subject_share_a_split(tmp_path: Path) -> None:
    src = tmp_path / "phases"
    src.mkdir()
    cases = []
    for subject in range(10):
        for phase in range(3):
            np.save(src / f"s{subject}_p{phase}.npy", np.full((4, 4), subject + phase / 10, np.float32))
            cases.append(Case(id=f"s{subject}_p{phase}", subject=f"s{subject}", image=f"s{subject}_p{phase}.npy", phase=phase))
    Manifest(name="lung", spatial_dims=2, cases=cases).with_root(src).save(src)
    prepared = Manifest.load(prepare_dataset(src, tmp_path / "out", normalize="none", progress=False))
    by_subject: dict[str, set[str]] = {}
    for case in prepared.cases:
        by_subject.setdefault(case.subject, set()).add(case.split)
    assert all(len(splits) == 1 for splits in by_subject.values())
    assert {next(iter(s)) for s in by_subject.values()} == {"train", "val", "test"}


# -- cache and output folder ----------------------------------------------------------------


def test_rerun_reuses_prepared_cases_and_redoes_changed_ones(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = _pictures(tmp_path / "raw")
    out = prepare_dataset(src, tmp_path / "out", size=8, progress=False)
    prepared = []
    original = prepare_module._prepare_case
    monkeypatch.setattr(prepare_module, "_prepare_case", lambda manifest, case, *args: prepared.append(case.id) or original(manifest, case, *args))
    prepare_dataset(src, out, size=8, progress=False)
    assert prepared == []
    changed = src / "b" / "b_1.png"
    os.utime(changed, ns=(changed.stat().st_atime_ns, changed.stat().st_mtime_ns + 10**9))
    prepare_dataset(src, out, size=8, progress=False)
    assert prepared == ["b_1"]

    with pytest.raises(MedsynthError, match="--force"):
        prepare_dataset(src, out, size=16, progress=False)
    (src / "b" / "b_3.png").unlink()
    prepare_dataset(src, out, size=16, force=True, progress=False)
    assert not (out / "cases" / "b_3.npz").exists() and _npz(out, "a_0")["image"].shape == (1, 16, 16)


def test_a_killed_write_leaves_only_a_temporary_that_the_next_run_removes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = _pictures(tmp_path / "raw")
    out = tmp_path / "out"

    def killed(path, data):  # the atomic writer killed after writing its temporary file
        (Path(path).parent / f".{Path(path).name}.x{TEMP_SUFFIX}").write_bytes(data[:10])
        raise KeyboardInterrupt

    monkeypatch.setattr(runs, "atomic_write_bytes", killed)
    monkeypatch.setattr(prepare_module, "atomic_write_bytes", killed)
    with pytest.raises(KeyboardInterrupt):
        prepare_dataset(src, out, size=8, progress=False)
    assert [p.name for p in (out / "cases").iterdir()] == [f".a_0.npz.x{TEMP_SUFFIX}"]
    monkeypatch.undo()
    prepare_dataset(src, out, size=8, progress=False)
    assert sorted(p.name for p in (out / "cases").iterdir()) == [f"{c}_{k}.npz" for c in "ab" for k in range(4)]
    assert sorted(p.name for p in out.iterdir()) == ["cases", "dataset.json", "fingerprint.json", "stats.csv"]


def test_settings_are_validated() -> None:
    with pytest.raises(MedsynthError, match="prepare: unknown config key 'sise'"):
        prepare_dataset(".", "out", sise=8)
    with pytest.raises(MedsynthError, match=r"prepare: val_fraction: Input should be less than 1"):
        prepare_dataset(".", "out", val_fraction=1.5)
    with pytest.raises(MedsynthError, match="keep_aspect needs a size"):
        prepare_dataset(".", "out", keep_aspect=True)
    with pytest.raises(MedsynthError, match="choose one"):
        prepare_dataset(".", "out", size=8, keep_aspect=True, crop=True)
    assert PrepareConfig(size=8).digest() != PrepareConfig(size=16).digest()
    # Settings added later change the hash only when set: datasets prepared before stay valid.
    assert PrepareConfig().digest() == "6da920670f61bb28"
    assert len({PrepareConfig(series="T1").digest(), PrepareConfig(keep_color=True).digest(), PrepareConfig().digest()}) == 3


# -- bad input ------------------------------------------------------------------------------


def test_nan_case_is_named_and_nothing_written_is_lost(tmp_path: Path) -> None:
    src = _nnunet(tmp_path / "raw", n=2)
    out = prepare_dataset(src, tmp_path / "out", progress=False)
    before = (out / "dataset.json").read_text()
    volume = np.zeros((10, 8, 6), np.float32)
    volume[0, 0, 0] = np.nan
    nib.save(nib.Nifti1Image(volume, OBLIQUE), str(src / "imagesTr" / "c9_0000.nii.gz"))
    nib.save(nib.Nifti1Image(np.zeros((10, 8, 6), np.uint8), OBLIQUE), str(src / "labelsTr" / "c9.nii.gz"))
    with pytest.raises(BadInputError, match=r"c9_0000\.nii\.gz: 1 voxel\(s\) are NaN"):
        prepare_dataset(src, out, progress=False)
    assert (out / "dataset.json").read_text() == before
    assert (out / "cases" / "c0.npz").exists() and (out / "cases" / "c1.npz").exists()


def test_truncated_nifti_is_named(tmp_path: Path) -> None:
    src = _nnunet(tmp_path / "raw", n=2)
    path = src / "imagesTr" / "c1_0000.nii.gz"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(BadInputError, match=r"c1_0000\.nii\.gz: cannot read image"):
        prepare_dataset(src, tmp_path / "out", progress=False)


def test_unknown_label_value_is_named(tmp_path: Path) -> None:
    src = _nnunet(tmp_path / "raw", n=1)
    nib.save(nib.Nifti1Image(np.full((10, 8, 6), 7, np.uint8), OBLIQUE), str(src / "labelsTr" / "c0.nii.gz"))
    with pytest.raises(BadInputError, match=r"c0\.nii\.gz: label value\(s\) \[7\]"):
        prepare_dataset(src, tmp_path / "out", progress=False)


def test_label_affine_mismatch_found_after_loading(tmp_path: Path, monkeypatch) -> None:
    # A manifest-listed NumPy label has no header; its (identity) affine is checked after loading.
    monkeypatch.setenv("MEDSYNTH_ALLOW_OUTSIDE", "1")  # the manifest names files of the dataset beside it (../raw)
    src = _nnunet(tmp_path / "raw", n=1)
    np.save(src / "label.npy", np.zeros((10, 8, 6), np.int16))
    Manifest(name="m", spatial_dims=3, cases=[Case(id="c", subject="s", image="imagesTr/c0_0000.nii.gz", label="label.npy")]).with_root(src).save(tmp_path / "m")
    with pytest.raises(BadInputError, match=r"label\.npy: affine differs"):
        prepare_dataset(tmp_path / "m", tmp_path / "out", progress=False)


# -- datasets -------------------------------------------------------------------------------


def test_prepared_dataset_and_datamodule(tmp_path: Path) -> None:
    out = prepare_dataset(_nnunet(tmp_path / "raw", n=4), tmp_path / "out", val_fraction=0.0, test_fraction=0.25, progress=False)
    info = load_prepared_info(out)
    assert (info["spatial_dims"], info["in_channels"], info["image_shape"]) == (3, 1, [10, 8, 6])
    assert info["labels"] == {0: "background", 1: "organ"} and info["splits"] == {"train": 3, "val": 0, "test": 1}
    item = PreparedDataset(out, "test", in_memory=True)[0]
    assert item["image"].dtype == torch.float32 and item["label"].dtype == torch.long and item["class"] == -1
    assert item["image"].shape == (1, 10, 8, 6) and item["label"].shape == (1, 10, 8, 6)

    orders = []
    for _ in range(2):
        module = PreparedDataModule(out, batch_size=2, seed=3)
        orders.append([batch["id"] for batch in module.train_dataloader()])
        assert [b["id"] for b in module.val_dataloader()] == [b["id"] for b in module.test_dataloader()]
    assert orders[0] == orders[1]
    with pytest.raises(BadInputError, match="not a prepared dataset"):
        PreparedDataset(tmp_path / "raw")


# -- flow pairs (the cardiac phantom's two layouts) -----------------------------------------


@pytest.fixture(scope="module")
def cardiac_pairs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cardiac-pairs")
    return {layout: api.phantom("cardiac", root / layout, n=2, size=16, frames=4, seed=1, flow_pairs=layout, progress=False)
            for layout in ("npy", "nifti")}


def test_both_flow_pair_layouts_prepare_to_the_same_arrays(cardiac_pairs, tmp_path):
    from medsynth.data.datasets import load_split

    items = {layout: load_split(prepare_dataset(src, tmp_path / layout, size=12, normalize="ct", progress=False), None)
             for layout, src in cardiac_pairs.items()}
    assert len(items["npy"]) == len(items["nifti"]) == 2
    for npy, nifti in zip(items["npy"], items["nifti"]):
        assert npy["flow"].shape == (3, 12, 12, 12) and npy["flow"].abs().max() > 0.5
        torch.testing.assert_close(npy["flow"], nifti["flow"], atol=1e-5, rtol=0)  # voxels of the prepared grid
        assert torch.equal(npy["label"], nifti["label"]) and set(npy["label"].unique().tolist()) > {0, 8, 9}
        for key in ("image", "moving", "affine"):
            torch.testing.assert_close(npy[key], nifti[key], atol=1e-5, rtol=0)
        assert not torch.equal(npy["image"], npy["moving"])  # ES and ED frames: the moving frame follows the image


def test_an_oblique_anisotropic_affine_survives_prepare(cardiac_pairs, tmp_path):
    """The same frame with an identity and an oblique, anisotropic affine: the same voxel flow after
    prepare (also resized), and mm vectors that differ by exactly the affine's linear part."""
    from medsynth.data.fields import voxel_to_mm

    src = cardiac_pairs["npy"]
    prepared = {}
    for name, affine in (("identity", None), ("oblique", OBLIQUE)):
        folder = tmp_path / name
        folder.mkdir()
        for kind in ("template_img", "flow", "label"):
            (folder / f"{kind}_0.npy").write_bytes((src / f"{kind}_0.npy").read_bytes())
        if affine is not None:
            np.save(folder / "affine_0.npy", affine)
        for size in (None, 12):
            out = prepare_dataset(folder, tmp_path / f"{name}-{size}", size=size, normalize="none", progress=False)
            prepared[name, size] = _npz(out, "case_0")
    np.testing.assert_allclose(prepared["oblique", None]["affine"], OBLIQUE)  # kept exactly without resampling
    np.testing.assert_allclose(prepared["identity", None]["flow"], np.load(src / "flow_0.npy"), atol=1e-5)
    for size in (None, 12):
        identity, oblique = prepared["identity", size], prepared["oblique", size]
        np.testing.assert_allclose(oblique["flow"], identity["flow"], atol=1e-4)
        assert np.array_equal(oblique["label"], identity["label"])
        mm_identity, mm_oblique = (voxel_to_mm(torch.from_numpy(p["flow"]).double(), p["affine"]).numpy() for p in (identity, oblique))
        np.testing.assert_allclose(mm_oblique, np.einsum("ij,j...->i...", OBLIQUE[:3, :3], mm_identity), atol=1e-4)
        np.testing.assert_allclose(oblique["affine"][:3, :3], OBLIQUE[:3, :3] @ identity["affine"][:3, :3], atol=1e-9)


def test_a_flow_pair_frame_with_nan_is_refused(tmp_path):
    frame = np.zeros((6, 5, 4), np.float32)
    frame[1, 2, 3] = np.nan
    np.save(tmp_path / "template_img_0.npy", frame)
    np.save(tmp_path / "flow_0.npy", np.zeros((3, 6, 5, 4), np.float32))
    with pytest.raises(BadInputError, match=r"template_img_0\.npy: 1 voxel\(s\) are NaN or Inf"):
        prepare_dataset(tmp_path, tmp_path.parent / f"{tmp_path.name}-out", progress=False)
