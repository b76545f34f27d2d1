"""Importers: turn a dataset folder in a known layout into a :class:`Manifest`.

Importers only list and check files (headers, not voxels); nothing is copied. Layouts:

- a medsynth ``dataset.json`` (our own schema; phantoms write it),
- nnU-Net v2 raw folders: ``imagesTr/<case>_0000<ending>`` (+ ``_0001``… channels; a DICOM
  series folder ``imagesTr/<case>_0000/`` stands wherever an image file does),
  ``labelsTr/<case><ending>``, ``dataset.json`` with ``channel_names``, ``labels``,
  ``file_ending``,
- Medical Segmentation Decathlon: ``dataset.json`` with a ``training`` list of
  ``{"image", "label"}`` pairs (an image may be a DICOM series folder),
- ``template_img_<n>.npy`` + ``flow_<n>.npy`` pairs (+ optional ``affine_<n>.npy``, ``label_<n>.npy``,
  ``diastole_img_<n>.npy``, a folder ``affine.npy`` and ``flow_pairs.json``),
- class-per-folder 2D pictures: ``<root>/<Class>/<Class>_<n>.png``.
- cine MRI (:mod:`medsynth.data.cine`): UK Biobank ``<subject>/sa.nii.gz`` [+ ``la_*``], ACDC
  ``<patient>/<patient>_frameNN.nii.gz`` + ``Info.cfg``.
- phase series (4D CT): 4D NIfTI files, or subject folders of one 4D NIfTI, one DICOM series per
  phase, or one 3D file per phase (:func:`import_phase_series`).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from medsynth.data.io import (
    ITK_SUFFIXES,
    NIFTI_SUFFIXES,
    PICTURE_SUFFIXES,
    check_same_grid,
    itk_affine,
    lps_to_ras,
    natural_key,
    nifti_header,
    suffix_of,
)
from medsynth.data.manifest import MANIFEST_NAME, Case, Manifest, check_inside
from medsynth.errors import BadInputError, MedsynthError
from medsynth.runs import read_structured


def import_dataset(src: str | Path, out_dir: str | Path | None = None) -> Manifest:
    """Recognise the layout of ``src`` and build its manifest.

    Args:
        src: dataset folder (any layout above).
        out_dir: where to write ``dataset.json`` (paths relative to it, pointing to the
            original files: outside that folder, so reading it needs ``--allow-outside``);
            ``None`` writes nothing and keeps paths relative to ``src``.

    Raises:
        MedsynthError: ``src`` is in no known layout.
        BadInputError: a file of the dataset is unusable (names it).
    """
    src = Path(src)
    if not src.is_dir():
        raise BadInputError(src, "dataset folder not found")
    manifest = _detect(src)(src)
    if out_dir is not None:
        manifest.save(out_dir)
    return manifest


def _detect(src: Path) -> Callable[[Path], Manifest]:
    description = src / MANIFEST_NAME
    if description.is_file():
        data = _read_json(description)
        if "cases" in data:
            return lambda folder: Manifest.load(folder).check_paths()  # its files inside its folder, unless --allow-outside
        if "channel_names" in data and (src / "imagesTr").is_dir():
            return import_nnunet
        if "training" in data:
            return import_decathlon
    if any(src.glob("template_img_*.npy")):
        return import_flow_pairs
    from medsynth.data import cine  # cine builds on this module's header checks

    if any(src.glob(f"*/{cine.SAX_NAME}")):
        return cine.import_ukbb
    if any(src.glob(f"*/{cine.INFO_NAME}")) and any(src.glob("*/*_frame[0-9]*.nii*")):
        return cine.import_acdc
    if not (src / "imagesTr").exists() and is_phase_layout(src):
        return import_phase_series
    if any(p.is_dir() and not p.name.startswith(".") for p in src.iterdir()) and not (src / "imagesTr").exists():
        return import_class_folders
    raise MedsynthError(
        f"{src}: not a recognised dataset layout (expected a medsynth dataset.json, an nnU-Net v2 raw folder "
        "[dataset.json + imagesTr/], a Decathlon folder [dataset.json with 'training'], template_img_<n>.npy + "
        "flow_<n>.npy pairs, UK Biobank <subject>/sa.nii.gz, ACDC <patient>/Info.cfg, 4D NIfTI files or subject folders of phases, "
        "or one folder of 2D pictures per class)"
    )


def _read_json(path: Path) -> dict[str, Any]:
    return read_structured(path, "dataset description")


def _relative(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


# -- class-per-folder pictures ---------------------------------------------------------------


def import_class_folders(src: str | Path) -> Manifest:
    """One folder of 2D pictures per class.

    The classes' order (a class's index is its position) is the ``classes`` list of a
    ``dataset.json`` beside the folders when there is one (e.g. a clinical order); otherwise
    the folder names sorted alphabetically.

    Raises:
        BadInputError: an empty class folder, a file that is not a picture (names it), or a
            ``classes`` list that does not name exactly the class folders.
    """
    src = Path(src)
    folders = sorted(p for p in src.iterdir() if p.is_dir() and not p.name.startswith("."))
    order = _declared_classes(src, [folder.name for folder in folders])
    folders.sort(key=lambda folder: order.index(folder.name))
    files: dict[str, list[Path]] = {}
    for folder in folders:
        entries = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
        for entry in entries:
            if not entry.is_file() or suffix_of(entry) not in PICTURE_SUFFIXES:
                raise BadInputError(entry, f"not a picture (class folders hold only {', '.join(PICTURE_SUFFIXES)} files)")
        if not entries:
            raise BadInputError(folder, "class folder holds no pictures")
        files[folder.name] = entries
    stems = [path.name[: -len(suffix_of(path))] for paths in files.values() for path in paths]
    # Stems name subjects and case files; prefix the class only where stems repeat across folders.
    unique = len(set(stems)) == len(stems)
    cases = []
    for class_name, paths in files.items():
        for path in paths:
            stem = path.name[: -len(suffix_of(path))]
            case_id = stem if unique else f"{class_name}_{stem}"
            cases.append(Case(id=case_id, subject=case_id, image=_relative(path, src), class_name=class_name))
    return Manifest(name=src.name, spatial_dims=2, modality="picture", source="class-folders",
                    classes=list(files), cases=cases).with_root(src)


def _declared_classes(src: Path, names: list[str]) -> list[str]:
    """The class order ``src/dataset.json`` declares (``{"classes": [...]}``), else ``names`` sorted."""
    path = src / MANIFEST_NAME
    if not path.is_file():
        return sorted(names)
    declared = _read_json(path).get("classes")
    if declared is None:
        return sorted(names)
    if not isinstance(declared, list) or not all(isinstance(name, str) for name in declared):
        raise BadInputError(path, f"'classes' must be a list of class-folder names, got {declared!r}")
    if sorted(declared) != sorted(names) or len(set(declared)) != len(declared):
        raise BadInputError(path, f"'classes' {declared} must name each class folder once (folders: {', '.join(sorted(names))})")
    return list(declared)


# -- nnU-Net v2 and Decathlon -------------------------------------------------------------


def import_nnunet(src: str | Path) -> Manifest:
    """An nnU-Net v2 raw folder (training cases of ``imagesTr``/``labelsTr``).

    Every channel named in ``channel_names`` becomes one entry of the case's image list.

    Raises:
        BadInputError: a missing channel or label, or a label whose shape or affine differs
            from its image (names the file).
    """
    src = Path(src)
    description_path = src / MANIFEST_NAME
    description = _read_json(description_path)
    try:
        ending = str(description["file_ending"])
        channels = {int(k): str(v) for k, v in description["channel_names"].items()}
        labels = _label_names(description["labels"], description_path)
    except (KeyError, AttributeError, ValueError) as exc:
        raise BadInputError(description_path, f"not an nnU-Net v2 dataset.json ({type(exc).__name__}: {exc})") from None
    images, labels_dir = src / "imagesTr", src / "labelsTr"
    pattern = re.compile(rf"^(?P<case>.+)_(?P<channel>\d{{4}}){re.escape(ending)}$")
    series_folder = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")  # a DICOM series in place of a file
    found: dict[str, dict[int, Path]] = {}
    for path in sorted(images.iterdir()):
        match = (series_folder if path.is_dir() else pattern).match(path.name)
        if path.name.startswith("."):
            continue
        if match is None:
            raise BadInputError(path, f"not an nnU-Net image name (<case>_<XXXX>{ending}, or a DICOM series folder <case>_<XXXX>)")
        found.setdefault(match["case"], {})[int(match["channel"])] = path
    if not found:
        raise BadInputError(images, f"no images named <case>_0000{ending}")
    cases = []
    for case_id, by_channel in found.items():
        missing = sorted(set(channels) - set(by_channel))
        if missing:
            raise BadInputError(images / f"{case_id}_{missing[0]:04d}{ending}", "channel file missing")
        paths = [by_channel[c] for c in sorted(channels)]
        label = labels_dir / f"{case_id}{ending}"
        if labels_dir.is_dir() and not label.is_file():
            raise BadInputError(label, "label file missing")
        if label.is_file():
            check_label_header(paths[0], label)
        image = [_relative(p, src) for p in paths]
        cases.append(Case(id=case_id, subject=case_id, image=image if len(image) > 1 else image[0],
                          label=_relative(label, src) if label.is_file() else None))
    if labels_dir.is_dir():  # a label without its image is left out: say so
        from medsynth.console import note

        for label in sorted(p for p in labels_dir.iterdir() if p.name.endswith(ending) and p.name[: -len(ending)] not in found):
            note(f"prepare: label {label} left out: no image {images / (label.name[: -len(ending)] + '_0000' + ending)}")
    return Manifest(name=str(description.get("name", src.name)), spatial_dims=_spatial_dims(cases[0], src),
                    modality="+".join(channels[c] for c in sorted(channels)), source="nnunet-v2",
                    labels=labels, cases=cases).with_root(src)


def import_decathlon(src: str | Path) -> Manifest:
    """A Medical Segmentation Decathlon folder (its ``training`` list of image/label pairs).

    Raises:
        BadInputError: a listed file is missing, or a label's geometry differs from its image.
    """
    src = Path(src)
    description_path = src / MANIFEST_NAME
    description = _read_json(description_path)
    try:
        labels = _by_value({str(int(k)): str(v) for k, v in description.get("labels", {}).items()})
        pairs = [(str(item["image"]), item.get("label")) for item in description["training"]]
        modality = "+".join(str(v) for v in description.get("modality", {}).values()) or "unknown"
    except (KeyError, AttributeError, TypeError, ValueError) as exc:
        raise BadInputError(description_path, f"not a Decathlon dataset.json ({type(exc).__name__}: {exc})") from None
    for index, (image_name, label_name) in enumerate(pairs):  # every listed path inside src, unless --allow-outside
        for what, name in (("image", image_name), ("label", label_name)):
            if name is not None:
                check_inside(src, str(name), f"training[{index}] {what}")
    cases = []
    for image_name, label_name in pairs:
        image = src / image_name
        if not image.exists():
            raise BadInputError(image, "listed in dataset.json but not found")
        if label_name is not None:
            check_label_header(image, src / label_name)
        case_id = image.name[: len(image.name) - len(suffix_of(image))]  # a series folder keeps its whole name
        # As listed (relative to src, or absolute under --allow-outside), tidied: "./imagesTr/x" -> "imagesTr/x".
        cases.append(Case(id=case_id, subject=case_id, image=Path(image_name).as_posix(),
                          label=Path(label_name).as_posix() if label_name is not None else None))
    if not cases:
        raise BadInputError(description_path, "lists no training cases")
    return Manifest(name=str(description.get("name", src.name)), spatial_dims=_spatial_dims(cases[0], src),
                    modality=modality, source="decathlon", labels=labels, cases=cases).with_root(src)


def _label_names(labels: dict[str, Any], path: Path) -> dict[str, str]:
    # nnU-Net maps names to values; region-based training maps names to lists of values.
    names = {}
    for name, value in labels.items():
        if not isinstance(value, int):
            raise BadInputError(path, f"label '{name}' is region-based ({value}); only integer labels are supported")
        names[str(value)] = str(name)
    return _by_value(names)


def _by_value(labels: dict[str, str]) -> dict[str, str]:
    # A label's value is its order (as nnU-Net and the Decathlon number them); names are never sorted.
    return dict(sorted(labels.items(), key=lambda item: int(item[0])))


def _spatial_dims(case: Case, root: Path) -> int:
    shape, _ = read_header(root / case.images[0])
    if shape is None:
        return 2 if suffix_of(case.images[0]) in PICTURE_SUFFIXES else 3
    return 2 if len(shape) == 2 else 3


def read_header(path: str | Path) -> tuple[tuple[int, ...] | None, np.ndarray | None]:
    """Spatial shape and 4x4 RAS affine from a file header, without reading voxels.

    Returns ``(None, None)`` for formats whose header is not read here (pictures, DICOM files
    and series folders, NumPy); their geometry is checked after loading.

    Raises:
        BadInputError: missing file or unreadable header.
    """
    path = Path(path)
    if path.is_dir():  # a DICOM series: which series (``--series``) is only known when prepare loads it
        return None, None
    if not path.is_file():
        raise BadInputError(path, "file not found")
    suffix = suffix_of(path)
    if suffix in NIFTI_SUFFIXES:
        shape, affine = nifti_header(path)
        return shape[:3], affine
    try:
        if suffix in ITK_SUFFIXES:
            return _itk_header(path)
    except BadInputError:
        raise
    except Exception as exc:  # each library fails differently on a corrupt header
        raise BadInputError(path, f"cannot read header ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'corrupt'})") from None
    return None, None


def _itk_header(path: Path) -> tuple[tuple[int, ...], np.ndarray]:
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    return tuple(int(n) for n in reader.GetSize()), itk_affine(reader.GetDirection(), reader.GetSpacing(), reader.GetOrigin())


def check_label_header(image: Path, label: Path) -> None:
    """Refuse a label whose header shape or affine differs from its image's.

    Raises:
        BadInputError: naming the label file.
    """
    image_shape, image_affine = read_header(image)
    label_shape, label_affine = read_header(label)
    if image_shape is not None and label_shape is not None:
        check_same_grid(image_shape, image_affine, label_shape, label_affine, label, image)


# -- template/flow NumPy pairs --------------------------------------------------------------

_PAIR_NAME = re.compile(r"^(?P<kind>template_img|flow|affine|label|diastole_img)_(?P<n>.+)\.npy$")
FLOW_PAIRS_DESCRIPTION = "flow_pairs.json"  # optional: modality and label names (the cardiac phantom writes it)
FOLDER_AFFINE = "affine.npy"  # optional: one 4x4 affine for every pair without its own affine_<n>.npy


def import_flow_pairs(src: str | Path) -> Manifest:
    """``template_img_<n>.npy`` frames with their ``flow_<n>.npy`` (the original cardiac CT flow layout).

    Per pair ``<n>``: the frame ``(X, Y, Z)`` (or ``(1, X, Y, Z)``); its flow, a displacement in
    voxels of the frame's grid, channel-first ``(3, X, Y, Z)`` or channel-last ``(X, Y, Z, 3)``;
    optional ``affine_<n>.npy`` (4x4 voxel-to-RAS, mm; else the folder's ``affine.npy``, else
    the identity), ``label_<n>.npy`` (the frame's label map, ``(X, Y, Z)`` integers) and
    ``diastole_img_<n>.npy`` (the other frame of the pair, the case's ``moving``: ``warp(diastole,
    flow) == template``). An optional ``flow_pairs.json`` gives ``modality`` and ``labels``
    (value -> name). Headers only are read here; NaN voxels are refused when ``prepare`` loads them.

    Raises:
        BadInputError: a file without its frame (or a frame without its flow), a flow whose
            channel count is not 3 or whose grid differs from its frame's, a label or diastole
            frame of another shape (each names the file).
    """
    src = Path(src)
    groups: dict[str, dict[str, Path]] = {}
    for path in sorted(src.glob("*.npy")):
        match = _PAIR_NAME.match(path.name)
        if match is not None:
            groups.setdefault(match["n"], {})[match["kind"]] = path
    description = _read_json(src / FLOW_PAIRS_DESCRIPTION) if (src / FLOW_PAIRS_DESCRIPTION).is_file() else {}
    folder_affine = FOLDER_AFFINE if (src / FOLDER_AFFINE).is_file() else None
    cases = []
    for n, files in sorted(groups.items(), key=lambda item: natural_key(item[0])):
        if "template_img" not in files:
            orphan = next(iter(files.values()))
            raise BadInputError(orphan, f"no matching template_img_{n}.npy")
        template = files["template_img"]
        if "flow" not in files:
            raise BadInputError(template, f"no matching flow_{n}.npy")
        _check_pair(template, files)
        optional = {key: _relative(files[kind], src) if kind in files else None
                    for key, kind in (("label", "label"), ("moving", "diastole_img"), ("affine", "affine"))}
        optional["affine"] = optional["affine"] or folder_affine
        cases.append(Case(id=f"case_{n}", subject=f"case_{n}", image=_relative(template, src),
                          flow=_relative(files["flow"], src), **optional))
    labels = description.get("labels") or {}
    try:
        return Manifest(name=src.name, spatial_dims=3, modality=str(description.get("modality", "CT")), source="flow-pairs",
                        labels=_by_value({str(int(k)): str(v) for k, v in labels.items()}), cases=cases).with_root(src)
    except (AttributeError, ValueError) as exc:
        raise BadInputError(src / FLOW_PAIRS_DESCRIPTION, f"'labels' must map integer values to names ({type(exc).__name__})") from None


def _npy_shape(path: Path) -> tuple[int, ...]:
    try:
        return tuple(np.load(path, mmap_mode="r", allow_pickle=False).shape)
    except Exception as exc:  # corrupt or pickled NumPy files
        raise BadInputError(path, f"cannot read NumPy header ({type(exc).__name__})") from None


def _check_pair(template: Path, files: dict[str, Path]) -> None:
    """Refuse a pair whose flow is not a 3-component field on the frame's grid, or whose label/diastole differ in shape."""
    shape = _npy_shape(template)
    spatial = shape[1:] if len(shape) == 4 and shape[0] == 1 else shape
    if len(spatial) != 3:
        raise BadInputError(template, f"expected a 3D volume, got shape {shape}")
    flow = files["flow"]
    flow_shape = _npy_shape(flow)
    if len(flow_shape) != 4:
        raise BadInputError(flow, f"shape {flow_shape} is not a field (3, X, Y, Z) on its frame {template.name}'s grid {spatial}")
    channels = flow_shape[0] if flow_shape[1:] == spatial else flow_shape[3] if flow_shape[:3] == spatial else None
    if channels is None:
        raise BadInputError(flow, f"shape {flow_shape} differs from its frame {template.name} {spatial} (expected (3, *{spatial}))")
    if channels != 3:
        raise BadInputError(flow, f"has {channels} channel(s); a 3D displacement field has 3 (shape {flow_shape})")
    for kind in ("label", "diastole_img"):
        if kind in files:
            other = _npy_shape(files[kind])
            if (other[1:] if len(other) == 4 and other[0] == 1 else other) != spatial:
                raise BadInputError(files[kind], f"shape {other} differs from its frame {template.name} {spatial}")


# -- phase series (4D CT and other 4D scans) --------------------------------------------------


def scan_header(path: str | Path) -> tuple[tuple[int, ...], np.ndarray]:
    """Full shape and 4x4 RAS affine of a phase-series source from its headers (no voxels): a NIfTI file
    (``(X, Y, Z)`` or ``(X, Y, Z, T)``), or a DICOM folder of one series per phase (``(X, Y, Z, T)``,
    :func:`medsynth.data.dicom.phase_series_geometry`).

    Raises:
        BadInputError: unreadable header, or a DICOM folder that is not the phases of one acquisition.
    """
    path = Path(path)
    if path.is_dir():
        from medsynth.data.dicom import phase_series_geometry

        geometry = phase_series_geometry(path)
        return geometry.shape, lps_to_ras(geometry.affine)
    return nifti_header(path)


def _nifti_files(folder: Path) -> list[Path]:
    """The NIfTI files of a folder in natural order (``image_2`` before ``image_10``)."""
    return sorted((p for p in folder.iterdir() if p.is_file() and suffix_of(p) in NIFTI_SUFFIXES), key=lambda p: natural_key(p.name))


def _holds_dicom(folder: Path) -> bool:
    from pydicom.misc import is_dicom

    return any(p.is_file() and not p.name.startswith(".") and suffix_of(p) not in PICTURE_SUFFIXES and is_dicom(p) for p in folder.iterdir())


def is_phase_layout(src: Path) -> bool:
    """Whether ``src`` looks like a phase-series layout (without a ``dataset.json``): NIfTI files in it, or
    sub-folders holding NIfTI or DICOM files (the class-folder layout holds pictures)."""
    if _nifti_files(src):
        return True
    return any(p.is_dir() and not p.name.startswith(".") and (_nifti_files(p) or _holds_dicom(p)) for p in src.iterdir())


def import_phase_series(src: str | Path) -> Manifest:
    """Phase series without a ``dataset.json``: one case per subject and phase (``phase`` set; ``frame`` too
    when the phases are frames of one 4D scan). Layouts:

    - a folder of 4D NIfTI files ``(X, Y, Z, T)``, one per subject (named after the file);
    - one folder per subject (named after it) holding one 4D NIfTI, or one DICOM series per phase of one
      acquisition (:mod:`medsynth.data.dicom`; e.g. TCIA's 4D-Lung), or one 3D file per phase (phase order
      = natural sort of the names; only ``image*`` files when any exist, so labels and fields beside them
      are not taken for phases).

    Raises:
        BadInputError: no subjects; a subject folder holding both a 4D scan and other phase files (ambiguous),
            or several 4D scans; a DICOM folder that is not the phases of one acquisition; unreadable headers.
    """
    src = Path(src)
    cases: list[Case] = []

    def add(subject: str, image: Path, phases: int, frames: bool) -> None:
        cases.extend(Case(id=f"{subject}_t{t:02d}", subject=subject, image=_relative(image, src), phase=t,
                          frame=t if frames else None) for t in range(phases))

    if not src.is_dir():
        pass  # refused below, as a folder without phases
    elif _nifti_files(src):
        for path in _nifti_files(src):
            shape, _ = scan_header(path)
            if len(shape) != 4:
                raise BadInputError(path, f"expected a 4D scan (X, Y, Z, phase), got {len(shape)}D (a folder of scans holds one 4D file per subject)")
            add(path.name[: -len(suffix_of(path))], path, shape[3], True)
    else:
        for folder in sorted((p for p in src.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: natural_key(p.name)):
            files = _nifti_files(folder)
            images = [p for p in files if p.name.startswith("image")] or files  # next to label/dvf files, only the images
            if images:
                scans = [p for p in files if len(shape := scan_header(p)[0]) == 4 and shape[3] > 1]  # (fields are 5D)
                others = [p for p in images if p not in scans]
                if len(scans) > 1 or (scans and others):
                    what = f"{len(scans)} 4D scans" if len(scans) > 1 else f"a 4D scan ({scans[0].name}) and {len(others)} other phase file(s)"
                    raise BadInputError(folder, f"holds {what}: keep one layout per subject folder (one 4D file, or one 3D file per phase)")
                if scans:
                    add(folder.name, scans[0], scan_header(scans[0])[0][3], True)
                else:
                    cases.extend(Case(id=f"{folder.name}_t{t:02d}", subject=folder.name, image=_relative(p, src), phase=t) for t, p in enumerate(images))
            elif _holds_dicom(folder):
                add(folder.name, folder, scan_header(folder)[0][3], True)
    if not cases:
        raise BadInputError(src, "no dataset.json with phase cases, no 4D NIfTI files and no subject folders of phases "
                                 "(one 4D NIfTI, one DICOM series per phase, or one 3D file per phase) found")
    return Manifest(name=src.name, spatial_dims=3, source="phase-series", cases=cases).with_root(src)
