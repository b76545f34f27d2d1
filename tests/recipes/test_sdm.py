"""The sdm recipe at a tiny size: both stages, label-map sampling with geometry, seamless patched
sampling, bad input, fine-tuning, resume after SIGKILL, evaluation and report."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import train_until_killed

from medsynth import api, cli
from medsynth.data.datasets import PreparedDataset
from medsynth.diffusion.cascade import downsample_image, low_res_affine, upsample_image
from medsynth.errors import BadInputError, MedsynthError
from medsynth.evaluate.segmentation import seam_score, sliding_window_borders
from medsynth.nets.patch_embedding import coordinate_channels, patch_coordinates
from medsynth.recipes.sdm import SDMRecipe

# 16^3 prepared volumes; the low stage works on 8^3 (low_res_factor 2), the high stage on 8^3 patches.
TINY = ["model.channels=[8, 16]", "model.attention_levels=[false, false]", "model.norm_num_groups=4",
        "model.num_head_channels=4", "model.spade_channels=8", "model.low_res_factor=2", "train.batch_size=2",
        "train.num_threads=1", "train.lr=0.003", "model.prediction=v_prediction", "sample.steps=4", "evaluate.n_generated=2", "evaluate.segmenter_epochs=1",
        "evaluate.segmenter_channels=[4, 8]"]
HIGH = ["model.stage=high", "model.patch_size=[8, 8, 8]"]


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    return api.phantom("coronary", tmp_path_factory.mktemp("coronary") / "raw", n=6, size=16, seed=0)


@pytest.fixture(scope="module")
def prepared(raw) -> Path:
    return api.prepare(raw, raw.parent / "prepared", recipe="sdm", normalize="ct", ct_window=(-1000.0, 1000.0),
                       seed=0, progress=False)


@pytest.fixture(scope="module")
def low_run(prepared, tmp_path_factory):
    out = tmp_path_factory.mktemp("low") / "run"
    return api.train("sdm", data=prepared, overrides=TINY + ["train.max_epochs=2"], out=out, progress=False)


@pytest.fixture(scope="module")
def high_run(prepared, low_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("high") / "run"
    return api.train("sdm", data=prepared, overrides=TINY + HIGH + ["train.max_epochs=40", f"sample.low_res_run={low_run.path}"],
                     out=out, progress=False)


def _cli(*args: str) -> int:
    return cli.main([str(a) for a in args])


def test_coordinate_channels():
    coords = coordinate_channels((4, 5, 1))
    assert coords.shape == (3, 4, 5, 1)
    assert coords[0, 0, 0, 0] == -1 and coords[0, -1, 0, 0] == 1 and coords[1, 0, -1, 0] == 1 and (coords[2] == 0).all()
    assert torch.equal(patch_coordinates((8, 8, 8), (2, 4, 0), (4, 4, 8)), coordinate_channels((8, 8, 8))[:, 2:6, 4:8, 0:8])


def test_low_stage_samples_label_map_with_its_affine(low_run, raw, tmp_path):
    label_path = raw / "labelsTr" / "coronary_001.nii.gz"
    assert _cli("sample", low_run.path, "--condition", label_path, "--out", tmp_path / "one", "--seed", "3") == 0
    written = tmp_path / "one" / "random" / "coronary_001.nii.gz"
    image, labels = nib.load(written), nib.load(label_path)
    assert image.shape == (8, 8, 8)  # the low-res grid: the label map pooled by low_res_factor 2
    assert np.allclose(image.affine, low_res_affine(labels.affine, 2))
    assert np.allclose(image.affine[:3, :3] @ [3.5, 3.5, 3.5] + image.affine[:3, 3],
                       labels.affine[:3, :3] @ [7.5, 7.5, 7.5] + labels.affine[:3, 3])  # same centre in world space
    data = np.asarray(image.dataobj)
    assert np.isfinite(data).all() and -1000 <= data.min() and data.max() <= 1000  # HU, inside the CT window


def test_batch_sampling_over_a_folder_is_reproducible(low_run, raw, tmp_path):
    first = api.sample(low_run.path, condition=raw / "labelsTr", seed=1, out=tmp_path / "a")
    again = api.sample(low_run.path, condition=raw / "labelsTr", seed=1, out=tmp_path / "b")
    other = api.sample(low_run.path, condition=raw / "labelsTr", seed=2, out=tmp_path / "c")
    assert [p.name for p in first] == [f"coronary_{k:03d}.nii.gz" for k in range(6)]
    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in again]
    assert first[0].read_bytes() != other[0].read_bytes()
    two = api.sample(low_run.path, n=2, condition=raw / "labelsTr" / "coronary_000.nii.gz", out=tmp_path / "d",
                     overrides=["sample.sampler=ddim", "sample.steps=2", "sample.guidance=0"])
    assert [p.name for p in two] == ["coronary_000_00.nii.gz", "coronary_000_01.nii.gz"]


@pytest.mark.parametrize("case", ["unknown class", "wrong dimensions", "negative guidance", "patch larger than volume"])
def test_bad_input_is_one_line_with_status_2(case, low_run, high_run, raw, tmp_path, capsys):
    reference = nib.load(raw / "labelsTr" / "coronary_000.nii.gz")
    labels = np.asarray(reference.dataobj).astype(np.int16)
    run, extra = low_run.path, []
    if case == "unknown class":
        labels[0, 0, 0] = 12
        path = tmp_path / "unknown.nii.gz"
    elif case == "wrong dimensions":
        labels = labels[:, :, 0]
        path = tmp_path / "flat.nii.gz"
    elif case == "negative guidance":
        path, extra = raw / "labelsTr" / "coronary_000.nii.gz", ["--guidance", "-1"]
    else:
        labels = labels[:4, :8, :8]
        path, run = tmp_path / "small.nii.gz", high_run.path
    if not path.exists():
        nib.save(nib.Nifti1Image(labels, reference.affine), str(path))
    status = _cli("sample", run, "--condition", path, "--out", tmp_path / "out", *extra)
    err = capsys.readouterr().err.strip()
    assert status == 2 and len(err.splitlines()) == 1 and err.startswith("medsynth: error:")
    expected = {"unknown class": ["unknown.nii.gz", "12"], "wrong dimensions": ["flat.nii.gz", "3D"],
                "negative guidance": ["sample.guidance", "greater than or equal to 0"], "patch larger than volume": ["small.nii.gz", "patch size"]}[case]
    assert all(word in err for word in expected), err


def test_training_refuses_a_patch_larger_than_the_volume(prepared, tmp_path):
    with pytest.raises(MedsynthError, match=r"patch_size \[32, 8, 8\] is larger than the volume"):
        api.train("sdm", data=prepared, overrides=TINY + ["model.stage=high", "model.patch_size=[32, 8, 8]"], out=tmp_path / "r",
                  progress=False)


def test_high_stage_patched_sampling_is_seamless(high_run, prepared):
    # A volume twice the training patch in every dimension, denoised patch by patch at every step.
    _, _, module = api.load_run(high_run.path)
    recipe, patch = SDMRecipe(), module.config.model.patch_size
    case = PreparedDataset(prepared, split="test")[0]
    labels = module.classes_of(case["label"][None])
    assert all(s >= 2 * p for s, p in zip(labels.shape[2:], patch))
    reference = upsample_image(downsample_image(case["image"][None], 2), 2) * 2 - 1
    settings = module.config.sample.model_copy(update={"steps": 10, "guidance": 1.0, "patch_overlap": 0.5})
    volume = recipe.to_units(recipe.generate(module, labels, [0], reference, settings), module.config)[0]
    borders = sliding_window_borders(volume.shape[1:], patch, settings.patch_overlap)
    assert all(borders)
    score = seam_score(volume, borders)
    assert abs(score["ratio"] - 1) <= 0.1, score

    # The control: tiles sampled one by one (own noise, no blending) and put side by side show seams.
    tiles = torch.zeros_like(volume[None])
    starts = [(x, y, z) for x in (0, 8) for y in (0, 8) for z in (0, 8)]
    for k, start in enumerate(starts):
        window = (slice(None), slice(None), *(slice(s, s + p) for s, p in zip(start, patch)))
        tiles[window] = recipe.to_units(module.volumes(labels[window], [k], settings, reference[window]), module.config)
    tiled = seam_score(tiles[0], sliding_window_borders(volume.shape[1:], patch, 0.0))
    assert tiled["ratio"] > 1.1, tiled


def test_init_fine_tunes_from_weights(prepared, low_run, tmp_path):
    tuned = api.train("sdm", data=prepared, overrides=TINY + ["train.max_epochs=1", "train.lr=1e-12"], out=tmp_path / "tuned",
                      init=low_run.path, progress=False)
    start, tuned_weights = load_file(low_run.weights_path), load_file(tuned.weights_path)
    assert all(torch.allclose(start[k], tuned_weights[k], atol=1e-6) for k in start)
    with pytest.raises(BadInputError, match="do not fit"):  # a low-stage UNet has fewer input channels than a high-stage one
        api.train("sdm", data=prepared, overrides=TINY + HIGH + ["train.max_epochs=1"], out=tmp_path / "bad", init=low_run.path,
                  progress=False)


def test_evaluate_and_report(low_run, high_run):
    metrics = api.evaluate(low_run.path)
    for key in ("segmenter_dice_real", "segmenter_dice_generated", "memorisation_max_ssim", "intensity_real_per_label",
                "memorisation_max_ssim_real_reference", "memorisation_real_test_max_ssim", *SDMRecipe.headline_metrics):
        assert key in metrics
    assert "coronary" in metrics["segmenter_dice_generated_per_class"] and metrics["intensity_units"] == "HU"
    report = api.report(low_run.path).read_text()
    assert "data:image/png;base64," in report and "segmenter_dice_generated" in report
    high = api.evaluate(high_run.path)
    assert high["reference"].startswith("low-res run")
    # patches blended with overlap: a step across a patch border is an ordinary step, ratio near 1 (measured 0.998; a
    # seam gives well above 1, tests/evaluate/test_segmentation.py)
    assert 0.75 < high["seam_ratio"] < 1.33 and high["seam_step_inside"] > 0


def test_resume_after_sigkill_restores_weights_optimiser_ema_and_step(prepared, tmp_path):
    # The high stage draws its patches from the global RNG: an exact continuation also needs the RNG state.
    run = tmp_path / "killed"
    epochs = 8
    settings = TINY + HIGH + [f"train.max_epochs={epochs}", "train.ema_decay=0.9"]
    killed_at = train_until_killed(["sdm", "--stage", "high", "--data", str(prepared),
                                    *[arg for item in settings if item != "model.stage=high" for arg in ("--set", item)]], run)
    assert killed_at["epoch"] < epochs - 1 and not (run / "model.safetensors").exists()
    assert killed_at["optimizer_states"] and any("EpochEMA" in key for key in killed_at["callbacks"])

    resumed = api.train(resume=run, progress=False)
    final = torch.load(resumed.last_checkpoint, weights_only=True)
    steps_per_epoch = killed_at["global_step"] // (killed_at["epoch"] + 1)
    assert final["epoch"] == epochs - 1 and final["global_step"] == epochs * steps_per_epoch

    # The resumed run continues exactly: the same (EMA) weights as a run that was never killed.
    whole = api.train("sdm", data=prepared, overrides=settings, out=tmp_path / "whole", progress=False)
    resumed_weights, whole_weights = load_file(run / "model.safetensors"), load_file(whole.weights_path)
    assert all(torch.equal(resumed_weights[k], whole_weights[k]) for k in whole_weights)
