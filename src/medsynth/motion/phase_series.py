"""Registration of phase series (4D CT): the grids of every phase of every subject, and their dense fields.

Phase ``t`` is always the FIXED image. With ``pairs="reference"`` the moving image is the
reference phase ``r``; with ``pairs="consecutive"`` it is the neighbour towards ``r``
(``t - 1`` above ``r``, ``t + 1`` below it). ``<out>/<subject>/grid_tNN.npz`` is the grid
that reaches phase ``t`` from its moving image; ``<out>/registration.json`` records the
pairing. :func:`phase_fields` turns the grids into the fields that warp the reference
phase onto every phase, composing consecutive fields (never adding them: adding is only
right to first order); :class:`PhaseData` gives them to training, made dense while loading.

Input layouts: a ``dataset.json`` with ``subject``/``phase`` cases; a folder of 4D NIfTI
files ``(X, Y, Z, phase)``, one per subject; or one folder per subject with one 3D file
per phase (phase order = natural sort of the names; only ``image*`` files when any exist).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from monai.data import MetaTensor

from medsynth.data.io import NIFTI_SUFFIXES, load_image, natural_key, spacing_of, suffix_of
from medsynth.data.manifest import MANIFEST_NAME, Manifest
from medsynth.errors import BadInputError, MedsynthError
from medsynth.motion.bspline import load_transform
from medsynth.motion.fields import compose, resample_field, voxel_to_mm
from medsynth.motion.registration import RegistrationConfig, RegistrationResult, _load_volume, register_batch
from medsynth.runs import atomic_write_json

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


def _header(path: Path) -> tuple[tuple[int, ...], np.ndarray]:
    """Shape and affine from the header alone (no voxels read)."""
    import nibabel as nib

    try:
        image = nib.load(str(path))
    except Exception as exc:  # nibabel raises several types for broken headers
        raise BadInputError(path, f"cannot read image ({type(exc).__name__})") from None
    return tuple(int(n) for n in image.shape), np.asarray(image.affine, dtype=np.float64)


def _series(name: str, paths: list[Path], where: Path) -> _Subject:
    """A subject with one 3D file per phase: refused unless every phase has the first one's shape and affine."""
    if len(paths) < 2:
        raise BadInputError(paths[0] if paths else where, f"subject {name} has only {len(paths)} phase (registration needs at least two)")
    first_shape, first_affine = _header(paths[0])
    for path in paths:
        shape, affine = _header(path)
        if len(shape) not in (3, 4) or (len(shape) == 4 and shape[3] > 1):
            raise BadInputError(path, f"expected one 3D phase per file, got shape {shape}")
        if shape[:3] != first_shape[:3] or not np.allclose(affine, first_affine, atol=1e-4):
            what = f"shape {shape[:3]} vs {first_shape[:3]}" if shape[:3] != first_shape[:3] else "affine differs"
            raise BadInputError(path, f"phases of subject {name} differ from {paths[0]} ({what}); resample them onto one grid first")
    return _Subject(name, paths, len(paths), first_shape[:3], tuple(spacing_of(first_affine)))


def _volume(path: Path) -> _Subject:
    shape, affine = _header(path)
    if len(shape) != 4:
        raise BadInputError(path, f"expected a 4D scan (X, Y, Z, phase), got {len(shape)}D")
    if shape[3] < 2:
        raise BadInputError(path, "4D scan has only one phase (registration needs at least two)")
    return _Subject(path.name[: -len(suffix_of(path))], [path], shape[3], shape[:3], tuple(spacing_of(affine)))


def _find_subjects(data_dir: Path, reference_phase: int) -> list[_Subject]:
    """The subjects of ``data_dir`` in one of the three layouts, checked from the headers."""
    manifest_path = data_dir / MANIFEST_NAME
    nifti = lambda folder: sorted((p for p in folder.iterdir() if p.is_file() and suffix_of(p) in NIFTI_SUFFIXES), key=lambda p: natural_key(p.name))  # noqa: E731
    if manifest_path.exists():
        manifest = Manifest.load(manifest_path)
        phase_paths: dict[str, dict[int, Path]] = {}
        for entry in manifest.cases:
            if entry.phase is None or not isinstance(entry.image, str):
                raise BadInputError(manifest_path, f"case {entry.id} is not one phase of a series (dataset mode needs a phase and one image per case)")
            phase_paths.setdefault(entry.subject, {})[entry.phase] = manifest.resolve(entry.image)
        for name, paths in phase_paths.items():
            missing = sorted(set(range(max(paths) + 1)) - set(paths))
            if missing:
                raise BadInputError(manifest_path, f"subject {name} is missing phase(s) {', '.join(map(str, missing))}")
        subjects = [_series(name, [paths[t] for t in sorted(paths)], manifest_path) for name, paths in phase_paths.items()]
    elif not data_dir.is_dir():
        subjects = []
    elif nifti(data_dir):
        subjects = [_volume(path) for path in nifti(data_dir)]
    else:
        subjects = []
        for folder in sorted((p for p in data_dir.iterdir() if p.is_dir()), key=lambda p: natural_key(p.name)):
            files = nifti(folder)
            images = [p for p in files if p.name.startswith("image")]  # next to label/dvf files, only the images
            if files:
                subjects.append(_series(folder.name, images or files, folder))
    if not subjects:
        raise BadInputError(data_dir, "no dataset.json with phase cases, no 4D NIfTI files and no subject folders of 3D phases found")
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


def _jobs(subjects: list[_Subject], out_dir: Path, reference_phase: int, pairs: Pairs) -> list[_Job]:
    jobs = []
    for subject in subjects:
        for t in range(subject.phase_count):
            if t != reference_phase:
                moving = reference_phase if pairs == "reference" else t - 1 if t > reference_phase else t + 1
                jobs.append(_Job(subject, t, moving, out_dir / subject.name / f"grid_t{t:02d}.npz"))
    return jobs


@lru_cache(maxsize=2)
def _load_4d(path: Path) -> MetaTensor:
    return load_image(path)  # (phase, X, Y, Z): a subject's jobs read it once


def _phase_image(subject: _Subject, phase: int) -> MetaTensor:
    return _load_volume(subject.files[phase]) if subject.volume is None else _load_4d(subject.volume)[phase : phase + 1]


def _register_jobs(jobs: Sequence[_Job], config: RegistrationConfig) -> list[RegistrationResult]:
    """Register one batch of jobs (one grid) jointly and write their grids."""
    fixed = [_phase_image(job.subject, job.fixed) for job in jobs]
    moving = [_phase_image(job.subject, job.moving) for job in jobs]
    results = []
    for job, (transform, quality) in zip(jobs, register_batch(fixed, moving, config)):
        fixed_name, moving_name = job.subject.source(job.fixed), job.subject.source(job.moving)
        transform.save(job.out, fixed=fixed_name, moving=moving_name, similarity=config.similarity, **quality)
        results.append(RegistrationResult(fixed_name, moving_name, job.out, config.similarity, quality["before"], quality["after"], quality["folding"], quality["seconds"]))
    return results


def _done_earlier(path: Path) -> RegistrationResult:
    _, extra = load_transform(path)
    return RegistrationResult(str(extra["fixed"]), str(extra["moving"]), path, str(extra["similarity"]), float(extra["before"]), float(extra["after"]), float(extra["folding"]), float(extra["seconds"]), skipped=True)


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


def _write_record(out_dir: Path, pairs: Pairs, reference_phase: int, subjects: list[_Subject]) -> None:
    """``registration.json``; refuses a folder whose grids were made with another pairing or reference."""
    path = out_dir / RECORD_NAME
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except ValueError:
            raise BadInputError(path, "broken registration record (not JSON): delete it or give another --out") from None
        if not isinstance(old, dict) or (old.get("pairs"), old.get("reference_phase")) != (pairs, reference_phase):
            raise BadInputError(path, f"grids here were made with pairs={old.get('pairs')}, reference phase {old.get('reference_phase')}; "
                                      f"give another --out for pairs={pairs}, reference phase {reference_phase}")
    record = {"pairs": pairs, "reference_phase": reference_phase,
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
) -> list[RegistrationResult]:
    """Register every phase of every subject (``medsynth register --data DIR --out DIR``).

    Phase ``t`` is the fixed image; the moving one is the reference phase
    (``pairs="reference"``: ``warp_image(reference, u_t) ~ phase_t``, like a phantom's
    ``dvf_tNN``) or the neighbour towards it (``"consecutive"``). Grids are written
    atomically and existing ones are skipped, so a killed run resumes where it stopped.

    Args:
        data_dir: one of the three layouts of the module docstring.
        out_dir: output folder: ``<subject>/grid_tNN.npz`` and ``registration.json``.
        config: registration settings (``config.device`` unless ``devices`` is given).
        reference_phase: the phase the fields start from.
        progress: show a progress bar and each quality line (stderr).
        callback: called with each result: grids found done first, then as they finish.
        pairs: ``"reference"`` or ``"consecutive"``.
        batch: pairs of one grid registered jointly (:func:`register_batch`).
        devices: e.g. ``["cuda:0", "cuda:1"]``: one worker process per device shares the
            batches (spawned; ``["cpu", "cpu"]`` works too).

    Returns:
        One result per registered phase, in subject and phase order.

    Raises:
        BadInputError: no subjects, a 4D file with one phase, a subject with one phase,
            phases of different shapes or affines, a missing phase, unreadable or NaN
            images, an output folder made with another pairing.
    """
    from tqdm import tqdm

    if pairs not in ("reference", "consecutive"):
        raise MedsynthError(f"register: pairs must be reference or consecutive, got {pairs!r}")
    if batch < 1:
        raise MedsynthError(f"register: batch must be at least 1, got {batch}")
    config = config or RegistrationConfig()
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    subjects = _find_subjects(data_dir, reference_phase)
    _write_record(out_dir, pairs, reference_phase, subjects)
    jobs = _jobs(subjects, out_dir, reference_phase, pairs)
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
                report(_done_earlier(job.out))
        if devices is None or len(devices) <= 1:
            single = config if not devices else config.model_copy(update={"device": devices[0]})
            for jobs_ in batches:
                for result in _register_jobs(jobs_, single):
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
