"""DICOM series folders read as DICOM readers do: one series, slices ordered by position.

The reader is **pydicom directly**. SimpleITK's GDCM series reader
(``ImageSeriesReader.GetGDCMSeriesIDs`` / ``GetGDCMSeriesFileNames``) groups and sorts as
well, but stacks missing or irregular slices with a warning only; refusing them needs every
header anyway, and pydicom gives grouping, ordering and the checks in one pass over the
headers. ``tests/data/test_dicom.py`` checks the volume and affine against SimpleITK's reader.

A folder's files (hidden files and ``DICOMDIR`` excepted; not its sub-folders) are:

1. grouped by ``SeriesInstanceUID``: a folder holding several series is the phases of one 4D
   acquisition when every series carries a phase (:func:`phase_of`); otherwise it is refused with
   one line listing them (UID, description, number of slices) unless ``series`` names one (its
   UID or its ``SeriesDescription``);
2. ordered by their position along the slice normal: ``ImagePositionPatient`` projected on
   the cross product of ``ImageOrientationPatient``'s row and column directions;
3. refused when two slices share a position, when the gaps between positions vary by more
   than :data:`GAP_TOLERANCE` (the line gives the smallest and largest gap), or when
   orientation, pixel spacing or slice size differ between slices;
4. stacked with the slice spacing taken from the positions (never ``SliceThickness``) and the
   affine built from orientation, pixel spacing and the first position, in DICOM's own LPS
   frame: :func:`medsynth.data.io.load_image` converts it through
   :func:`~medsynth.data.io.lps_to_ras` (the one conversion; io imports this module, which takes
   only the grid tolerance back).

Arrays are ``(1, X, Y, Z)`` = (columns, rows, slices), intensities through the modality LUT
(``RescaleSlope``/``RescaleIntercept``), as :func:`medsynth.data.io.load_image` returns them; a
4D acquisition is ``(T, X, Y, Z)``, phases in order, as a 4D NIfTI reads (:func:`read_phase_series`).

4D CT as scanners and TCIA's 4D-Lung store it: one series per breathing or cardiac phase in one
folder. A series' phase is its ``NominalPercentageOfCardiacPhase`` (0020,9241), else its
``TriggerTime`` (0018,1060, ms), else the percentage in its ``SeriesDescription`` (4D-Lung:
``"Gated, 10.0%"``); the first of these that every series has orders them. Each phase is one
series as above, and all must share one grid (shape and affine to
:data:`AFFINE_TOLERANCE`), or the folder is refused.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from medsynth.errors import BadInputError

# Image and label geometry must agree to this many millimetres (nnU-Net uses a similar tolerance): a label,
# flow, second channel or phase whose affine differs by more is on another grid. The one grid tolerance
# (data.io re-exports it; it lives here because io imports this reader, not the other way).
AFFINE_TOLERANCE = 1e-4

# Gaps between neighbouring slice positions may differ by this share of the median gap
# (positions are stored as decimal strings, rounded to a few micrometres).
GAP_TOLERANCE = 0.01
# Orientation cosines and pixel spacings (mm) of a series' slices must agree to this.
_HEADER_TOLERANCE = 1e-4
_SKIPPED = ("DICOMDIR",)


def series_files(folder: str | Path) -> list[Path]:
    """The files a series folder's reader looks at (sorted; hidden files and ``DICOMDIR`` skipped)."""
    return sorted(p for p in Path(folder).iterdir() if p.is_file() and not p.name.startswith(".") and p.name not in _SKIPPED)


def is_dicom_folder(folder: str | Path) -> bool:
    """Whether every file a series reader looks at in ``folder`` is DICOM (by its ``DICM`` preamble; no header parsed)."""
    from pydicom.misc import is_dicom

    files = series_files(folder)
    return bool(files) and all(is_dicom(path) for path in files)


def read_series(folder: str | Path, series: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The volume and voxel-to-LPS affine of the one DICOM series in ``folder`` (or the one ``series`` names),
    or of the 4D acquisition its series are the phases of (:func:`read_phase_series`, when ``series`` is ``None``).

    Args:
        folder: a folder of DICOM slice files (any file names, in any order).
        series: the ``SeriesInstanceUID`` or ``SeriesDescription`` to read when the folder
            holds several series.

    Returns:
        ``(array, affine)``: float64 ``(1, X, Y, Z)`` (columns, rows, slices), or ``(T, X, Y, Z)`` for the
        phases of a 4D acquisition, in modality units (HU for CT), and the 4x4 voxel-to-LPS affine (mm;
        DICOM's patient frame).

    Raises:
        BadInputError: no DICOM files, several series without phases and no choice, an unknown ``series``,
            duplicated or irregular slice positions, slices that differ in geometry, or phases on different grids.
    """
    folder = Path(folder)
    headers = _headers(folder)
    if series is None and len(headers) > 1 and _phase_order(headers) is not None:  # the phases of one 4D acquisition
        geometry = _phase_geometry(folder, headers)
        return np.stack([_read_slices(files) for files in geometry.files]), geometry.affine
    files, affine = _geometry(folder, _choose(folder, headers, series))
    return _read_slices(files)[None], affine


def _read_slices(files: list[Path]) -> np.ndarray:
    """The slices' pixels through the modality LUT, stacked ``(X, Y, Z)`` float64 in the order given."""
    from pydicom import dcmread
    from pydicom.pixels import apply_modality_lut

    slices = []
    for path in files:
        ds = dcmread(path)
        pixels = np.asarray(apply_modality_lut(ds.pixel_array, ds), dtype=np.float64)
        if pixels.shape != (int(ds.Rows), int(ds.Columns)):
            raise BadInputError(path, f"holds pixels of shape {pixels.shape}, expected one slice ({ds.Rows}, {ds.Columns}) "
                                      "(multi-frame or colour files are not read as series slices)")
        slices.append(pixels.T)  # (rows, columns) -> (columns, rows): x along the row direction
    return np.stack(slices, axis=-1)


# -- 4D: one series per phase --------------------------------------------------------------

# Where a series' phase is read, in order of preference (the first kind every series has wins).
PHASE_TAGS = ("NominalPercentageOfCardiacPhase", "TriggerTime", "SeriesDescription")
_PERCENT = re.compile(r"(-?\d+(?:\.\d+)?)\s*%")


def phase_of(ds: Any, tag: str) -> float | None:
    """The phase ``tag`` gives a DICOM header: the tag's number, or for ``SeriesDescription`` the number before
    its ``%`` (``"Gated, 10.0%"`` -> 10.0); ``None`` when the header has none."""
    value = ds.get(tag)
    if value is None or str(value).strip() == "":
        return None
    if tag == "SeriesDescription":
        match = _PERCENT.search(str(value))
        return float(match.group(1)) if match else None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _phase_order(groups: dict[str, list[tuple[Path, Any]]]) -> tuple[str, list[tuple[float, str]]] | None:
    """The phase tag every series has and the series ``(phase, uid)`` in phase order, or ``None`` (not phases).

    A tag gives phases only when all slices of each series carry it with one value: series whose slices span
    several trigger times (a cine MR slice position per series) are not phases of a 4D volume."""
    for tag in PHASE_TAGS:
        values = {uid: {phase_of(ds, tag) for _, ds in items} for uid, items in groups.items()}
        if all(len(v) == 1 and None not in v for v in values.values()):
            return tag, sorted((float(next(iter(v))), uid) for uid, v in values.items())
    return None


def is_phase_series(folder: str | Path) -> bool:
    """Whether ``folder`` holds several DICOM series that are the phases of one acquisition (headers only;
    the grids are checked when read). ``False`` for a folder of one series or with files that are not DICOM."""
    try:
        headers = _headers(Path(folder))
    except BadInputError:
        return False
    return len(headers) > 1 and _phase_order(headers) is not None


class PhaseGeometry(NamedTuple):
    """A 4D acquisition's layout, from its headers."""

    files: list[list[Path]]  # each phase's files in slice order, phases in order
    affine: np.ndarray  # (4, 4) voxel-to-LPS (mm), shared by every phase
    phases: list[float]  # each phase's value: percent, or ms for TriggerTime
    shape: tuple[int, int, int, int]  # (X, Y, Z, T) = (columns, rows, slices, phases)


def phase_series_geometry(folder: str | Path) -> PhaseGeometry:
    """Each phase's files in slice order, the voxel-to-LPS affine they share, the phase values and the 4D shape,
    from the headers.

    Raises:
        BadInputError: the folder is not a phase series (one series, or series without a phase tag: the
            line lists them), two series share a phase, or a phase differs from the first in grid.
    """
    folder = Path(folder)
    headers = _headers(folder)
    if len(headers) < 2 or _phase_order(headers) is None:
        _choose(folder, headers, None)  # several series without phases: the line that lists them
        raise BadInputError(folder, "holds one DICOM series, not one series per phase of a 4D acquisition")
    return _phase_geometry(folder, headers)


def read_phase_series(folder: str | Path) -> tuple[np.ndarray, np.ndarray, list[float]]:
    """A 4D acquisition stored as one DICOM series per phase.

    Returns:
        ``(array, affine, phases)``: float64 ``(T, X, Y, Z)`` in modality units (HU for CT), phases in
        order (the layout :func:`medsynth.data.io.load_image` gives a 4D NIfTI); the 4x4 voxel-to-LPS
        affine (mm) all phases share; each phase's value (percent, or ms for ``TriggerTime``).

    Raises:
        BadInputError: as :func:`phase_series_geometry`, or a slice that cannot be read.
    """
    geometry = phase_series_geometry(folder)
    return np.stack([_read_slices(files) for files in geometry.files]), geometry.affine, geometry.phases


def _phase_geometry(folder: Path, headers: dict[str, list[tuple[Path, Any]]]) -> PhaseGeometry:
    """Every phase series ordered and placed by :func:`_geometry`, refused unless all share the first one's grid."""
    order = _phase_order(headers)
    assert order is not None
    tag, ordered = order
    values = [value for value, _ in ordered]
    repeated = sorted({v for v in values if values.count(v) > 1})
    if repeated:
        clash = "; ".join(_describe(uid, headers[uid]) for v, uid in ordered if v == repeated[0])
        raise BadInputError(folder, f"several DICOM series share the phase {repeated[0]:g} ({tag}): {clash}; "
                                    "keep one series per phase in the folder, or choose one with --series")
    phases, first_affine, first_shape = [], None, None
    for value, uid in ordered:
        files, affine = _geometry(folder, headers[uid])
        first = headers[uid][0][1]
        shape = (int(first.Columns), int(first.Rows), len(files))
        if first_affine is None:
            first_affine, first_shape, first_value = affine, shape, value
        elif shape != first_shape:
            raise BadInputError(folder, f"phase {value:g} ({tag}) has shape {shape}, phase {first_value:g} {first_shape}: "
                                        "the phases of one acquisition share one grid")
        elif np.abs(affine - first_affine).max() > AFFINE_TOLERANCE:
            difference = float(np.abs(affine - first_affine).max())
            raise BadInputError(folder, f"phase {value:g} ({tag}) lies on another grid than phase {first_value:g} "
                                        f"(affine differs by up to {difference:.3g} mm): the phases of one acquisition share one grid")
        phases.append(files)
    return PhaseGeometry(phases, first_affine, values, (*first_shape, len(phases)))


def _headers(folder: Path) -> dict[str, list[tuple[Path, Any]]]:
    """Every DICOM file's header (no pixels), grouped by SeriesInstanceUID."""
    from pydicom import dcmread
    from pydicom.errors import InvalidDicomError

    files = series_files(folder)
    if not files:
        nested = " (sub-folders are not searched: name a series folder)" if any(p.is_dir() for p in folder.iterdir()) else ""
        raise BadInputError(folder, f"folder holds no DICOM files{nested}")
    groups: dict[str, list[tuple[Path, Any]]] = {}
    for path in files:
        try:
            ds = dcmread(path, stop_before_pixels=True)
        except InvalidDicomError:
            raise BadInputError(path, "not a DICOM file (a series folder holds only the series' DICOM files)") from None
        uid = ds.get("SeriesInstanceUID")
        if not uid:
            raise BadInputError(path, "DICOM file without SeriesInstanceUID")
        groups.setdefault(str(uid), []).append((path, ds))
    return groups


def _describe(uid: str, items: list[tuple[Path, Any]]) -> str:
    description = str(items[0][1].get("SeriesDescription", "") or "").strip()
    return f"{uid} '{description}' ({len(items)} slice{'s' if len(items) != 1 else ''})"


def _choose(folder: Path, groups: dict[str, list[tuple[Path, Any]]], series: str | None) -> list[tuple[Path, Any]]:
    """The one series of the folder, or the one ``series`` names by UID or description."""
    listing = "; ".join(_describe(uid, items) for uid, items in sorted(groups.items()))
    if series is None:
        if len(groups) > 1:
            raise BadInputError(folder, f"holds {len(groups)} DICOM series, choose one with --series UID "
                                        f"(or its description): {listing}")
        return next(iter(groups.values()))
    matches = [uid for uid, items in groups.items()
               if series in (uid, str(items[0][1].get("SeriesDescription", "") or "").strip())]
    if len(matches) != 1:
        what = "no" if not matches else f"{len(matches)}"
        raise BadInputError(folder, f"{what} DICOM series match --series '{series}' (series here: {listing})")
    return groups[matches[0]]


def _vector(ds: Any, path: Path, name: str, length: int) -> np.ndarray:
    value = ds.get(name)
    if value is None or len(value) != length:
        raise BadInputError(path, f"DICOM slice without a valid {name} (needed to place it in space)")
    return np.asarray([float(v) for v in value], dtype=np.float64)


def _geometry(folder: Path, items: list[tuple[Path, Any]]) -> tuple[list[Path], np.ndarray]:
    """Order a series' slices along their normal, check their spacing, and build the affine."""
    first_path, first = items[0]
    orientation = _vector(first, first_path, "ImageOrientationPatient", 6)
    pixel_spacing = _vector(first, first_path, "PixelSpacing", 2)  # (between rows, between columns)
    size = (int(first.Rows), int(first.Columns))
    for path, ds in items[1:]:
        if np.abs(_vector(ds, path, "ImageOrientationPatient", 6) - orientation).max() > _HEADER_TOLERANCE:
            raise BadInputError(path, f"slice orientation differs from {first_path.name}'s (a localiser or another stack in the series)")
        if np.abs(_vector(ds, path, "PixelSpacing", 2) - pixel_spacing).max() > _HEADER_TOLERANCE:
            raise BadInputError(path, f"pixel spacing differs from {first_path.name}'s")
        if (int(ds.Rows), int(ds.Columns)) != size:
            raise BadInputError(path, f"slice size {int(ds.Rows)}x{int(ds.Columns)} differs from {first_path.name}'s {size[0]}x{size[1]}")
    row, column = orientation[:3], orientation[3:]  # directions of increasing column and row index (LPS)
    normal = np.cross(row, column)
    positions = np.stack([_vector(ds, path, "ImagePositionPatient", 3) for path, ds in items])
    along = positions @ normal  # mm along the slice normal
    order = np.argsort(along, kind="stable")
    files, positions, along = [items[i][0] for i in order], positions[order], along[order]

    affine = np.eye(4)
    affine[:3, 0] = row * pixel_spacing[1]
    affine[:3, 1] = column * pixel_spacing[0]
    affine[:3, 3] = positions[0]
    if len(files) == 1:  # one slice: its thickness is the only spacing there is
        affine[:3, 2] = normal * float(first.get("SliceThickness") or 1.0)
        return files, affine
    gaps = np.diff(along)
    median = float(np.median(gaps))
    tolerance = max(GAP_TOLERANCE * median, _HEADER_TOLERANCE)
    if gaps.min() <= tolerance:
        k = int(np.argmin(gaps))
        raise BadInputError(folder, f"slices {files[k].name} and {files[k + 1].name} share the position "
                                    f"{along[k]:.2f} mm along the slice normal (duplicated slices)")
    if gaps.max() - gaps.min() > tolerance:
        raise BadInputError(folder, f"slice spacing varies from {gaps.min():.2f} to {gaps.max():.2f} mm along the slice normal "
                                    f"(missing or irregular slices in {len(files)} slices)")
    step = (positions[-1] - positions[0]) / (len(files) - 1)  # slice spacing from the positions (a tilt shears it)
    off_line = np.linalg.norm(positions - (positions[0] + np.arange(len(files))[:, None] * step), axis=1).max()
    if off_line > tolerance:
        raise BadInputError(folder, f"slice positions leave the line through the first and last slice by up to {off_line:.2f} mm")
    affine[:3, 2] = step
    return files, affine
