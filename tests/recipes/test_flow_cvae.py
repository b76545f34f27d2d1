"""Recipe flow-cvae: the ELBO (KL closed form, end-point error in mm), geometry in = geometry out, condition
files (resampled, refused), sampling modes, the registration stage and its frozen encoder as the pyramid.

The contract tests (tests/recipes/test_contract.py) run the recipe's tiny example end to end.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from medsynth import api
from medsynth.config import load_config
from medsynth.data.fields import load_field
from medsynth.errors import BadInputError, MedsynthError
from medsynth.recipes import get_recipe
from medsynth.recipes.base import SampleRequest
from medsynth.recipes.flow_cvae import CVAEStage, FlowCVAEModule

TINY = ["model.channels=[4, 8]", "model.pyramid_channels=[4, 4]", "model.latent_channels=2", "train.num_threads=1"]
AFFINE = np.diag([6.875, 6.875, 5.0, 1.0])


def module(shape=(16, 16, 16), affine=AFFINE, overrides=()) -> FlowCVAEModule:
    torch.manual_seed(0)
    config = load_config(get_recipe("flow-cvae").config_class, "flow-cvae-tiny", [*TINY, *overrides])
    config = config.model_copy(update={"model": config.model.model_copy(update={
        "image_shape": list(shape), "reference_affine": np.asarray(affine).tolist(), "ct_window": [-1000.0, 1000.0]})})
    built = FlowCVAEModule(config).eval()
    torch.nn.init.normal_(built.net.decoder.out.conv.weight, std=0.2)  # untrained, but visibly non-zero fields
    return built


def frame_file(path: Path, affine: np.ndarray, shape=(16, 16, 16), value: float | None = None) -> Path:
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    hu = (800 * np.exp(-(x**2 + y**2 + z**2) * 3) - 900).astype(np.float32)
    if value is not None:
        hu[0, 0, 0] = value
    nib.save(nib.Nifti1Image(hu, affine), str(path))
    return path


def test_kl_is_the_closed_form_and_the_error_is_in_mm():
    net = module()
    mu, logvar = torch.randn(2, 2, 4, 4, 4), torch.randn(2, 2, 4, 4, 4) * 0.5
    flow = torch.zeros(2, 3, 16, 16, 16)
    recon = flow.clone()
    recon[:, 0] = 1.0  # one voxel along x: 6.875 mm; along z it would be 5 mm
    net.net.forward = lambda f, frame: (recon, mu, logvar)
    affines = torch.tensor(AFFINE).expand(2, 4, 4)
    losses = CVAEStage(net.config).losses(net, {"image": torch.zeros(2, 1, 16, 16, 16), "flow": flow, "affine": affines}, beta=0.5)
    expected = torch.distributions.kl_divergence(torch.distributions.Normal(mu, (0.5 * logvar).exp()),
                                                 torch.distributions.Normal(0.0, 1.0)).flatten(1).sum(1).mean()
    assert torch.allclose(losses["kl"], expected, rtol=1e-5)
    assert torch.allclose(losses["epe_mm"], torch.tensor(6.875))
    sigma = net.config.model.recon_sigma_mm
    assert torch.allclose(losses["loss"], torch.tensor(6.875 / sigma) + 0.5 * expected / 16**3, rtol=1e-5)


@pytest.mark.parametrize("weight", [0.0, 9.0])
def test_moving_weight_weighs_the_error_where_the_true_field_moves(weight):
    net = module(overrides=[f"model.moving_weight={weight}"])
    flow = torch.zeros(2, 3, 16, 16, 16)
    inside = torch.zeros(16, 16, 16, dtype=torch.bool)
    inside[4:8, 4:10, 2:6] = True  # 96 of 4096 voxels move; the field is zero elsewhere
    flow[:, 0, inside] = 2.0
    flow[:, 1, inside] = 0.15  # |u| varies a little above the threshold (10 % of the peak), still the same mask
    recon = flow.clone()
    recon[:, 2, inside] += 1.0  # 5 mm error (z) inside the mask only
    recon[:, 2, 0, 0, 0] += 2.0  # 10 mm at one still voxel
    affines = torch.tensor(AFFINE).expand(2, 4, 4)
    stage = CVAEStage(net.config)
    weights = stage.voxel_weights(flow, affines)
    assert torch.equal(weights, torch.where(inside, 1.0 + weight, 1.0).expand(2, -1, -1, -1))
    net.net.forward = lambda f, frame: (recon, torch.zeros(2, 2, 4, 4, 4), torch.zeros(2, 2, 4, 4, 4))
    losses = stage.losses(net, {"image": torch.zeros(2, 1, 16, 16, 16), "flow": flow, "affine": affines}, beta=1.0)
    n_in, n = 96, 16**3
    assert torch.allclose(losses["epe_mm"], torch.tensor((5.0 * n_in + 10.0) / n))  # the logged EPE stays unweighted
    expected = (5.0 * (1 + weight) * n_in + 10.0) / ((1 + weight) * n_in + n - n_in) / net.config.model.recon_sigma_mm
    assert torch.allclose(losses["loss"], torch.tensor(expected), rtol=1e-5)  # KL is zero: mu = 0, logvar = 0


def test_temperature_scales_the_random_latents():
    recipe = get_recipe("flow-cvae")
    plain = recipe.latents(module(), SampleRequest(n=3, seed=4), 1)
    cooled = recipe.latents(module(overrides=["sample.temperature=0.5"]), SampleRequest(n=3, seed=4), 1)
    assert torch.allclose(cooled, 0.5 * plain) and plain.std() > 0.5


def test_aggregate_prior_is_the_training_posteriors_mean_and_spread():
    net = module(overrides=["model.prior=aggregate"])
    shape = net.net.latent_shape((16, 16, 16))
    assert torch.equal(net.prior_stats()[0], torch.zeros(shape)) and torch.equal(net.prior_stats()[1], torch.ones(shape))  # before fitting
    codes = torch.tensor([1.0, 3.0, 2.0, 6.0, 0.0])  # one posterior per case: mean codes[i] everywhere, variance 0.25
    cases = [{"image": torch.zeros(1, 16, 16, 16), "flow": torch.full((3, 16, 16, 16), float(i))} for i in range(5)]
    net.net.encode = lambda flow, features: (codes[flow[:, 0, 0, 0, 0].long()].view(-1, 1, 1, 1, 1).expand(-1, *shape).clone(),
                                             torch.full((len(flow), *shape), float(np.log(0.25))))
    net.fit_aggregate_prior(cases, chunk=2)
    mean, std = net.prior_stats()
    assert torch.allclose(mean, torch.tensor(2.4)) and torch.allclose(std, torch.tensor((4.24 + 0.25) ** 0.5))  # var of codes 4.24
    plain = get_recipe("flow-cvae").latents(module(), SampleRequest(n=3, seed=4), 1)
    assert torch.allclose(get_recipe("flow-cvae").latents(net, SampleRequest(n=3, seed=4), 1), 2.4 + std * plain)


def test_kl_warms_up_linearly():
    net = module(overrides=["model.kl_warmup_epochs=2", "model.kl_weight=0.5"])
    assert net.kl.beta(net) == 0.5  # no trainer: the full weight
    betas = []
    for step in (0, 5, 10, 15, 20, 40):  # global steps
        net._trainer = SimpleNamespace(num_training_batches=5, global_step=step)
        betas.append(net.kl.beta(net))
    assert betas == pytest.approx([0.0, 0.25, 0.5, 0.5, 0.5, 0.5])  # 2 epochs of 5 batches: full weight at step 10


def test_same_frame_with_another_affine_gives_the_same_voxel_field(tmp_path):
    net, recipe = module(), get_recipe("flow-cvae")
    oblique = np.array([[6.0, 1.5, 0.3, -50.0], [-1.2, 5.5, 0.8, 20.0], [0.2, -0.6, 4.0, 7.0], [0, 0, 0, 1]])
    plain = recipe.sample(net, SampleRequest(n=1, condition=frame_file(tmp_path / "plain.nii.gz", np.eye(4)), seed=5), tmp_path / "a")
    tilted = recipe.sample(net, SampleRequest(n=1, condition=frame_file(tmp_path / "tilted.nii.gz", oblique), seed=5), tmp_path / "b")
    field_plain, field_tilted = load_field(plain[0]), load_field(tilted[0])
    assert torch.allclose(field_plain.as_tensor(), field_tilted.as_tensor(), atol=1e-4) and field_plain.abs().max() > 0.01
    mm_plain = nib.load(plain[0]).get_fdata()[:, :, :, 0, :]
    mm_tilted = nib.load(tilted[0]).get_fdata()[:, :, :, 0, :]
    assert np.allclose(mm_tilted, np.einsum("ij,xyzj->xyzi", oblique[:3, :3], mm_plain), atol=1e-4)
    assert np.allclose(nib.load(tilted[1]).affine, oblique) and np.allclose(nib.load(tilted[0]).affine, oblique)


def test_a_condition_of_another_size_is_resampled_and_said(tmp_path, capsys):
    net = module()
    written = get_recipe("flow-cvae").sample(net, SampleRequest(n=1, condition=frame_file(tmp_path / "f.nii.gz", AFFINE, (20, 20, 12))),
                                             tmp_path / "out")
    assert "resampled to the model grid [16, 16, 16]" in capsys.readouterr().err.replace("\n", " ")
    assert nib.load(written[0]).shape[:3] == (16, 16, 16)


def test_a_condition_with_nan_is_refused(tmp_path):
    with pytest.raises(BadInputError, match="NaN"):
        get_recipe("flow-cvae").sample(module(), SampleRequest(n=1, condition=frame_file(tmp_path / "f.nii.gz", AFFINE, value=np.nan)),
                                       tmp_path / "out")


@pytest.mark.parametrize("directions", ["halves", "channels", "random"])
def test_grid_is_seeded_and_writes_a_mosaic_and_a_walk(tmp_path, directions):
    net, recipe = module(overrides=[f"sample.grid_directions={directions}"]), get_recipe("flow-cvae")
    condition = frame_file(tmp_path / "f.nii.gz", AFFINE)
    first = recipe.sample(net, SampleRequest(n=4, mode="grid", condition=condition), tmp_path / "a")
    again = recipe.sample(net, SampleRequest(n=4, mode="grid", condition=condition), tmp_path / "b")
    assert [p.name for p in first[-2:]] == ["grid_mosaic.png", "grid_walk.gif"] and len(first) == 2 * 4 + 2
    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in again]
    fields = [load_field(p).as_tensor() for p in first[0:8:2]]
    assert not torch.allclose(fields[0], fields[3])  # the corners of the grid differ


def test_plane_draws_lie_on_a_plane(tmp_path):
    net, recipe = module(), get_recipe("flow-cvae")
    z = recipe.latents(net, SampleRequest(n=6, mode="plane", seed=1), 1).flatten(1)
    assert torch.linalg.matrix_rank(z, atol=1e-4) == 2


def test_bad_settings_are_one_line(tmp_path):
    net = module(overrides=["sample.grid_directions=channels", "sample.grid_channels=[0, 5]"])
    with pytest.raises(MedsynthError, match="channels"):
        get_recipe("flow-cvae").sample(net, SampleRequest(n=4, mode="grid", condition=frame_file(tmp_path / "f.nii.gz", AFFINE)), tmp_path)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("flow")
    raw = api.phantom("cardiac", root / "raw", n=5, size=16, flow_pairs=True, progress=False)
    return api.prepare(raw, root / "prepared", recipe="flow-cvae", size=16, seed=0, progress=False)


def test_registration_stage_then_its_frozen_encoder_as_the_pyramid(prepared, tmp_path):
    settings = [*TINY, "train.max_epochs=1", "train.batch_size=2"]
    registration = api.train("flow-cvae", data=prepared, config="flow-cvae-tiny", overrides=[*settings, "model.stage=registration"],
                             out=tmp_path / "registration", progress=False)
    assert "registration_epe_mm" in api.evaluate(registration.path)
    with pytest.raises(MedsynthError, match="registration-stage"):
        api.sample(registration.path, n=1)
    with pytest.raises(MedsynthError, match="registration_run"):
        api.train("flow-cvae", data=prepared, config="flow-cvae-tiny", overrides=[*settings, "model.pyramid=registration"],
                  out=tmp_path / "none", progress=False)
    cvae = api.train("flow-cvae", data=prepared, config="flow-cvae-tiny", out=tmp_path / "cvae", progress=False,
                     overrides=[*settings, "model.pyramid=registration", f"model.registration_run={registration.path}"])
    encoder = {k.removeprefix("net.encoder."): v for k, v in load_file(registration.weights_path).items() if k.startswith("net.encoder.")}
    pyramid = {k.removeprefix("net.pyramid."): v for k, v in load_file(cvae.weights_path).items() if k.startswith("net.pyramid.")}
    assert encoder and encoder.keys() == pyramid.keys() and all(torch.equal(encoder[k], pyramid[k]) for k in encoder)
    assert api.sample(cvae.path, n=1, out=tmp_path / "samples")


def test_shape_not_divisible_by_the_levels_is_refused(prepared, tmp_path):
    with pytest.raises(MedsynthError, match="divisible by 32"):
        api.train("flow-cvae", data=prepared, config="flow-cvae-tiny", out=tmp_path / "run", progress=False,
                  overrides=["model.channels=[4, 4, 4, 4, 4, 4]", "model.pyramid_channels=[4, 4, 4, 4, 4, 4]"])


def test_interpolation_runs_between_two_real_flows(prepared, tmp_path):
    run = api.train("flow-cvae", data=prepared, config="flow-cvae-tiny", overrides=[*TINY, "train.max_epochs=1"], out=tmp_path / "run",
                    progress=False)
    written = api.sample(run.path, n=3, mode="interpolate", seed=2)
    assert len(written) == 6 and all(p.is_file() for p in written)


def test_masks_from_cardiac_labels_or_from_the_moving_region(monkeypatch):
    from medsynth.data.phantoms.cardiac import CARDIAC_LABELS
    from medsynth.recipes import flow_cvae

    labels = torch.zeros(1, 8, 8, 8, dtype=torch.long)
    labels[0, 2:4] = 9  # myocardium
    labels[0, 4:6] = 8  # LV blood pool
    labels[0, 6] = 2  # lung: not heart
    flow = torch.zeros(3, 8, 8, 8)
    flow[0, 1:3] = 1.0
    case = {"label": labels, "flow": flow, "affine": torch.tensor(AFFINE)}
    monkeypatch.setattr(flow_cvae, "load_prepared_info", lambda root: {"labels": CARDIAC_LABELS})
    masks, lv = flow_cvae.FlowCVAERecipe.masks(Path("."), [case])
    assert masks["heart"].sum() == 4 * 64 and masks["myocardium"].sum() == 2 * 64 and lv.sum() == 2 * 64
    unlabelled = {key: value for key, value in case.items() if key != "label"}
    masks, lv = flow_cvae.FlowCVAERecipe.masks(Path("."), [unlabelled])
    assert lv is None and set(masks) == {"heart"} and masks["heart"].shape == (1, 8, 8, 8) and masks["heart"].sum() == 2 * 64


def test_frames_prepared_without_the_ct_window_are_refused(tmp_path):
    raw = api.phantom("cardiac", tmp_path / "raw", n=3, size=16, flow_pairs=True, progress=False)
    prepared = api.prepare(raw, tmp_path / "prepared", size=16, normalize="percentile", progress=False)
    with pytest.raises(MedsynthError, match="--normalize ct"):
        api.train("flow-cvae", data=prepared, config="flow-cvae-tiny", overrides=TINY, out=tmp_path / "run", progress=False)
