"""Cine-MRI datasets: the UK Biobank and ACDC layouts, and a slice view of their SAX stacks.

- UK Biobank (and the cardiac phantom's ``views``): ``<src>/<subject>/sa.nii.gz`` (4D
  ``(X, Y, S, T)`` short-axis stack), optional ``sa_gt.nii.gz`` (labels on the same grid),
  ``la_2ch.nii.gz``, ``la_3ch.nii.gz``, ``la_4ch.nii.gz`` (single planes ``(X, Y, 1, T)``),
  optional ``Info.cfg`` (ED/ES) and an optional ``<src>/labels.json`` (value -> name; else
  the UK Biobank pipeline's 1 LV, 2 myocardium, 3 RV). One case per subject and frame: the
  case's ``image`` is the 4D file and its ``frame`` the index on the file's last axis.
- ACDC: ``<src>/patientNNN/patientNNN_frameNN.nii.gz`` (3D SAX stacks) with ``_gt`` labels
  and ``Info.cfg`` (``ED: 1``, ``ES: 12``; frame numbers 1-based). One case per subject for
  its ED and its ES frame.

Both manifests carry ``cine``: subject -> ``{"frames", "ed", "es", "views"}`` (0-based frame
indices, ``es`` ``None`` when unknown; ``views`` the LAX planes present, found by
:func:`lax_views` beside the subject's SAX file, so no path needs rebasing).
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from monai.data import MetaTensor

from medsynth.data.io import check_same_grid, load_image, nifti_header
from medsynth.data.manifest import Case, Manifest
from medsynth.data.splits import subject_splits
from medsynth.errors import BadInputError
from medsynth.runs import read_structured

SAX_NAME, SAX_LABEL_NAME, INFO_NAME, LABELS_NAME = "sa.nii.gz", "sa_gt.nii.gz", "Info.cfg", "labels.json"
_LAX_NAME = re.compile(r"^la_(?P<view>\w+?)\.nii(\.gz)?$")
# Label conventions: the UK Biobank segmentations (Bai et al., JCMR 2018) and ACDC's.
UKB_LABELS = {"0": "background", "1": "lv_blood_pool", "2": "lv_myocardium", "3": "rv_blood_pool"}
ACDC_LABELS = {"0": "background", "1": "rv_blood_pool", "2": "lv_myocardium", "3": "lv_blood_pool"}


class SaxSlice(NamedTuple):
    """One 2D SAX slice: ``image`` and ``label`` ``(X, Y)`` (label ``None`` without one), its 4x4 ``affine``
    (voxel ``(i, j, 0)`` -> world mm), the cardiac ``frame`` (0-based) and its ``slice_index`` in the stack."""

    subject: str
    frame: int
    slice_index: int
    image: np.ndarray
    label: np.ndarray | None
    affine: np.ndarray


def cine_header(path: Path) -> tuple[tuple[int, int, int, int], np.ndarray]:
    """``(X, Y, S, T)`` (``T = 1`` for a 3D file) and the 4x4 affine of a NIfTI header, without voxels.

    Raises:
        BadInputError: missing or unreadable file, or not 3D/4D (names it).
    """
    shape, affine = nifti_header(path)
    if len(shape) not in (3, 4):
        raise BadInputError(path, f"expected a 3D (X, Y, S) or 4D (X, Y, S, T) image, got shape {shape}")
    return (*shape, 1)[:4], affine  # type: ignore[return-value]


def lax_views(subject_dir: str | Path) -> dict[str, Path]:
    """The long-axis planes beside a subject's SAX file: ``{"2ch": <dir>/la_2ch.nii.gz, ...}``."""
    found = {}
    for path in sorted(Path(subject_dir).glob("la_*.nii*")):
        match = _LAX_NAME.match(path.name)
        if match is not None:
            found[match["view"]] = path
    return found


def read_info(path: Path, required: tuple[str, ...] = ()) -> dict[str, str]:
    """``key: value`` lines of an ACDC-style ``Info.cfg``.

    Raises:
        BadInputError: a ``required`` key is missing (names the file).
    """
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise BadInputError(path, f"cannot read ({exc.strerror})") from None
    info = {key.strip(): value.strip() for key, sep, value in (line.partition(":") for line in lines) if sep}
    missing = [key for key in required if key not in info]
    if missing:
        raise BadInputError(path, f"has no {' or '.join(missing)} frame (expected lines like 'ED: 1' and 'ES: 12')")
    return info


def _frame(info: dict[str, str], key: str, path: Path, first: int) -> int | None:
    """A 0-based frame index from Info.cfg (``first``: the file's first frame number, ``FirstFrame`` if given)."""
    if key not in info:
        return None
    try:
        return int(float(info[key])) - int(info.get("FirstFrame", first))
    except ValueError:
        raise BadInputError(path, f"{key} '{info[key]}' is not a frame number") from None


def _check_stack(path: Path, shape: tuple[int, ...]) -> None:
    if shape[2] < 2:
        raise BadInputError(path, f"has one slice (shape {shape}): a short-axis stack needs at least 2")


def _check_label(label: Path, shape: tuple[int, ...], image: Path) -> None:
    label_shape, label_affine = cine_header(label)
    check_same_grid(shape, cine_header(image)[1], label_shape, label_affine, label, image)


def _relative(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def _note_left_out(src: Path, kept: list[Path], missing: str) -> None:
    """One line per subject folder of ``src`` that is not imported (not in ``kept``), naming the file it lacks."""
    from medsynth.console import note

    for folder in sorted(p for p in src.iterdir() if p.is_dir() and not p.name.startswith(".") and p not in kept):
        note(f"prepare: subject {folder.name} left out: no {folder / missing}")


def import_ukbb(src: str | Path) -> Manifest:
    """A UK Biobank-layout folder (``<subject>/sa.nii.gz`` [+ ``sa_gt``, ``la_*``, ``Info.cfg``]).

    Raises:
        BadInputError: no subject, a SAX file with one slice, labels on another grid, a LAX
            file that is not a single plane or whose frame count differs from the SAX's
            (each names the file).
    """
    src = Path(src)
    subjects = sorted(p.parent for p in src.glob(f"*/{SAX_NAME}"))
    if not subjects:
        raise BadInputError(src, f"no <subject>/{SAX_NAME} (UK Biobank layout)")
    _note_left_out(src, subjects, SAX_NAME)
    cases, cine = [], {}
    for folder in subjects:
        sax = folder / SAX_NAME
        shape, _ = cine_header(sax)
        _check_stack(sax, shape)
        label = folder / SAX_LABEL_NAME
        if label.is_file():
            _check_label(label, shape, sax)
        views = lax_views(folder)
        for path in views.values():
            lax_shape, _ = cine_header(path)
            if lax_shape[2] != 1:
                raise BadInputError(path, f"is not a single plane: shape {lax_shape} has {lax_shape[2]} slices (expected (X, Y, 1, T))")
            if lax_shape[3] != shape[3]:
                raise BadInputError(path, f"has {lax_shape[3]} frame(s); its SAX stack {SAX_NAME} has {shape[3]}")
        info_path = folder / INFO_NAME
        info = read_info(info_path) if info_path.is_file() else {}
        ed = _frame(info, "ED", info_path, 1)
        cine[folder.name] = {"frames": shape[3], "ed": 0 if ed is None else ed, "es": _frame(info, "ES", info_path, 1), "views": sorted(views)}
        for t in range(shape[3]):
            cases.append(Case(id=f"{folder.name}_t{t:02d}", subject=folder.name, image=_relative(sax, src), phase=t,
                              label=_relative(label, src) if label.is_file() else None, frame=t if shape[3] > 1 else None))
    labels_path = src / LABELS_NAME
    labels = read_structured(labels_path, "label names") if labels_path.is_file() else UKB_LABELS
    return Manifest(name=src.name, spatial_dims=3, modality="MRI", source="ukbb", labels=labels, cases=cases,
                    cine=cine).with_root(src)


def import_acdc(src: str | Path) -> Manifest:
    """An ACDC folder (``patientNNN/patientNNN_frameNN.nii.gz`` + ``_gt`` + ``Info.cfg``): its ED and ES frames.

    Raises:
        BadInputError: no patient folder, an ``Info.cfg`` without ED or ES, a frame it names
            that is missing, a stack with one slice, labels on another grid (names the file).
    """
    src = Path(src)
    patients = sorted(p.parent for p in src.glob(f"*/{INFO_NAME}"))
    if not patients:
        raise BadInputError(src, f"no <patient>/{INFO_NAME} (ACDC layout)")
    _note_left_out(src, patients, INFO_NAME)
    cases, cine = [], {}
    for folder in patients:
        info_path = folder / INFO_NAME
        info = read_info(info_path, ("ED", "ES"))
        ed, es = _frame(info, "ED", info_path, 1), _frame(info, "ES", info_path, 1)
        frames = int(info["NbFrame"]) if info.get("NbFrame", "").isdigit() else None
        cine[folder.name] = {"frames": frames, "ed": ed, "es": es, "views": []}
        for index in sorted({ed, es}):
            number = index + 1  # ACDC numbers frames from 1
            image = next((p for p in (folder / f"{folder.name}_frame{number:02d}{s}" for s in (".nii.gz", ".nii")) if p.is_file()), None)
            if image is None:
                raise BadInputError(folder / f"{folder.name}_frame{number:02d}.nii.gz", f"frame {number} named in {INFO_NAME} not found")
            shape, _ = cine_header(image)
            _check_stack(image, shape)
            label = image.with_name(image.name.replace(f"_frame{number:02d}", f"_frame{number:02d}_gt"))
            if label.is_file():
                _check_label(label, shape, image)
            cases.append(Case(id=f"{folder.name}_frame{number:02d}", subject=folder.name, image=_relative(image, src), phase=index,
                              label=_relative(label, src) if label.is_file() else None))
    return Manifest(name=src.name, spatial_dims=3, modality="MRI", source="acdc", labels=ACDC_LABELS, cases=cases,
                    cine=cine).with_root(src)


def sax_slices(manifest: Manifest, split: str | None = None, val_fraction: float = 0.1, test_fraction: float = 0.2,
               seed: int = 0) -> list[SaxSlice]:
    """Every 2D slice of the SAX cases of one split, for 2D training.

    Splits are by subject (all slices and frames of a subject in one split): the manifest's
    own when every case has one, else :func:`medsynth.data.splits.subject_splits` with the
    fractions and seed. A 4D case's ``frame`` selects its frame; a slice's affine is its
    stack's, moved to the slice (``affine @ translate(0, 0, k)``).

    Returns:
        The slices in case order, then slice order.
    """
    splits = subject_splits(manifest, val_fraction, test_fraction, seed)
    loaded: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def read(path: str, dtype: type) -> tuple[np.ndarray, np.ndarray]:
        if path not in loaded:  # one 4D file (and its labels) serves every frame of a subject
            if len(loaded) >= 2:
                loaded.pop(next(iter(loaded)))
            tensor = load_image(manifest.resolve(path), dtype=dtype)
            loaded[path] = (tensor.numpy(), np.asarray(tensor.affine, dtype=np.float64))
        return loaded[path]

    slices = []
    for case in manifest.cases:
        if split is not None and splits[case.subject] != split:
            continue
        frame = getattr(case, "frame", None) or 0
        volume, affine = read(case.images[0], np.float32)
        image = volume[frame]  # (X, Y, S): channels are frames of a 4D NIfTI
        label = read(case.label, np.int16)[0][frame] if case.label is not None else None
        for k in range(image.shape[2]):
            moved = affine.copy()
            moved[:3, 3] = affine[:3, 3] + k * affine[:3, 2]
            slices.append(SaxSlice(case.subject, case.phase if case.phase is not None else frame, k, image[:, :, k],
                                   None if label is None else label[:, :, k], moved))
    return slices


# -- 2D slices for `medsynth prepare --slices` (recipe diffae) -------------------------------------

HR_NAME, HR_LABEL_NAME = "sa_hr.nii.gz", "sa_hr_gt.nii.gz"  # the cardiac phantom's thin-slice SAX truth


def slice_manifest(manifest: Manifest) -> Manifest:
    """The 2D view of a cine manifest: one case per subject, frame and SAX slice, for ``prepare --slices``.

    A subject with the high-resolution truth beside its stack (``sa_hr.nii.gz`` + ``sa_hr_gt.nii.gz``,
    the phantom) gives its thin slices, others their acquired ``sa.nii.gz`` slices. Case ``<id>_sNN`` keeps
    the subject (so splits stay by subject), ``frame`` and ``phase``, and adds ``slice`` (the index on the
    stack's third axis); :func:`load_case_file` reads it.

    Raises:
        BadInputError: a case whose image is not one 3D/4D file (names it).
    """
    cases = []
    for case in manifest.cases:
        if len(case.images) != 1:
            raise BadInputError(manifest.resolve(case.images[0]), "a cine case is one 3D/4D SAX file")
        image, label = case.images[0], case.label
        hr, hr_label = (Path(image).with_name(name).as_posix() for name in (HR_NAME, HR_LABEL_NAME))
        if Path(image).name == SAX_NAME and manifest.resolve(hr).is_file():
            image, label = hr, hr_label if manifest.resolve(hr_label).is_file() else None
        shape, _ = cine_header(manifest.resolve(image))
        cases += [case.model_copy(update={"id": f"{case.id}_s{k:02d}", "image": image, "label": label, "slice": k}) for k in range(shape[2])]
    return manifest.model_copy(update={"spatial_dims": 2, "cases": cases})


@lru_cache(maxsize=2)  # one 4D file (and its labels) serves every frame and slice of a subject
def _read_cine(path: str, dtype: str, stamp: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    tensor = load_image(path, dtype=np.dtype(dtype))
    return tensor.numpy(), np.asarray(tensor.affine, dtype=np.float64)


def load_case_file(path: str | Path, case: Case, dtype: np.dtype | type = np.float32, **options: Any) -> MetaTensor:
    """A case's image or label file as :func:`~medsynth.data.io.load_image` reads it, or, for a slice case of
    :func:`slice_manifest`, its one 2D slice ``(1, X, Y)`` of frame ``case.frame``; the slice's 4x4 affine maps
    pixel ``(i, j, 0)`` to world mm (the stack's, moved to the slice), so its third column keeps the stack's
    through-plane step."""
    index = getattr(case, "slice", None)
    if index is None:
        return load_image(path, dtype=dtype, **options)
    stat = Path(path).stat()
    volume, affine = _read_cine(str(path), np.dtype(dtype).name, (stat.st_mtime_ns, stat.st_size))
    if not 0 <= index < volume.shape[-1]:
        raise BadInputError(path, f"has {volume.shape[-1]} slices, the case '{case.id}' asks for slice {index}")
    moved = affine.copy()
    moved[:3, 3] = affine[:3, 3] + index * affine[:3, 2]
    frame = volume[case.frame or 0]  # (X, Y, S): channels are frames of a 4D NIfTI
    return MetaTensor(torch.from_numpy(np.ascontiguousarray(frame[None, :, :, index])), affine=torch.from_numpy(moved))


def cine_frame(path: str | Path, t: int) -> tuple[np.ndarray, np.ndarray]:
    """Frame ``t`` of a 3D/4D cine NIfTI as (array (X, Y, Z), float64 4x4 affine)."""
    image = load_image(path)  # (T, X, Y, Z): frames as channels
    return image.numpy()[t], np.asarray(image.affine, dtype=np.float64)


@lru_cache(maxsize=8)  # every slice of a frame asks for the same percentiles
def _frame_percentiles(path: str, frame: int, percentiles: tuple[float, float], stamp: tuple[int, int]) -> tuple[float, float]:
    volume, _ = _read_cine(path, "float32", stamp)
    low, high = (float(v) for v in np.percentile(volume[frame], percentiles))
    return low, (high if high > low else low + 1.0)


def stack_percentiles(path: str | Path, case: Case, percentiles: tuple[float, float]) -> tuple[float, float] | None:
    """The intensity percentiles of the whole frame volume a slice case of :func:`slice_manifest` comes from
    (``None`` for any other case).

    ``prepare --slices`` maps these to [0, 1] for every slice of the frame, so training slices are in the
    units :mod:`medsynth.inverse` gives a whole stack (its percentiles to [-1, 1]): an apical slice stays
    as dark as it is in its volume instead of being stretched to full contrast on its own.
    """
    if getattr(case, "slice", None) is None:
        return None
    stat = Path(path).stat()
    return _frame_percentiles(str(path), case.frame or 0, tuple(percentiles), (stat.st_mtime_ns, stat.st_size))
