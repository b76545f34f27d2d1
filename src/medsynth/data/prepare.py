"""Prepare an imported dataset for training: resample, normalise, resize or crop, split by subject.

``prepare_dataset(src, out)`` writes::

    out/dataset.json      the manifest: ``split`` filled, ``prepare`` = settings, images -> cases/<id>.npz
    out/cases/<id>.npz    image float32 (C, *spatial), affine (4, 4), optional label int16 (1, *spatial),
                          optional flow float32 (D, *spatial) in voxels of the prepared grid,
                          optional moving float32 (C, *spatial): a pair's other frame, transformed as the image,
                          meta (JSON: the cache stamp and the case's statistics)
    out/stats.csv         one row per case; intensities are the source image's, before normalisation
    out/fingerprint.json  dataset-wide shapes, spacings, foreground intensities, class and label counts

Transforms are MONAI's, applied to ``MetaTensor``s so that MONAI updates the affine; a case
is only resampled when ``spacing``/``orientation``/``size`` ask for it, otherwise its
affine is kept exactly. Flows are resampled as world-space (mm) vectors and converted to
voxels of the prepared grid at the end. Rerunning with the same settings reuses every case
whose sources have not changed (the stamp in its ``meta``).
"""

from __future__ import annotations

import hashlib
import io
import json
from collections import Counter
from collections.abc import Sequence
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.networks.layers import gaussian_1d, separable_filtering
from monai.transforms import (
    NormalizeIntensity,
    Orientation,
    Resize,
    ScaleIntensityRange,
    ScaleIntensityRangePercentiles,
    Spacing,
    SpatialCrop,
    SpatialPad,
)
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, ValidationError, model_validator
from rich.progress import track

from medsynth.config import format_validation_error
from medsynth.console import console, note
from medsynth.data.cache import cached_meta, stamp
from medsynth.data.cine import load_case_file, slice_manifest, stack_percentiles
from medsynth.data.fields import mm_to_voxel, voxel_to_mm
from medsynth.data.importers import import_dataset
from medsynth.data.io import (
    ITK_SUFFIXES,
    NIFTI_SUFFIXES,
    check_finite_output,
    check_same_grid,
    load_image,
    load_phase,
    spacing_of,
    suffix_of,
)
from medsynth.data.manifest import MANIFEST_NAME, Case, Manifest
from medsynth.data.splits import split_subjects, subject_splits
from medsynth.data.stats import STATS_COLUMNS, fingerprint, intensity_stats, write_stats
from medsynth.errors import BadInputError, MedsynthError, NonFiniteOutputError
from medsynth.runs import atomic_write_bytes, atomic_write_json, remove_stale_temps

__all__ = ["STATS_COLUMNS", "Normalize", "PrepareConfig", "fingerprint", "intensity_stats", "prepare_dataset", "split_subjects", "hu_to_unit", "unit_to_hu"]

CASES_DIR = "cases"
# Flows in these formats carry their own geometry and are stored in millimetres (DESIGN.md).
_MM_FLOW_SUFFIXES = NIFTI_SUFFIXES + ITK_SUFFIXES


class Normalize(str, Enum):
    """Intensity normalisation of prepared images."""

    PERCENTILE = "percentile"  # percentiles[0]..percentiles[1] -> [0, 1] per channel (slices: of their frame volume), clipped
    ZSCORE = "zscore"  # zero mean, unit variance per channel
    CT = "ct"  # ct_window (HU) -> [0, 1], clipped
    NONE = "none"


class PrepareConfig(BaseModel):
    """Preparation settings; stored in the prepared manifest's ``prepare`` with their hash."""

    model_config = ConfigDict(extra="forbid")

    size: PositiveInt | None = Field(None, description="every spatial side to this many voxels (resized, or cropped/padded with crop)")
    keep_aspect: bool = Field(False, description="resize the longest side to `size` and pad the others")
    crop: bool = Field(False, description="reach `size` by cropping/padding around the label map's foreground, "
                                          "keeping the spacing, instead of resizing")
    spacing: tuple[PositiveFloat, ...] | None = Field(None, description="resample to this voxel spacing (mm); one value for all axes")
    orientation: str | None = Field(None, description="reorient to these axis codes, e.g. RAS")
    normalize: Normalize = Normalize.PERCENTILE
    percentiles: tuple[float, float] = (0.5, 99.5)
    ct_window: tuple[float, float] = (-1000.0, 1000.0)
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    test_fraction: float = Field(0.2, ge=0.0, lt=1.0)
    seed: int = 0
    series: str | None = Field(None, description="the DICOM series (SeriesInstanceUID or SeriesDescription) to read "
                                                 "from folders holding several")
    keep_color: bool = Field(False, description="colour pictures keep their R, G, B channels instead of becoming grey")
    slices: bool = Field(False, description="cine SAX stacks: one 2D case per subject, frame and slice (cine.slice_manifest)")

    @model_validator(mode="after")
    def _consistent(self) -> PrepareConfig:
        if self.keep_aspect and self.size is None:
            raise ValueError("keep_aspect needs a size")
        if self.keep_aspect and self.crop:
            raise ValueError("keep_aspect resizes and crop does not: choose one")
        if not 0.0 <= self.percentiles[0] < self.percentiles[1] <= 100.0:
            raise ValueError(f"percentiles {self.percentiles} must satisfy 0 <= low < high <= 100")
        if self.ct_window[0] >= self.ct_window[1]:
            raise ValueError(f"ct_window {self.ct_window} must be (low, high) with low < high")
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError("val_fraction + test_fraction must leave subjects for training")
        axes = {"L": 0, "R": 0, "P": 1, "A": 1, "I": 2, "S": 2}
        if self.orientation is not None and (set(self.orientation.upper()) - set(axes)
                                             or len({axes[c] for c in self.orientation.upper()}) != len(self.orientation)):
            raise ValueError(f"orientation '{self.orientation}' is not a code like RAS or LPS (one letter per axis)")
        return self

    def digest(self) -> str:
        """A hash of the settings: prepared files are reused only under the same hash.

        Settings added later count only when set, so datasets prepared before keep their hash.
        """
        later = {name for name in ("series", "keep_color", "slices") if getattr(self, name) == type(self).model_fields[name].default}
        return hashlib.sha256(self.model_dump_json(exclude=later).encode()).hexdigest()[:16]

    def check_dims(self, spatial_dims: int) -> None:
        """Refuse a spacing or orientation of the wrong length for ``spatial_dims``."""
        if self.spacing is not None and len(self.spacing) not in (1, spatial_dims):
            raise MedsynthError(f"spacing {self.spacing} needs 1 or {spatial_dims} values for {spatial_dims}D images")
        if self.orientation is not None and len(self.orientation) != spatial_dims:
            raise MedsynthError(f"orientation '{self.orientation}' needs {spatial_dims} letters for {spatial_dims}D images")


def prepare_dataset(src: str | Path, out: str | Path, config: PrepareConfig | None = None, *, force: bool = False,
                    progress: bool = True, **settings: Any) -> Path:
    """Import ``src`` and write a prepared dataset into ``out``.

    Args:
        src: a dataset folder in any layout :func:`~medsynth.data.importers.import_dataset` knows.
        out: output folder (not inside ``src``).
        config: the settings, or ``None`` to build them from ``settings``
            (``size``, ``keep_aspect``, ``crop``, ``spacing``, ``orientation``, ``normalize``,
            ``percentiles``, ``ct_window``, ``val_fraction``, ``test_fraction``, ``seed``,
            ``series``, ``keep_color``). Colour pictures become grey by luminance (one line on
            stderr says so) unless ``keep_color``.
        force: replace a different prepared dataset in ``out``.
        progress: show a progress bar on stderr.

    Returns:
        ``out``.

    Raises:
        MedsynthError: bad settings, or ``out`` holds a different prepared dataset and not ``force``.
        BadInputError: an unusable source file (names it); cases already written are kept.
    """
    config = _build_config(config, settings)
    src, out = Path(src), Path(out)
    if out.resolve() == src.resolve() or src.resolve() in out.resolve().parents:
        raise MedsynthError(f"{out}: the output folder must not be inside the source folder {src}")
    manifest = import_dataset(src)
    manifest = slice_manifest(manifest) if config.slices else manifest
    config.check_dims(manifest.spatial_dims)
    source = str(src.resolve())
    _claim(out, source, config.digest(), force)
    splits = subject_splits(manifest, config.val_fraction, config.test_fraction, config.seed)

    cases_dir = out / CASES_DIR
    cases_dir.mkdir(parents=True, exist_ok=True)
    prepared = []

    for case in track(manifest.cases, description="prepare", console=console, disable=not progress):
        target = cases_dir / f"{case.id}.npz"
        case_stamp = stamp(config.digest(), _sources(manifest, case))
        meta = cached_meta(target, case_stamp)
        if meta is None:
            meta = _prepare_case(manifest, case, config, target, case_stamp)
        prepared.append(_prepared_entry(case, meta, splits[case.subject]))
    for what, count in Counter(case.stats["colour"] for case in prepared if case.stats.get("colour")).items():
        note(f"prepare: {count} colour picture(s): {what}" + ("" if config.keep_color else "; keep the channels with --keep-color"))
    result = manifest.model_copy(update={"cases": prepared, "prepare": {
        "settings": config.model_dump(mode="json"), "hash": config.digest(), "from": source}}).with_root(out)
    _remove_stale(cases_dir, {case.id for case in prepared})
    write_stats(result, out / "stats.csv")
    atomic_write_json(out / "fingerprint.json", fingerprint(result))
    result.save(out)  # last: a dataset.json means the preparation is complete
    return out


def _build_config(config: PrepareConfig | None, settings: dict[str, Any]) -> PrepareConfig:
    if config is not None:
        if settings:
            raise MedsynthError(f"prepare: give a PrepareConfig or settings, not both ({', '.join(settings)})")
        return config
    try:
        return PrepareConfig(**settings)
    except ValidationError as exc:
        raise MedsynthError(format_validation_error(exc, "prepare")) from None


def _claim(out: Path, source: str, digest: str, force: bool) -> None:
    # Refuse to overwrite another prepared dataset (other source or settings) unless forced.
    if not (out / MANIFEST_NAME).exists() or force:
        return
    try:
        previous = Manifest.load(out).prepare or {}
    except BadInputError:
        previous = {}
    if previous.get("from") == source and previous.get("hash") == digest:
        return
    what = "a prepared dataset of another source or settings" if previous else "a dataset.json that is not a prepared dataset"
    raise MedsynthError(f"{out}: holds {what}; pass --force to replace it")


# -- one case -----------------------------------------------------------------------------


def _sources(manifest: Manifest, case: Case) -> list[Path]:
    return [manifest.resolve(p) for p in (*case.images, case.label, case.flow, case.affine, case.moving) if p is not None]


def _prepare_case(manifest: Manifest, case: Case, config: PrepareConfig, target: Path, stamp: str) -> dict[str, Any]:
    dims = manifest.spatial_dims
    image = _load_case_image(manifest, case, config)
    label = _load_label(manifest, case, image) if case.label is not None else None
    flow = _load_flow(manifest, case, image) if case.flow is not None else None
    mask = label.numpy()[0] > 0 if label is not None else None
    foreground = image.numpy()[:, mask] if mask is not None and mask.any() else None
    meta: dict[str, Any] = {
        "stamp": stamp,
        "original_shape": list(image.shape[1:]),
        "original_spacing": [round(float(s), 6) for s in spacing_of(image.affine)[:dims]],
        "intensity": intensity_stats(image.numpy()),
        "foreground": intensity_stats(foreground) if foreground is not None else None,
        **({"colour": image.meta["colour"]} if image.meta.get("colour") else {}),
    }

    channels = image.shape[0]
    if case.moving is not None:  # the pair's other frame: the same transforms as extra channels, split off below
        image = MetaTensor(torch.cat([image.as_tensor(), _load_moving(manifest, case, image, config).as_tensor()]), affine=image.affine)
    image, label, flow = _resample(image, label, flow, config, dims)
    image = _normalize(image, config, stack_percentiles(manifest.resolve(case.images[0]), case, config.percentiles))
    if config.size is not None:
        image, label, flow = (_crop_or_pad if config.crop else _resize)(image, label, flow, config, dims)
    image, moving = image[:channels], (image[channels:] if case.moving is not None else None)

    arrays = {"image": image.numpy().astype(np.float32), "affine": image.affine.numpy().astype(np.float64),
              **({"moving": moving.numpy().astype(np.float32)} if moving is not None else {})}
    if label is not None:
        arrays["label"] = label.numpy().round().astype(np.int16)
        values, counts = np.unique(arrays["label"], return_counts=True)
        meta["label_voxels"] = {str(int(v)): int(c) for v, c in zip(values, counts)}
    if flow is not None:
        # float64 here, as the vectors were resampled in mm: the conversion adds no rounding of its own.
        arrays["flow"] = mm_to_voxel(torch.from_numpy(flow.numpy().astype(np.float64)), arrays["affine"]).numpy().astype(np.float32)
    meta["prepared_shape"] = list(arrays["image"].shape[1:])
    _save_npz(target, {**arrays, "meta": np.array(json.dumps(meta))})
    return meta


def _load_case_image(manifest: Manifest, case: Case, config: PrepareConfig) -> MetaTensor:
    """The case's channels stacked ``(C, *spatial)``, with its affine sidecar applied (``meta["colour"]`` kept)."""
    paths = [manifest.resolve(p) for p in case.images]
    if case.frame is not None and getattr(case, "slice", None) is None:  # one phase of a 4D NIfTI or DICOM phase series
        channels = [load_phase(p, case.frame) for p in paths]
    else:
        channels = [load_case_file(p, case, series=config.series, keep_color=config.keep_color) for p in paths]
    for path, channel in zip(paths[1:], channels[1:]):
        check_same_grid(channels[0].shape[1:], channels[0].affine.numpy(), channel.shape[1:], channel.affine.numpy(), path, paths[0])
    image = MetaTensor(torch.cat([c.as_tensor() for c in channels]), affine=channels[0].affine)
    if any(c.meta.get("colour") for c in channels):
        image.meta["colour"] = next(c.meta["colour"] for c in channels if c.meta.get("colour"))
    if image.ndim - 1 != manifest.spatial_dims:
        raise BadInputError(paths[0], f"expected a {manifest.spatial_dims}D image (channel-first {manifest.spatial_dims + 1} axes), got shape {tuple(image.shape)}")
    if case.affine is not None:
        image.affine = torch.as_tensor(_read_affine(manifest.resolve(case.affine)))
    return image


def _read_affine(path: Path) -> np.ndarray:
    try:
        affine = np.load(path, allow_pickle=False).astype(np.float64)
    except Exception as exc:  # corrupt or pickled NumPy files
        raise BadInputError(path, f"cannot read affine ({type(exc).__name__})") from None
    if affine.shape != (4, 4) or not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise BadInputError(path, f"expected a finite, invertible 4x4 affine, got shape {affine.shape}")
    return affine


def _load_label(manifest: Manifest, case: Case, image: MetaTensor) -> MetaTensor:
    path = manifest.resolve(case.label)
    label = _without_geometry_on(load_case_file(path, case, np.int64, key="label"), path, image, manifest.resolve(case.images[0]))
    check_same_grid(image.shape[1:], image.affine.numpy(), label.shape[1:], label.affine.numpy(), path, manifest.resolve(case.images[0]))
    if label.shape[0] != 1:
        raise BadInputError(path, f"a label map has one channel, got {label.shape[0]}")
    values = label.numpy()
    if values.min() < np.iinfo(np.int16).min or values.max() > np.iinfo(np.int16).max:
        raise BadInputError(path, "label values do not fit in int16")
    unknown = sorted(set(np.unique(values).tolist()) - {int(k) for k in manifest.labels}) if manifest.labels else []
    if unknown:
        raise BadInputError(path, f"label value(s) {unknown[:5]} are not in the dataset's labels {sorted(int(k) for k in manifest.labels)}")
    return label


def _without_geometry_on(tensor: MetaTensor, path: Path, image: MetaTensor, image_path: Path) -> MetaTensor:
    # Plain .npy beside a plain .npy image: neither has geometry, both lie on the image's grid (and affine sidecar).
    if suffix_of(path) == ".npy" and suffix_of(image_path) == ".npy":
        tensor.affine = image.affine.clone()
    return tensor


def _load_moving(manifest: Manifest, case: Case, image: MetaTensor, config: PrepareConfig) -> MetaTensor:
    """The pair's other frame (``case.moving``), on the image's grid with as many channels."""
    path, image_path = manifest.resolve(case.moving), manifest.resolve(case.images[0])
    moving = _without_geometry_on(load_image(path, series=config.series, keep_color=config.keep_color), path, image, image_path)
    check_same_grid(image.shape[1:], image.affine.numpy(), moving.shape[1:], moving.affine.numpy(), path, image_path)
    if moving.shape[0] != image.shape[0]:
        raise BadInputError(path, f"has {moving.shape[0]} channel(s), its image {image.shape[0]}")
    return moving


def _load_flow(manifest: Manifest, case: Case, image: MetaTensor) -> MetaTensor:
    """The case's flow as world-space (mm, RAS) vectors ``(D, *spatial)`` on the image's grid.

    NumPy flows are displacements in voxels of their image; image-format flows (NIfTI, ITK)
    are millimetres in world (RAS) axes with their own affine (as medsynth writes them).
    """
    path = manifest.resolve(case.flow)
    dims = manifest.spatial_dims
    spatial = tuple(image.shape[1:])
    flow = load_image(path, key="flow")
    array = flow.numpy()
    if array.shape[0] == 1 and array.ndim == dims + 2:  # a channel-last field read as one channel
        array = array[0]
    if array.shape == (*spatial, dims):
        array = np.moveaxis(array, -1, 0)
    if array.shape != (dims, *spatial):
        raise BadInputError(path, f"shape {tuple(flow.shape)} is not a {dims}-component field on its image's grid {spatial}")
    affine = image.affine.numpy()
    if suffix_of(path) in _MM_FLOW_SUFFIXES:
        check_same_grid(spatial, affine, spatial, flow.affine.numpy(), path, manifest.resolve(case.images[0]))
    else:
        array = voxel_to_mm(torch.from_numpy(np.asarray(array, dtype=np.float64)), affine).numpy()
    return MetaTensor(torch.as_tensor(np.ascontiguousarray(array, dtype=np.float32)), affine=image.affine)


def _resample(image: MetaTensor, label: MetaTensor | None, flow: MetaTensor | None, config: PrepareConfig,
              dims: int) -> tuple[MetaTensor, MetaTensor | None, MetaTensor | None]:
    # Only when asked: otherwise the affine must stay exactly the source's.
    if config.orientation is not None:
        orient = Orientation(axcodes=config.orientation.upper(), labels=None)
        image, label, flow = (orient(t) if t is not None else None for t in (image, label, flow))
    if config.spacing is not None:
        pixdim = config.spacing * dims if len(config.spacing) == 1 else config.spacing
        linear, nearest = Spacing(pixdim=pixdim, mode="bilinear"), Spacing(pixdim=pixdim, mode="nearest")
        image = linear(image)
        label = nearest(label) if label is not None else None
        flow = linear(flow) if flow is not None else None
    return image, label, flow


def _normalize(image: MetaTensor, config: PrepareConfig, intensity_range: tuple[float, float] | None = None) -> MetaTensor:
    """``intensity_range``: for percentile normalisation, the (low, high) intensities to map to [0, 1] instead of
    the image's own percentiles (a slice case: its frame volume's, :func:`medsynth.data.cine.stack_percentiles`)."""
    if config.normalize is Normalize.PERCENTILE and intensity_range is not None:
        return ScaleIntensityRange(a_min=intensity_range[0], a_max=intensity_range[1], b_min=0.0, b_max=1.0, clip=True)(image)
    if config.normalize is Normalize.PERCENTILE:
        low, high = config.percentiles
        return ScaleIntensityRangePercentiles(low, high, b_min=0.0, b_max=1.0, clip=True, channel_wise=True)(image)
    if config.normalize is Normalize.ZSCORE:
        return NormalizeIntensity(channel_wise=True)(image)
    if config.normalize is Normalize.CT:
        low, high = config.ct_window
        return ScaleIntensityRange(a_min=low, a_max=high, b_min=0.0, b_max=1.0, clip=True)(image)
    return image


def unit_to_hu(unit: torch.Tensor, ct_window: Sequence[float] | None) -> torch.Tensor:
    """The inverse of ``--normalize ct``: intensities in [0, 1] back to HU of ``ct_window`` (unchanged when ``None``)."""
    return unit if ct_window is None else ct_window[0] + unit * (ct_window[1] - ct_window[0])


def hu_to_unit(hu: torch.Tensor, ct_window: Sequence[float] | None) -> torch.Tensor:
    """``ct_window`` to [0, 1] as ``--normalize ct`` maps it, unclipped (for display); unchanged when ``None``."""
    return hu if ct_window is None else (hu - ct_window[0]) / (ct_window[1] - ct_window[0])


def _resize(image: MetaTensor, label: MetaTensor | None, flow: MetaTensor | None, config: PrepareConfig,
            dims: int) -> tuple[MetaTensor, MetaTensor | None, MetaTensor | None]:
    shape = tuple(image.shape[1:])
    if config.keep_aspect:  # the longest side becomes `size`, the others are padded to it
        target = tuple(max(1, round(n * config.size / max(shape))) for n in shape)
    else:
        target = (config.size,) * dims
    linear = Resize(target, mode="bilinear" if dims == 2 else "trilinear")
    image = linear(_anti_alias(image, target))
    flow = linear(_anti_alias(flow, target)) if flow is not None else None
    label = Resize(target, mode="nearest-exact")(label) if label is not None else None
    if config.keep_aspect:
        full = (config.size,) * dims
        # Pad with the image's darkest value: background in CT, MR and pictures alike.
        image = SpatialPad(full, value=float(image.min()))(image)
        label, flow = (SpatialPad(full)(t) if t is not None else None for t in (label, flow))
    return image, label, flow


def _crop_or_pad(image: MetaTensor, label: MetaTensor | None, flow: MetaTensor | None, config: PrepareConfig,
                 dims: int) -> tuple[MetaTensor, MetaTensor | None, MetaTensor | None]:
    """Every axis cropped or padded to ``size`` voxels around the centre of the label map's foreground
    (the image's centre without one); the voxels and the spacing stay, the affine's origin moves."""
    shape = np.asarray(image.shape[1:])
    mask = label.numpy()[0] > 0 if label is not None else None
    if mask is not None and mask.any():  # the centre of the foreground's bounding box
        centre = np.array([(axis.min() + axis.max() + 1) / 2 for axis in np.nonzero(mask)])
    else:
        centre = shape / 2
    start = np.clip(np.round(centre - config.size / 2).astype(int), 0, np.maximum(shape - config.size, 0))
    crop = SpatialCrop(roi_start=start, roi_end=np.minimum(start + config.size, shape))
    full = (config.size,) * dims
    image = SpatialPad(full, value=float(image.min()))(crop(image))  # air in CT: the darkest value
    label, flow = (SpatialPad(full)(crop(t)) if t is not None else None for t in (label, flow))
    return image, label, flow


def _anti_alias(image: MetaTensor, target: tuple[int, ...]) -> MetaTensor:
    """Gaussian smoothing of the axes about to be down-sized (skimage's sigma), edges replicated.

    MONAI's ``Resize(anti_aliasing=True)`` pads with zeros, which darkens the borders.
    """
    sigmas = [max(0.0, (n / t - 1.0) / 2.0) for n, t in zip(image.shape[1:], target)]
    if not any(sigmas):
        return image
    kernels = [gaussian_1d(torch.tensor(s), truncated=4.0, normalize=True) if s > 0 else torch.ones(1) for s in sigmas]
    smoothed = separable_filtering(image.as_tensor()[None].float(), kernels, mode="replicate")[0]
    return MetaTensor(smoothed, affine=image.affine)


def _save_npz(target: Path, arrays: dict[str, np.ndarray]) -> None:
    for array in arrays.values():  # a case's arrays pass the same guard as every image writer
        try:
            check_finite_output(array, target)
        except NonFiniteOutputError as exc:
            raise exc.blaming("the intensity normalisation overflowed: check --normalize, --ct-window and the source's values") from None
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    atomic_write_bytes(target, buffer.getvalue())


def _prepared_entry(case: Case, meta: dict[str, Any], split: str) -> Case:
    path = f"{CASES_DIR}/{case.id}.npz"
    stats = {k: v for k, v in meta.items() if k != "stamp"}
    return case.model_copy(update={"image": path, "label": path if case.label is not None else None,
                                   "flow": path if case.flow is not None else None, "affine": None,
                                   "moving": path if case.moving is not None else None,
                                   "split": split, "stats": stats})


def _remove_stale(cases_dir: Path, ids: set[str]) -> None:
    # Only our own files inside out/cases: cases no longer in the dataset, and temporaries a kill left.
    remove_stale_temps(cases_dir)
    for path in cases_dir.iterdir():
        if path.is_file() and path.suffix == ".npz" and not path.name.startswith(".") and path.stem not in ids:
            path.unlink()
