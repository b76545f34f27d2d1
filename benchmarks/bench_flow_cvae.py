"""flow-cvae: training-step time and peak memory against MONAI's ``VarAutoEncoder``; sampling time
per flow; and the pyramid options compared on the demo data.

``step``: one training step (forward, backward, AdamW) of the recipe's module at the demo size
(32^3, batch 4, ``flow-cvae-tiny``) against MONAI's ``VarAutoEncoder`` of a similar parameter
count given the same input (flow and frame concatenated) and a plain MSE + KL loss: the
alternative a MONAI user would reach for (it has no pyramid and a dense latent). Each model runs
in its own process, so the peak resident memory (``VmHWM``) of each is its own. Medians over
``--steps`` steps after two warm-up steps; CPU time with one thread.

``sample``: seconds per prior flow (decode and write the field NIfTI and the warped frame).

``pyramids``: trains the demo config with each pyramid option (``image``, ``learned``,
``registration`` with its registration stage first) on the same prepared phantom and evaluates
them: which conditioning wins, in the metrics issue 10 names.

    .venv/bin/python benchmarks/bench_flow_cvae.py step [--steps 10]
    .venv/bin/python benchmarks/bench_flow_cvae.py sample [--n 8]
    .venv/bin/python benchmarks/bench_flow_cvae.py pyramids [--epochs 30]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from steps import median_step_cpu_s, peak_rss_mb  # benchmarks/steps.py (scripts run from this folder)

from medsynth import api
from medsynth.config import load_config
from medsynth.recipes import get_recipe

KEYS = ("flow_epe_mean_mm", "flow_epe_best_of_n_mm", "flow_epe_zero_mm", "flow_epe_mean_flow_mm", "folding_share",
        "ejection_fraction_generated", "ejection_fraction_real", "downstream_epe_real_only_mm", "downstream_epe_with_generated_mm")


def demo_data(work: Path, n: int = 28, size: int = 32) -> Path:
    """The demo's data: cardiac phantom flow pairs (ES frame, ES->ED flow, labels), prepared at ``size``^3."""
    raw = api.phantom("cardiac", work / "raw", n=n, size=size, seed=0, flow_pairs="npy", progress=False)
    return api.prepare(raw, work / "prepared", recipe="flow-cvae", size=size, progress=False)


def one_model_steps(kind: str, prepared: Path, steps: int) -> dict:
    """Median step time of ``kind`` (``flow-cvae`` or ``monai-vae``) in this process."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    recipe = get_recipe("flow-cvae")
    config = recipe.resolve_config(load_config(recipe.config_class, "flow-cvae-tiny", [],
                                               base={"recipe": "flow-cvae", "data_dir": str(prepared)}))
    data = recipe.build_datamodule(config)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    if kind == "flow-cvae":
        module = recipe.build_module(config)
        module.stage.before_fit(module)
        beta = config.model.kl_weight

        def loss_of() -> torch.Tensor:
            return module.stage.losses(module, batch, beta)["loss"]
    else:
        from monai.networks.nets import VarAutoEncoder

        shape = tuple(batch["image"].shape[2:])
        module = VarAutoEncoder(spatial_dims=3, in_shape=(4, *shape), out_channels=3, latent_size=64,
                                channels=(12, 24, 24), strides=(2, 2, 2))
        inputs = torch.cat([batch["flow"].float(), batch["image"].float()], dim=1)

        def loss_of() -> torch.Tensor:
            recon, mu, logvar, _ = module(inputs)
            kl = 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).sum(1).mean()
            return torch.nn.functional.mse_loss(recon[:, :3], batch["flow"].float()) + kl / inputs[0].numel()
    step_s = median_step_cpu_s(module.parameters(), loss_of, steps, lr=1e-3)
    return {"model": kind, "parameters": sum(p.numel() for p in module.parameters()), "batch": len(batch["image"]),
            "shape": list(batch["image"].shape[2:]), "step_cpu_s": step_s, "peak_rss_mb": round(peak_rss_mb(), 1)}


def step(args: argparse.Namespace) -> dict:
    work = Path(tempfile.mkdtemp(prefix="bench-flow-"))
    prepared = demo_data(work)
    results = {}
    for kind in ("flow-cvae", "monai-vae"):
        out = subprocess.run([sys.executable, __file__, "_one", kind, str(prepared), str(args.steps)],
                             check=True, capture_output=True, text=True).stdout
        results[kind] = json.loads(out.strip().splitlines()[-1])
    results["step_time_ratio"] = round(results["flow-cvae"]["step_cpu_s"] / results["monai-vae"]["step_cpu_s"], 3)
    results["peak_memory_ratio"] = round(results["flow-cvae"]["peak_rss_mb"] / results["monai-vae"]["peak_rss_mb"], 3)
    return results


def sample(args: argparse.Namespace) -> dict:
    work = Path(tempfile.mkdtemp(prefix="bench-flow-"))
    prepared = demo_data(work)
    run = api.train("flow-cvae", data=prepared, config="flow-cvae-tiny", overrides=["train.max_epochs=1"], out=work / "run", progress=False)
    torch.set_num_threads(1)
    start = time.perf_counter()
    written = api.sample(run.path, n=args.n, seed=0, progress=False)
    seconds = time.perf_counter() - start
    return {"flows": len(written) // 2, "seconds_per_flow_incl_files": round(seconds / max(1, len(written) // 2), 3)}


def pyramids(args: argparse.Namespace) -> dict:
    work = Path(tempfile.mkdtemp(prefix="bench-flow-"))
    prepared = demo_data(work)
    epochs = f"train.max_epochs={args.epochs}"
    registration = api.train("flow-cvae", data=prepared, config="flow-cvae-tiny", overrides=[epochs, "model.stage=registration"],
                             out=work / "registration", progress=False)
    results = {"registration_stage": {k: v for k, v in api.evaluate(registration.path, progress=False).items() if "epe" in k}}
    for pyramid in ("image", "learned", "registration"):
        extra = [f"model.registration_run={registration.path}"] if pyramid == "registration" else []
        start = time.perf_counter()
        run = api.train("flow-cvae", data=prepared, config="flow-cvae-tiny", overrides=[epochs, f"model.pyramid={pyramid}", *extra],
                        out=work / f"cvae-{pyramid}", progress=False)
        trained = time.perf_counter() - start
        metrics = api.evaluate(run.path, progress=False)
        results[pyramid] = {"train_s": round(trained, 1), **{k: metrics.get(k) for k in KEYS}}
    return results


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_one":  # one model in a fresh process (its own peak memory)
        print(json.dumps(one_model_steps(sys.argv[2], Path(sys.argv[3]), int(sys.argv[4]))))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["step", "sample", "pyramids"])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=30)
    args = parser.parse_args()
    print(json.dumps({"step": step, "sample": sample, "pyramids": pyramids}[args.what](args), indent=2, default=str))


if __name__ == "__main__":
    main()
