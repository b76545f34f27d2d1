"""Fault injection on data through the CLI (issue 17): every check before the first write, refused empty phases,
dropped subjects named, bounded reading of headers and gzip streams, dataset.json paths kept inside the dataset,
and Lightning's notices in the run's log instead of stderr."""

from __future__ import annotations

import gzip
import json
import os
import pickle
import shutil
import subprocess
import sys
import tracemalloc
import zipfile
import zlib
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import torch

from medsynth import api
from medsynth.cli import main
from medsynth.config import load_config
from medsynth.data.io import load_image, save_image
from medsynth.errors import BadInputError, MedsynthError
from medsynth.motion.bspline import BSplineTransform
from medsynth.recipes.motion_ldm import MotionLDMRecipe
from medsynth.runs import atomic_write_json

SRC = Path(__file__).resolve().parents[1] / "src"


def cli(capsys, *argv: object) -> tuple[int, list[str]]:
    """``medsynth ARGV`` in this process: the exit status (argument errors included) and the lines on stderr (no traceback)."""
    try:
        code = main([str(arg) for arg in argv])
    except SystemExit as exit:  # argparse refuses an argument
        code = exit.code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err.splitlines()


# -- 4: every check before the first write: motion-ldm's registration grids ----------------------------------


@pytest.fixture(scope="module")
def lung(tmp_path_factory) -> tuple[Path, Path]:
    """A prepared two-subject, two-phase lung phantom and its raw folder."""
    root = tmp_path_factory.mktemp("lung")
    raw = api.phantom("lung", root / "raw", n=2, seed=0, size=32, frames=2, progress=False)
    return raw, api.prepare(raw, root / "prepared", recipe="motion-ldm", ct_window=(-1000.0, 500.0), seed=0, progress=False)


def write_registration(raw: Path, out: Path, subjects: dict[str, str] | None = None) -> Path:
    """Zero control grids of phase 1 fitted on each raw subject's phase-1 image (``subjects``: name -> raw subject)."""
    subjects = subjects or {"sub000": "sub000", "sub001": "sub001"}
    for name, source in subjects.items():
        image = nib.load(str(raw / source / "image_t01.nii.gz"))
        shape = tuple(int(n) for n in image.shape[:3])
        grid = BSplineTransform.grid_shape(shape, (4.0, 4.0, 4.0))
        BSplineTransform(torch.zeros(3, *grid), (4.0, 4.0, 4.0), shape, image.affine).save(out / name / "grid_t01.npz")
    atomic_write_json(out / "registration.json", {"pairs": "reference", "reference_phase": 0,
                                                  "subjects": {name: {"phases": [0, 1], "source": []} for name in subjects}})
    return out


def train_motion_ldm(capsys, prepared: Path, registration: Path, out: Path) -> tuple[int, list[str]]:
    return cli(capsys, "train", "motion-ldm", "--data", prepared, "--config", "motion-ldm-tiny", "--set", f"data.registration={registration}",
               "--set", "train.num_threads=1", "--no-progress", "--out", out)


class Bomb:
    """A pickle that would create ``marker`` when unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def test_bad_registration_grids_are_refused_before_the_run_folder_exists(capsys, lung, tmp_path):
    raw, prepared = lung
    good = write_registration(raw, tmp_path / "good")
    config = load_config(MotionLDMRecipe.config_class, "motion-ldm-tiny", [f"data.registration={good}"],
                         base={"recipe": "motion-ldm", "data_dir": str(prepared)})
    MotionLDMRecipe().check_data(MotionLDMRecipe().resolve_config(config))  # good grids pass

    other = write_registration(raw, tmp_path / "other", {"sub900": "sub000", "sub901": "sub001"})  # another dataset's subjects
    code, err = train_motion_ldm(capsys, prepared, other, tmp_path / "run")
    assert code == 2 and len(err) == 1 and "has no grids for 2 of the 2 subjects" in err[0] and "sub000" in err[0], err

    pickled = write_registration(raw, tmp_path / "pickled")
    marker = tmp_path / "unpickled"
    (pickled / "sub001" / "grid_t01.npz").write_bytes(pickle.dumps(Bomb(marker)))
    code, err = train_motion_ldm(capsys, prepared, pickled, tmp_path / "run")
    assert code == 2 and len(err) == 1 and "sub001/grid_t01.npz: cannot read control grid" in err[0], err
    assert not marker.exists()

    nan = write_registration(raw, tmp_path / "nan")
    with np.load(nan / "sub000" / "grid_t01.npz") as arrays:
        broken = {key: arrays[key] for key in arrays.files}
    broken["coefficients"] = np.full_like(broken["coefficients"], np.nan)
    np.savez(nan / "sub000" / "grid_t01.npz", **broken)
    code, err = train_motion_ldm(capsys, prepared, nan, tmp_path / "run")
    assert code == 2 and len(err) == 1 and "sub000/grid_t01.npz: control grid holds NaN or Inf" in err[0], err

    moved = write_registration(raw, tmp_path / "moved")  # a grid of another scan: its image 500 mm away
    with np.load(moved / "sub000" / "grid_t01.npz") as arrays:
        shifted = {key: arrays[key] for key in arrays.files}
    shifted["affine"] = shifted["affine"] + np.pad(np.array([[500.0], [0.0], [0.0]]), ((0, 1), (3, 0)))
    np.savez(moved / "sub000" / "grid_t01.npz", **shifted)
    code, err = train_motion_ldm(capsys, prepared, moved, tmp_path / "run")
    assert code == 2 and len(err) == 1 and "does not cover subject sub000's prepared volume" in err[0], err

    (good / "sub001" / "grid_t01.npz").unlink()
    code, err = train_motion_ldm(capsys, prepared, good, tmp_path / "run")
    assert code == 2 and len(err) == 1 and "sub001/grid_t01.npz: missing" in err[0], err
    assert not (tmp_path / "run").exists()  # nothing written: a retry with good data starts cleanly


def test_a_missing_prepared_case_file_is_refused_before_the_first_write(capsys, lung, tmp_path):
    _, prepared = lung
    copy = Path(shutil.copytree(prepared, tmp_path / "prepared"))
    next((copy / "cases").glob("*.npz")).unlink()
    code, err = cli(capsys, "train", "motion-ldm", "--data", copy, "--config", "motion-ldm-tiny", "--no-progress", "--out", tmp_path / "run")
    assert code == 2 and len(err) == 1 and "prepared case file missing (1 of 4 missing)" in err[0], err
    assert not (tmp_path / "run").exists()


# -- 5: empty or out-of-range phases ------------------------------------------------------------------------


def test_empty_phases_are_refused_in_one_line(capsys, tmp_path):
    code, err = cli(capsys, "sample", tmp_path, "--condition", tmp_path / "ct.nii.gz", "--phases", "")
    assert code == 2 and err == ["medsynth sample: error: argument --phases: empty; give 'all' or phases such as 3,5 (see medsynth sample --help)"]
    module = SimpleNamespace(config=SimpleNamespace(model=SimpleNamespace(phases=3)))
    with pytest.raises(MedsynthError, match=r"--phases: empty; give 'all' or phases such as 0,2 \(trained phases 0..2\)"):
        MotionLDMRecipe().requested_phases(module, [])
    with pytest.raises(MedsynthError, match=r"--phases 3: outside the trained phases 0..2"):
        MotionLDMRecipe().requested_phases(module, [1, 3])


# -- 6: prepare names every subject it drops --------------------------------------------------------------


def write_nifti(path: Path, shape: tuple[int, ...], value: float = 0.0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.full(shape, value, np.float32)
    array[(slice(1, 3),) * 3] = 1.0  # not constant
    nib.save(nib.Nifti1Image(array, np.diag([1.5, 1.5, 8.0, 1.0])), str(path))


def test_prepare_names_each_subject_it_leaves_out(capsys, tmp_path):
    ukbb = tmp_path / "ukbb"
    for subject in ("s1", "s2"):
        write_nifti(ukbb / subject / "sa.nii.gz", (8, 8, 3, 2))
    write_nifti(ukbb / "s3" / "la_2ch.nii.gz", (8, 8, 1, 2))  # no sa.nii.gz
    code, err = cli(capsys, "prepare", ukbb, "--out", tmp_path / "prepared", "--recipe", "diffae", "--size", "8", "--no-progress")
    assert code == 0, err
    assert f"prepare: subject s3 left out: no {ukbb / 's3' / 'sa.nii.gz'}" in err
    subjects = {case["subject"] for case in json.loads((tmp_path / "prepared" / "dataset.json").read_text())["cases"]}
    assert subjects == {"s1", "s2"}

    from medsynth.data.importers import import_dataset

    acdc = tmp_path / "acdc"
    write_nifti(acdc / "patient001" / "patient001_frame01.nii.gz", (8, 8, 3))
    (acdc / "patient001" / "Info.cfg").write_text("ED: 1\nES: 1\n")
    write_nifti(acdc / "patient002" / "patient002_frame01.nii.gz", (8, 8, 3))  # no Info.cfg
    assert [case.subject for case in import_dataset(acdc).cases] == ["patient001"]
    assert capsys.readouterr().err.splitlines() == [f"prepare: subject patient002 left out: no {acdc / 'patient002' / 'Info.cfg'}"]

    nnunet = tmp_path / "nnunet"
    write_nifti(nnunet / "imagesTr" / "a_0000.nii.gz", (8, 8, 3))
    write_nifti(nnunet / "labelsTr" / "a.nii.gz", (8, 8, 3))
    write_nifti(nnunet / "labelsTr" / "b.nii.gz", (8, 8, 3))  # a label without its image
    (nnunet / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": {"background": 0, "x": 1}, "file_ending": ".nii.gz"}))
    assert [case.id for case in import_dataset(nnunet).cases] == ["a"]
    assert capsys.readouterr().err.splitlines() == [
        f"prepare: label {nnunet / 'labelsTr' / 'b.nii.gz'} left out: no image {nnunet / 'imagesTr' / 'b_0000.nii.gz'}"]


# -- 7: bounded reading ------------------------------------------------------------------------------------------


def nifti_header(shape: tuple[int, ...]) -> bytes:
    """A single-file NIfTI-1 header (352 bytes with the extension flag) claiming ``shape`` float32."""
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(np.float32)
    header["vox_offset"] = 352
    return header.binaryblock + b"\0" * 4


def peak_bytes(action) -> int:
    """The peak of Python and NumPy allocations (tracemalloc) while ``action()`` runs."""
    tracemalloc.start()
    try:
        action()
    except BadInputError:
        pass
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak


def test_a_tiny_file_claiming_gigabytes_is_refused_without_allocating(capsys, tmp_path):
    claim = (512, 512, 2000)  # 2.1 GB of float32, within the voxel bound
    compressed = gzip.compress(nifti_header(claim), mtime=0)
    assert len(compressed) < 100  # the 88-byte file
    for name, data, holds in (("tiny.nii", nifti_header(claim), "holds 352 bytes"), ("tiny.nii.gz", compressed, "expands to 352 bytes")):
        path = tmp_path / name
        path.write_bytes(data)
        code, err = cli(capsys, "render", path, "--out", tmp_path / "x.gif")
        assert code == 2 and err == [f"medsynth: error: {path}: header claims 512x512x2000 voxels (2.1 GB) but the file {holds} "
                                     "(truncated or corrupt)"], err
        assert peak_bytes(lambda path=path: load_image(path)) < 100e6
    npy = tmp_path / "tiny.npy"
    with open(npy, "wb") as stream:
        np.lib.format.write_array_header_1_0(stream, {"descr": "<f4", "fortran_order": False, "shape": claim})
    with pytest.raises(BadInputError, match=r"tiny.npy: header claims 512x512x2000 voxels \(2.1 GB\) but the file holds 128 bytes"):
        load_image(npy)
    npz = tmp_path / "tiny.npz"
    with zipfile.ZipFile(npz, "w") as archive:  # a member whose array header claims 2.1 GB
        archive.writestr("image.npy", npy.read_bytes())
    with pytest.raises(BadInputError, match=r"tiny.npz\[image.npy\]: header claims 512x512x2000 voxels \(2.1 GB\) but the file holds 128"):
        load_image(npz)
    assert not (tmp_path / "x.gif").exists()


def gzip_bomb(path: Path, header: bytes, zeros: int) -> Path:
    """``header`` then ``zeros`` zero bytes, gzip-compressed in chunks (a few hundred kB on disk)."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)  # wbits 31: a gzip stream
    chunk = bytes(1 << 24)
    with open(path, "wb") as stream:
        stream.write(compressor.compress(header))
        for _ in range(zeros // len(chunk)):
            stream.write(compressor.compress(chunk))
        stream.write(compressor.flush())
    return path


def test_gzip_expansion_is_bounded_and_a_normal_file_still_reads(capsys, tmp_path):
    # A header past the voxel bound (--max-voxels) is refused before anything is decompressed.
    bomb = gzip_bomb(tmp_path / "bomb.nii.gz", nifti_header((4096, 4096, 200)), 256 << 20)
    assert bomb.stat().st_size < 1 << 20
    code, err = cli(capsys, "render", bomb, "--out", tmp_path / "x.gif")
    assert code == 2 and len(err) == 1 and "header claims 4096x4096x200 voxels (13.4 GB), more than the bound of 2147483648 voxels" in err[0], err
    assert peak_bytes(lambda: load_image(bomb)) < 100e6
    # A small claim followed by 256 MB of zeros: decompression stops at the claim.
    small = gzip_bomb(tmp_path / "small.nii.gz", nifti_header((16, 16, 16)), 256 << 20)
    peak = peak_bytes(lambda: load_image(small))
    assert peak < 100e6
    assert load_image(small).shape == (1, 16, 16, 16)
    # --max-voxels (after or before the command) bounds an ordinary file; without it the file reads as written.
    volume = np.random.default_rng(0).random((1, 16, 16, 16), dtype=np.float32)
    path = save_image(volume, tmp_path / "normal.nii.gz", affine=np.diag([0.7, 0.8, 2.5, 1.0]))
    for argv in (("render", path, "--out", tmp_path / "y.gif", "--max-voxels", 4000), ("--max-voxels", 4000, "render", path, "--out", tmp_path / "y.gif")):
        code, err = cli(capsys, *argv)
        assert code == 2 and len(err) == 1 and "header claims 16x16x16 voxels (1.64e-05 GB), more than the bound of 4000 voxels" in err[0], err
    assert "MEDSYNTH_MAX_VOXELS" not in os.environ  # set for the command only
    image = load_image(path)
    assert np.array_equal(image.numpy(), volume) and np.allclose(image.affine.numpy(), np.diag([0.7, 0.8, 2.5, 1.0]))


# -- 7: dataset.json paths stay inside the dataset ------------------------------------------------------------


def test_dataset_json_paths_outside_the_dataset_are_refused_unless_allowed(capsys, tmp_path):
    from medsynth.data.importers import import_class_folders

    raw = api.phantom("cilia", tmp_path / "raw", n=2, seed=0, size=32, progress=False)
    import_class_folders(raw).save(raw)  # a medsynth dataset.json listing the cases
    description = json.loads((raw / "dataset.json").read_text())
    first = description["cases"][0]
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shutil.copy(raw / first["image"], outside / "x.png")
    (raw / "link.png").symlink_to(outside / "x.png")
    for path, problem in (("../elsewhere/x.png", "climbs out with '..'"), (str(outside / "x.png"), "is an absolute path"),
                          ("link.png", f"is a symlink to {str(outside / 'x.png')!r}")):
        (raw / "dataset.json").write_text(json.dumps({**description, "cases": [{**first, "image": path}, *description["cases"][1:]]}))
        code, err = cli(capsys, "prepare", raw, "--out", tmp_path / "prepared", "--size", "32", "--no-progress")
        assert code == 2 and err == [f"medsynth: error: {raw / 'dataset.json'}: case {first['id']!r} image {path!r} {problem}, outside the "
                                     "dataset folder; pass --allow-outside (or set MEDSYNTH_ALLOW_OUTSIDE=1) to read it"], err
        assert not (tmp_path / "prepared").exists()
    code, err = cli(capsys, "prepare", raw, "--out", tmp_path / "prepared", "--size", "32", "--no-progress", "--allow-outside")
    assert code == 0, err
    # A prepared dataset edited to name a file outside it is refused by train before anything is written.
    prepared = json.loads((tmp_path / "prepared" / "dataset.json").read_text())
    prepared["cases"][0]["image"] = str(tmp_path / "prepared" / prepared["cases"][0]["image"])
    (tmp_path / "prepared" / "dataset.json").write_text(json.dumps(prepared))
    code, err = cli(capsys, "train", "cvae", "--data", tmp_path / "prepared", "--config", "cvae-tiny", "--out", tmp_path / "run", "--no-progress")
    assert code == 2 and len(err) == 1 and "is an absolute path, outside the dataset folder" in err[0], err
    assert not (tmp_path / "run").exists()


# -- 9: one console -------------------------------------------------------------------------------------------------


def test_lightning_notices_go_to_the_run_log_and_a_divergence_is_the_only_line(tmp_path):
    raw = api.phantom("cilia", tmp_path / "raw", n=2, seed=0, size=32, progress=False)
    prepared = api.prepare(raw, tmp_path / "prepared", recipe="cvae", progress=False, size=32, normalize="none", seed=0)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "medsynth.cli", "train", "cvae", "--data", str(prepared), "--config", "cvae-tiny",
                           "--set", "model.channels=[8, 16]", "--set", "model.strides=[2, 2]", "--set", "model.latent_size=4",
                           "--set", "model.embed_dim=4", "--set", "train.batch_size=4", "--set", "train.num_threads=1",
                           "--set", "train.lr=1e6", "--no-progress", "--out", str(out)], capture_output=True, text=True, env=env, timeout=300)
    lines = done.stderr.splitlines()
    assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith("medsynth: error: training diverged: "), done.stderr
    log = (out / "train.log").read_text()
    assert "GPU available" in log and "litlogger" in log  # Lightning's banner and tip, kept in the run's log
