"""motion-ldm: each stage's training-step time and peak memory at the CPU size, against what a MONAI user
would build instead; sampling time of every phase of one CT per sampler and step count.

``step``: one training step (forward, backward, AdamW) of each stage of the demo config
(``motion-ldm-tiny``: 48 x 48 x 12 volumes, batch 4), each in its own process so that its peak resident
memory (``VmHWM``) is its own. The alternatives, same batch and volume:

- ``image-ae-isotropic`` / ``field-vae-isotropic``: MONAI's ``AutoencoderKL`` as it is (every axis halved
  per level; the slice axis of 12 falls to 3): what keeping the slice axis costs;
- ``pixel-diffusion``: MONAI's ``DiffusionModelUNet`` with the LDM's channels on the full-resolution
  (CT, field) volume, predicting the field's noise: diffusion without the autoencoders.

Medians over ``--steps`` steps after two warm-up steps; CPU time with one thread.

``sample``: seconds to generate every phase of one CT (all phases in one batch; decode included), per
sampler and step count, on an untrained model of the demo config (the time does not depend on the weights).

    .venv/bin/python benchmarks/bench_motion_ldm.py step [--steps 10]
    .venv/bin/python benchmarks/bench_motion_ldm.py sample
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch
from steps import median_step_cpu_s, peak_rss_mb  # benchmarks/steps.py (scripts run from this folder)

from medsynth.config import load_config
from medsynth.recipes import get_recipe

SHAPE, PHASES, BATCH = (48, 48, 12), 6, 4
KINDS = ("image-ae", "image-ae-isotropic", "field-vae", "field-vae-isotropic", "ldm", "pixel-diffusion")


def demo_module(**model):
    """The demo config's module on the demo grid, without data (the fields filled from data set by hand)."""
    recipe = get_recipe("motion-ldm")
    config = load_config(recipe.config_class, "motion-ldm-tiny", [])
    config = config.model_copy(update={"model": config.model.model_copy(update={
        "phases": PHASES, "image_shape": list(SHAPE), "ct_window": [-1000.0, 500.0], **model})})
    return recipe.build_module(config)


def one_kind(kind: str, steps: int) -> dict:
    """Median step time and peak memory of ``kind`` in this process."""
    from monai.networks.nets import AutoencoderKL

    from medsynth.diffusion.condition import Condition

    torch.set_num_threads(1)
    torch.manual_seed(0)
    image, field = torch.rand(BATCH, 1, *SHAPE), torch.randn(BATCH, 3, *SHAPE) * 0.3
    phase = torch.arange(BATCH) % PHASES
    module = demo_module()
    if kind in ("image-ae", "field-vae"):
        batch = {"image": image, "field": field}
        network = module.image_ae if kind == "image-ae" else module.field_vae

        def loss_of() -> torch.Tensor:
            return module.autoencoder_losses(kind, batch)["loss"]
    elif kind.endswith("-isotropic"):
        settings = module.config.model.image_ae if kind.startswith("image") else module.config.model.field_vae
        network = AutoencoderKL(spatial_dims=3, in_channels=settings.in_channels, out_channels=settings.in_channels, channels=settings.channels,
                                latent_channels=settings.latent_channels, num_res_blocks=(settings.num_res_blocks,) * len(settings.channels),
                                norm_num_groups=settings.groups, attention_levels=(False,) * len(settings.channels),
                                with_encoder_nonlocal_attn=False, with_decoder_nonlocal_attn=False)
        x = image * 2 - 1 if kind.startswith("image") else field

        def loss_of() -> torch.Tensor:
            recon, mu, sigma = network(x)
            return (recon - x).abs().mean() + 1e-6 * (mu.pow(2) + sigma.pow(2) - torch.log(sigma.pow(2)) - 1).sum() / len(x)
    elif kind == "ldm":
        network = module.net
        with torch.no_grad():
            z_image = module.image_ae.encode(image * 2 - 1)[0]
            z_field = module.field_vae.encode(field)[0]

        def loss_of() -> torch.Tensor:
            return module.loss(module.net, z_field, Condition(concat=z_image, class_labels=phase))[0]
    else:  # pixel-diffusion: the LDM's UNet on the full-resolution volumes
        from medsynth.diffusion.denoiser import ConditionedDenoiser
        from medsynth.diffusion.objectives import DiffusionLoss

        model = module.config.model
        network = ConditionedDenoiser(model.build_unet(3, 4, 3, num_class_embeds=PHASES))
        loss = DiffusionLoss(model.make_schedule())

        def loss_of() -> torch.Tensor:
            return loss(network, field, Condition(concat=image, class_labels=phase))[0]
    step_s = median_step_cpu_s(network.parameters(), loss_of, steps, lr=1e-4)
    return {"kind": kind, "parameters": sum(p.numel() for p in network.parameters()), "batch": BATCH, "shape": list(SHAPE),
            "step_cpu_s": step_s, "peak_rss_mb": round(peak_rss_mb(), 1)}


def step(args: argparse.Namespace) -> dict:
    results = {}
    for kind in KINDS:
        out = subprocess.run([sys.executable, __file__, "_one", kind, str(args.steps)], check=True, capture_output=True, text=True).stdout
        results[kind] = json.loads(out.strip().splitlines()[-1])
    for stage, alternative in (("image-ae", "image-ae-isotropic"), ("field-vae", "field-vae-isotropic"), ("ldm", "pixel-diffusion")):
        results[f"{stage}_vs_{alternative}_time_ratio"] = round(results[stage]["step_cpu_s"] / results[alternative]["step_cpu_s"], 3)
        results[f"{stage}_vs_{alternative}_memory_ratio"] = round(results[stage]["peak_rss_mb"] / results[alternative]["peak_rss_mb"], 3)
    return results


def sample(args: argparse.Namespace) -> dict:
    torch.set_num_threads(1)
    module = demo_module().eval()
    ct = torch.rand(1, *SHAPE)
    phases = list(range(1, PHASES))
    results = {}
    for sampler, steps in (("ddim", 20), ("ddim", 50), ("ddim", 200), ("dpmpp", 20), ("ddpm", 1000)):
        settings = module.config.sample.model_copy(update={"sampler": sampler, "steps": steps, "batch_size": len(phases)})
        start = time.perf_counter()
        module.fields_mm(ct, phases, list(range(len(phases))), settings)
        results[f"{sampler}_{steps}"] = round(time.perf_counter() - start, 2)
    return {"seconds_all_phases_of_one_ct": results, "phases": len(phases), "shape": list(SHAPE)}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_one":  # one model in a fresh process (its own peak memory)
        print(json.dumps(one_kind(sys.argv[2], int(sys.argv[3]))))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["step", "sample"])
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    print(json.dumps({"step": step, "sample": sample}[args.what](args), indent=2))


if __name__ == "__main__":
    main()
