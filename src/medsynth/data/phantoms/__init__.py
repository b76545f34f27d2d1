"""Procedural phantoms with exact ground truth: each is a function of (parameters, seed).

:data:`PHANTOMS` names every phantom and gives it one interface,
``PHANTOMS[kind].make(out, n, seed, size, progress, force, **options)``, with the options of each
phantom checked by a small pydantic model. This module is cheap to import (no torch, no
rendering code): a phantom's module is imported only when it is made.

A dataset is written into a new or empty folder; with ``force`` it replaces an earlier phantom
dataset (one with the :data:`MARKER_NAME` file every phantom writes first), which is moved aside
while the new one is written, then deleted (or put back if writing fails): no stale files or
subjects are left, and a folder that is not a phantom dataset is never deleted.
"""

from __future__ import annotations

import importlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, field_validator

from medsynth.config import validate_config
from medsynth.errors import BadInputError, MedsynthError, NonFiniteOutputError
from medsynth.runs import atomic_write_json, check_output, read_structured

MARKER_NAME = ".medsynth-phantom.json"  # written first into every phantom dataset: what made it (kind, n, seed, size, options)
# dataset.json names of the phantoms written before the marker existed
_UNMARKED_NAMES = ("phantom-cilia", "phantom-cardiac", "phantom-lung", "medsynth-coronary")


class PhantomOptions(BaseModel):
    """Options of one phantom beside ``out, n, seed, size, progress`` (unknown ones are refused)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class CiliaOptions(PhantomOptions):
    """The cilia phantom takes no options."""


class CardiacOptions(PhantomOptions):
    frames: int = Field(10, ge=2, description="frames per cardiac cycle (frame 0: end-diastole)")
    modality: Literal["ct", "mri"] = Field("ct", description="contrast: CT in HU or cine-MRI (bSSFP)")
    flow_pairs: Literal["npy", "nifti"] | None = Field(
        None, description="write end-systole frame + flow to end-diastole pairs: npy (template_img_N.npy, flow_N.npy, "
                          "label_N.npy, diastole_img_N.npy, affine_N.npy) or nifti (subNNN/frame_es, flow_es_ed, label_es, "
                          "frame_ed .nii.gz + dataset.json)")

    views: bool = Field(False, description="cine MRI: write the simulated acquisitions in the UK Biobank layout instead "
                                           "(subNNN/sa, sa_gt, la_2ch, la_3ch, la_4ch, sa_hr, sa_hr_gt .nii.gz, Info.cfg)")
    sax_spacing_mm: PositiveFloat = Field(10.0, description="views: distance between SAX slice centres (mm)")
    sax_thickness_mm: PositiveFloat = Field(8.0, description="views: SAX slice thickness (mm, box slice profile)")
    lax_thickness_mm: PositiveFloat = Field(6.0, description="views: LAX slice thickness (mm, box slice profile)")
    view_pixel_mm: PositiveFloat | None = Field(None, description="views: in-plane pixel (mm); None: a 160 mm field of view over size pixels")
    hr_factor: int = Field(8, ge=2, description="views: through-plane refinement of the sa_hr ground truth (spacing sax_spacing_mm / factor)")
    noise: float = Field(0.03, ge=0, le=1, description="views: Rician noise sd of the acquired images, relative to the LV blood signal "
                                                    "(the sa_hr truth is noise-free)")
    shading: float = Field(0.2, ge=0, le=0.5, description="views: coil-sensitivity shading, the relative gain's sd across the field of view")
    trabeculation: bool = Field(True, description="views: endocardial trabeculae in the apical LV (detail that changes between SAX slices)")

    @field_validator("flow_pairs", mode="before")
    @classmethod
    def _bool_is_npy(cls, value: object) -> object:
        # Before the NIfTI layout, flow_pairs was a switch for the NumPy layout: True still means npy.
        return "npy" if value is True else None if value is False else value


class LungOptions(PhantomOptions):
    frames: int = Field(10, ge=2, description="breathing phases per cycle (phase 0: end-inhale)")


class CoronaryOptions(PhantomOptions):
    spacing: tuple[PositiveFloat, PositiveFloat, PositiveFloat] | None = Field(
        None, description="voxel spacing (mm) of every subject; each subject's own (0.8-1.2 mm) if None")


@dataclass(frozen=True)
class Phantom:
    """One phantom: its summary, its options and where its dataset writer lives.

    The writer ``<module>.<function>(out, n, seed=, size=, progress=, **options)`` takes ``n``
    images per class (cilia) or subjects (the others); ``size=None`` keeps its default size.
    """

    name: str
    summary: str
    options: type[PhantomOptions]
    module: str
    function: str

    def check(self, options: dict[str, Any]) -> dict[str, Any]:
        """The options given, validated; one line naming the phantom and the option otherwise."""
        known = list(self.options.model_fields)
        for key in options:
            if key not in known:
                takes = ", ".join(known) if known else "no options"
                raise MedsynthError(f"phantom {self.name}: unknown option '{key}' ({self.name} takes {takes})")
        checked = validate_config(self.options, options, f"phantom {self.name}")  # type: ignore[type-var]
        return checked.model_dump(exclude_unset=True)

    def make(self, out: str | Path, n: int = 10, seed: int = 0, size: int | None = None, progress: bool = True,
             force: bool = False, **options: Any) -> Path:
        """Write the dataset into ``out`` and return it (see the phantom module for its layout).

        ``out`` must be new or empty; with ``force`` an earlier phantom dataset there is replaced whole
        (module docstring). Raises :class:`~medsynth.errors.BadInputError` for an existing ``out``
        without ``force``, or one that is not a phantom dataset.
        """
        checked = self.check(options)
        if n < 1:
            raise MedsynthError(f"phantom {self.name}: n must be at least 1 (got {n})")
        out = check_output(out, (), force, folder=True)
        writer = getattr(importlib.import_module(self.module), self.function)
        sized = {} if size is None else {"size": size}
        record = {"phantom": self.name, "n": n, "seed": seed, "size": list(size) if isinstance(size, (tuple, list)) else size,
                  "options": checked}
        existed = out.exists()
        old = _move_aside(out) if existed and any(out.iterdir()) else None
        try:
            atomic_write_json(out / MARKER_NAME, record)  # first: a killed run's folder is still known as ours
            written = Path(writer(out, n, seed=seed, progress=progress, **sized, **checked))
        except NonFiniteOutputError as exc:
            _put_back(out, old, existed)
            raise exc.blaming(f"phantom {self.name}: an option or --size is out of range") from None
        except BaseException:
            _put_back(out, old, existed)
            raise
        if old is not None:
            shutil.rmtree(old)
        return written


def _is_phantom_dataset(folder: Path) -> bool:
    """Whether ``folder`` holds a phantom dataset: the marker, or (written before it) a phantom's dataset.json."""
    if (folder / MARKER_NAME).is_file():
        return True
    try:
        return read_structured(folder / "dataset.json", "manifest").get("name") in _UNMARKED_NAMES
    except BadInputError:
        return False


def _move_aside(out: Path) -> Path:
    """Move the phantom dataset in ``out`` to a hidden sibling (``out`` is left empty) and return it;
    a folder that is not a phantom dataset is refused, never deleted."""
    if not _is_phantom_dataset(out):
        raise BadInputError(out, "--force replaces only a phantom dataset, and this folder is not one; "
                                 "give a new or empty folder, or delete it yourself")
    real = out.resolve()  # through a symlink: the folder itself moves, the link stays
    old = real.with_name(f".{real.name}.replaced-{os.getpid()}")
    shutil.rmtree(old, ignore_errors=True)
    real.rename(old)
    real.mkdir()
    return old


def _put_back(out: Path, old: Path | None, existed: bool) -> None:
    """After a failed write: the dataset moved aside comes back in place of what was written; without one,
    a refusal before any image (only the marker written) leaves ``out`` as it was."""
    if old is None:
        if out.is_dir() and [p.name for p in out.iterdir()] == [MARKER_NAME]:
            (out / MARKER_NAME).unlink()
            if not existed:
                out.rmdir()
        return
    real = out.resolve()
    shutil.rmtree(real, ignore_errors=True)
    old.rename(real)


PHANTOMS: dict[str, Phantom] = {
    "cilia": Phantom("cilia", "2D cilia cross-sections, 5 classes (n images per class, 64 px)", CiliaOptions,
                     "medsynth.data.phantoms.cilia", "make_cilia_dataset"),
    "cardiac": Phantom("cardiac", "3D+t beating heart in a thorax with exact fields (CT or cine MRI)", CardiacOptions,
                       "medsynth.data.phantoms.cardiac_views", "make_cardiac_phantom"),
    "lung": Phantom("lung", "4D CT breathing thorax with exact fields per phase", LungOptions,
                    "medsynth.data.phantoms.lung", "make_lung_dataset"),
    "coronary": Phantom("coronary", "CTCA-like volumes with a 9-class heart label map (nnU-Net layout)", CoronaryOptions,
                        "medsynth.data.phantoms.coronary", "make_coronary_dataset"),
}


def get_phantom(kind: str) -> Phantom:
    """The phantom called ``kind``, or a one-line error listing the known ones."""
    if kind not in PHANTOMS:
        raise MedsynthError(f"unknown phantom '{kind}' (known: {', '.join(PHANTOMS)})")
    return PHANTOMS[kind]
