"""Torch datasets and a Lightning data module over a prepared dataset (``cases/<id>.npz``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from medsynth.data.io import check_npz_sizes
from medsynth.data.manifest import MANIFEST_NAME, SPLITS, Manifest
from medsynth.errors import BadInputError, MedsynthError

Sample = dict[str, Any]
# Arrays a prepared case file may hold (its "meta" is for the cache, not for training).
_ARRAY_KEYS = ("image", "affine", "label", "flow", "moving")


def load_prepared_manifest(root: str | Path) -> Manifest:
    """The manifest of a prepared dataset.

    Raises:
        BadInputError: no ``dataset.json``, one that ``medsynth prepare`` did not write, or one naming files
            outside its folder (:meth:`~medsynth.data.manifest.Manifest.check_paths`; a fold view may name its dataset's).
    """
    try:
        manifest = Manifest.load(root)
    except BadInputError as exc:
        raise BadInputError(exc.path, f"not a prepared dataset ({exc.problem}); run `medsynth prepare` first") from None
    if manifest.prepare is None:
        raise BadInputError(manifest.resolve(MANIFEST_NAME), "not a prepared dataset; run `medsynth prepare` first")
    return manifest.check_paths()


def load_prepared_info(root: str | Path) -> dict[str, Any]:
    """What a recipe needs to size its model from a prepared dataset.

    Returns:
        ``spatial_dims``; ``in_channels``; ``image_shape`` (spatial, or ``None`` when cases
        differ in shape); ``classes`` (ordered names); ``labels`` (label value -> name);
        ``affine`` (4x4 of the first case, for writing samples with geometry);
        ``flow_channels`` (0 without flows); ``has_label``; ``splits`` (cases per split).
    """
    manifest = load_prepared_manifest(root)
    if not manifest.cases:
        raise BadInputError(manifest.resolve(MANIFEST_NAME), "the prepared dataset holds no cases")
    first = read_case(manifest.resolve(manifest.cases[0].image))
    shapes = {tuple(case.stats["prepared_shape"]) for case in manifest.cases}
    return {
        "spatial_dims": manifest.spatial_dims,
        "in_channels": int(first["image"].shape[0]),
        "image_shape": list(first["image"].shape[1:]) if len(shapes) == 1 else None,
        "classes": list(manifest.classes),
        "labels": {int(value): name for value, name in manifest.labels.items()},
        "affine": first["affine"],
        "flow_channels": int(first["flow"].shape[0]) if "flow" in first else 0,
        "has_label": "label" in first,
        "splits": {split: len(manifest.split_cases(split)) for split in SPLITS},
    }


def prepared_affine(info: dict[str, Any]) -> list[list[float]] | None:
    """The 4 x 4 (voxel -> world mm) that :func:`load_prepared_info` read from the first case, as the list a model
    config keeps (``model.reference_affine``); None for data without one."""
    return np.asarray(info["affine"], dtype=np.float64).tolist() if info.get("affine") is not None else None


def require_prepared(root: str | Path, who: str, spatial_dims: int | None = None, one_shape: bool = False,
                     labels: bool = False, channels: int | None = None,
                     normalize: tuple[str, ...] = ()) -> tuple[dict[str, Any], dict[str, Any]]:
    """A prepared dataset's info (:func:`load_prepared_info`) and prepare settings, checked for what ``who`` needs.

    Args:
        root: prepared dataset folder.
        who: who asks (e.g. the recipe name), for the messages.
        spatial_dims: required 2 or 3 (``None``: any).
        one_shape: every case must have the same shape (prepared with ``--size``).
        labels: cases must carry label maps with named label values.
        channels: required image channels (``None``: any).
        normalize: accepted ``--normalize`` settings (empty: any).

    Raises:
        MedsynthError: one line naming the folder and what to prepare differently.
    """
    info = load_prepared_info(root)
    if (spatial_dims is not None and info["spatial_dims"] != spatial_dims) or (one_shape and info["image_shape"] is None):
        raise MedsynthError(f"{root}: {who} needs {spatial_dims or info['spatial_dims']}D volumes"
                            f"{' of one shape; prepare with --size' if one_shape else ''}")
    if labels and (not info["has_label"] or not info["labels"]):
        raise MedsynthError(f"{root}: {who} needs label maps (an nnU-Net raw folder or a dataset with labelsTr)")
    if channels is not None and info["in_channels"] != channels:
        raise MedsynthError(f"{root}: {who} needs {channels}-channel images; this dataset has {info['in_channels']} channels")
    settings = (load_prepared_manifest(root).prepare or {}).get("settings", {})
    if normalize and settings.get("normalize") not in normalize:
        raise MedsynthError(f"{root}: {who} needs intensities prepared with --normalize {' or '.join(normalize)}, "
                            f"not '{settings.get('normalize')}'")
    return info, settings


def check_prepared_files(root: str | Path) -> None:
    """Refuse a prepared dataset whose case files are not all there (a stat per case: cheap), before training writes.

    Raises:
        BadInputError: naming the first missing case file and how many are missing.
    """
    manifest = load_prepared_manifest(root)
    missing = [path for case in manifest.cases for path in (manifest.resolve(case.image),) if not path.is_file()]
    if missing:
        raise BadInputError(missing[0], f"prepared case file missing ({len(missing)} of {len(manifest.cases)} missing); prepare the dataset again")


def read_case(path: Path) -> dict[str, np.ndarray]:
    """The arrays of a prepared case file (``image``, ``affine`` and, when present, ``label``, ``flow``, ``moving``).

    Raises:
        BadInputError: a missing, truncated, oversized, pickled or foreign file (names it).
    """
    try:
        check_npz_sizes(path)  # claimed array sizes against the file and --max-voxels, before NumPy allocates
        with np.load(path, allow_pickle=False) as data:
            return {key: data[key] for key in _ARRAY_KEYS if key in data}
    except BadInputError:
        raise
    except Exception as exc:  # missing, truncated or foreign files fail in many ways
        raise BadInputError(path, f"cannot read prepared case ({type(exc).__name__}); prepare the dataset again") from None


class PreparedDataset(Dataset):
    """The cases of one split of a prepared dataset.

    Each item is a dict: ``image`` float32 ``(C, *spatial)``; ``class`` int (-1 without
    classes); ``phase`` int (-1 without phases); ``affine`` float64 ``(4, 4)``; ``id`` str;
    and, when the case has them, ``label`` int64 ``(1, *spatial)`` and ``flow`` float32
    ``(D, *spatial)`` (displacement in voxels).

    Args:
        root: prepared dataset folder.
        split: ``train``, ``val``, ``test`` or ``None`` for all cases.
        transform: applied to each item dict (e.g. augmentation).
        in_memory: keep the arrays after the first read (per worker process).
    """

    def __init__(self, root: str | Path, split: str | None = None, transform: Callable[[Sample], Sample] | None = None,
                 in_memory: bool = False):
        self.manifest = load_prepared_manifest(root)
        self.cases = self.manifest.split_cases(split)
        self.transform = transform
        self.in_memory = in_memory
        self._cache: dict[int, dict[str, np.ndarray]] = {}

    def __len__(self) -> int:
        return len(self.cases)

    def _arrays(self, index: int) -> dict[str, np.ndarray]:
        if index in self._cache:
            return self._cache[index]
        arrays = read_case(self.manifest.resolve(self.cases[index].image))
        if self.in_memory:
            self._cache[index] = arrays
        return arrays

    def __getitem__(self, index: int) -> Sample:
        case = self.cases[index]
        arrays = self._arrays(index)
        # torch.tensor copies, so a transform cannot alter the cached arrays.
        sample: Sample = {
            "image": torch.tensor(arrays["image"], dtype=torch.float32),
            "class": self.manifest.class_index(case.class_name) if case.class_name is not None else -1,
            "phase": case.phase if case.phase is not None else -1,
            "affine": torch.tensor(arrays["affine"], dtype=torch.float64),
            "id": case.id,
        }
        if "label" in arrays:
            sample["label"] = torch.tensor(arrays["label"], dtype=torch.long)
        for key in ("flow", "moving"):  # moving: a flow pair's other frame (see Case.moving)
            if key in arrays:
                sample[key] = torch.tensor(arrays[key], dtype=torch.float32)
        return self.transform(sample) if self.transform is not None else sample


def load_split(root: str | Path, split: str | None) -> list[Sample]:
    """Every item of one split of a prepared dataset (``None``: all cases), read once, in manifest order.

    The one way recipes and evaluation read real cases (see :class:`PreparedDataset` for an item).
    """
    dataset = PreparedDataset(root, split=split)
    return [dataset[i] for i in range(len(dataset))]


HELD_OUT = ("test", "val")  # "held out", everywhere: the first non-empty of these splits


def held_out_split(root: str | Path | None) -> str | None:
    """The name of the held-out split of a prepared dataset: the first of :data:`HELD_OUT` with items (None: none)."""
    if root is None or not (Path(root) / MANIFEST_NAME).exists():
        return None
    return next((split for split in HELD_OUT if load_split(root, split)), None)


def held_out(root: str | Path | None) -> list[Sample]:
    """The held-out items of a prepared dataset (:func:`held_out_split`; none when ``root`` is not one)."""
    return first_split(root, HELD_OUT)


def first_split(root: str | Path | None, splits: Sequence[str]) -> list[Sample]:
    """The items of the first non-empty split of ``splits`` (none when ``root`` is not a prepared dataset)."""
    if root is None or not (Path(root) / MANIFEST_NAME).exists():
        return []
    return next((items for split in splits if (items := load_split(root, split))), [])


def stack_items(items: list[Sample], key: str) -> torch.Tensor:
    """``items[i][key]`` stacked along a new first axis (tensors) or as a tensor (numbers)."""
    values = [item[key] for item in items]
    return torch.stack(values) if isinstance(values[0], torch.Tensor) else torch.tensor(values)


class PreparedDataModule(L.LightningDataModule):
    """Train/val/test loaders over a prepared dataset.

    The training loader shuffles by ``(seed, epoch)``; validation uses the test split when
    the val split is empty.

    Args:
        root: prepared dataset folder.
        batch_size: items per batch.
        num_workers: loader worker processes.
        seed: seed of the training shuffle.
        train_transform: applied to training items only (augmentation), after ``transform``.
        in_memory: keep arrays in memory after the first read.
        transform: applied to the items of every split (e.g. adding what a recipe derives from a case).
    """

    def __init__(self, root: str | Path, batch_size: int, num_workers: int = 0, seed: int = 0,
                 train_transform: Callable[[Sample], Sample] | None = None, in_memory: bool = False,
                 transform: Callable[[Sample], Sample] | None = None):
        super().__init__()
        self.root = Path(root)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.transform = transform
        self.train_transform = train_transform
        self.in_memory = in_memory
        self.datasets: dict[str, PreparedDataset] = {}

    def setup(self, stage: str | None = None) -> None:
        if not self.datasets:
            self.datasets = {split: PreparedDataset(self.root, split, self._transform(split), in_memory=self.in_memory) for split in SPLITS}

    def _transform(self, split: str) -> Callable[[Sample], Sample] | None:
        steps = [t for t in (self.transform, self.train_transform if split == "train" else None) if t is not None]
        if len(steps) < 2:
            return steps[0] if steps else None
        return lambda sample: steps[1](steps[0](sample))

    def _loader(self, dataset: PreparedDataset, shuffle: bool = False) -> DataLoader:
        # A one-replica DistributedSampler shuffles by (seed, epoch), and Lightning calls its
        # set_epoch: a resumed run sees the same order as an uninterrupted one (under DDP,
        # Lightning shards it across ranks).
        sampler = DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=self.seed) if shuffle else None
        return DataLoader(dataset, batch_size=self.batch_size, sampler=sampler,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        self.setup()
        if len(self.datasets["train"]) == 0:
            raise MedsynthError(f"{self.root}: the prepared dataset has no training cases")
        return self._loader(self.datasets["train"], shuffle=True)

    def val_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.datasets["val"] if len(self.datasets["val"]) else self.datasets["test"])

    def test_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.datasets["test"])
