"""DiffusionModule: the training and validation losses are DiffusionLoss's on the recipe's pair, validation is seeded
privately, guidance wraps the net, and generate() gives every seed its item whatever the batch."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from medsynth.config import RecipeConfig
from medsynth.diffusion import DiffusionLoss, SamplerConfig, make_schedule, run_sampler
from medsynth.diffusion.module import DiffusionModule
from medsynth.seeds import item_generators, item_noise, item_seeds

NULL_CLASS = 0


class ClassNet(nn.Module):
    """eps(x | y) = w x + 0.1 y: a learnable scale and the class as an offset (y = 0 is the null class)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(0.3))

    def forward(self, x, t, cond):
        offset = 0.0 if cond is None else 0.1 * cond.to(x.dtype).reshape(-1, *[1] * (x.dim() - 1))
        return self.w * x + offset


class ToyModule(DiffusionModule):
    """The batch is (x_0, class); a random flip from ``generator``, so the pair's draws are checked too."""

    def __init__(self, guided: bool = True):
        null_cond = torch.tensor(NULL_CLASS) if guided else None
        super().__init__(RecipeConfig(recipe="toy"), ClassNet(), make_schedule("linear"), cond_drop_prob=0.0, null_cond=null_cond)

    def training_pair(self, batch, generator=None):
        x0, y = batch
        flip = torch.rand((), generator=generator) < 0.5
        return (x0.flip(-1) if flip else x0), y


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand((3, 1, 4, 4), generator=g) * 2 - 1, torch.tensor([1, 2, 3])


def _logged(module):
    logs = []
    module.log_dict = lambda values, **kwargs: logs.append({k: float(v.detach()) for k, v in values.items()})
    return logs


def test_training_step_is_the_diffusion_loss_of_the_pair_under_the_global_rng():
    module, batch = ToyModule(), _batch()
    logs = _logged(module)
    torch.manual_seed(5)
    loss = module.training_step(batch, 0)
    torch.manual_seed(5)
    x0, cond = module.training_pair(batch)
    with torch.no_grad():
        expected, terms = DiffusionLoss(module.schedule)(module.net, x0, cond)
    assert torch.equal(loss.detach(), expected) and loss > 0
    assert logs == [{f"train/{k}": float(v) for k, v in terms.items()}] and "train/loss" in logs[0]


def test_validation_is_seeded_by_the_batch_index_and_leaves_the_global_rng_alone():
    module, batch = ToyModule(), _batch()
    logs = _logged(module)
    torch.manual_seed(1)
    state = torch.get_rng_state()
    module.validation_step(batch, 3)
    module.validation_step(batch, 3)
    module.validation_step(batch, 4)
    assert torch.equal(torch.get_rng_state(), state)
    generator = torch.Generator().manual_seed(3)
    x0, cond = module.training_pair(batch, generator)
    with torch.no_grad():
        expected, _ = DiffusionLoss(module.schedule)(module.net, x0, cond, generator)
    assert logs[0] == logs[1] and logs[0]["val/loss"] == pytest.approx(float(expected), rel=1e-6)
    assert logs[2] != logs[0]  # another batch index: other draws


def test_training_pair_must_be_defined_by_the_recipe():
    module = DiffusionModule(RecipeConfig(recipe="toy"), ClassNet(), make_schedule("linear"))
    with pytest.raises(NotImplementedError, match="DiffusionModule must define training_pair"):
        module.training_step(_batch(), 0)


def test_guidance_wraps_the_net_with_the_null_condition():
    module, x, t, y = ToyModule(), torch.randn(3, 1, 4, 4), torch.full((3,), 10), torch.tensor([1, 2, 3])
    eps_c, eps_u = module.net(x, t, y), module.net(x, t, torch.zeros(3))
    torch.testing.assert_close(module.guided(2.0)(x, t, y), eps_c + 2.0 * (eps_c - eps_u))
    torch.testing.assert_close(module.denoiser(SamplerConfig(guidance=0.0))(x, t, y), eps_c)
    unconditional = ToyModule(guided=False)
    assert unconditional.guided(3.0) is unconditional.net  # nothing to guide against


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_generate_gives_each_seed_its_item_whatever_the_batch(sampler):
    module = ToyModule()
    seeds, cond = item_seeds(4, 5), torch.tensor([1, 2, 3, 1, 2])
    settings = SamplerConfig(sampler=sampler, steps=4, eta=1.0, guidance=1.5, batch_size=2)
    batched = module.generate((1, 4, 4), cond, settings, seeds)
    one_by_one = module.generate((1, 4, 4), cond, settings.model_copy(update={"batch_size": 1}), seeds)
    assert batched.shape == (5, 1, 4, 4)
    torch.testing.assert_close(batched, one_by_one, rtol=0, atol=1e-6)
    # the reference: the sampler run on item 3 alone, from its own generator
    generators = item_generators(seeds[3:4])
    alone = run_sampler(module.guided(1.5), item_noise((1, 4, 4), generators), module.schedule, cond[3:4], settings, generators)
    torch.testing.assert_close(batched[3:4], alone, rtol=0, atol=1e-6)
    assert torch.equal(module.generate((1, 4, 4), cond, settings, seeds), batched)  # bit for bit again
    assert not torch.allclose(module.generate((1, 4, 4), cond, settings, item_seeds(5, 5)), batched)
