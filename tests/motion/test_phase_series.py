"""Phase-series registration: layouts, pairings, composition of consecutive fields, resume, batches, devices, bad input."""

from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch

from medsynth import api
from medsynth.data.datasets import load_split
from medsynth.data.io import load_image
from medsynth.data.phantoms.lung import make_lung_dataset
from medsynth.errors import BadInputError
from medsynth.motion.bspline import BSplineTransform, _cubic_bspline_matrix, load_transform
from medsynth.motion.fields import compose, end_point_error, invert, load_field, voxel_to_mm
from medsynth.motion.phase_series import PhaseData, phase_fields, register_dataset
from medsynth.motion.registration import RegistrationConfig
from medsynth.runs import atomic_write_json

TINY = RegistrationConfig(levels=1, iterations=3)
# Follows the phantom's breathing at 32 x 32 x 16 (11 x 8 x 16 mm voxels) in a few seconds; MSE: the phases share
# their intensities (LNCC's consecutive steps erred more: phase 3 composed 3.6 mm against 1.7 mm direct).
PHANTOM = RegistrationConfig(levels=2, iterations=(60, 30), control_spacing_mm=20.0, similarity="mse")


@pytest.fixture(scope="module")
def breathing(tmp_path_factory):
    """A lung phantom with 4 phases (0 end-inhale, 2 end-exhale), its exact fields and lung mask."""
    data = make_lung_dataset(tmp_path_factory.mktemp("lung") / "lung", n=1, size=(32, 32, 16), frames=4)
    exact = [load_field(data / f"sub000/dvf_t{t:02d}.nii.gz") for t in range(4)]
    body = load_image(data / "sub000/label_t00.nii.gz")[0] > 0
    return data, exact, body


@pytest.fixture
def lung_dataset(tmp_path):
    return make_lung_dataset(tmp_path / "lung", n=2, frames=3, size=(24, 24, 12), seed=2)


def _epe(field, truth, body) -> float:
    return end_point_error(field, truth.as_tensor(), truth.affine, body)


def test_consecutive_fields_compose_to_each_phase(tmp_path, breathing):
    data, exact, body = breathing
    register_dataset(data, tmp_path / "direct", PHANTOM, progress=False)
    results = register_dataset(data, tmp_path / "steps", PHANTOM, progress=False, pairs="consecutive")
    names = [(r.fixed.split("/")[-1], r.moving.split("/")[-1]) for r in results]
    assert names == [(f"image_t{t:02d}.nii.gz", f"image_t{t - 1:02d}.nii.gz") for t in (1, 2, 3)]
    record = json.loads((tmp_path / "steps" / "registration.json").read_text())
    assert record["pairs"] == "consecutive" and record["reference_phase"] == 0
    assert record["subjects"]["sub000"]["phases"] == [0, 1, 2, 3]
    assert [p.split("/")[-1] for p in record["subjects"]["sub000"]["source"]] == [f"image_t{t:02d}.nii.gz" for t in range(4)]

    direct, composed = phase_fields(tmp_path / "direct", "sub000"), phase_fields(tmp_path / "steps", "sub000")
    assert composed.shape == (4, 3, 32, 32, 16) and np.allclose(composed.affine, exact[0].affine)
    assert composed[0].abs().max() == 0 and torch.equal(composed[1], direct[1])  # phase 1 is the same pair in both modes
    steps = [load_transform(tmp_path / "steps" / f"sub000/grid_t{t:02d}.npz")[0].dense_field().as_tensor() for t in (1, 2, 3)]
    # The registration's own error: each step's error against the exact step field
    # v_t = compose(invert(u_{t-1}), u_t) (measured 1.46, 1.64, 1.39 mm).
    truth = [e.as_tensor() for e in exact]
    step_errors = [end_point_error(v, compose(invert(truth[t - 1]), truth[t]), exact[0].affine, body) for t, v in zip((1, 2, 3), steps)]
    for t in (2, 3):  # measured direct / composed: 3.10 / 3.06 mm and 1.56 / 1.64 mm (zero field 6.76 and 3.74 mm)
        epe_direct, epe_composed = _epe(direct[t], exact[t], body), _epe(composed[t], exact[t], body)
        assert epe_direct < 0.6 * _epe(torch.zeros_like(truth[t]), exact[t], body)  # the registration follows the phantom
        assert abs(epe_composed - epe_direct) < 0.2 * min(step_errors)  # reaching phase t in steps costs little
    # With one-voxel motion, adding misses only grad(u) . v (measured 0.02 mm worse here), far below this
    # registration's error: the next test shows it on the exact fields. Here it must not beat composing.
    assert _epe(steps[0] + steps[1] + steps[2], exact[3], body) >= epe_composed - 0.01


def _fit_grid(field: torch.Tensor) -> torch.Tensor:
    """B-spline coefficients (one control point per voxel) reproducing ``field`` (3, X, Y, Z) exactly.

    With one control point per voxel each axis' basis matrix (n, n + 3) has full row rank, so its
    pseudo-inverse interpolates; the tensor product's pseudo-inverse is the product of the axes'.
    """
    values = field.double()
    for axis, n in enumerate(field.shape[1:]):
        basis = _cubic_bspline_matrix(torch.arange(n, dtype=torch.float64), 1.0, n + 3)
        values = torch.movedim(torch.tensordot(values, torch.linalg.pinv(basis), dims=([axis + 1], [1])), -1, axis + 1)
    return values.float()


def test_composition_against_adding_on_the_exact_phantom_fields(tmp_path, breathing):
    """phase_fields on grids that hold the exact step fields: composing reaches phase 3, adding does not."""
    _, exact, body = breathing
    truth = [e.as_tensor() for e in exact]
    affine = np.asarray(exact[0].affine, dtype=np.float64)
    out = tmp_path / "exact"
    steps = {}
    for t in (1, 2, 3):
        steps[t] = compose(invert(truth[t - 1]), truth[t])  # warp phase t-1 onto phase t
        transform = BSplineTransform(_fit_grid(steps[t]), (1.0, 1.0, 1.0), tuple(truth[t].shape[1:]), affine)
        assert torch.allclose(transform.dense_field().as_tensor(), steps[t], atol=1e-4)
        transform.save(out / "sub000" / f"grid_t{t:02d}.npz")
    atomic_write_json(out / "registration.json", {"pairs": "consecutive", "reference_phase": 0, "subjects": {"sub000": {"phases": [0, 1, 2, 3], "source": []}}})
    fields = phase_fields(out, "sub000")
    assert torch.allclose(fields[3], compose(compose(steps[1], steps[2]), steps[3]), atol=1e-5)
    composed = _epe(fields[3], exact[3], body)
    added = _epe(steps[1] + steps[2] + steps[3], exact[3], body)
    swapped = _epe(compose(steps[3], compose(steps[2], steps[1])), exact[3], body)  # composing in the wrong order
    # Composing leaves only interpolation error (measured 0.09 mm); adding drops the second-order term
    # grad(u_{t-1}) . v_t (measured 0.19 mm, 2x): a margin of 0.05 mm is 5x float and resampling noise here.
    assert composed < 0.12 and added > composed + 0.05 and added > 1.5 * composed
    assert swapped > composed + 0.05

    # Below the reference (here 2) phase t is fixed and t + 1 moving: phase 0 is reached by composing downwards.
    down = tmp_path / "down"
    for t in (0, 1, 3):
        step = compose(invert(truth[t + 1]), truth[t]) if t < 2 else steps[3]
        BSplineTransform(_fit_grid(step), (1.0, 1.0, 1.0), tuple(step.shape[1:]), affine).save(down / "sub000" / f"grid_t{t:02d}.npz")
    atomic_write_json(down / "registration.json", {"pairs": "consecutive", "reference_phase": 2, "subjects": {"sub000": {"phases": [0, 1, 2, 3], "source": []}}})
    fields = phase_fields(down, "sub000")
    assert fields[2].abs().max() == 0
    for t in (0, 3):  # the exact field from phase 2 to phase t
        assert end_point_error(fields[t], compose(invert(truth[2]), truth[t]), affine, body) < 0.12


def test_subject_folders_layout_with_reference_phase_in_the_middle(tmp_path, lung_dataset):
    data = tmp_path / "folders"
    shutil.copytree(lung_dataset, data, ignore=shutil.ignore_patterns("dataset.json", "params.json"))
    for t, name in enumerate(["image_t00", "image_t01", "image_t02"]):  # natural order: 2 < 10
        (data / "sub001" / f"{name}.nii.gz").rename(data / "sub001" / f"image_{[2, 9, 10][t]}.nii.gz")
    results = register_dataset(data, tmp_path / "out", TINY, progress=False, reference_phase=1, pairs="consecutive")
    assert [r.output.relative_to(tmp_path / "out").as_posix() for r in results] == ["sub000/grid_t00.npz", "sub000/grid_t02.npz", "sub001/grid_t00.npz", "sub001/grid_t02.npz"]
    assert results[0].fixed.endswith("sub000/image_t00.nii.gz") and results[0].moving.endswith("sub000/image_t01.nii.gz")  # below the reference: t+1 moves
    assert results[3].fixed.endswith("sub001/image_10.nii.gz") and results[3].moving.endswith("sub001/image_9.nii.gz")
    record = json.loads((tmp_path / "out" / "registration.json").read_text())
    assert record["reference_phase"] == 1 and [p.split("/")[-1] for p in record["subjects"]["sub001"]["source"]] == ["image_2.nii.gz", "image_9.nii.gz", "image_10.nii.gz"]
    fields = phase_fields(tmp_path / "out", "sub001")
    grid = {t: load_transform(tmp_path / "out" / f"sub001/grid_t{t:02d}.npz")[0].dense_field().as_tensor() for t in (0, 2)}
    assert fields[1].abs().max() == 0 and torch.allclose(fields[0], compose(fields[1], grid[0])) and torch.allclose(fields[2], grid[2], atol=1e-6)


def test_dataset_mode_resumes_after_a_kill(tmp_path, lung_dataset):
    out = tmp_path / "registered"

    def kill_after_first(result):
        raise KeyboardInterrupt  # the job dies after its first registration was written

    with pytest.raises(KeyboardInterrupt):
        register_dataset(lung_dataset, out, TINY, progress=False, callback=kill_after_first)
    first = out / "sub000" / "grid_t01.npz"
    assert first.exists() and len(list(out.rglob("*.npz"))) == 1
    stamp = first.stat().st_mtime_ns

    results = register_dataset(lung_dataset, out, TINY, progress=False)
    assert [r.output.relative_to(out).as_posix() for r in results] == ["sub000/grid_t01.npz", "sub000/grid_t02.npz", "sub001/grid_t01.npz", "sub001/grid_t02.npz"]
    assert [r.skipped for r in results] == [True, False, False, False]
    assert first.stat().st_mtime_ns == stamp  # not redone
    assert not list(out.rglob(".*tmp*"))  # no half-written files
    transform, extra = load_transform(results[1].output)
    assert extra["fixed"].endswith("sub000/image_t02.nii.gz") and extra["moving"].endswith("sub000/image_t00.nii.gz")
    assert transform.dense_field().shape == (3, 24, 24, 12)
    with pytest.raises(BadInputError, match=r"registration.json: grids here were made with other settings \(pairs: reference -> consecutive\)"):
        register_dataset(lung_dataset, out, TINY, progress=False, pairs="consecutive")


def test_dataset_mode_reads_4d_files(tmp_path, lung_dataset):
    frames = [nib.load(str(lung_dataset / f"sub000/image_t{t:02d}.nii.gz")) for t in range(3)]
    data = tmp_path / "scans"
    data.mkdir()
    nib.save(nib.Nifti1Image(np.stack([np.asarray(f.dataobj) for f in frames], axis=-1), frames[0].affine), str(data / "case1.nii.gz"))
    results = register_dataset(data, tmp_path / "out", TINY, progress=False)
    assert [r.output.name for r in results] == ["grid_t01.npz", "grid_t02.npz"]
    assert results[0].fixed.endswith("case1.nii.gz[phase 1]")
    assert json.loads((tmp_path / "out" / "registration.json").read_text())["subjects"]["case1"]["source"] == [str(data / "case1.nii.gz")]


def test_a_batch_and_two_workers_give_the_one_by_one_grids(tmp_path, lung_dataset):
    one = register_dataset(lung_dataset, tmp_path / "one", TINY, progress=False)
    batched = register_dataset(lung_dataset, tmp_path / "batched", TINY, progress=False, batch=3)
    workers = register_dataset(lung_dataset, tmp_path / "workers", TINY, progress=False, batch=2, devices=["cpu", "cpu"])
    for a, b, c in zip(one, batched, workers, strict=True):
        grid = load_transform(a.output)[0].coefficients
        assert torch.allclose(load_transform(b.output)[0].coefficients, grid, atol=1e-4)
        assert torch.allclose(load_transform(c.output)[0].coefficients, grid, atol=1e-4)
        assert b.output.name == a.output.name == c.output.name and a.after == pytest.approx(c.after, abs=1e-5)


def _save(array, path, affine=None):
    nib.save(nib.Nifti1Image(np.asarray(array, np.float32), np.eye(4) if affine is None else affine), str(path))
    return path


def test_dataset_mode_refuses_bad_input(tmp_path, lung_dataset):
    one_phase = tmp_path / "one"
    one_phase.mkdir()
    _save(np.zeros((8, 8, 8, 1)), one_phase / "scan.nii.gz")
    with pytest.raises(BadInputError, match="scan.nii.gz: 4D scan has only one phase"):
        register_dataset(one_phase, tmp_path / "out", TINY, progress=False)
    folders = tmp_path / "folders"
    (folders / "a").mkdir(parents=True)
    _save(np.zeros((8, 8, 8)), folders / "a" / "p0.nii.gz")
    with pytest.raises(BadInputError, match="p0.nii.gz: subject a has only 1 phase"):
        register_dataset(folders, tmp_path / "out", TINY, progress=False)
    _save(np.zeros((8, 8, 6)), folders / "a" / "p1.nii.gz")
    with pytest.raises(BadInputError, match=r"p1.nii.gz: phases of subject a differ from .*p0.nii.gz \(shape"):
        register_dataset(folders, tmp_path / "out", TINY, progress=False)
    _save(np.zeros((8, 8, 8)), folders / "a" / "p1.nii.gz", affine=np.diag([2.0, 1.0, 1.0, 1.0]))
    with pytest.raises(BadInputError, match=r"p1.nii.gz: phases of subject a differ from .*p0.nii.gz \(affine"):
        register_dataset(folders, tmp_path / "out", TINY, progress=False)
    manifest = json.loads((lung_dataset / "dataset.json").read_text())
    manifest["cases"] = [case for case in manifest["cases"] if not (case["subject"] == "sub001" and case["phase"] == 1)]
    (lung_dataset / "dataset.json").write_text(json.dumps(manifest))
    with pytest.raises(BadInputError, match="dataset.json: subject sub001 is missing phase"):
        register_dataset(lung_dataset, tmp_path / "out", TINY, progress=False)
    with pytest.raises(BadInputError, match="nothing: no dataset.json"):
        register_dataset(tmp_path / "nothing", tmp_path / "out", TINY, progress=False)


def test_phase_fields_refuses_unfinished_folders(tmp_path, lung_dataset):
    with pytest.raises(BadInputError, match="empty: no registration.json"):
        phase_fields(tmp_path / "empty", "sub000")
    out = tmp_path / "out"
    register_dataset(lung_dataset, out, TINY, progress=False)
    (out / "sub001" / "grid_t02.npz").unlink()
    with pytest.raises(BadInputError, match="sub001: missing grid_t02.npz"):
        phase_fields(out, "sub001")
    with pytest.raises(BadInputError, match="registration.json: no subject sub009"):
        phase_fields(out, "sub009")


def test_command_line_takes_pairs_batch_and_devices(capsys, tmp_path, lung_dataset):
    from medsynth.cli import main

    fast = ["--set", "levels=1", "--set", "iterations=3", "--no-progress"]
    out = tmp_path / "out"
    assert main(["register", "--data", str(lung_dataset), "--out", str(out), "--pairs", "consecutive", "--batch", "2", "--devices", "cpu", *fast]) == 0
    assert json.loads((out / "registration.json").read_text())["pairs"] == "consecutive"
    assert phase_fields(out, "sub001").shape == (3, 3, 24, 24, 12)
    capsys.readouterr()
    assert main(["register", "--data", str(lung_dataset), "--out", str(out), "--batch", "0", *fast]) == 2
    err = capsys.readouterr().err.strip()
    assert "batch must be at least 1" in err and len(err.splitlines()) == 1


@pytest.fixture(scope="module")
def prepared_series(tmp_path_factory):
    """A tiny lung phantom (2 subjects, 3 phases at 16 x 16 x 4), prepared for motion-ldm and registered to phase 0."""
    root = tmp_path_factory.mktemp("series")
    raw = make_lung_dataset(root / "raw", n=2, size=(16, 16, 4), frames=3)
    prepared = api.prepare(raw, root / "prepared", recipe="motion-ldm", progress=False, ct_window=(-1000.0, 500.0))
    registration = root / "registration"
    api.register(data=raw, out=registration, pairs="reference", progress=False, overrides=["levels=1", "iterations=3"])
    return raw, prepared, registration


def test_phase_data_fields_from_the_registration(prepared_series):
    raw, prepared, registration = prepared_series
    series = PhaseData(prepared, registration, 0, field_scale_mm=10)
    items = load_split(prepared, None)
    assert len(items) == 6
    for item in items:
        out = series(item)
        subject, phase = out["subject"], int(out["phase"])
        assert subject == item["id"].split("_")[0] and out["field"].shape == (3, 16, 16, 4)
        reference = next(other for other in items if other["id"] == f"{subject}_t00")
        assert torch.equal(out["reference"], reference["image"])  # the subject's reference-phase image (1, *S)
        registered = phase_fields(registration, subject)
        assert np.allclose(registered.affine, item["affine"])  # prepare kept the grid: no resampling in between
        expected = voxel_to_mm(registered.as_tensor()[phase].double(), item["affine"].numpy()).float()
        assert torch.allclose(out["field"] * 10, expected, atol=1e-4)  # world mm / field_scale_mm
        if phase == 0:
            assert out["field"].abs().max() == 0  # the reference phase does not move
        else:
            assert out["field"].abs().max() > 0
        assert torch.equal(out["image"], item["image"])  # the prepared item passes through


def test_phase_data_without_registration_uses_the_exact_motion(prepared_series, tmp_path):
    raw, prepared, _ = prepared_series
    series = PhaseData(prepared, None, 0, field_scale_mm=10)
    for item in load_split(prepared, None):
        subject, phase = item["id"].split("_")[0], int(item["phase"])
        exact_mm = np.asarray(nib.load(raw / subject / f"dvf_t{phase:02d}.nii.gz").dataobj)[..., 0, :]  # (X, Y, Z, 3) mm
        field = series(item)["field"]
        assert torch.allclose(field * 10, torch.from_numpy(np.moveaxis(exact_mm, -1, 0)).float(), atol=1e-3)
        assert torch.equal(series.true_field(item), item["flow"])  # judged against the exact motion, in voxels
        del item["flow"]
        with pytest.raises(BadInputError, match=rf"{prepared.name}.*case {item['id']} has no field: give the registration folder"):
            series(item)


def test_phase_data_groups_phases_by_subject(prepared_series):
    _, prepared, registration = prepared_series
    grouped = PhaseData(prepared, registration, 0, field_scale_mm=10).by_subject(["val", "train"])  # no val split: train
    assert sorted(grouped) == ["sub000", "sub001"]
    for subject, phases in grouped.items():
        assert sorted(phases) == [0, 1, 2]
        assert all(item["subject"] == subject and int(item["phase"]) == phase for phase, item in phases.items())
        assert torch.equal(phases[1]["reference"], phases[0]["image"])
    assert PhaseData(prepared, registration).by_subject(["val", "test"]) == {}
