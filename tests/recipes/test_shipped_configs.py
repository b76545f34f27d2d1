"""Every shipped config builds its module and runs one training step and one sampling step.

2D configs run at the image size they are written for; 3D GPU configs on a reduced volume (the
smallest their network's strides and the low-res pooling allow). The fields a recipe fills from
the prepared data (``resolve_config``) are filled here by hand, as the data would.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import nibabel as nib
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from medsynth.config import CONFIG_DIR, dump_config, load_config, read_yaml
from medsynth.recipes import get_recipe
from medsynth.recipes.base import SampleRequest
from medsynth.runs import Run
from medsynth.training import export_weights

CONFIGS = sorted(path.stem for path in CONFIG_DIR.glob("*.yaml") if "recipe" in read_yaml(path))
# The data each config is written for: image side in pixels/voxels; None: a 3D GPU config, run reduced.
SHIPPED_SIDE = {"cvae-tiny": 64, "cvae-224": 224, "cvae-448": 448,
                "sdm-tiny": 24, "sdm-tiny-high": 32, "sdm-low-64": None, "sdm-high-128": None, "sdm-bench-48": 48,
                "flow-cvae-tiny": 32, "flow-cvae-86": None, "motion-ldm-tiny": 48, "motion-ldm-256": None,
                "diffae-tiny": 32, "diffae-128": 128, "diffae-bench-64": 64, "class-diffusion-tiny": 64}
CILIA_CLASSES = ["normal", "disarranged", "oda_defect", "ida_defect", "cp_defect"]
CORONARY_LABELS = {0: "background", 1: "myocardium", 2: "blood_pool", 3: "coronary"}


def step(module, batch: dict[str, torch.Tensor]) -> None:
    """One optimiser step on ``batch`` through a Lightning Trainer (32-bit on the CPU); the weights change."""
    before = [p.detach().clone() for p in module.parameters()]
    trainer = L.Trainer(max_steps=1, accelerator="cpu", precision="32", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(module, train_dataloaders=DataLoader([batch], batch_size=None))
    assert trainer.global_step == 1
    assert any(not torch.equal(old, new) for old, new in zip(before, module.parameters()))


def cvae_case(name: str, tmp_path: Path) -> list[Path]:
    side = SHIPPED_SIDE[name]
    config = load_config(get_recipe("cvae").config_class, name, ["train.num_threads=1"])
    config = config.model_copy(update={"model": config.model.model_copy(update={
        "spatial_dims": 2, "in_shape": [1, side, side], "classes": CILIA_CLASSES})})
    module = get_recipe("cvae").build_module(config)
    step(module, {"image": torch.rand(2, 1, side, side), "class": torch.tensor([0, 3])})
    return get_recipe("cvae").sample(module.eval(), SampleRequest(n=1, class_name="normal"), tmp_path / "samples")


def sdm_config(name: str, side: int, stage: str | None = None):
    recipe = get_recipe("sdm")
    reduced = [] if SHIPPED_SIDE[name] else ["sample.patch_overlap=0", "sample.guidance=0", "data.patches_per_volume=1"]
    config = load_config(recipe.config_class, name, ["train.num_threads=1", "sample.steps=1", *reduced])
    model = config.model
    stage = stage or model.stage
    multiple = 2 ** (len(model.channels) - 1)
    patch = model.patch_size if SHIPPED_SIDE[name] else [2 * multiple] * 3  # the deepest level keeps 2^3 voxels
    return config.model_copy(update={"data_dir": None, "model": model.model_copy(update={
        "stage": stage, "image_shape": [side] * 3, "classes": list(CORONARY_LABELS.values()), "label_values": list(CORONARY_LABELS),
        "reference_affine": np.diag([0.8, 0.8, 1.0, 1.0]).tolist(), "ct_window": [-1000.0, 1000.0],
        "patch_size": patch if stage == "high" else None})})


def sdm_case(name: str, tmp_path: Path) -> list[Path]:
    recipe = get_recipe("sdm")
    yaml_model = read_yaml(CONFIG_DIR / f"{name}.yaml")["model"]
    factor, multiple = yaml_model.get("low_res_factor", 2), 2 ** (len(yaml_model["channels"]) - 1)
    side = SHIPPED_SIDE[name] or 2 * factor * multiple  # reduced: the low-res grid's deepest level keeps 2^3 voxels
    config = sdm_config(name, side)
    if config.model.stage == "high":  # its references come from a low-stage run of the same network on the same grid
        low = Run.create(tmp_path / "low")
        low_config = sdm_config(name, side, stage="low")
        dump_config(low_config, low.config_path)
        export_weights(recipe.build_module(low_config), low_config, low.weights_path)
        config = config.model_copy(update={"sample": config.sample.model_copy(update={"low_res_run": str(low.path)})})
    module = recipe.build_module(config)
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, len(CORONARY_LABELS), (1, 1, side, side, side), generator=generator)
    step(module, {"image": torch.rand(1, 1, side, side, side, generator=generator), "label": labels})
    condition = tmp_path / "labels.nii.gz"
    nib.save(nib.Nifti1Image(labels[0, 0].numpy().astype(np.int16), np.diag([0.8, 0.8, 1.0, 1.0])), str(condition))
    return recipe.sample(module.eval(), SampleRequest(n=1, condition=condition), tmp_path / "samples")


def flow_cvae_case(name: str, tmp_path: Path) -> list[Path]:
    recipe = get_recipe("flow-cvae")
    config = load_config(recipe.config_class, name, ["train.num_threads=1"])
    side = SHIPPED_SIDE[name] or 2 * 2 ** (len(config.model.channels) - 1)  # reduced: the latent grid keeps 2^3 voxels
    affine = np.diag([2.0, 2.0, 2.5, 1.0])
    config = config.model_copy(update={"data_dir": None, "model": config.model.model_copy(update={
        "image_shape": [side] * 3, "reference_affine": affine.tolist(), "ct_window": [-1000.0, 1000.0]})})
    module = recipe.build_module(config)
    generator = torch.Generator().manual_seed(0)
    step(module, {"image": torch.rand(2, 1, side, side, side, generator=generator), "flow": torch.randn(2, 3, side, side, side, generator=generator),
                  "affine": torch.tensor(affine).expand(2, 4, 4)})
    condition = tmp_path / "frame.nii.gz"
    nib.save(nib.Nifti1Image(np.full((side,) * 3, -500.0, dtype=np.float32), affine), str(condition))
    return recipe.sample(module.eval(), SampleRequest(n=1, condition=condition), tmp_path / "samples")


def motion_ldm_case(name: str, tmp_path: Path) -> list[Path]:
    """A step of the first stage (the image autoencoder), a step of the LDM stage on the autoencoders of that
    run, and one phase sampled from a CT file; the GPU config on a reduced (X, Y, Z) grid."""
    recipe = get_recipe("motion-ldm")
    config = load_config(recipe.config_class, name, ["train.num_threads=1", "sample.steps=1", "sample.phases=[1]"])
    model = config.model
    in_plane = 2 ** (len(model.image_ae.channels) - 1) * 2 ** (len(model.channels) - 1)
    shape = [48, 48, 12] if SHIPPED_SIDE[name] else [2 * in_plane, 2 * in_plane, 2 ** len(model.channels)]
    affine = np.diag([5.6, 4.2, 21.0, 1.0])
    config = config.model_copy(update={"data_dir": None, "model": model.model_copy(update={
        "phases": 3, "image_shape": shape, "reference_affine": affine.tolist(), "ct_window": [-1000.0, 500.0]})})
    generator = torch.Generator().manual_seed(0)
    batch = {"image": torch.rand(2, 1, *shape, generator=generator), "reference": torch.rand(2, 1, *shape, generator=generator),
             "field": torch.randn(2, 3, *shape, generator=generator) * 0.1, "phase": torch.tensor([1, 2]),
             "id": ["a_t01", "a_t02"], "subject": ["a", "a"], "affine": torch.tensor(affine).expand(2, 4, 4)}
    module = recipe.build_module(config)
    step(module, batch)
    autoencoders = Run.create(tmp_path / "autoencoders")
    dump_config(config, autoencoders.config_path)
    export_weights(module, config, autoencoders.weights_path)
    ldm = config.model_copy(update={"model": config.model.model_copy(update={
        "stage": "ldm", "image_ae_run": str(autoencoders.path), "field_vae_run": str(autoencoders.path)})})
    module = recipe.build_module(ldm)
    step(module, batch)
    condition = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(np.full(shape, -500.0, dtype=np.float32), affine), str(condition))
    return recipe.sample(module.eval(), SampleRequest(n=1, condition=condition), tmp_path / "samples")


def diffae_case(name: str, tmp_path: Path) -> list[Path]:
    """A step of the first stage (encoder + UNet, end to end) on slices of the config's side, and one random slice."""
    recipe, side = get_recipe("diffae"), SHIPPED_SIDE[name]
    config = load_config(recipe.config_class, name, ["train.num_threads=1", "sample.steps=1"])
    config = config.model_copy(update={"data_dir": None, "model": config.model.model_copy(update={"image_size": side})})
    module = recipe.build_module(config)
    step(module, {"image": torch.rand(2, 1, side, side, generator=torch.Generator().manual_seed(0))})
    return recipe.sample(module.eval(), SampleRequest(n=1), tmp_path / "samples")


def class_diffusion_case(name: str, tmp_path: Path) -> list[Path]:
    """A step on cilia-sized images of the five classes, and one image of a class sampled in one step."""
    recipe, side = get_recipe("class-diffusion"), SHIPPED_SIDE[name]
    config = load_config(recipe.config_class, name, ["train.num_threads=1", "sample.steps=1"])
    config = config.model_copy(update={"data_dir": None, "model": config.model.model_copy(update={
        "spatial_dims": 2, "in_shape": [1, side, side], "classes": CILIA_CLASSES})})
    module = recipe.build_module(config)
    step(module, {"image": torch.rand(2, 1, side, side, generator=torch.Generator().manual_seed(0)), "class": torch.tensor([0, 3])})
    return recipe.sample(module.eval(), SampleRequest(n=1, class_name="normal"), tmp_path / "samples")


CASES = {"cvae": cvae_case, "sdm": sdm_case, "flow-cvae": flow_cvae_case, "motion-ldm": motion_ldm_case, "diffae": diffae_case,
         "class-diffusion": class_diffusion_case}


def test_every_shipped_config_is_listed():
    assert sorted(SHIPPED_SIDE) == CONFIGS


@pytest.mark.parametrize("name", CONFIGS)
def test_shipped_config_trains_a_step_and_samples(name, tmp_path):
    recipe = read_yaml(CONFIG_DIR / f"{name}.yaml")["recipe"]
    assert recipe in CASES, f"{name}: no test glue for recipe '{recipe}' here"
    written = CASES[recipe](name, tmp_path)
    assert written and all(path.is_file() and path.stat().st_size > 0 for path in written)

