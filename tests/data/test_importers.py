"""Manifests and importers: every layout becomes one manifest pointing at the original files."""

from __future__ import annotations

import json
from pathlib import Path

import imageio.v3 as iio
import nibabel as nib
import numpy as np
import pytest

from medsynth.data.importers import import_dataset
from medsynth.data.manifest import Case, Manifest
from medsynth.errors import BadInputError, MedsynthError


def _pictures(root: Path, counts: dict[str, int], size: int = 8) -> Path:
    for name, count in counts.items():
        (root / name).mkdir(parents=True)
        for n in range(count):
            iio.imwrite(root / name / f"{name}_{n}.png", np.full((size, size), 10 * n, np.uint8))
    return root


def _nifti(path: Path, shape: tuple[int, ...], affine: np.ndarray, dtype: type = np.float32) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.zeros(shape, dtype), affine), str(path))
    return path


def _nnunet(root: Path, cases: int = 2, label_shape: tuple[int, ...] = (6, 5, 4), label_affine: np.ndarray | None = None) -> Path:
    affine = np.diag([0.8, 0.8, 2.0, 1.0])
    for k in range(cases):
        for channel in range(2):
            _nifti(root / "imagesTr" / f"case{k}_{channel:04d}.nii.gz", (6, 5, 4), affine)
        _nifti(root / "labelsTr" / f"case{k}.nii.gz", label_shape, affine if label_affine is None else label_affine, np.uint8)
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "T2", "1": "ADC"}, "labels": {"background": 0, "prostate": 1},
        "numTraining": cases, "file_ending": ".nii.gz"}))
    return root


# -- manifest -------------------------------------------------------------------------------


def test_manifest_round_trip_and_rebase(tmp_path: Path) -> None:
    manifest = Manifest(name="m", spatial_dims=3, classes=["a", "b"], labels={"0": "background"},
                        cases=[Case(id="c1", subject="s1", image="img/c1.nii.gz", class_name="b", future_key=1)])
    manifest.with_root(tmp_path / "raw").save(tmp_path / "raw")
    loaded = Manifest.load(tmp_path / "raw" / "dataset.json")
    assert loaded.class_index("b") == 1
    assert loaded.cases[0].model_extra == {"future_key": 1}
    assert json.loads((tmp_path / "raw" / "dataset.json").read_text())["cases"][0]["class"] == "b"
    loaded.save(tmp_path / "elsewhere" / "deeper")
    moved = Manifest.load(tmp_path / "elsewhere" / "deeper")
    assert moved.cases[0].image == "../../raw/img/c1.nii.gz"
    assert moved.resolve(moved.cases[0].image).resolve() == (tmp_path / "raw" / "img" / "c1.nii.gz").resolve()
    with pytest.raises(MedsynthError, match="unknown class 'c'"):
        moved.class_index("c")


def test_broken_manifests_are_refused_by_name(tmp_path: Path) -> None:
    with pytest.raises(BadInputError, match="dataset.json: manifest not found"):
        Manifest.load(tmp_path)
    (tmp_path / "dataset.json").write_text("{not json")
    with pytest.raises(BadInputError, match="dataset.json: manifest is not valid JSON at line 1"):
        Manifest.load(tmp_path)
    case = {"id": "x", "subject": "s", "image": "x.png"}
    (tmp_path / "dataset.json").write_text(json.dumps({"name": "d", "spatial_dims": 2, "cases": [case, case]}))
    with pytest.raises(BadInputError, match="duplicate case id"):
        Manifest.load(tmp_path)
    (tmp_path / "dataset.json").write_text(json.dumps({"name": "d", "spatial_dims": 4, "cases": []}))
    with pytest.raises(BadInputError, match="spatial_dims"):
        Manifest.load(tmp_path)


# -- class folders --------------------------------------------------------------------------


def test_class_folders(tmp_path: Path) -> None:
    src = _pictures(tmp_path / "raw", {"outer": 2, "normal": 3})
    manifest = import_dataset(src, tmp_path / "out")
    assert manifest.classes == ["normal", "outer"]
    assert manifest.spatial_dims == 2 and len(manifest.cases) == 5
    case = manifest.cases[0]
    assert (case.id, case.subject, case.class_name, case.image) == ("normal_0", "normal_0", "normal", "../raw/normal/normal_0.png")
    assert Manifest.load(tmp_path / "out").resolve(case.image).resolve() == (src / "normal" / "normal_0.png").resolve()


def test_class_folders_empty_folder_and_foreign_file(tmp_path: Path) -> None:
    src = _pictures(tmp_path / "raw", {"a": 2})
    (src / "b").mkdir()
    with pytest.raises(BadInputError, match=r"raw/b: class folder holds no pictures"):
        import_dataset(src)
    (src / "b" / "notes.txt").write_text("x")
    with pytest.raises(BadInputError, match=r"notes\.txt: not a picture"):
        import_dataset(src)


# -- nnU-Net v2 and Decathlon ---------------------------------------------------------------


def test_nnunet(tmp_path: Path) -> None:
    manifest = import_dataset(_nnunet(tmp_path / "Dataset001_Prostate"))
    assert manifest.source == "nnunet-v2" and manifest.modality == "T2+ADC" and manifest.spatial_dims == 3
    assert manifest.labels == {"0": "background", "1": "prostate"}
    assert manifest.cases[0].image == ["imagesTr/case0_0000.nii.gz", "imagesTr/case0_0001.nii.gz"]
    assert manifest.cases[1].label == "labelsTr/case1.nii.gz"


def test_nnunet_label_shape_mismatch(tmp_path: Path) -> None:
    with pytest.raises(BadInputError, match=r"case0\.nii\.gz: shape \(6, 5, 3\) differs"):
        import_dataset(_nnunet(tmp_path / "raw", label_shape=(6, 5, 3)))


def test_nnunet_label_affine_mismatch(tmp_path: Path) -> None:
    shifted = np.diag([0.8, 0.8, 2.0, 1.0])
    shifted[0, 3] = 0.01
    with pytest.raises(BadInputError, match=r"labelsTr/case0\.nii\.gz: affine differs"):
        import_dataset(_nnunet(tmp_path / "raw", label_affine=shifted))


def test_decathlon(tmp_path: Path) -> None:
    src = tmp_path / "Task02_Heart"
    _nifti(src / "imagesTr" / "la_003.nii.gz", (6, 5, 4), np.eye(4))
    _nifti(src / "labelsTr" / "la_003.nii.gz", (6, 5, 4), np.eye(4), np.uint8)
    (src / "dataset.json").write_text(json.dumps({
        "name": "LeftAtrium", "modality": {"0": "MRI"}, "labels": {"0": "background", "1": "left atrium"},
        "training": [{"image": "./imagesTr/la_003.nii.gz", "label": "./labelsTr/la_003.nii.gz"}], "test": []}))
    manifest = import_dataset(src)
    assert (manifest.name, manifest.modality, manifest.cases[0].id) == ("LeftAtrium", "MRI", "la_003")
    assert manifest.cases[0].label == "labelsTr/la_003.nii.gz"


# -- template/flow pairs, our own manifests, unknown layouts -----------------------------------


def test_flow_pairs(tmp_path: Path) -> None:
    src = tmp_path / "flows"
    src.mkdir()
    for n in (2, 10):
        np.save(src / f"template_img_{n}.npy", np.zeros((6, 5, 4), np.float32))
        np.save(src / f"flow_{n}.npy", np.zeros((3, 6, 5, 4), np.float32))
    np.save(src / "affine_10.npy", np.diag([2.0, 2.0, 2.0, 1.0]))
    manifest = import_dataset(src)
    assert [c.id for c in manifest.cases] == ["case_2", "case_10"]
    assert (manifest.cases[1].flow, manifest.cases[1].affine, manifest.cases[0].affine) == ("flow_10.npy", "affine_10.npy", None)
    np.save(src / "template_img_11.npy", np.zeros((6, 5, 4), np.float32))
    with pytest.raises(BadInputError, match=r"template_img_11\.npy: no matching flow_11\.npy"):
        import_dataset(src)


def test_flow_pair_shape_mismatch(tmp_path: Path) -> None:
    np.save(tmp_path / "template_img_0.npy", np.zeros((6, 5, 4), np.float32))
    np.save(tmp_path / "flow_0.npy", np.zeros((3, 6, 5, 5), np.float32))
    with pytest.raises(BadInputError, match=r"flow_0\.npy: shape"):
        import_dataset(tmp_path)


def test_flow_pairs_with_labels_diastole_and_a_folder_affine(tmp_path: Path) -> None:
    np.save(tmp_path / "template_img_0.npy", np.zeros((6, 5, 4), np.float32))
    np.save(tmp_path / "flow_0.npy", np.zeros((6, 5, 4, 3), np.float32))  # channel-last is accepted
    np.save(tmp_path / "label_0.npy", np.zeros((6, 5, 4), np.int16))
    np.save(tmp_path / "diastole_img_0.npy", np.zeros((6, 5, 4), np.float32))
    np.save(tmp_path / "affine.npy", np.diag([2.0, 2.0, 3.0, 1.0]))
    (tmp_path / "flow_pairs.json").write_text(json.dumps({"modality": "MRI", "labels": {"1": "lv", "0": "background"}}))
    manifest = import_dataset(tmp_path)
    case = manifest.cases[0]
    assert (case.label, case.moving, case.affine) == ("label_0.npy", "diastole_img_0.npy", "affine.npy")
    assert manifest.modality == "MRI" and list(manifest.labels.items()) == [("0", "background"), ("1", "lv")]
    np.save(tmp_path / "diastole_img_0.npy", np.zeros((6, 5, 5), np.float32))
    with pytest.raises(BadInputError, match=r"diastole_img_0\.npy: shape \(6, 5, 5\) differs from its frame template_img_0\.npy"):
        import_dataset(tmp_path)
    np.save(tmp_path / "flow_0.npy", np.zeros((2, 6, 5, 4), np.float32))
    with pytest.raises(BadInputError, match=r"flow_0\.npy: has 2 channel\(s\); a 3D displacement field has 3"):
        import_dataset(tmp_path)


def test_medsynth_manifest_is_loaded_and_rebased(tmp_path: Path) -> None:
    src = tmp_path / "phantom"
    _nifti(src / "s0.nii.gz", (4, 4, 4), np.eye(4))
    Manifest(name="p", spatial_dims=3, source="phantom:cardiac",
             cases=[Case(id="s0", subject="s0", image="s0.nii.gz", phase=0)]).with_root(src).save(src)
    assert import_dataset(src).source == "phantom:cardiac"
    assert import_dataset(src, tmp_path / "copy").cases[0].image == "../phantom/s0.nii.gz"


def test_unknown_layout(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(MedsynthError, match="not a recognised dataset layout"):
        import_dataset(tmp_path)


# -- class order ----------------------------------------------------------------------------


def test_class_folders_keep_a_declared_order(tmp_path: Path) -> None:
    src = _pictures(tmp_path / "raw", {"normal": 1, "cp_defect": 1, "oda_defect": 1})
    (src / "dataset.json").write_text(json.dumps({"name": "cilia", "classes": ["normal", "oda_defect", "cp_defect"]}))
    manifest = import_dataset(src)
    assert manifest.classes == ["normal", "oda_defect", "cp_defect"]
    assert manifest.class_index("cp_defect") == 2
    assert [case.class_name for case in manifest.cases] == ["normal", "oda_defect", "cp_defect"]


def test_class_folders_without_a_declared_order_are_alphabetical(tmp_path: Path) -> None:
    src = _pictures(tmp_path / "raw", {"normal": 1, "cp_defect": 1})
    (src / "dataset.json").write_text(json.dumps({"name": "cilia"}))
    assert import_dataset(src).classes == ["cp_defect", "normal"]


def test_declared_classes_must_name_the_folders(tmp_path: Path) -> None:
    src = _pictures(tmp_path / "raw", {"normal": 1, "cp_defect": 1})
    (src / "dataset.json").write_text(json.dumps({"classes": ["normal", "ida_defect"]}))
    with pytest.raises(BadInputError, match=r"dataset\.json: 'classes' \['normal', 'ida_defect'\] must name each class folder once"):
        import_dataset(src)
    (src / "dataset.json").write_text(json.dumps({"classes": "normal"}))
    with pytest.raises(BadInputError, match="'classes' must be a list"):
        import_dataset(src)


def test_a_medsynth_manifest_keeps_its_class_order(tmp_path: Path) -> None:
    cases = [Case(id=f"c{k}", subject=f"c{k}", image=f"c{k}.png", class_name=name) for k, name in enumerate(["zeta", "alpha"])]
    Manifest(name="m", spatial_dims=2, classes=["zeta", "alpha"], cases=cases).with_root(tmp_path).save(tmp_path)
    assert import_dataset(tmp_path).classes == ["zeta", "alpha"]


def test_nnunet_labels_keep_their_values_and_names_unsorted(tmp_path: Path) -> None:
    src = _nnunet(tmp_path / "raw")
    description = json.loads((src / "dataset.json").read_text())
    description["labels"] = {"zona": 2, "background": 0, "apex": 1}
    (src / "dataset.json").write_text(json.dumps(description))
    assert list(import_dataset(src).labels.items()) == [("0", "background"), ("1", "apex"), ("2", "zona")]


def test_broken_dataset_description_is_one_line(tmp_path: Path) -> None:
    src = _nnunet(tmp_path / "raw")
    (src / "dataset.json").write_text('{"channel_names": {"0": "T2"},\n "labels": }')
    with pytest.raises(BadInputError, match=r"raw/dataset\.json: dataset description is not valid JSON at line 2"):
        import_dataset(src)
