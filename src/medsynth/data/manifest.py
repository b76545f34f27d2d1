"""The dataset manifest: one ``dataset.json`` per dataset, listing its cases.

Every importer produces a :class:`Manifest`; :func:`medsynth.data.prepare.prepare_dataset`
reads one and writes another (``split`` filled, images in ``cases/<id>.npz``). File paths
in a manifest are relative to the folder holding its ``dataset.json``::

    {"name": "cilia", "spatial_dims": 2, "modality": "EM", "source": "class-folders",
     "classes": ["normal", "outer-arm"], "labels": {},
     "cases": [{"id": "normal_001", "subject": "normal_001", "image": "normal/normal_001.png",
                "label": null, "class": "normal", "phase": null, "flow": null, "split": null}],
     "prepare": null}

A dataset.json that ``prepare`` imports, and a prepared one that ``train``, ``sample`` and ``evaluate``
read, name files inside its own folder (:meth:`Manifest.check_paths`): a path that is absolute,
climbs out with ``../`` or is a symlink leading out is refused unless ``--allow-outside``
(``MEDSYNTH_ALLOW_OUTSIDE=1``); a fold view's absolute paths into the dataset it views are allowed.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from medsynth.config import format_validation_error
from medsynth.errors import BadInputError, MedsynthError
from medsynth.runs import atomic_write_json, read_structured

MANIFEST_NAME = "dataset.json"
SPLITS = ("train", "val", "test")
# Case fields that hold file paths: rebased when a manifest is saved into another folder.
PATH_FIELDS = ("image", "label", "flow", "affine", "moving")
ALLOW_OUTSIDE_VARIABLE = "MEDSYNTH_ALLOW_OUTSIDE"  # set by the CLI's --allow-outside


def outside_allowed() -> bool:
    """Whether a dataset.json may name files outside its folder (``--allow-outside``, ``MEDSYNTH_ALLOW_OUTSIDE=1``)."""
    return os.environ.get(ALLOW_OUTSIDE_VARIABLE, "").strip().lower() not in ("", "0", "false", "no")


def _within(path: str, folder: str) -> bool:
    return os.path.commonpath([path, folder]) == folder


def check_inside(root: str | Path, path: str, what: str, viewed: str | None = None) -> None:
    """Refuse ``path`` (named in ``root/dataset.json`` as ``what``) when it leaves ``root``, unless :func:`outside_allowed`.

    It leaves ``root`` when it is absolute (unless it lies in ``viewed``, the dataset a fold view names),
    climbs out with ``../``, or is, or passes through, a symlink whose target is outside.

    Raises:
        BadInputError: naming ``root/dataset.json``, ``what`` and the path.
    """
    if outside_allowed():
        return
    root = os.path.abspath(root)
    joined = os.path.join(root, path)  # an absolute path stays itself
    target = os.path.realpath(joined)
    if os.path.isabs(path):
        inside, problem = viewed is not None and _within(target, os.path.realpath(viewed)), "is an absolute path"
    elif not _within(os.path.normpath(joined), root):
        inside, problem = False, "climbs out with '..'"
    else:
        inside, problem = _within(target, os.path.realpath(root)), f"is a symlink to {target!r}"
    if not inside:
        raise BadInputError(Path(root) / MANIFEST_NAME, f"{what} {path!r} {problem}, outside the dataset folder; "
                                                        f"pass --allow-outside (or set {ALLOW_OUTSIDE_VARIABLE}=1) to read it")


class Case(BaseModel):
    """One image (with its optional label map, class, phase and flow) of one subject.

    Unknown keys are kept (``extra="allow"``), so newer manifests load in older code.
    ``image`` is one file, or a list of files stacked as channels (nnU-Net ``_0000``, ``_0001``…).
    ``affine`` names a NumPy 4x4 voxel-to-RAS sidecar for formats without geometry.
    ``moving`` names the other frame of a registration pair on the image's grid (the
    end-diastole frame a flow pair's ``flow`` maps the image to: ``warp(moving, flow) == image``).
    ``frame`` picks one frame of a 4D ``(X, Y, Z, T)`` image file (and of its label file), as
    a cine series' cases share one file (the UK Biobank ``sa.nii.gz``); ``None``: the file is one frame.
    """

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    id: str = Field(min_length=1)
    subject: str = Field(min_length=1)
    image: str | list[str]
    label: str | None = None
    class_name: str | None = Field(None, alias="class")
    phase: int | None = None
    flow: str | None = None
    affine: str | None = None
    moving: str | None = None
    frame: int | None = Field(None, ge=0)
    split: Literal["train", "val", "test"] | None = None

    @field_validator("id")
    @classmethod
    def _id_is_a_file_name(cls, value: str) -> str:
        # The id names the prepared file ``cases/<id>.npz``.
        if "/" in value or "\\" in value or value.startswith("."):
            raise ValueError(f"case id '{value}' must be usable as a file name (no slashes, no leading dot)")
        return value

    @property
    def images(self) -> list[str]:
        """The image file(s), one per channel group."""
        return [self.image] if isinstance(self.image, str) else list(self.image)


class Manifest(BaseModel):
    """A dataset: its geometry, classes, label names and cases.

    ``classes`` is ordered: a class's index is its position. ``labels`` maps label-map
    values (as strings, JSON keys) to names. ``prepare`` is ``None`` for a raw dataset and
    holds the preparation settings for a prepared one.
    """

    model_config = ConfigDict(extra="allow")

    name: str
    spatial_dims: Literal[2, 3]
    modality: str = "unknown"
    source: str = ""
    classes: list[str] = Field(default_factory=list)
    labels: dict[str, str] = Field(default_factory=dict)
    cases: list[Case]
    prepare: dict[str, Any] | None = None

    _root: Path = PrivateAttr(default_factory=Path.cwd)

    @field_validator("labels")
    @classmethod
    def _label_keys_are_integers(cls, value: dict[str, str]) -> dict[str, str]:
        for key in value:
            try:
                int(key)
            except ValueError:
                raise ValueError(f"label key '{key}' is not an integer label value") from None
        return value

    @model_validator(mode="after")
    def _cases_are_consistent(self) -> Manifest:
        duplicates = sorted(k for k, n in Counter(c.id for c in self.cases).items() if n > 1)
        if duplicates:
            raise ValueError(f"duplicate case id(s): {', '.join(duplicates[:5])}")
        if len(set(self.classes)) != len(self.classes):
            raise ValueError("classes are not unique")
        for case in self.cases:
            if case.class_name is not None and case.class_name not in self.classes:
                raise ValueError(f"case '{case.id}': unknown class '{case.class_name}' (classes: {', '.join(self.classes) or 'none'})")
        return self

    # -- files ------------------------------------------------------------------------------

    @property
    def root(self) -> Path:
        """The folder that relative case paths start from."""
        return self._root

    def with_root(self, root: str | Path) -> Manifest:
        """This manifest with relative paths read from ``root`` (nothing is rewritten)."""
        self._root = Path(root)
        return self

    def resolve(self, relpath: str | Path) -> Path:
        """The file a case path names (absolute paths are kept)."""
        return self._root / relpath

    @classmethod
    def load(cls, path_or_dir: str | Path) -> Manifest:
        """Read ``dataset.json`` (or the one inside a folder).

        Raises:
            BadInputError: missing, unreadable or invalid manifest (names the file).
        """
        path = Path(path_or_dir)
        if path.is_dir():
            path = path / MANIFEST_NAME
        data = read_structured(path, "manifest")
        try:
            manifest = cls.model_validate(data)
        except ValidationError as exc:
            raise BadInputError(path, format_validation_error(exc, "invalid manifest")) from None
        return manifest.with_root(path.parent)

    def save(self, folder: str | Path) -> Path:
        """Write ``folder/dataset.json`` atomically; this manifest is then rooted at ``folder``.

        Relative case paths are rebased, so they still name the same files from ``folder``.

        Returns:
            The written file.
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        if folder.resolve() != self._root.resolve():
            self.cases = [self._rebased(case, folder) for case in self.cases]
            self._root = folder
        path = folder / MANIFEST_NAME
        atomic_write_json(path, self.model_dump(mode="json", by_alias=True))
        return path

    def _rebased(self, case: Case, folder: Path) -> Case:
        def rebase(value: str) -> str:
            if Path(value).is_absolute():
                return value
            target = os.path.abspath(self.resolve(value))
            try:
                return Path(os.path.relpath(target, os.path.abspath(folder))).as_posix()
            except ValueError:  # another drive on Windows: no relative path exists
                return target

        update: dict[str, Any] = {}
        for name in PATH_FIELDS:
            value = getattr(case, name)
            if value is not None:
                update[name] = [rebase(v) for v in value] if isinstance(value, list) else rebase(value)
        return case.model_copy(update=update)

    def check_paths(self) -> Manifest:
        """Refuse a case path that leaves the dataset folder, unless :func:`outside_allowed`; returns ``self``.

        A path leaves it when it is absolute, climbs out with ``../``, or is (or passes through) a symlink
        whose target is outside. A fold view (``prepare.fold_of``: the prepared dataset it views, which
        holds a dataset.json) may name that dataset's files by absolute paths.

        Raises:
            BadInputError: naming this ``dataset.json``, the case and its path.
        """
        if outside_allowed():
            return self
        view_of = (self.prepare or {}).get("fold_of")
        viewed = view_of if isinstance(view_of, str) and (Path(view_of) / MANIFEST_NAME).is_file() else None
        for case in self.cases:
            for name in PATH_FIELDS:
                value = getattr(case, name)
                for path in [] if value is None else [value] if isinstance(value, str) else value:
                    check_inside(self._root, path, f"case {case.id!r} {name}", viewed)
        return self

    # -- lookups ----------------------------------------------------------------------------

    def class_index(self, name: str) -> int:
        """The index of class ``name`` (its position in ``classes``)."""
        try:
            return self.classes.index(name)
        except ValueError:
            raise MedsynthError(f"unknown class '{name}' (classes: {', '.join(self.classes) or 'none'})") from None

    def subjects(self) -> list[str]:
        """Subject names, sorted."""
        return sorted({case.subject for case in self.cases})

    def split_cases(self, split: str | None) -> list[Case]:
        """The cases of one split (all cases for ``None``)."""
        if split is not None and split not in SPLITS:
            raise MedsynthError(f"unknown split '{split}' (use: {', '.join(SPLITS)})")
        return [case for case in self.cases if split is None or case.split == split]
