"""The cvae recipe end to end at a tiny size: train, resume after SIGKILL, sample (bit-identical), evaluate, report."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from conftest import train_until_killed

from medsynth import api
from medsynth.errors import MedsynthError

TINY = ["model.channels=[8, 16]", "model.strides=[2, 2]", "model.latent_size=4", "model.embed_dim=4",
        "train.batch_size=8", "train.num_threads=1", "evaluate.n_per_class=4", "evaluate.classifier_epochs=1"]


@pytest.fixture(scope="module")
def trained(prepared, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "run"
    return api.train("cvae", data=prepared, overrides=TINY + ["train.max_epochs=2", "train.ema_decay=0.9"], out=out, progress=False)


def test_run_layout(trained):
    for name in ("config.yaml", "checkpoints/last.ckpt", "model.safetensors"):
        assert (trained.path / name).is_file(), name
    assert any((trained.path / "tb").rglob("events.out.tfevents.*"))
    checkpoint = torch.load(trained.last_checkpoint, weights_only=True)
    assert checkpoint["epoch"] == 1
    assert any("EpochEMA" in key for key in checkpoint["callbacks"])  # Lightning's EMA, from the recipe's first epoch


def test_same_seed_same_samples_bit_for_bit(trained, tmp_path):
    first = api.sample(trained.path, n=3, seed=7, out=tmp_path / "a")
    second = api.sample(trained.path, n=3, seed=7, out=tmp_path / "b")
    other = api.sample(trained.path, n=3, seed=8, out=tmp_path / "c")
    assert len(first) == 15
    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in second]
    assert [p.read_bytes() for p in first] != [p.read_bytes() for p in other]


@pytest.mark.parametrize("mode", ["grid", "plane", "interpolate"])
def test_sampling_modes(trained, tmp_path, mode):
    paths = api.sample(trained.path, n=4, mode=mode, class_name="normal", out=tmp_path)
    assert len(paths) == 4 and all(p.suffix == ".png" for p in paths)
    assert (tmp_path / mode / "normal.png").is_file()


def test_sampling_refuses_to_overwrite_and_unknown_class(trained, tmp_path):
    api.sample(trained.path, n=1, out=tmp_path)
    with pytest.raises(MedsynthError, match="--force"):
        api.sample(trained.path, n=1, out=tmp_path)
    with pytest.raises(MedsynthError, match="unknown class 'cancer'"):
        api.sample(trained.path, n=1, class_name="cancer", out=tmp_path / "x")


def test_evaluate_and_report(trained):
    metrics = api.evaluate(trained.path)
    for key in ("classifier_accuracy_real", "classifier_accuracy_generated", "memorisation_max_ssim", "mmd_classifier_features"):
        assert key in metrics
    assert set(metrics["classifier_accuracy_generated_per_class"]) == {"normal", "disarranged", "oda_defect", "ida_defect", "cp_defect"}
    assert 0.0 <= metrics["memorisation_max_ssim"] <= 1.0
    report = api.report(trained.path).read_text()
    assert "data:image/png;base64," in report and "classifier_accuracy_real" in report


def test_new_run_refuses_existing_run(prepared, trained):
    with pytest.raises(MedsynthError, match="--resume"):
        api.train("cvae", data=prepared, overrides=TINY, out=trained.path, progress=False)


def test_resume_after_sigkill_finishes_configured_epochs(prepared, tmp_path):
    run = tmp_path / "killed"
    epochs = 12
    killed_at = train_until_killed(["cvae", "--data", str(prepared), *[arg for item in TINY + [f"train.max_epochs={epochs}"] for arg in ("--set", item)]], run)
    assert killed_at["epoch"] < epochs - 1 and not (run / "model.safetensors").exists()

    resumed = api.train(resume=run, progress=False)
    final = torch.load(resumed.last_checkpoint, weights_only=True)
    steps_per_epoch = killed_at["global_step"] // (killed_at["epoch"] + 1)
    assert final["epoch"] == epochs - 1
    assert final["global_step"] == epochs * steps_per_epoch
    assert (run / "prev_config.yaml").is_file() and (run / "model.safetensors").is_file()

    # The resumed run continues exactly: the same weights as a run that was never killed.
    uninterrupted = api.train("cvae", data=prepared, overrides=TINY + [f"train.max_epochs={epochs}"], out=tmp_path / "whole", progress=False)
    resumed_weights, whole_weights = load_file(run / "model.safetensors"), load_file(uninterrupted.weights_path)
    assert all(torch.equal(resumed_weights[k], whole_weights[k]) for k in whole_weights)


# -- every shipped cvae config builds, trains one step and decodes at its shipped size ----------

SHIPPED_SIZES = {"cvae-tiny": 64, "cvae-224": 224, "cvae-448": 448}


@pytest.mark.parametrize("name", sorted(SHIPPED_SIZES))
def test_shipped_config_builds_trains_one_step_and_decodes(name):
    import lightning as L
    from torch.utils.data import DataLoader

    from medsynth.config import load_config, resolve_config_path
    from medsynth.recipes.cvae import CVAEConfig, CVAEModule

    assert {p.stem for p in resolve_config_path("cvae-tiny").parent.glob("cvae-*.yaml")} == set(SHIPPED_SIZES)
    size = SHIPPED_SIZES[name]
    config = load_config(CVAEConfig, name, overrides=["model.spatial_dims=2", f"model.in_shape=[1, {size}, {size}]",
                                                     "model.classes=[a, b]", "train.batch_size=1", "train.num_threads=1"])
    torch.manual_seed(0)
    module = CVAEModule(config)
    items = [{"image": torch.rand(1, size, size), "class": k} for k in range(2)]
    before = {k: v.detach().clone() for k, v in module.net.state_dict().items()}
    # One optimiser step at the shipped precision (bf16-mixed for the large configs), no validation: cheap on a CPU.
    trainer = L.Trainer(max_steps=1, limit_val_batches=0, accelerator="cpu", precision=config.train.precision, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, train_dataloaders=DataLoader(items, batch_size=1))
    assert any(not torch.equal(before[k], v) for k, v in module.net.state_dict().items()), "the training step changed no weight"
    module.eval()
    with torch.no_grad():
        images = module.decode(torch.randn(2, config.model.latent_size), torch.tensor([0, 1]))
    assert images.shape == (2, 1, size, size)
    assert torch.isfinite(images).all() and images.min() >= 0 and images.max() <= 1


def test_evaluate_reports_real_references(trained):
    metrics = api.evaluate(trained.path)
    for key in ("mmd_classifier_features", "ms_ssim_generated", "memorisation_max_ssim", "memorisation_mean_ssim"):
        assert f"{key}_real_reference" in metrics, key
    assert metrics["ms_ssim_generated_per_class_real_reference"] == metrics["ms_ssim_real_per_class"]
    assert 0.0 <= metrics["memorisation_max_ssim_real_reference"] <= 1.0


def test_adversarial_term_trains_each_network_on_its_own_loss(prepared, tmp_path):
    """The generator's patch-GAN loss reaches the decoder only, the discriminator's the discriminator only,
    and a run with the term trains, logs both and resumes like any other (one optimiser)."""
    from medsynth.recipes import get_recipe

    settings = [*TINY, "model.adversarial_weight=0.05", "model.adversarial_start_epoch=0", "model.discriminator_channels=4",
                "train.max_epochs=1"]
    run = api.train("cvae", data=prepared, overrides=settings, out=tmp_path / "adv", progress=False)
    module = api.load_run(run.path)[2].train()
    batch = {"image": torch.rand((2, 1, 32, 32)), "class": torch.tensor([0, 1])}
    x, c = batch["image"], batch["class"]
    out, _, _, _ = module.net(x, c)
    losses = module._adversarial({"loss": torch.zeros(())}, x, c, out, per_image=1)
    losses["adv_g"].backward(retain_graph=True)
    assert all(p.grad is None for p in module.discriminator.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.net.parameters())
    module.zero_grad(set_to_none=True)
    losses["adv_d"].backward()
    assert all(p.grad is None for p in module.net.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.discriminator.parameters())
    assert get_recipe("cvae").config_class.model_fields["model"].annotation.model_fields["adversarial_weight"].default == 0.0
    assert any((run.path / "tb").rglob("events.out.tfevents.*"))
