"""The sampler registry and its settings: names, steps, clipped x_0 against diffusers' clip_sample, one-line errors, a
cheap import."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler

from diffusion_toys import T, assert_same_trajectory, diffusers_args, diffusers_trajectory, noise, toy_model, trajectory
from medsynth.config import validate_config
from medsynth.diffusion import SAMPLERS, SamplerConfig, make_schedule, run_sampler, sample_ddim
from medsynth.diffusion.sampling import ClippedX0, SamplerName
from medsynth.errors import MedsynthError


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_clipped_x0_ddim_matches_diffusers_clip_sample(prediction):
    """SamplerConfig.clip_x0 = diffusers' clip_sample with the eps recomputed from the clipped x_0."""
    schedule, x = make_schedule("cosine", prediction=prediction), noise()
    diffusers = DDIMScheduler(clip_sample=True, clip_sample_range=1.5, set_alpha_to_one=True, **diffusers_args(schedule))
    clipped = ClippedX0(toy_model, schedule, 1.5)
    ours = trajectory(sample_ddim, clipped, x, schedule, steps=20)
    # float32 eps re-derived by dividing by sqrt(1 - abar) in diffusers, float64 abar here: 1e-5 relative at worst
    assert_same_trajectory(ours, diffusers_trajectory(diffusers, toy_model, x, 20, use_clipped_model_output=True), tol=1e-4)
    assert ours[-1].abs().max() <= 1.5 + 1e-6  # the toy model's unclipped samples reach 1e3 on this schedule
    config = SamplerConfig(sampler="ddim", steps=20, clip_x0=1.5)
    torch.testing.assert_close(run_sampler(toy_model, x, schedule, None, config), ours[-1])


def test_sampler_registry_and_config():
    assert set(SAMPLERS) == set(SamplerName.__args__)  # the config's names are the registry's
    config = SamplerConfig()
    assert [SamplerConfig(sampler=name).steps_for(make_schedule()) for name in SAMPLERS] == [T, 50, 20, 30]
    assert config.model_copy(update={"steps": 7}).steps_for(make_schedule()) == 7
    for bad, word in [({"guidance": float("inf")}, "guidance"), ({"guidance": -1}, "guidance"), ({"eta": 2}, "eta"),
                      ({"sampler": "euler"}, "sampler"), ({"steps": 0}, "steps")]:
        with pytest.raises(MedsynthError, match=word) as info:
            validate_config(SamplerConfig, bad, "sample")
        assert "\n" not in str(info.value)


def test_run_sampler_checks_schedule_and_steps_in_one_line():
    x = noise()
    with pytest.raises(MedsynthError, match="does not fit") as info:
        run_sampler(toy_model, x, make_schedule("rflow"), None, SamplerConfig(sampler="ddim"))
    assert "\n" not in str(info.value)
    with pytest.raises(MedsynthError, match="exceeds"):
        run_sampler(toy_model, x, make_schedule(), None, SamplerConfig(sampler="ddim", steps=T + 1))
    ours = run_sampler(toy_model, x, make_schedule(), None, SamplerConfig(sampler="ddim", steps=5))
    assert torch.equal(ours, sample_ddim(toy_model, x, make_schedule(), steps=5))


def test_importing_the_sampler_registry_is_cheap():
    import subprocess
    import sys

    code = ("import sys; from medsynth.diffusion.sampling import SAMPLERS; "
            "print(any(m.split('.')[0] in ('monai', 'lightning') for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
