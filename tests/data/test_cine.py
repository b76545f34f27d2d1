"""Cine-MRI importers (UK Biobank layout, ACDC) and the subject-split SAX slice view."""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medsynth.data.cine import ACDC_LABELS, import_acdc, import_ukbb, lax_views, sax_slices
from medsynth.data.importers import import_dataset
from medsynth.data.phantoms.cardiac_views import make_cardiac_phantom
from medsynth.errors import BadInputError

FRAMES = 2


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    return make_cardiac_phantom(tmp_path_factory.mktemp("ukbb"), n=3, seed=1, size=16, frames=FRAMES, modality="mri", views=True, hr_factor=2)


def _nifti(path: Path, array: np.ndarray, affine: np.ndarray | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, np.diag([1.5, 1.5, 10.0, 1.0]) if affine is None else affine), str(path))
    return path


def _acdc(root: Path, info: str = "ED: 1\nES: 3\nGroup: NOR\nNbFrame: 4\n") -> Path:
    rng = np.random.default_rng(0)
    for patient in ("patient001", "patient002"):
        folder = root / patient
        for number in (1, 3):
            _nifti(folder / f"{patient}_frame{number:02d}.nii.gz", rng.random((6, 5, 3)).astype(np.float32))
            _nifti(folder / f"{patient}_frame{number:02d}_gt.nii.gz", rng.integers(0, 4, (6, 5, 3)).astype(np.uint8))
        _nifti(folder / f"{patient}_4d.nii.gz", rng.random((6, 5, 3, 4)).astype(np.float32))
        (folder / "Info.cfg").write_text(info)
    return root


def _copy_subject(phantom: Path, root: Path) -> Path:
    shutil.copytree(phantom / "sub000", root / "sub000")
    return root / "sub000"


def test_ukbb_import_of_a_phantom(phantom):
    manifest = import_dataset(phantom)  # the written dataset.json
    again = import_ukbb(phantom)
    assert manifest.model_dump() == again.model_dump()
    assert manifest.subjects() == ["sub000", "sub001", "sub002"] and manifest.source == "ukbb"
    case = manifest.cases[1]
    assert (case.id, case.image, case.label, case.phase, case.frame) == ("sub000_t01", "sub000/sa.nii.gz", "sub000/sa_gt.nii.gz", 1, 1)
    assert set(lax_views(phantom / "sub000")) == {"2ch", "3ch", "4ch"}
    assert manifest.cine["sub000"]["ed"] == 0 and manifest.cine["sub000"]["es"] == 1  # type: ignore[attr-defined]


def test_ukbb_layout_is_detected_without_a_manifest(phantom, tmp_path):
    _copy_subject(phantom, tmp_path)
    manifest = import_dataset(tmp_path)
    assert manifest.source == "ukbb" and len(manifest.cases) == FRAMES
    assert manifest.labels == {"0": "background", "1": "lv_blood_pool", "2": "lv_myocardium", "3": "rv_blood_pool"}  # UKB's own


def test_sax_slices_keep_subjects_in_one_split(phantom):
    manifest = import_ukbb(phantom)
    views = {split: sax_slices(manifest, split, val_fraction=0.34, test_fraction=0.34, seed=0) for split in ("train", "val", "test")}
    subjects = {split: {s.subject for s in items} for split, items in views.items()}
    assert all(subjects.values()) and sum(len(s) for s in subjects.values()) == 3  # every subject in exactly one split
    every = sax_slices(manifest)
    assert len(every) == sum(len(v) for v in views.values())
    sa, affine = (lambda im: (np.asarray(im.dataobj), im.affine))(nib.load(str(phantom / "sub001/sa.nii.gz")))
    item = next(s for s in every if s.subject == "sub001" and s.frame == 1 and s.slice_index == 2)
    assert np.array_equal(item.image, sa[:, :, 2, 1])
    assert set(np.unique(item.label)) <= {0, 7, 8, 9} and (item.label == 8).any()
    assert np.allclose(item.affine @ [3, 4, 0, 1], affine @ [3, 4, 2, 1])  # the slice's own affine


def test_acdc_import_reads_ed_and_es_from_info(tmp_path):
    src = _acdc(tmp_path / "acdc")
    manifest = import_dataset(src)
    assert manifest.source == "acdc" and manifest.labels == ACDC_LABELS
    assert [(c.id, c.phase, c.label) for c in manifest.cases[:2]] == [
        ("patient001_frame01", 0, "patient001/patient001_frame01_gt.nii.gz"), ("patient001_frame03", 2, "patient001/patient001_frame03_gt.nii.gz")]
    assert manifest.cine["patient002"] == {"frames": 4, "ed": 0, "es": 2, "views": []}  # type: ignore[attr-defined]
    slices = sax_slices(manifest)
    assert len(slices) == 4 * 3 and slices[0].image.shape == (6, 5)
    assert np.array_equal(slices[4].label, np.asarray(nib.load(str(src / "patient001/patient001_frame03_gt.nii.gz")).dataobj)[:, :, 1])


def test_acdc_info_without_es_is_refused(tmp_path):
    src = _acdc(tmp_path, info="ED: 1\nGroup: NOR\n")
    with pytest.raises(BadInputError, match=r"Info.cfg: has no ES frame"):
        import_acdc(src)


def test_acdc_missing_frame_is_refused(tmp_path):
    src = _acdc(tmp_path, info="ED: 1\nES: 2\n")
    with pytest.raises(BadInputError, match=r"patient001_frame02.nii.gz: frame 2 named in Info.cfg not found"):
        import_acdc(src)


@pytest.mark.parametrize(("name", "shape", "problem"), [
    ("sa.nii.gz", (16, 16, 1, FRAMES), "has one slice"),
    ("la_4ch.nii.gz", (16, 16, 1, FRAMES + 1), f"has {FRAMES + 1} frame\\(s\\); its SAX stack sa.nii.gz has {FRAMES}"),
    ("la_2ch.nii.gz", (16, 16, 3, FRAMES), "is not a single plane"),
])
def test_bad_ukbb_files_are_named(phantom, tmp_path, name, shape, problem):
    subject = _copy_subject(phantom, tmp_path)
    _nifti(subject / name, np.zeros(shape, dtype=np.float32))
    with pytest.raises(BadInputError, match=problem) as error:
        import_ukbb(tmp_path)
    assert error.value.path == subject / name and "\n" not in str(error.value)


def test_ukbb_labels_on_another_grid_are_named(phantom, tmp_path):
    subject = _copy_subject(phantom, tmp_path)
    sax = nib.load(str(subject / "sa.nii.gz"))
    shifted = sax.affine.copy()
    shifted[:3, 3] += [0.0, 0.0, 5.0]  # same shape, half a slice away
    _nifti(subject / "sa_gt.nii.gz", np.zeros(sax.shape, dtype=np.uint8), shifted)
    with pytest.raises(BadInputError, match="affine differs from its image sa.nii.gz") as error:
        import_ukbb(tmp_path)
    assert error.value.path == subject / "sa_gt.nii.gz"
