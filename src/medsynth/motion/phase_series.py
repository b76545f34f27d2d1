"""Registration of phase series (4D CT): the grids of every phase of every subject, and their dense fields.

Phase ``t`` is always the FIXED image. With ``pairs="reference"`` the moving image is the
reference phase ``r``; with ``pairs="consecutive"`` it is the neighbour towards ``r``
(``t - 1`` above ``r``, ``t + 1`` below it). ``<out>/<subject>/grid_tNN.npz`` is the grid
that reaches phase ``t`` from its moving image; ``<out>/registration.json`` records the
pairing, the reference phase and every setting that changes a grid (a rerun with others is
refused unless ``force``: grids of two settings never mix). :func:`phase_fields` turns the grids into the fields that warp the reference
phase onto every phase, composing consecutive fields (never adding them: adding is only
right to first order); :class:`PhaseData` gives them to training, made dense while loading.

Input layouts: a ``dataset.json`` with ``subject``/``phase`` cases (a case's ``frame``: the phase
is that frame of a 4D file); a folder of 4D NIfTI files ``(X, Y, Z, phase)``, one per subject; or one
folder per subject holding one 4D NIfTI, one DICOM series per phase (4D CT as scanners and TCIA's
4D-Lung store it, ordered by phase: :mod:`medsynth.data.dicom`), or one 3D file per phase (phase order
= natural sort of the names; only ``image*`` files when any exist). Without a ``dataset.json`` the
folder is read by :func:`medsynth.data.importers.import_phase_series`, as ``prepare`` reads it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from monai.data import MetaTensor

from medsynth.data.importers import import_phase_series, scan_header
from medsynth.data.io import load_phase, spacing_of
from medsynth.data.manifest import MANIFEST_NAME, Case, Manifest
from medsynth.errors import BadInputError, MedsynthError, NonFiniteOutputError
from medsynth.motion.bspline import load_transform
from medsynth.motion.fields import compose, resample_field, voxel_to_mm
from medsynth.motion.landmarks import PointSet, landmark_file, read_pair
from medsynth.motion.registration import (
    RegistrationConfig,
    RegistrationResult,
    _load_volume,
    diverged,
    refuse_constant,
    register_batch,
    with_landmarks,
)
from medsynth.runs import atomic_write_json, remove_stale_temps

__all__ = ["RECORD_NAME", "PhaseData", "phase_fields", "register_dataset"]

RECORD_NAME = "registration.json"
Pairs = Literal["reference", "consecutive"]


@dataclass
class _Subject:
    """One subject's phases: one file per phase, or one 4D file; with the grid they share."""

    name: str
    files: list[Path]  # one per phase, or the one 4D file
    phase_count: int
    shape: tuple[int, ...]
    spacing: tuple[float, ...]

    @property
    def volume(self) -> Path | None:
        """The 4D file, or ``None`` for one file per phase."""
        return self.files[0] if len(self.files) == 1 else None

    def source(self, phase: int) -> str:
        return str(self.files[phase]) if self.volume is None else f"{self.volume}[phase {phase}]"


def _series(name: str, paths: list[Path], where: Path) -> _Subject:
    """A subject with one 3D file per phase: refused unless every phase has the first one's shape and affine."""
    if len(paths) < 2:
        raise BadInputError(paths[0] if paths else where, f"subject {name} has only {len(paths)} phase (registration needs at least two)")
    first_shape, first_affine = scan_header(paths[0])
    for path in paths:
        shape, affine = scan_header(path)
        if len(shape) not in (3, 4) or (len(shape) == 4 and shape[3] > 1):
            raise BadInputError(path, f"expected one 3D phase per file, got shape {shape}")
        if shape[:3] != first_shape[:3] or not np.allclose(affine, first_affine, atol=1e-4):
            what = f"shape {shape[:3]} vs {first_shape[:3]}" if shape[:3] != first_shape[:3] else "affine differs"
            raise BadInputError(path, f"phases of subject {name} differ from {paths[0]} ({what}); resample them onto one grid first")
    return _Subject(name, paths, len(paths), first_shape[:3], tuple(spacing_of(first_affine)))


def _volume(path: Path, name: str, phases: int) -> _Subject:
    """A subject whose ``phases`` phases are the frames of one 4D NIfTI or DICOM phase series."""
    shape, affine = scan_header(path)
    if len(shape) != 4:
        raise BadInputError(path, f"expected a 4D scan (X, Y, Z, phase), got {len(shape)}D")
    if shape[3] < 2:
        raise BadInputError(path, "4D scan has only one phase (registration needs at least two)")
    if shape[3] != phases:
        raise BadInputError(path, f"4D scan has {shape[3]} phases, its dataset lists {phases} for subject {name}")
    return _Subject(name, [path], shape[3], shape[:3], tuple(spacing_of(affine)))


def _find_subjects(data_dir: Path, reference_phase: int) -> list[_Subject]:
    """The subjects of ``data_dir`` in one of the layouts of the module docstring, checked from the headers."""
    manifest_path = data_dir / MANIFEST_NAME
    manifest, where = (Manifest.load(manifest_path), manifest_path) if manifest_path.exists() else (import_phase_series(data_dir), data_dir)
    phase_cases: dict[str, dict[int, Case]] = {}
    for entry in manifest.cases:
        if entry.phase is None or not isinstance(entry.image, str):
            raise BadInputError(where, f"case {entry.id} is not one phase of a series (dataset mode needs a phase and one image per case)")
        phase_cases.setdefault(entry.subject, {})[entry.phase] = entry
    subjects = []
    for name, cases in phase_cases.items():
        missing = sorted(set(range(max(cases) + 1)) - set(cases))
        if missing:
            raise BadInputError(where, f"subject {name} is missing phase(s) {', '.join(map(str, missing))}")
        ordered = [cases[t] for t in sorted(cases)]
        if all(case.frame is None for case in ordered):
            subjects.append(_series(name, [manifest.resolve(case.image) for case in ordered], where))
        elif len({case.image for case in ordered}) == 1 and [case.frame for case in ordered] == list(range(len(ordered))):
            subjects.append(_volume(manifest.resolve(ordered[0].image), name, len(ordered)))
        else:
            raise BadInputError(where, f"subject {name}: phases given as frames must be frames 0, 1, ... of one 4D file, in phase order")
    for subject in subjects:
        if reference_phase >= subject.phase_count or reference_phase < 0:
            raise BadInputError(subject.files[0], f"subject {subject.name} has {subject.phase_count} phases, no reference phase {reference_phase}")
    return subjects


@dataclass
class _Job:
    """One registration: phase ``fixed`` of a subject, moving phase ``moving``, grid written to ``out``."""

    subject: _Subject
    fixed: int
    moving: int
    out: Path
    landmarks: tuple[PointSet, PointSet] | None = None  # the fixed and moving phases' landmarks, when both have a file
    notes: list[str] = field(default_factory=list)


def _jobs(subjects: list[_Subject], out_dir: Path, reference_phase: int, pairs: Pairs) -> list[_Job]:
    jobs = []
    for subject in subjects:
        for t in range(subject.phase_count):
            if t != reference_phase:
                moving = reference_phase if pairs == "reference" else t - 1 if t > reference_phase else t + 1
                jobs.append(_Job(subject, t, moving, out_dir / subject.name / f"grid_t{t:02d}.npz"))
    return jobs


def _phase_image(subject: _Subject, phase: int) -> MetaTensor:
    if subject.volume is None:
        return _load_volume(subject.files[phase])  # refuses a constant phase too
    image = load_phase(subject.volume, phase)
    refuse_constant(image, subject.source(phase))
    return image


def _landmark_path(subject: _Subject, phase: int) -> Path | None:
    """``<stem>.pts``/``.csv`` beside a phase file, or ``<stem>_tNN.pts``/``.csv`` beside a subject's 4D file or series folder."""
    return landmark_file(subject.files[phase]) if subject.volume is None else landmark_file(subject.volume, phase)


def _read_landmarks(jobs: list[_Job]) -> None:
    """Give each job the landmarks of its fixed and moving phase (read and checked now, before anything is written)."""
    for job in jobs:
        fixed, moving = _landmark_path(job.subject, job.fixed), _landmark_path(job.subject, job.moving)
        if fixed and moving:
            job.landmarks = read_pair(fixed, moving)
        elif fixed or moving:
            job.notes.append(f"no TRE: landmarks {fixed or moving} have no partner beside phase {job.moving if fixed else job.fixed}")


def _register_jobs(jobs: Sequence[_Job], config: RegistrationConfig, progress: bool = False) -> list[RegistrationResult]:
    """Register one batch of jobs (one grid) jointly and write their grids (``progress``: a bar per pyramid level)."""
    fixed = [_phase_image(job.subject, job.fixed) for job in jobs]
    moving = [_phase_image(job.subject, job.moving) for job in jobs]
    for job, fixed_image, moving_image in zip(jobs, fixed, moving):
        if job.landmarks:
            job.landmarks[0].check_inside(fixed_image.affine, fixed_image.shape, job.subject.source(job.fixed))
            job.landmarks[1].check_inside(moving_image.affine, moving_image.shape, job.subject.source(job.moving))
    results = []
    for job, (transform, quality) in zip(jobs, register_batch(fixed, moving, config, progress)):
        fixed_name, moving_name = job.subject.source(job.fixed), job.subject.source(job.moving)
        try:  # a diverged grid is refused by its writer; the grids written before it are finished results
            transform.save(job.out, fixed=fixed_name, moving=moving_name, similarity=config.similarity, **quality)
        except NonFiniteOutputError as exc:
            raise diverged(exc, config) from None
        result = RegistrationResult(fixed_name, moving_name, job.out, config.similarity, quality["before"], quality["after"], quality["folding"], quality["seconds"], notes=list(job.notes),
                                    level_seconds=quality["level_seconds"])
        results.append(with_landmarks(result, job.landmarks, transform))  # the phases of a subject share one grid
    return results


def _done_earlier(job: _Job) -> RegistrationResult:
    transform, extra = load_transform(job.out)
    result = RegistrationResult(str(extra["fixed"]), str(extra["moving"]), job.out, str(extra["similarity"]), float(extra["before"]), float(extra["after"]), float(extra["folding"]), float(extra["seconds"]), skipped=True, notes=list(job.notes))
    return with_landmarks(result, job.landmarks, transform)


_worker_device: str | None = None  # set once in each worker process


def _start_worker(devices, threads: int) -> None:
    global _worker_device
    _worker_device = devices.get()
    torch.set_num_threads(threads)


def _work(task: tuple[list[_Job], RegistrationConfig]) -> list[RegistrationResult] | str:
    jobs, config = task
    try:
        return _register_jobs(jobs, config.model_copy(update={"device": _worker_device}))
    except MedsynthError as exc:  # sent back as text: BadInputError does not survive pickling
        return str(exc)


_ABSENT = object()  # a setting a record does not hold


def _changes(old: dict, new: dict) -> list[str]:
    """``key: old -> new`` for each setting that differs; a setting only one side has (the other method's, or one an
    older record lacks) is named only when no setting both have differs."""
    shown = lambda value: "unrecorded" if value is _ABSENT else value if isinstance(value, str) else json.dumps(value)  # noqa: E731
    keys = list(new) + [key for key in old if key not in new]
    both = [key for key in keys if key in old and key in new and old[key] != new[key]]
    return [f"{key}: {shown(old.get(key, _ABSENT))} -> {shown(new.get(key, _ABSENT))}"
            for key in both or [key for key in keys if old.get(key, _ABSENT) != new.get(key, _ABSENT)]]


def _clear_grids(out_dir: Path, names: set[str]) -> None:
    """Delete the grids (and half-written temporary files) of the named subjects' folders under ``out_dir`` (``--force``)."""
    for name in names:
        folder = out_dir / name
        if folder.parent.resolve() != out_dir.resolve() or not folder.is_dir():  # a subject name is one folder inside out_dir
            continue
        for path in folder.glob("grid_t*.npz"):
            path.unlink()
        remove_stale_temps(folder)


def _write_record(out_dir: Path, pairs: Pairs, reference_phase: int, subjects: list[_Subject], config: RegistrationConfig,
                  force: bool = False) -> None:
    """``registration.json``: the pairing, the reference phase, every setting that changes a grid and the subjects.

    A folder whose grids were made otherwise is refused naming what differs (so grids of two settings never
    mix), as is a folder from before the settings were recorded; ``force`` starts over: the grids of the
    recorded and the present subjects are deleted first.
    """
    path = out_dir / RECORD_NAME
    settings = config.grid_settings()
    old: object = None
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except ValueError:
            if not force:
                raise BadInputError(path, "broken registration record (not JSON): rerun with --force to start over, or give another --out") from None
        if not force:
            if not isinstance(old, dict) or not isinstance(old.get("settings"), dict):
                raise BadInputError(path, "grids here were made by an older medsynth that did not record their settings: "
                                          "rerun with --force to start over, or give another --out")
            changes = _changes({"pairs": old.get("pairs"), "reference_phase": old.get("reference_phase"), **old["settings"]},
                               {"pairs": pairs, "reference_phase": reference_phase, **settings})
            if changes:
                raise BadInputError(path, f"grids here were made with other settings ({', '.join(changes)}): "
                                          "rerun with --force to start over, or give another --out")
    if force:
        recorded = old.get("subjects") if isinstance(old, dict) else None
        _clear_grids(out_dir, {s.name for s in subjects} | (set(map(str, recorded)) if isinstance(recorded, dict) else set()))
    record = {"pairs": pairs, "reference_phase": reference_phase, "settings": settings,
              "subjects": {s.name: {"phases": list(range(s.phase_count)), "source": [str(p) for p in s.files]} for s in subjects}}
    atomic_write_json(path, record)


def register_dataset(
    data_dir: str | Path,
    out_dir: str | Path,
    config: RegistrationConfig | None = None,
    reference_phase: int = 0,
    progress: bool = True,
    callback: Callable[[RegistrationResult], None] | None = None,
    pairs: Pairs = "reference",
    batch: int = 1,
    devices: Sequence[str] | None = None,
    force: bool = False,
) -> list[RegistrationResult]:
    """Register every phase of every subject (``medsynth register --data DIR --out DIR``).

    Phase ``t`` is the fixed image; the moving one is the reference phase
    (``pairs="reference"``: ``warp_image(reference, u_t) ~ phase_t``, like a phantom's
    ``dvf_tNN``) or the neighbour towards it (``"consecutive"``). Grids are written
    atomically and existing ones are skipped, so a killed run resumes where it stopped;
    ``registration.json`` records the settings that change a grid, and a rerun with other
    settings is refused unless ``force``.

    Landmarks: where both phases of a pair have a landmark file beside them (``<stem>.pts``
    or ``<stem>.csv`` next to a phase file ``<stem>.nii.gz``; ``<stem>_tNN.pts``/``.csv``
    next to a subject's 4D file or series folder ``<stem>``, for its phase ``NN``; formats
    of :mod:`medsynth.motion.landmarks`), the pair's result reports its TRE before and after.

    Args:
        data_dir: one of the layouts of the module docstring.
        out_dir: output folder: ``<subject>/grid_tNN.npz`` and ``registration.json``.
        config: registration settings (``config.device`` unless ``devices`` is given).
        reference_phase: the phase the fields start from.
        progress: show a progress bar and each quality line (stderr).
        callback: called with each result: grids found done first, then as they finish.
        pairs: ``"reference"`` or ``"consecutive"``.
        batch: pairs of one grid registered jointly (:func:`register_batch`).
        devices: e.g. ``["cuda:0", "cuda:1"]``: one worker process per device shares the
            batches (spawned; ``["cpu", "cpu"]`` works too).
        force: start over in a folder registered with other settings (its grids are deleted first).

    Returns:
        One result per registered phase, in subject and phase order.

    Raises:
        BadInputError: no subjects, a 4D file with one phase, a subject with one phase, a subject
            folder holding a 4D scan beside other phase files, DICOM phases on different grids,
            phases of different shapes or affines, a missing phase, unreadable, NaN or
            constant images, broken landmark files, an output folder made with other
            settings (or by a version that did not record them) without ``force``.
    """
    from tqdm import tqdm

    if pairs not in ("reference", "consecutive"):
        raise MedsynthError(f"register: pairs must be reference or consecutive, got {pairs!r}")
    if batch < 1:
        raise MedsynthError(f"register: batch must be at least 1, got {batch}")
    config = config or RegistrationConfig()
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    subjects = _find_subjects(data_dir, reference_phase)
    jobs = _jobs(subjects, out_dir, reference_phase, pairs)
    _read_landmarks(jobs)
    _write_record(out_dir, pairs, reference_phase, subjects, config, force)
    todo = [job for job in jobs if not job.out.exists()]
    groups: dict[tuple, list[_Job]] = {}  # jobs of one grid (shape, spacing) may share a batch
    for job in todo:
        groups.setdefault((job.subject.shape, tuple(np.round(job.subject.spacing, 5))), []).append(job)
    batches = [group[i : i + batch] for group in groups.values() for i in range(0, len(group), batch)]
    order = {id(job): i for i, job in enumerate(todo)}
    batches.sort(key=lambda jobs_: order[id(jobs_[0])])  # in the order of the subjects and phases
    found: dict[Path, RegistrationResult] = {}
    with tqdm(total=len(jobs), desc="register", unit="phase", disable=not progress) as bar:

        def report(result: RegistrationResult) -> None:
            found[result.output] = result
            bar.update()
            if progress:
                bar.write(result.line())
            if callback is not None:
                callback(result)

        for job in jobs:
            if job.out.exists():
                report(_done_earlier(job))
        if devices is None or len(devices) <= 1:
            single = config if not devices else config.model_copy(update={"device": devices[0]})
            for jobs_ in batches:
                for result in _register_jobs(jobs_, single, progress):
                    report(result)
        else:
            import torch.multiprocessing as mp

            context = mp.get_context("spawn")
            queue = context.Queue()
            for device in devices:
                queue.put(device)
            threads = max(1, torch.get_num_threads() // len(devices))
            with context.Pool(len(devices), initializer=_start_worker, initargs=(queue, threads)) as pool:
                for outcome in pool.imap(_work, [(jobs_, config) for jobs_ in batches]):
                    if isinstance(outcome, str):
                        raise MedsynthError(outcome)
                    for result in outcome:
                        report(result)
    return [found[job.out] for job in jobs]


def phase_fields(registration_dir: str | Path, subject: str) -> MetaTensor:
    """The dense fields that warp a subject's reference phase onto each of its phases.

    ``warp_image(reference, fields[t]) ~ phase_t``; zero at the reference phase. With
    consecutive grids ``v_t`` (phase ``t`` fixed, its neighbour towards the reference
    moving) the fields are composed outwards from the reference:
    ``u_t = compose(u_{t-1}, v_t)`` above it (warp by ``u_{t-1}``, then by ``v_t``) and
    ``u_t = compose(u_{t+1}, v_t)`` below it.

    Args:
        registration_dir: a folder written by :func:`register_dataset`.
        subject: the subject's name (its folder there).

    Returns:
        ``MetaTensor`` ``(P, 3, X, Y, Z)`` in voxels of the registered grid, with its affine.

    Raises:
        BadInputError: no ``registration.json``, an unknown subject, missing or broken grids.
    """
    registration_dir = Path(registration_dir)
    record_path = registration_dir / RECORD_NAME
    if not record_path.exists():
        raise BadInputError(registration_dir, f"no {RECORD_NAME}: not a folder written by medsynth register --data")
    try:
        record = json.loads(record_path.read_text())
        entry, reference, consecutive = record["subjects"].get(subject), int(record["reference_phase"]), record["pairs"] == "consecutive"
    except (ValueError, KeyError, TypeError, AttributeError):
        raise BadInputError(record_path, "broken registration record (expected pairs, reference_phase, subjects)") from None
    if entry is None:
        raise BadInputError(record_path, f"no subject {subject} (subjects: {', '.join(sorted(record['subjects']))})")
    phases = [int(t) for t in entry["phases"]]
    folder = registration_dir / subject
    missing = [f"grid_t{t:02d}.npz" for t in phases if t != reference and not (folder / f"grid_t{t:02d}.npz").exists()]
    if missing:
        raise BadInputError(folder, f"missing {', '.join(missing)} (run medsynth register --data again to finish)")
    grids = {t: load_transform(folder / f"grid_t{t:02d}.npz")[0].dense_field() for t in phases if t != reference}
    affine = next(iter(grids.values())).affine
    fields = {reference: torch.zeros_like(next(iter(grids.values())).as_tensor())}
    for t in sorted(t for t in phases if t > reference) + sorted((t for t in phases if t < reference), reverse=True):
        grid = grids[t].as_tensor()
        fields[t] = compose(fields[t - 1 if t > reference else t + 1], grid) if consecutive else grid
    return MetaTensor(torch.stack([fields[t] for t in phases]), affine=affine)


class PhaseData:
    """A prepared phase-series dataset (one case per subject and phase) with the fields to learn from.

    Called on a prepared item (:class:`~medsynth.data.datasets.PreparedDataset`), it adds ``subject``,
    ``reference`` (the subject's reference-phase image ``(1, *S)``) and ``field`` ``(3, *S)``: the field
    that warps the reference onto the item's phase, in world mm divided by ``field_scale_mm``. Fields
    come from ``registration`` (a :func:`register_dataset` folder: its compact grids are made dense per
    subject when first needed, moved onto the prepared grid, and kept for ``cached_subjects`` subjects),
    or, without it, from the dataset's own ``flow`` (e.g. a phantom's exact motion).
    """

    def __init__(self, data_dir: str | Path, registration: str | Path | None = None, reference_phase: int = 0,
                 field_scale_mm: float = 1.0, cached_subjects: int = 64):
        from medsynth.data.datasets import load_prepared_manifest

        self.data_dir, self.registration = Path(data_dir), registration
        self.reference_phase, self.field_scale_mm = reference_phase, field_scale_mm
        cases = load_prepared_manifest(data_dir).cases
        self.subject = {case.id: case.subject for case in cases}
        self.phase_case = {(case.subject, case.phase): case.id for case in cases}
        self.registered = lru_cache(maxsize=cached_subjects)(self._registered)
        self.reference_image = lru_cache(maxsize=cached_subjects)(self._reference_image)

    def _reference_image(self, subject: str) -> torch.Tensor:
        case = self.phase_case.get((subject, self.reference_phase))
        if case is None:
            raise BadInputError(self.data_dir, f"subject {subject} has no reference phase {self.reference_phase}")
        with np.load(self.data_dir / "cases" / f"{case}.npz") as arrays:
            return torch.from_numpy(arrays["image"]).float()

    def _registered(self, subject: str) -> tuple[torch.Tensor, np.ndarray]:
        fields = phase_fields(self.registration, subject)
        return fields.as_tensor(), np.asarray(fields.affine, dtype=np.float64)

    def field_voxels(self, item: dict) -> torch.Tensor:
        """The training field of a prepared item ``(3, *S)`` in voxels of its grid."""
        if self.registration is None:
            if "flow" not in item:
                raise BadInputError(self.data_dir, f"case {item['id']} has no field: give the registration folder (`medsynth register --data`)")
            return item["flow"].float()
        fields, affine = self.registered(self.subject[item["id"]])
        return resample_field(fields[item["phase"]], affine, tuple(item["image"].shape[1:]), item["affine"].numpy()).float()

    def true_field(self, item: dict) -> torch.Tensor:
        """What a generated field of the item's phase is judged against ``(3, *S)`` voxels: the dataset's own field
        (a phantom's exact motion) when it has one, else the registration's."""
        return item["flow"].float() if "flow" in item else self.field_voxels(item)

    def __call__(self, item: dict) -> dict:
        subject = self.subject[item["id"]]
        field = voxel_to_mm(self.field_voxels(item).double(), item["affine"].numpy()).float() / self.field_scale_mm
        return {**item, "subject": subject, "reference": self.reference_image(subject), "field": field}

    def by_subject(self, splits: Sequence[str]) -> dict[str, dict[int, dict]]:
        """The first non-empty split of ``splits`` as subject -> phase -> item (with the keys above)."""
        from medsynth.data.datasets import load_split

        for split in splits:
            grouped: dict[str, dict[int, dict]] = {}
            for item in map(self, load_split(self.data_dir, split)):
                grouped.setdefault(item["subject"], {})[int(item["phase"])] = item
            if grouped:
                return grouped
        return {}
