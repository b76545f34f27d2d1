"""The planner: what a recipe's training and sampling steps cost, and a config that fits a GPU (``medsynth plan``).

The estimator runs a recipe's own ``training_step`` (and one call of its sampler's network) on *fake* tensors
(PyTorch's ``FakeTensorMode``: meta storage, CPU dispatch keys, so nothing is allocated and CPU autocast still
applies), and counts:

- FLOPs with ``torch.utils.flop_counter``'s per-op formulas (forward + backward of one training step; one forward
  of the sampling network, with classifier-free guidance and patch tiling as the recipe samples);
- activation memory: the tensors autograd saves for backward (``torch.autograd.graph.saved_tensors_hooks``),
  each storage once, parameters and the batch excluded; under ``bf16-mixed`` the forward runs under CPU autocast,
  so the saved tensors carry the dtypes autocast gives them (CPU's op lists: group norm runs in bf16 there, fp32
  on CUDA, so the bf16 activation estimate is a little low where group norms dominate);
- weights, gradients (the parameters that receive one in the step) and AdamW's two moments (every parameter:
  a staged recipe's earlier networks keep theirs), at the parameters' dtype (fp32 under ``32`` and
  ``bf16-mixed``, bf16 under ``bf16-true``).

``peak_memory_bytes`` = weights + optimiser state + batch + step memory, where step memory is the high-water mark,
over the forward and backward pass, of the fake tensors alive (:class:`OpTracker`: saved activations, gradients as
backward writes them, transients; each storage once). Gradients + saved activations alone overestimate it where
the gradients rival the activations (early layers' gradients appear when most activations are freed): the CPU
measurement (:func:`measure_cpu`) measures the same quantity, the resident-memory high-water mark of a step above
the resident memory before it, with optimiser state and batch already in place. On a GPU add :data:`CUDA_CONTEXT_BYTES` and :data:`ALLOCATOR_SLACK` (:func:`device_bytes`); these two
are assumptions (no GPU measured), stated with the table.

Projected times are FLOPs / (the GPU's dense bf16 peak x :data:`EFFICIENCY`). Where the issue is silent the
planner does what nnU-Net's does: the data's (median) shape is kept, the batch is the largest that fits up to
the config's, patches shrink when nothing else fits; a generative model also keeps its effective batch
(gradient accumulation) and its stage split.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medsynth.config import RecipeConfig, load_config
from medsynth.errors import BadInputError, MedsynthError

if TYPE_CHECKING:
    from medsynth.recipes.base import Example

# Fraction of the dense bf16 tensor peak a training or sampling step is assumed to reach (stated, not measured).
EFFICIENCY = 0.4
CUDA_CONTEXT_BYTES = 1 << 30  # CUDA context, cuBLAS/cuDNN workspaces (assumed 1 GiB)
ALLOCATOR_SLACK = 1.10  # PyTorch's caching allocator: fragmentation and rounding (assumed 10 %)
GIB = 1 << 30


@dataclass(frozen=True)
class Gpu:
    """A GPU: its dense bf16 tensor peak (TFLOPS, FP32 accumulate) and memory (GB = 10^9 bytes, as sold)."""

    name: str
    bf16_tflops: float
    memory_gb: float
    source: str

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_gb * 1e9)


# Vendor datasheets; "dense" = without structured sparsity (datasheets print the sparse figure, twice this).
GPUS: dict[str, Gpu] = {
    "h100-80gb": Gpu("H100 SXM 80 GB", 989.4, 80, "NVIDIA H100 Tensor Core GPU datasheet (SXM: BF16 1,979 TFLOPS with sparsity)"),
    "h200": Gpu("H200 SXM 141 GB", 989.4, 141, "NVIDIA H200 Tensor Core GPU datasheet (SXM: BF16 1,979 TFLOPS with sparsity)"),
    "a100-80gb": Gpu("A100 SXM 80 GB", 312.0, 80, "NVIDIA A100 datasheet (BF16 312 TFLOPS dense, 624 sparse)"),
    "a100-40gb": Gpu("A100 40 GB", 312.0, 40, "NVIDIA A100 datasheet (BF16 312 TFLOPS dense, 624 sparse)"),
    "l40s": Gpu("L40S 48 GB", 362.05, 48, "NVIDIA L40S datasheet (BF16 362.05 TFLOPS dense, 733 sparse)"),
    "rtx-4090": Gpu("RTX 4090 24 GB", 165.2, 24, "NVIDIA Ada Lovelace architecture whitepaper, Table 2 (BF16, FP32 accumulate: "
                    "165.2 dense; 330.3 with FP16 accumulate)"),
    "rtx-3090": Gpu("RTX 3090 24 GB", 71.0, 24, "NVIDIA Ampere GA102 whitepaper (BF16, FP32 accumulate: 71 dense; 142 sparse)"),
}


def get_gpu(name: str) -> Gpu:
    """The GPU called ``name`` (case-insensitive), or one line listing the known ones."""
    key = name.lower()
    if key not in GPUS:
        raise MedsynthError(f"unknown GPU '{name}' (known: {', '.join(GPUS)})")
    return GPUS[key]


def parse_memory(text: str) -> int:
    """``24GB`` / ``24 GiB`` / ``80g`` -> bytes (GB = 10^9 as GPUs are sold, GiB = 2^30)."""
    raw = text.strip().lower().replace(" ", "")
    units = {"gib": GIB, "gb": 10**9, "g": 10**9, "mib": 1 << 20, "mb": 10**6}
    suffix = next((s for s in units if raw.endswith(s)), "")
    unit, raw = units.get(suffix, 10**9), raw[: len(raw) - len(suffix)]
    try:
        value = float(raw)
    except ValueError:
        raise MedsynthError(f"--memory '{text}': expected a size such as 24GB or 40GiB") from None
    if not math.isfinite(value) or value <= 0:
        raise MedsynthError(f"--memory '{text}': must be a positive size")
    return int(value * unit)


def device_bytes(peak_bytes: int) -> int:
    """What ``peak_bytes`` of tensors need on a GPU: the allocator's slack and the CUDA context added."""
    return int(peak_bytes * ALLOCATOR_SLACK) + CUDA_CONTEXT_BYTES


# -- what a recipe trains and samples, on an input of a given size (its Recipe.plan_examples) ---------------------


def input_size(config: RecipeConfig) -> list[int] | None:
    """The spatial input size a config states (the data-filled field of its recipe: ``Recipe.input_size``), or None."""
    from medsynth.recipes import get_recipe

    return get_recipe(config.recipe).input_size(config)


def examples(config: RecipeConfig, size: Sequence[int] | None = None) -> list[Example]:
    """The stages of ``config``'s recipe at ``size`` (None: the size the config states), as its ``plan_examples`` declares
    them. ``size`` is spread to the recipe's ``data_format.spatial_dims``: one size gives a cube (3D) or a square (2D);
    a recipe whose data decides (None) takes 2 or 3 sizes."""
    from medsynth.recipes import get_recipe

    recipe = get_recipe(config.recipe)
    chosen = list(size) if size is not None else recipe.input_size(config)
    if not chosen:
        raise MedsynthError(f"{config.recipe}: the config states no input size (model.image_shape / in_shape / image_size): give --size")
    dims = recipe.data_format.spatial_dims
    if dims is None and len(chosen) not in (2, 3):
        raise MedsynthError(f"{config.recipe}: --size {chosen}: 2 or 3 sizes")
    if dims is not None and len(chosen) != dims:
        chosen = chosen * dims if len(chosen) == 1 else chosen
        if len(chosen) != dims:
            axes = "X Y Z" if dims == 3 else "X Y"
            raise MedsynthError(f"{config.recipe}: --size {list(size or [])}: one or {'three' if dims == 3 else 'two'} sizes ({axes})")
    return recipe.plan_examples(config, [int(s) for s in chosen])


# -- counting on fake tensors --------------------------------------------------------------------------------


@dataclass
class StepCount:
    """What one training step of one stage costs at one batch size (bytes, FLOPs)."""

    stage: str
    batch_size: int
    params: int
    trainable_params: int  # parameters that receive a gradient in this stage
    weight_bytes: int
    grad_bytes: int
    optimizer_bytes: int  # AdamW: two moments for every parameter
    batch_bytes: int
    activation_bytes: int  # tensors saved for backward (each storage once; parameters and batch excluded)
    live_step_bytes: int  # high-water mark of the tensors alive during the step above those before it (0: not tracked)
    train_step_flops: int
    sample_step_flops: int  # one call of the sampling network on sample_items items
    sample_items: int
    sample_calls: int

    @property
    def step_bytes(self) -> int:
        """The memory a step adds above weights, optimiser state and batch: the high-water mark of the tensors alive
        during it (saved activations, gradients and transients) where tracked, else gradients + saved activations."""
        return self.live_step_bytes or self.grad_bytes + self.activation_bytes

    @property
    def peak_bytes(self) -> int:
        return self.weight_bytes + self.optimizer_bytes + self.batch_bytes + self.step_bytes


def _autocast(precision: str) -> Any:
    import contextlib

    import torch

    if precision == "bf16-mixed":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    if precision == "16-mixed":
        return torch.autocast("cpu", dtype=torch.float16)
    return contextlib.nullcontext()


def _tensor_bytes(value: Any) -> int:
    import torch

    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(v) for v in value)
    return 0


def _storage_key(tensor: Any) -> int:
    return tensor.untyped_storage()._cdata


def build(example: Example) -> Any:
    """The stage's module with fresh weights, on the CPU."""
    from medsynth.recipes import get_recipe

    return get_recipe(example.config.recipe).build_module(example.config)


class OpTracker:
    """What the ops of a step cost: the FLOPs (``torch.utils.flop_counter``'s per-op formulas) and the bytes of the
    tensors alive, each storage once, with their high-water mark. Every tensor an op returns is tracked until its
    last Python reference dies (a fake tensor's Python object lives as long as the tensor, also when only autograd
    holds it).

    The FLOPs are counted here rather than under ``FlopCounterMode``: that mode, stacked on the step, kept alive
    what gradient checkpointing frees (motion-ldm's checkpointed image-ae step at 48x48x12 held 47-61 MB of
    tensors under it against 35 MB without, on real tensors as on fake ones).
    """

    def __init__(self) -> None:
        self.now = self.peak = self.flops = 0
        self.storages: dict[int, list[int]] = {}  # storage -> [bytes, tensors alive on it]

    def count(self, func: Any, args: Any, kwargs: Any, out: Any) -> None:
        """Add the FLOPs of one op (those without a formula, elementwise ones, count 0 as in ``FlopCounterMode``)."""
        from torch.utils.flop_counter import flop_registry

        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.flops += formula(*args, **(kwargs or {}), out_val=out)

    def track(self, tensor: Any) -> None:
        import weakref

        key = _storage_key(tensor)
        entry = self.storages.get(key)
        if entry is None:
            entry = self.storages[key] = [tensor.untyped_storage().nbytes(), 0]
            self.now += entry[0]
            self.peak = max(self.peak, self.now)
        entry[1] += 1
        weakref.finalize(tensor, self._release, key)

    def _release(self, key: int) -> None:
        entry = self.storages[key]
        entry[1] -= 1
        if entry[1] == 0:
            self.now -= entry[0]
            del self.storages[key]

    def reset_peak(self) -> int:
        """Start a new high-water mark from now; returns the bytes alive now."""
        self.peak = self.now
        return self.now


def run_step(example: Example, module: Any, batch_size: int, precision: str, tracker: OpTracker, sample: bool = True) -> StepCount:
    """One training step (forward + backward) of ``module`` and one sampling call (``sample``; else 0 FLOPs), counted
    by ``tracker``, which the dispatch mode around the call (:func:`count_steps`) feeds with every op."""
    import torch

    if precision == "bf16-true":
        module = module.to(torch.bfloat16)
    module.train()
    batch = example.batch(batch_size)
    if precision == "bf16-true":
        batch = {k: v.to(torch.bfloat16) if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in batch.items()}
    if example.prepare is not None:
        example.prepare(module, batch)
    params = list(module.parameters())
    excluded = {_storage_key(p) for p in params} | {_storage_key(b) for b in module.buffers()}
    excluded |= {_storage_key(v) for v in batch.values() if isinstance(v, torch.Tensor)}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        key = _storage_key(tensor)
        if key not in excluded:
            saved[key] = max(saved.get(key, 0), tensor.untyped_storage().nbytes())
        return tensor

    start, flops = tracker.reset_peak(), tracker.flops
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        with _autocast(precision):
            loss = module.training_step(batch, 0)
        loss.backward()
    train_flops = tracker.flops - flops
    del loss
    live_step = tracker.peak - start
    module.eval()
    flops = tracker.flops
    if sample:
        with torch.no_grad(), _autocast(precision):
            example.sample(module)
    with_grad = [p for p in params if p.grad is not None]
    weight_bytes = sum(p.numel() * p.element_size() for p in params)
    return StepCount(
        stage=example.stage, batch_size=batch_size, params=sum(p.numel() for p in params),
        trainable_params=sum(p.numel() for p in with_grad), weight_bytes=weight_bytes,
        grad_bytes=sum(p.numel() * p.element_size() for p in with_grad), optimizer_bytes=2 * weight_bytes,
        batch_bytes=_tensor_bytes(batch), activation_bytes=sum(saved.values()), live_step_bytes=live_step, train_step_flops=int(train_flops),
        sample_step_flops=int(tracker.flops - flops), sample_items=example.sample_items, sample_calls=example.sample_calls)


def count_steps(example: Example, batch_sizes: Sequence[int], precision: str, sample: bool = True) -> list[StepCount]:
    """:func:`run_step` on fake tensors at each batch size: exact FLOPs and saved bytes, nothing allocated, no arithmetic."""
    import gc
    import warnings

    import torch
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode, unset_fake_temporarily
    from torch.utils._pytree import tree_leaves

    tracker = OpTracker()

    class CountingMode(FakeTensorMode):
        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            if func is torch.ops.aten._local_scalar_dense.default:
                # a Python number read from a fake tensor (a random patch's start, a flag) is 0: the counts do not depend on it
                return False if args[0].dtype == torch.bool else 0
            tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
            if tensors and not any(isinstance(t, FakeTensor) for t in tensors):
                with unset_fake_temporarily():  # real in, real out (an affine the loss reads with numpy)
                    out = func(*args, **(kwargs or {}))
                tracker.count(func, args, kwargs, out)
                return out
            out = super().__torch_dispatch__(func, types, args, kwargs)
            tracker.count(func, args, kwargs, out)
            for tensor in tree_leaves(out):
                if isinstance(tensor, FakeTensor):
                    tracker.track(tensor)
            return out

    # Built on the CPU (schedules compute Python floats from their tensors, which fake tensors cannot give),
    # then every parameter and buffer is swapped for a fake one: the steps allocate nothing.
    module = build(example)
    mode = CountingMode(allow_non_fake_inputs=True)
    mode.cache_enabled = False  # the dispatch cache made a step's count depend on the steps counted before it
    for part in module.modules():
        for name, param in part._parameters.items():
            if param is not None:
                part._parameters[name] = torch.nn.Parameter(mode.from_tensor(param.detach()), requires_grad=param.requires_grad)
        for name, buffer in part._buffers.items():
            if buffer is not None:
                part._buffers[name] = mode.from_tensor(buffer)
    counts = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning: "self.log() without a Trainer" (nothing is logged here)
        with mode:
            for size in batch_sizes:
                module.zero_grad(set_to_none=True)
                gc.collect()
                gc.disable()  # tensors in reference cycles die at a collection: none during the step, so the count is repeatable
                try:
                    counts.append(run_step(example, module, size, precision, tracker, sample))
                finally:
                    gc.enable()
    return counts


# -- estimates -------------------------------------------------------------------------------------------------


@dataclass
class Estimate:
    """A recipe's training and sampling costs for one config, input size, batch and precision (every stage)."""

    recipe: str
    size: list[int]
    batch_size: int
    precision: str
    stages: list[StepCount]
    efficiency: float = EFFICIENCY

    @property
    def worst(self) -> StepCount:
        """The stage with the highest peak memory."""
        return max(self.stages, key=lambda c: c.peak_bytes)

    def step_seconds(self, gpu: Gpu) -> float:
        """Projected seconds of one training step of the slowest stage."""
        return max(c.train_step_flops for c in self.stages) / (gpu.bf16_tflops * 1e12 * self.efficiency)

    def sample_seconds(self, gpu: Gpu) -> float:
        """Projected seconds to generate one item (all sampler steps; the last stage is the generator)."""
        last = self.stages[-1]
        return last.sample_step_flops * last.sample_calls / last.sample_items / (gpu.bf16_tflops * 1e12 * self.efficiency)

    def fits(self, gpu_bytes: int) -> bool:
        return device_bytes(self.worst.peak_bytes) <= gpu_bytes

    def as_dict(self) -> dict[str, Any]:
        """The JSON of ``train --dry-run --json``."""
        worst = self.worst
        return {
            "recipe": self.recipe, "size": self.size, "batch_size": self.batch_size, "precision": self.precision,
            "params": worst.params, "train_step_flops": max(c.train_step_flops for c in self.stages),
            "sample_step_flops": self.stages[-1].sample_step_flops, "sample_items_per_call": self.stages[-1].sample_items,
            "sample_calls_per_item_batch": self.stages[-1].sample_calls,
            "peak_memory_bytes": worst.peak_bytes, "device_memory_bytes": device_bytes(worst.peak_bytes),
            "efficiency": self.efficiency,
            "projected_step_seconds": {key: self.step_seconds(gpu) for key, gpu in GPUS.items()},
            "projected_sample_seconds_per_item": {key: self.sample_seconds(gpu) for key, gpu in GPUS.items()},
            "fits": {key: self.fits(gpu.memory_bytes) for key, gpu in GPUS.items()},
            "stages": [asdict(c) | {"peak_bytes": c.peak_bytes} for c in self.stages],
        }

    def table(self) -> str:
        """The estimate as text: one line per stage, one per GPU."""
        lines = [f"{self.recipe} at {'x'.join(map(str, self.size))}, batch {self.batch_size}, {self.precision} "
                 f"(projections at {self.efficiency:.0%} of dense bf16 peak)"]
        lines.append(f"  {'stage (GB)':<12} {'params':>9} {'weights':>9} {'optim':>9} {'grads':>9} {'activ.':>9} {'peak':>9} "
                     f"{'train TFLOP':>12} {'sample TFLOP':>13}")
        for c in self.stages:
            lines.append(f"  {c.stage:<12} {c.params / 1e6:>8.1f}M {_gb(c.weight_bytes)} {_gb(c.optimizer_bytes)} {_gb(c.grad_bytes)} "
                         f"{_gb(c.activation_bytes)} {_gb(c.peak_bytes)} {c.train_step_flops / 1e12:>12.3f} "
                         f"{c.sample_step_flops / 1e12:>13.3f}")
        lines.append(f"  {'GPU':<16} {'memory':>8} {'needs':>9} {'fits':>5} {'s/step':>9} {'s/item':>9}")
        need = device_bytes(self.worst.peak_bytes)
        for gpu in GPUS.values():
            lines.append(f"  {gpu.name:<16} {gpu.memory_gb:>6.0f}GB {need / 1e9:>7.1f}GB {'yes' if need <= gpu.memory_bytes else 'no':>5} "
                         f"{self.step_seconds(gpu):>9.3g} {self.sample_seconds(gpu):>9.3g}")
        return "\n".join(lines)


def _gb(n: int) -> str:
    return f"{n / 1e9:>8.2f}G"


def _linear(one: StepCount, two: StepCount, batch_size: int) -> StepCount:
    """The counts at ``batch_size`` from those at 1 and 2: every batch-dependent figure is linear in the batch."""
    def at(key: str) -> int:
        a, b = getattr(one, key), getattr(two, key)
        return max(0, int(a + (b - a) * (batch_size - 1)))

    return StepCount(**{**asdict(one), "batch_size": batch_size,
                        **{key: at(key) for key in ("batch_bytes", "activation_bytes", "live_step_bytes", "train_step_flops")}})


def estimate(config: RecipeConfig, size: Sequence[int] | None = None, batch_size: int | None = None,
             precision: str | None = None, sample: bool = True) -> Estimate:
    """The estimate of ``config`` (its stated or ``size`` input, its or the given batch and precision;
    ``sample=False``: the sampling call is not counted)."""
    chosen = examples(config, size)
    batch = batch_size or config.train.batch_size
    precision = precision or config.train.precision
    if precision not in ("32", "32-true", "bf16-mixed", "16-mixed", "bf16-true"):
        raise MedsynthError(f"plan: precision '{precision}' is not estimated (32, bf16-mixed, 16-mixed, bf16-true)")
    stages = [count_steps(example, [batch], precision, sample)[0] for example in chosen]
    return Estimate(config.recipe, _size_of(chosen[0].config), batch, precision, stages)


def _size_of(config: RecipeConfig) -> list[int]:
    return list(input_size(config) or [])


# -- the planner -------------------------------------------------------------------------------------------------

@dataclass
class Plan:
    """What ``medsynth plan`` chose, its estimate, and the config written."""

    estimate: Estimate
    budget_bytes: int
    budget_name: str
    accumulate: int
    epochs: int | None
    changes: dict[str, Any] = field(default_factory=dict)
    config: RecipeConfig | None = None
    path: Path | None = None


def plan(data: str | Path, recipe: str, gpu: str | None = None, memory: str | None = None, hours: float | None = None,
         config: str | Path | None = None, overrides: Sequence[str] = (), out: str | Path | None = None) -> Plan:
    """Fit ``recipe`` to a prepared dataset and a GPU (or a memory budget), as nnU-Net plans segmentation.

    The dataset's shape is kept (its ``fingerprint.json`` must exist); the batch is the largest up to the
    config's that fits, gradient accumulation keeps the config's effective batch, precision is bf16-mixed, and
    where batch 1 does not fit, checkpointing and then smaller patches are tried. ``hours`` sets the epochs
    from the projected step time (on ``gpu``; with ``memory`` alone, on an H100). ``out``: the config is written
    there (YAML, the estimate as comments), after every check.
    """
    from medsynth.recipes import get_recipe
    from medsynth.recipes.base import with_settings
    from medsynth.runs import read_structured

    data = Path(data)
    chosen_recipe = get_recipe(recipe)
    if gpu is not None and memory is not None:
        raise MedsynthError("plan: --gpu or --memory, not both")
    speed = get_gpu(gpu) if gpu is not None else GPUS["h100-80gb"]
    budget = parse_memory(memory) if memory is not None else speed.memory_bytes
    budget_name = memory if memory is not None else speed.name
    if hours is not None and not (math.isfinite(hours) and hours > 0):
        raise MedsynthError(f"plan: --hours {hours}: must be a positive number")
    if not (data / "dataset.json").exists():
        raise BadInputError(data, "not a prepared dataset (no dataset.json); run `medsynth prepare` first")
    if not (data / "fingerprint.json").exists():
        raise BadInputError(data, "no fingerprint.json: prepared by an older version: re-run `medsynth prepare`")
    fingerprint = read_structured(data / "fingerprint.json", "fingerprint")
    base = load_config(chosen_recipe.config_class, config or chosen_recipe.plan_config, list(overrides),
                       base={"recipe": recipe, "data_dir": str(data.resolve())})
    base = base.model_copy(update={"data_dir": str(data.resolve())})
    resolved = chosen_recipe.resolve_config(base)
    wanted = resolved.train.batch_size * resolved.train.accumulate_grad_batches
    precision = "bf16-mixed"
    best: tuple[Estimate, dict[str, Any], RecipeConfig] | None = None
    smallest: Estimate | None = None
    for change in chosen_recipe.plan_candidates(resolved):  # the config's own, then leaner ones
        candidate = with_settings(resolved, "model", **change) if change else resolved
        chosen_examples = examples(candidate)
        per_stage = [count_steps(example, [1, 2], precision) for example in chosen_examples]

        def at(b: int, per_stage: list[list[StepCount]] = per_stage, candidate: RecipeConfig = candidate,
               chosen_examples: list[Example] = chosen_examples) -> Estimate:
            """Counted at 1 and 2; beyond, counted again at ``b`` (a high-water mark is a maximum of lines in the
            batch: it can grow faster than the line through batches 1 and 2)."""
            if b <= 2:
                return Estimate(recipe, _size_of(candidate), b, precision, [pair[b - 1] for pair in per_stage])
            counts = [count_steps(example, [b], precision, sample=False)[0] for example in chosen_examples]
            return Estimate(recipe, _size_of(candidate), b, precision, [
                replace(c, sample_step_flops=pair[0].sample_step_flops) for c, pair in zip(counts, per_stage)])

        if smallest is None or at(1).worst.peak_bytes < smallest.worst.peak_bytes:
            smallest = at(1)
        # the largest batch the line through batches 1 and 2 allows, then checked by counting and lowered until it fits
        guess = next((b for b in range(wanted, 0, -1)
                      if Estimate(recipe, [], b, precision, [_linear(one, two, b) for one, two in per_stage]).fits(budget)), 0)
        too_big = wanted + 1
        while guess >= 1:
            found = at(guess)
            if found.fits(budget):
                while too_big - guess > 1:  # the largest fitting batch, by bisection
                    middle = (guess + too_big) // 2
                    tried = at(middle)
                    guess, found, too_big = (middle, tried, too_big) if tried.fits(budget) else (guess, found, middle)
                best = (found, change, candidate)
                break
            too_big = guess
            if guess <= 2:
                guess -= 1
                continue
            # the chord from batch 2 to this batch lies above the (convex) high-water mark between them: its
            # largest fitting batch fits, or nearly
            two, high = at(2), found
            slope = (device_bytes(high.worst.peak_bytes) - device_bytes(two.worst.peak_bytes)) / (guess - 2)
            guess = min(guess - 1, 2 + int((budget - device_bytes(two.worst.peak_bytes)) / slope) if slope > 0 else guess - 1)
        if best is not None:
            break
    if best is None:
        assert smallest is not None
        need = device_bytes(smallest.worst.peak_bytes)
        gpus = [g for g in sorted(GPUS.values(), key=lambda g: g.memory_bytes) if g.memory_bytes >= need]
        what = f"the smallest GPU that fits is {gpus[0].name} (--gpu {next(k for k, v in GPUS.items() if v is gpus[0])})" if gpus \
            else "no listed GPU fits: prepare the data at a smaller --size"
        if config_patch := getattr(resolved.model, "patch_size", None):
            what += f"; patch {config_patch} was halved as far as the network allows"
        raise MedsynthError(f"plan: {recipe} on {data} does not fit {budget_name} ({budget / 1e9:.1f} GB) at batch 1: it needs "
                            f"{need / 1e9:.1f} GB; {what}")
    chosen, change, candidate = best
    accumulate = math.ceil(wanted / chosen.batch_size)
    train_cases = int(fingerprint.get("splits", {}).get("train", {}).get("cases") or fingerprint.get("n_cases") or 1)
    epochs = None
    train_update: dict[str, Any] = {"batch_size": chosen.batch_size, "accumulate_grad_batches": accumulate, "precision": precision}
    model_update = dict(change)
    if hours is not None:
        step_seconds = chosen.step_seconds(speed)
        steps_per_epoch = math.ceil(train_cases / chosen.batch_size)
        epochs = max(1, int(hours * 3600 / (steps_per_epoch * step_seconds)))
        stage_epochs = getattr(candidate.model, "stage_epochs", None)
        if isinstance(stage_epochs, list) and candidate.train.max_epochs:  # keep each stage's share of the epochs
            model_update["stage_epochs"] = [max(1, round(e * epochs / candidate.train.max_epochs)) for e in stage_epochs]
            epochs = max(epochs, sum(model_update["stage_epochs"]) + 1)
        elif isinstance(stage_epochs, int) and candidate.train.max_epochs:
            model_update["stage_epochs"] = max(1, round(stage_epochs * epochs / candidate.train.max_epochs))
            epochs = max(epochs, model_update["stage_epochs"] + 1)
        train_update["max_epochs"] = epochs
    planned = with_settings(candidate, "train", **train_update)
    if model_update:
        planned = with_settings(planned, "model", **model_update)
    changes = {f"train.{k}": v for k, v in train_update.items()} | {f"model.{k}": v for k, v in model_update.items()}
    result = Plan(chosen, budget, budget_name, accumulate, epochs, changes, planned)
    if out is not None:
        import yaml

        from medsynth.runs import atomic_write_text

        written = planned.model_dump(mode="json")
        written.pop("data_dir")  # `train --data DATA` gives it; the data-filled fields are re-read from DATA
        note_lines = [f"# medsynth plan for {recipe} on {data} within {budget_name}: " + ", ".join(f"{k}={v}" for k, v in changes.items()),
                      *(f"# {line}" for line in chosen.table().splitlines())]
        atomic_write_text(Path(out), "\n".join(note_lines) + "\n" + yaml.safe_dump(written, sort_keys=False))
        result.path = Path(out)
    return result


# -- the check against measurement (CPU) ------------------------------------------------------------------------


def _proc_status_kib(key: str) -> int:
    from medsynth.runs import proc_field

    value = proc_field("/proc/self/status", key)
    if value is not None:
        return int(value)
    raise MedsynthError(f"/proc/self/status has no {key} (the CPU measurement needs Linux)")


def _measure_one(case: dict[str, Any]) -> dict[str, Any]:
    """In the measuring process: one stage's step on real CPU tensors (see :func:`measure_cpu`)."""
    import ctypes
    import gc
    import time
    import warnings

    import torch

    from medsynth.recipes import get_recipe

    torch.manual_seed(0)
    config = load_config(get_recipe(case["recipe"]).config_class, case.get("config"), case.get("overrides", ()),
                         base={"recipe": case["recipe"]})
    example = next(e for e in examples(config, case["size"]) if e.stage == case["stage"])
    module = build(example).train()
    batch = example.batch(case["batch_size"])
    if example.prepare is not None:
        example.prepare(module, batch)
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-5)
    libc = ctypes.CDLL("libc.so.6")

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with _autocast(case["precision"]):
            loss = module.training_step(batch, 0)
        loss.backward()
        optimizer.step()

    seconds = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        step()  # warm-up: AdamW's moments exist from here on, kernels are loaded
        optimizer.zero_grad(set_to_none=True)
        gc.collect()
        libc.malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident size
        before = _proc_status_kib("VmRSS")
        start = time.perf_counter()
        step()
        seconds.append(time.perf_counter() - start)
        peak = _proc_status_kib("VmHWM")
        for _ in range(case.get("repeats", 1) - 1):
            start = time.perf_counter()
            step()
            seconds.append(time.perf_counter() - start)
    return {"step_bytes": (peak - before) * 1024, "seconds": sorted(seconds)[len(seconds) // 2]}


def measure_cpu(cases: Sequence[dict[str, Any]], threads: int = 1, timeout: float = 1800) -> list[dict[str, Any]]:
    """Measure training steps on this CPU, in one fresh process (``cases`` run in turn).

    Each case: ``recipe``, ``config`` (a shipped name or file, or None), ``overrides``, ``size``, ``stage``,
    ``batch_size``, ``precision`` and ``repeats``. Measured per case, after a warm-up step (so AdamW's moments
    and the batch are resident before, as the estimate's fixed part): ``step_bytes``, the resident-memory
    high-water mark of one step (forward, backward, AdamW) above the resident memory just before it (Linux
    ``VmHWM`` after resetting it through ``/proc/self/clear_refs``; glibc returns every block over 64 KiB to
    the system when freed, so resident memory follows live tensors), and ``seconds``, the median wall time of
    ``repeats`` steps.
    """
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    code = "import json, sys; from medsynth.plan import _measure_one; print(json.dumps([_measure_one(c) for c in json.load(sys.stdin)]))"
    done = subprocess.run([sys.executable, "-c", code], input=json.dumps(list(cases)), capture_output=True, text=True, env=env,
                          timeout=timeout, check=False)
    if done.returncode != 0:
        raise MedsynthError(f"plan: the CPU measurement failed: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode}")
    return json.loads(done.stdout.strip().splitlines()[-1])
