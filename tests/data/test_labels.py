"""Label maps of a trained model (data/labels.py), the prepared-data requirements, and the sdm services moved out of
the recipe: shape grouping, random patches, CT window round trip, the denoiser config, the label-map fidelity metrics."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medsynth.data.datasets import first_split, held_out, held_out_split, require_prepared
from medsynth.data.labels import load_labelled, load_labelled_split, read_label_map, save_labelled, value_lookup, values_of
from medsynth.data.manifest import Manifest
from medsynth.data.prepare import hu_to_unit, prepare_dataset, unit_to_hu
from medsynth.diffusion.condition import Condition
from medsynth.diffusion.config import DenoiserConfig
from medsynth.diffusion.patches import random_patches
from medsynth.diffusion.sampling import SamplerConfig, generate_by_shape
from medsynth.diffusion.schedule import FlowSchedule
from medsynth.errors import BadInputError, MedsynthError
from medsynth.evaluate.segmentation import label_map_fidelity, mean_seam_score
from medsynth.report.html import label_map_grid

VALUES, NAMES = [0, 2, 5], ["background", "two", "five"]
AFFINE = np.diag([0.5, 0.7, 2.0, 1.0])


def _nifti(path: Path, array: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(array, AFFINE), str(path))
    return path


def test_value_lookup_and_back():
    table = value_lookup(VALUES)
    assert table.tolist() == [0, -1, 1, -1, -1, 2]
    classes = table[torch.tensor([[5, 0, 2]])]
    assert classes.tolist() == [[2, 0, 1]] and values_of(classes, VALUES).tolist() == [[5, 0, 2]]
    assert values_of(classes, VALUES).dtype == torch.int16


def test_read_label_map_gives_class_indices_and_affine(tmp_path):
    array = np.zeros((4, 6, 2), np.int16)
    array[1, 2, 1], array[3, 5, 0] = 5, 2
    labels, affine = read_label_map(_nifti(tmp_path / "l.nii.gz", array), VALUES, NAMES)
    assert labels.shape == (1, 1, 4, 6, 2) and labels.dtype == torch.long
    assert (labels[0, 0, 1, 2, 1], labels[0, 0, 3, 5, 0], int(labels.sum())) == (2, 1, 3)
    np.testing.assert_allclose(affine, AFFINE)


def test_read_label_map_refuses_unknown_values_and_2d_in_one_line(tmp_path):
    array = np.zeros((4, 4, 4), np.int16)
    array[0, 0, 0], array[1, 1, 1] = 3, 7
    with pytest.raises(BadInputError) as error:
        read_label_map(_nifti(tmp_path / "bad.nii.gz", array), VALUES, NAMES)
    message = str(error.value)
    assert "bad.nii.gz" in message and "3, 7" in message and "0 background, 2 two, 5 five" in message and "\n" not in message
    with pytest.raises(BadInputError, match=r"2 dimension\(s\) \[4, 4\].*3D label map"):
        read_label_map(_nifti(tmp_path / "flat.nii.gz", np.zeros((4, 4), np.int16)), VALUES, NAMES)


def test_save_and_load_labelled_pairs(tmp_path):
    volumes, label_maps = torch.rand(2, 1, 4, 4, 4), torch.tensor(VALUES)[torch.randint(0, 3, (2, 1, 4, 4, 4))].to(torch.int16)
    written = save_labelled(tmp_path, volumes, label_maps, AFFINE)
    assert [p.name for p in written] == ["generated_000.nii.gz", "generated_001.nii.gz"]
    pairs = load_labelled(tmp_path, limit=1)
    assert len(pairs) == 1 and pairs[0][0] == "000"
    assert torch.equal(pairs[0][1], label_maps[0].long()) and torch.equal(pairs[0][2], volumes[0])
    assert load_labelled(tmp_path / "none") == []


def _prepared(tmp_path: Path, normalize: str = "ct", labels: dict | None = None) -> Path:
    raw = tmp_path / "raw"
    for folder in ("imagesTr", "labelsTr"):
        (raw / folder).mkdir(parents=True)
    for k in range(4):
        _nifti(raw / "imagesTr" / f"c{k}_0000.nii.gz", np.full((8, 8, 4), 100.0 * k, np.float32))
        label = np.zeros((8, 8, 4), np.uint8)
        label[2:5, 2:5, 1:3] = 5
        _nifti(raw / "labelsTr" / f"c{k}.nii.gz", label)
    (raw / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": labels or {"background": 0, "five": 5},
                                                  "numTraining": 4, "file_ending": ".nii.gz"}))
    return prepare_dataset(raw, tmp_path / f"prep_{normalize}", normalize=normalize, val_fraction=0.0, test_fraction=0.25,
                           progress=False)


def test_require_prepared_and_labelled_splits(tmp_path):
    out = _prepared(tmp_path)
    info, settings = require_prepared(out, "sdm", spatial_dims=3, one_shape=True, labels=True, channels=1, normalize=("ct",))
    assert info["image_shape"] == [8, 8, 4] and settings["normalize"] == "ct"
    with pytest.raises(MedsynthError, match=r"x needs 2D volumes$"):
        require_prepared(out, "x", spatial_dims=2)
    with pytest.raises(MedsynthError, match=r"x needs 3-channel images; this dataset has 1 channels"):
        require_prepared(out, "x", channels=3)
    with pytest.raises(MedsynthError, match=r"x needs intensities prepared with --normalize percentile, not 'ct'"):
        require_prepared(out, "x", normalize=("percentile",))

    images, classes = load_labelled_split(out, "train", [0, 5])
    assert images.shape == (3, 1, 8, 8, 4) and classes.shape == (3, 1, 8, 8, 4) and set(classes.unique().tolist()) == {0, 1}
    assert load_labelled_split(out, "val", [0, 5]) is None
    with pytest.raises(BadInputError, match="label values this model was not trained on"):
        load_labelled_split(out, "train", [0, 2])  # 5 lies beyond the table
    assert [item["id"] for item in first_split(out, ("val", "test"))] == [item["id"] for item in first_split(out, ("test",))]
    assert first_split(None, ("test",)) == [] and first_split(tmp_path, ("test",)) == []


def test_held_out_is_the_test_split_else_val(tmp_path):
    out = _prepared(tmp_path)
    test_ids = [item["id"] for item in first_split(out, ("test",))]
    assert held_out_split(out) == "test" and [item["id"] for item in held_out(out)] == test_ids
    manifest = Manifest.load(out)  # the same cases, their test split renamed val
    manifest.cases = [case.model_copy(update={"split": "val" if case.split == "test" else case.split}) for case in manifest.cases]
    manifest.save(out)
    assert held_out_split(out) == "val" and [item["id"] for item in held_out(out)] == test_ids
    assert held_out_split(None) is None and held_out(tmp_path / "nowhere") == []


def test_generate_by_shape_batches_per_shape_in_order():
    items = [torch.full((1, 1, 2, 2), 0.0), torch.full((1, 1, 3, 3), 1.0), torch.full((1, 1, 2, 2), 2.0)]
    calls = []

    def generate(batch, indices):
        calls.append(list(indices))
        return batch + 10

    out = generate_by_shape(items, generate)
    assert calls == [[0, 2], [1]]
    assert [float(o.flatten()[0]) for o in out] == [10.0, 11.0, 12.0] and out[1].shape == (1, 3, 3)


def test_random_patches_cut_the_same_windows():
    x0 = torch.arange(2 * 8 * 8 * 8, dtype=torch.float32).reshape(2, 1, 8, 8, 8)
    cond = Condition(seg=x0 * 2, concat=x0 + 1, class_labels=torch.tensor([3, 4]))
    patches, pcond = random_patches(x0, cond, [4, 2, 8], 3, torch.Generator().manual_seed(0))
    assert patches.shape == (6, 1, 4, 2, 8) and pcond.seg.shape == (6, 1, 4, 2, 8)
    assert torch.equal(pcond.seg, patches * 2) and torch.equal(pcond.concat, patches + 1)
    assert pcond.class_labels.tolist() == [3, 3, 3, 4, 4, 4]
    again, _ = random_patches(x0, cond, [4, 2, 8], 3, torch.Generator().manual_seed(0))
    assert torch.equal(again, patches)


def test_ct_window_round_trip():
    unit = torch.tensor([0.0, 0.25, 1.0])
    assert unit_to_hu(unit, (-1000.0, 1000.0)).tolist() == [-1000.0, -500.0, 1000.0]
    assert torch.allclose(hu_to_unit(unit_to_hu(unit, (-200.0, 600.0)), (-200.0, 600.0)), unit)
    assert unit_to_hu(unit, None) is unit and hu_to_unit(unit, None) is unit


def test_denoiser_config_builds_unet_and_schedule():
    config = DenoiserConfig(channels=[8, 16], attention_levels=[False, False], norm_num_groups=4, num_head_channels=4,
                            schedule="rflow")
    unet = config.build_unet(2, 3, 1)
    assert unet(torch.zeros(1, 3, 8, 8), torch.zeros(1)).shape == (1, 1, 8, 8)
    assert isinstance(config.make_schedule(), FlowSchedule)
    assert SamplerConfig(sampler="ddim", steps=7, guidance=2.0).describe(config.make_schedule()) == "ddim (7 steps), guidance 2.0"


def test_label_map_fidelity_keys_and_identity():
    labels = torch.zeros(3, 8, 8, 8, dtype=torch.long)
    labels[:, 2:6, 2:6, 2:6] = 1
    images = labels[:, None].float() * 100.0 + torch.randn(3, 1, 8, 8, 8, generator=torch.Generator().manual_seed(0))
    result = label_map_fidelity(images, labels, images, labels, images, labels, ["background", "box"], epochs=1, channels=(4, 8))
    assert list(result) == ["segmenter_dice_real", "segmenter_dice_generated", "segmenter_dice_ratio",
                            "segmenter_dice_real_per_class", "segmenter_dice_generated_per_class", "intensity_units",
                            "intensity_real_per_label", "intensity_generated_per_label", "intensity_mean_abs_difference"]
    # generated = real: the same Dice, ratio 1 (or NaN when the one-epoch segmenter finds nothing), no intensity difference
    assert result["segmenter_dice_real"] == result["segmenter_dice_generated"]
    assert result["intensity_mean_abs_difference"] == 0.0 and result["intensity_real_per_label"]["box"]["mean"] > 90


def test_mean_seam_score_is_the_mean_over_volumes():
    volumes = torch.rand(2, 1, 8, 8, 8, generator=torch.Generator().manual_seed(0))
    single = [mean_seam_score(v[None], [4, 4, 4], 0.0)["ratio"] for v in volumes]
    assert mean_seam_score(volumes, [4, 4, 4], 0.0)["ratio"] == pytest.approx(np.mean(single))


def test_label_map_grid_titles_pairs():
    labels, volume = torch.zeros(1, 4, 4, 4, dtype=torch.long), torch.rand(1, 4, 4, 4)
    figure = label_map_grid([("000", "generated", labels, volume), ("c1", "real", labels, volume)], num_classes=3)
    titles = [axis.get_title() for axis in figure.axes if axis.get_title()]
    assert titles == ["labels 000", "generated 000", "labels c1", "real c1"]
