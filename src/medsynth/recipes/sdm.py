"""Recipe ``sdm``: 3D CT synthesis from a semantic label map (SPADE) with classifier-free guidance.

Two stages, each a run of its own (``medsynth train sdm --stage low|high``):

- **low**: the whole volume at low resolution (the prepared volume average-pooled by
  ``model.low_res_factor``; 64^3 in the CTCA original, 16^3-24^3 in the CPU configs), a MONAI
  ``SPADEDiffusionModelUNet`` conditioned on the one-hot label map.
- **high**: patches of the prepared (high-resolution) volume. The UNet's input is the noisy patch,
  the matching crop of the *reference* (the low-resolution volume upsampled back to the high-res
  grid) and the patch's position (normalised whole-volume voxel coordinates, see
  :mod:`medsynth.nets.patch_embedding`); the label-map patch conditions it through SPADE. At
  sampling time the whole volume is denoised at once: every sampler step splits ``x_t`` into
  overlapping patches, the model answers per patch, and the answers are blended with Gaussian
  weights before the step (:class:`PatchwiseDenoiser`), so volumes larger than any training patch
  come out without seams (the original stitched 16-slice slabs by histogram matching).

Conditioning and guidance: the condition is ``cat(one-hot label map, extra channels)``; the null
condition of classifier-free guidance zeroes the label channels (an empty SPADE map) and keeps the
reference and position. Training drops the label map with ``model.cond_drop_prob``; sampling
guides with ``eps = eps(x|y) + s (eps(x|y) - eps(x|none))`` (``sample.guidance`` = s).

Data: ``medsynth prepare --recipe sdm`` resamples to ``--spacing``, clips and scales the HU window
to [0, 1] (``--normalize ct``; generated volumes are written back in HU; ``percentile`` also works)
and crops/pads to ``--size`` around the label map's foreground, keeping the spacing. The rest is
done on the fly from the prepared case, so no extra files are needed: label values are remapped
to contiguous classes (``model.label_values``), the low-resolution volumes and label maps are
average-pooled (labels by majority vote), and the high stage's reference is the pooled volume
upsampled back (trilinear).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from monai.data.utils import compute_importance_map
from monai.inferers import SlidingWindowSplitter
from monai.networks.nets import SPADEDiffusionModelUNet
from pydantic import Field
from torch import Tensor, nn

from medsynth.config import RecipeConfig, StrictModel, read_yaml, validate_config
from medsynth.data.datasets import PreparedDataModule, PreparedDataset, load_prepared_info, load_prepared_manifest
from medsynth.data.io import READABLE_SUFFIXES, load_image, save_image, suffix_of
from medsynth.diffusion import (
    DiffusionLoss,
    FlowSchedule,
    classifier_free_guidance,
    make_schedule,
    sample_ddim,
    sample_ddpm,
    sample_dpmpp_2m,
    sample_rflow,
)
from medsynth.errors import BadInputError, MedsynthError
from medsynth.nets.patch_embedding import coordinate_channels
from medsynth.recipes.base import Recipe, SampleRequest, TinyExample
from medsynth.report.sections import ReportSection
from medsynth.runs import Run
from medsynth.training import MedsynthModule, load_module

Stage = Literal["low", "high"]
SamplerName = Literal["ddpm", "ddim", "dpmpp", "rflow"]
DEFAULT_STEPS = {"ddpm": None, "ddim": 50, "dpmpp": 20, "rflow": 30}  # None: all T steps
POSITION_CHANNELS = 3


# -- configuration ------------------------------------------------------------------------------


class SDMModelConfig(StrictModel):
    """Network, schedule and stage. ``image_shape``, ``classes``, ``label_values``,
    ``reference_affine`` and ``intensity_window`` are filled from the prepared data."""

    stage: Stage = Field("low", description="low: whole low-res volume; high: high-res patches + low-res reference")
    image_shape: list[int] | None = Field(None, description="prepared (high-res) volume shape")
    classes: list[str] = []
    label_values: list[int] = Field([], description="label value of each class index (contiguous remapping)")
    reference_affine: list[list[float]] | None = None
    intensity_window: list[float] | None = Field(None, description="HU window of --normalize ct: outputs are written in HU")
    low_res_factor: int = Field(2, ge=1, description="low-res grid = prepared grid / this factor (average pooling)")
    patch_size: list[int] | None = Field(None, description="high stage: training patch (voxels); default half the volume")
    channels: list[int] = [16, 32, 32]
    attention_levels: list[bool] = [False, False, False]
    num_res_blocks: int = Field(1, ge=1)
    norm_num_groups: int = Field(8, ge=1)
    num_head_channels: int = Field(8, ge=1)
    spade_channels: int = Field(16, ge=1, description="hidden channels of each SPADE block (MONAI default 128)")
    use_flash_attention: bool = True
    position_channels: bool = Field(True, description="high stage: give the UNet the patch's whole-volume coordinates")
    schedule: Literal["linear", "scaled_linear", "sigmoid", "cosine", "rflow"] = "linear"
    num_train_timesteps: int = Field(1000, ge=2)
    prediction: Literal["epsilon", "sample", "v_prediction"] = "epsilon"
    cond_drop_prob: float = Field(0.15, ge=0, lt=1, description="share of training samples without label map (CFG)")


class SDMDataConfig(StrictModel):
    patches_per_volume: int = Field(4, ge=1, description="high stage: random patches drawn from each volume of a batch")


class SDMSampleConfig(StrictModel):
    sampler: SamplerName = "dpmpp"
    steps: int | None = Field(None, ge=1, description="None: ddpm all T, ddim 50, dpmpp 20, rflow 30")
    guidance: float = Field(1.0, ge=0, description="classifier-free guidance scale s (0: plain conditional model)")
    patch_overlap: float = Field(0.5, ge=0, lt=1, description="high stage: overlap of neighbouring patches (share of the patch)")
    patch_batch: int = Field(8, ge=1, description="high stage: patches per forward pass")
    batch_size: int = Field(4, ge=1, description="volumes per sampler call")
    low_res_run: str | None = Field(None, description="high stage: the low-res run that makes the references")


class SDMEvaluateConfig(StrictModel):
    n_generated: int = Field(8, ge=1, description="volumes generated from held-out label maps")
    segmenter_epochs: int = Field(40, ge=1)
    segmenter_channels: list[int] = [8, 16, 32]
    seed: int = 0


class SDMConfig(RecipeConfig):
    recipe: Literal["sdm"] = "sdm"
    model: SDMModelConfig = SDMModelConfig()
    data: SDMDataConfig = SDMDataConfig()
    sample: SDMSampleConfig = SDMSampleConfig()
    evaluate: SDMEvaluateConfig = SDMEvaluateConfig()


# -- tensors: label maps, resolutions, intensities ------------------------------------------------


def one_hot(labels: Tensor, num_classes: int) -> Tensor:
    """Class indices ``(B, 1, *S)`` to a one-hot map ``(B, num_classes, *S)`` (float32)."""
    return F.one_hot(labels[:, 0].long(), num_classes).movedim(-1, 1).float()


def downsample_image(image: Tensor, factor: int) -> Tensor:
    """Average pooling ``(B, C, *S) -> (B, C, *S / factor)``: the low-res volume."""
    return image if factor == 1 else F.avg_pool3d(image, factor)


def downsample_labels(labels: Tensor, num_classes: int, factor: int) -> Tensor:
    """Majority vote in each ``factor^3`` block: class indices ``(B, 1, *S) -> (B, 1, *S / factor)``."""
    if factor == 1:
        return labels
    return F.avg_pool3d(one_hot(labels, num_classes), factor).argmax(dim=1, keepdim=True)


def upsample_image(image: Tensor, factor: int) -> Tensor:
    """Trilinear upsampling ``(B, C, *S) -> (B, C, *S * factor)`` (the high stage's reference)."""
    return image if factor == 1 else F.interpolate(image, scale_factor=factor, mode="trilinear", align_corners=False)


def low_res_affine(affine: np.ndarray, factor: int) -> np.ndarray:
    """Affine of the grid average-pooled by ``factor``: voxels ``factor`` times larger, centred on their blocks."""
    scale = np.diag([factor, factor, factor, 1.0])
    scale[:3, 3] = (factor - 1) / 2.0
    return np.asarray(affine, dtype=np.float64) @ scale


def _zero_labels(cond: Tensor, label_nc: int) -> Tensor:
    """The null condition: an empty label map, the extra channels (reference, position) kept."""
    return torch.cat([torch.zeros_like(cond[:, :label_nc]), cond[:, label_nc:]], dim=1)


# -- networks -----------------------------------------------------------------------------------


class SDMDenoiser(nn.Module):
    """MONAI's SPADE diffusion UNet as ``model(x_t, t, cond)``.

    ``cond`` is ``(B, label_nc + E, *S)``: the one-hot label map (to SPADE's ``seg``) followed by E
    extra channels concatenated to ``x_t`` at the input (high stage: reference + position).
    """

    def __init__(self, unet: nn.Module, label_nc: int):
        super().__init__()
        self.unet = unet
        self.label_nc = label_nc

    def forward(self, x_t: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        """x_t (B, 1, *S), t (B,), cond (B, label_nc + E, *S) -> prediction (B, 1, *S)."""
        seg, extra = cond[:, : self.label_nc], cond[:, self.label_nc:]
        x = torch.cat([x_t, extra.to(x_t.dtype)], dim=1) if extra.shape[1] else x_t
        return self.unet(x, t, seg=seg)


class PatchwiseDenoiser:
    """A patch-wise denoiser applied to a whole volume, with the samplers' signature.

    Every call (one sampler step) splits ``x_t`` and the spatial condition into overlapping
    patches (MONAI ``SlidingWindowSplitter``, replicate padding where the grid overruns the
    volume), evaluates ``model`` on batches of patches and merges the outputs with Gaussian
    weights (MONAI ``compute_importance_map``), so the sampler's update is taken on one
    consistent whole-volume prediction and neighbouring patches cannot drift apart.

    Args:
        model: ``model(x_t, t, cond)`` on patches (e.g. the guided :class:`SDMDenoiser`).
        patch_size: the model's patch, per axis.
        overlap: overlap of neighbouring patches, a share of the patch in [0, 1).
        batch_size: patches per forward pass.
    """

    def __init__(self, model: Callable[[Tensor, Tensor, Tensor], Tensor], patch_size: Sequence[int],
                 overlap: float = 0.5, batch_size: int = 8):
        self.model = model
        self.patch_size = tuple(int(p) for p in patch_size)
        self.overlap = overlap
        self.batch_size = batch_size

    def __call__(self, x_t: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        """x_t (B, C, *S), t (B,), cond (B, K, *S) with S >= patch -> output (B, C_out, *S)."""
        shape = tuple(x_t.shape[2:])
        if any(s < p for s, p in zip(shape, self.patch_size)):
            raise MedsynthError(f"patch size {list(self.patch_size)} is larger than the volume {list(shape)}")
        channels = x_t.shape[1]
        splitter = SlidingWindowSplitter(patch_size=self.patch_size, overlap=self.overlap, pad_mode="replicate")
        inputs = torch.cat([x_t, cond.to(x_t.dtype)], dim=1)
        padded = splitter.get_padded_shape(inputs)
        weight = compute_importance_map(self.patch_size, mode="gaussian", device=x_t.device, dtype=torch.float32)
        total = torch.zeros(x_t.shape[0], 1, *padded, device=x_t.device)
        merged: Tensor | None = None
        batch = x_t.shape[0]
        pending: list[tuple[Tensor, Sequence[int]]] = []

        def flush() -> None:
            nonlocal merged
            patches = torch.cat([patch for patch, _ in pending])  # (k B, C + K, *P), location-major
            out = self.model(patches[:, :channels], t.repeat(len(pending)), patches[:, channels:]).float()
            if merged is None:
                merged = torch.zeros(batch, out.shape[1], *padded, device=x_t.device)
            for k, (_, location) in enumerate(pending):
                window = (slice(None), slice(None), *(slice(s, s + p) for s, p in zip(location, self.patch_size)))
                merged[window] += out[k * batch:(k + 1) * batch] * weight
                total[window] += weight
            pending.clear()

        for patch, location in splitter(inputs):
            pending.append((patch, location))
            if len(pending) == self.batch_size:
                flush()
        if pending:
            flush()
        assert merged is not None
        crop = (slice(None), slice(None), *(slice(0, s) for s in shape))
        return (merged / total)[crop].to(x_t.dtype)


# -- the LightningModule ------------------------------------------------------------------------


class SDMModule(MedsynthModule):
    """Denoising loss of one stage; the batch's label map, low-res volume, reference and patch are made here."""

    config: SDMConfig

    def __init__(self, config: SDMConfig):
        super().__init__(config)
        model = config.model
        if model.image_shape is None or not model.classes:
            raise MedsynthError("sdm: model.image_shape and model.classes are unset (train with --data)")
        if model.stage == "high" and model.patch_size is None:
            raise MedsynthError("sdm: model.patch_size is unset for the high stage (train with --data)")
        self.label_nc = len(model.classes)
        extra = 0 if model.stage == "low" else 1 + (POSITION_CHANNELS if model.position_channels else 0)
        unet = SPADEDiffusionModelUNet(
            spatial_dims=3, in_channels=1 + extra, out_channels=1, label_nc=self.label_nc,
            channels=tuple(model.channels), attention_levels=tuple(model.attention_levels),
            num_res_blocks=model.num_res_blocks, norm_num_groups=model.norm_num_groups,
            num_head_channels=model.num_head_channels, spade_intermediate_channels=model.spade_channels,
            use_flash_attention=model.use_flash_attention,
        )
        self.net = SDMDenoiser(unet, self.label_nc)
        self.schedule = make_schedule(model.schedule, model.num_train_timesteps,
                                      prediction="flow" if model.schedule == "rflow" else model.prediction)
        self.null_cond = functools.partial(_zero_labels, label_nc=self.label_nc)
        self.loss = DiffusionLoss(self.schedule, cond_drop_prob=model.cond_drop_prob, null_cond=self.null_cond)
        lut = torch.full((max(model.label_values) + 1,), -1, dtype=torch.long)
        lut[torch.tensor(model.label_values)] = torch.arange(len(model.label_values))
        self.register_buffer("lut", lut, persistent=False)

    @property
    def factor(self) -> int:
        return self.config.model.low_res_factor

    def classes_of(self, labels: Tensor) -> Tensor:
        """Prepared label values ``(B, 1, *S)`` to contiguous class indices."""
        return self.lut[labels.long()]

    def conditions(self, labels: Tensor, reference: Tensor | None = None) -> Tensor:
        """The condition of a whole volume: class indices ``(B, 1, *S)`` (+ reference in [-1, 1]) -> ``(B, K, *S)``."""
        parts = [one_hot(labels, self.label_nc)]
        if self.config.model.stage == "high":
            parts.append(reference)
            if self.config.model.position_channels:
                coords = coordinate_channels(labels.shape[2:], device=labels.device)
                parts.append(coords.expand(len(labels), *coords.shape))
        return torch.cat(parts, dim=1)

    def training_pair(self, batch: dict[str, Any], generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """(x_0 in [-1, 1], condition) of a batch of prepared cases: low-res volumes or high-res patches."""
        image, labels = batch["image"].float(), self.classes_of(batch["label"])
        if self.config.model.stage == "low":
            x0 = downsample_image(image, self.factor) * 2 - 1
            return x0, self.conditions(downsample_labels(labels, self.label_nc, self.factor))
        reference = upsample_image(downsample_image(image, self.factor), self.factor) * 2 - 1
        x0, cond = image * 2 - 1, self.conditions(labels, reference)
        return self.random_patches(x0, cond, generator)

    def random_patches(self, x0: Tensor, cond: Tensor, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        """``data.patches_per_volume`` random patches per volume, the same windows of ``x0`` and ``cond``."""
        patch = self.config.model.patch_size
        xs, cs = [], []
        for b in [b for b in range(len(x0)) for _ in range(self.config.data.patches_per_volume)]:
            starts = [int(torch.randint(0, s - p + 1, (), generator=generator)) for s, p in zip(x0.shape[2:], patch)]
            window = tuple(slice(s, s + p) for s, p in zip(starts, patch))
            xs.append(x0[(b, slice(None), *window)])
            cs.append(cond[(b, slice(None), *window)])
        return torch.stack(xs), torch.stack(cs)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        x0, cond = self.training_pair(batch)
        loss, logs = self.loss(self.net, x0, cond)
        self.log_dict({f"train/{k}": v for k, v in logs.items()}, on_step=True, on_epoch=True, batch_size=len(x0))
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        # A private generator: the same t, noise and patches at every validation, and the global
        # RNG (which a resumed run restores) untouched.
        generator = torch.Generator(device=self.device).manual_seed(batch_idx)
        x0, cond = self.training_pair(batch, generator)
        loss, logs = self.loss(self.net, x0, cond, generator)
        self.log_dict({f"val/{k}": v for k, v in logs.items()}, prog_bar=True, on_epoch=True, batch_size=len(x0))

    # -- generation ---------------------------------------------------------------------------

    def guided(self, guidance: float) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
        return classifier_free_guidance(self.net, guidance, self.null_cond)

    @torch.no_grad()
    def generate(self, labels: Tensor, seeds: Sequence[int], settings: SDMSampleConfig,
                 reference: Tensor | None = None) -> Tensor:
        """Volumes in [-1, 1] for label maps.

        Args:
            labels: class indices ``(B, 1, *S)`` on the prepared (high-res) grid.
            seeds: one seed per volume (its initial noise; the first also seeds DDPM's per-step noise).
            settings: sampler, steps, guidance, patch overlap.
            reference: high stage: the upsampled low-res volumes ``(B, 1, *S)`` in [-1, 1].

        Returns:
            ``(B, 1, *S / low_res_factor)`` for the low stage, ``(B, 1, *S)`` for the high stage.
        """
        self.eval()
        model = self.guided(settings.guidance)
        if self.config.model.stage == "low":
            cond = self.conditions(downsample_labels(labels, self.label_nc, self.factor))
        else:
            if reference is None:
                raise MedsynthError("sdm high stage: sampling needs a low-res reference (sample.low_res_run)")
            cond = self.conditions(labels, reference)
            model = PatchwiseDenoiser(model, self.config.model.patch_size, settings.patch_overlap, settings.patch_batch)
        noise = torch.stack([torch.randn(1, *cond.shape[2:], generator=torch.Generator().manual_seed(int(s))) for s in seeds])
        generator = torch.Generator().manual_seed(int(seeds[0]))
        x = run_sampler(model, noise.to(self.device), self.schedule, cond, settings, generator)
        return x.clamp(-1, 1)


def run_sampler(model: Callable, x: Tensor, schedule: Any, cond: Tensor, settings: SDMSampleConfig,
                generator: torch.Generator | None) -> Tensor:
    """Dispatch to the shared samplers by name (they share one signature)."""
    steps = settings.steps if settings.steps is not None else DEFAULT_STEPS[settings.sampler]
    if isinstance(schedule, FlowSchedule) != (settings.sampler == "rflow"):
        raise MedsynthError(f"sampler '{settings.sampler}' does not fit the model's '{type(schedule).__name__}' "
                            "(rectified flow takes 'rflow'; noise schedules 'ddpm', 'ddim' or 'dpmpp')")
    if steps is not None and not isinstance(schedule, FlowSchedule) and steps > schedule.num_train_timesteps:
        raise MedsynthError(f"--steps {steps} exceeds the model's {schedule.num_train_timesteps} training timesteps")
    sampler = {"ddpm": sample_ddpm, "ddim": sample_ddim, "dpmpp": sample_dpmpp_2m, "rflow": sample_rflow}[settings.sampler]
    kwargs = {} if steps is None else {"steps": steps}
    return sampler(model, x, schedule, cond, generator=generator, **kwargs)


# -- label maps from files ------------------------------------------------------------------------


def read_label_map(path: Path, module: SDMModule) -> tuple[Tensor, np.ndarray]:
    """A label-map file as class indices ``(1, 1, X, Y, Z)`` and its affine; bad files get one line naming them."""
    image = load_image(path, dtype=np.int64)
    if image.ndim != 4 or image.shape[0] != 1:
        shape = list(image.shape[1:]) if image.shape[0] == 1 else [*image.shape[1:], image.shape[0]]
        raise BadInputError(path, f"label map has {len(shape)} dimension(s) {shape}; sdm needs a 3D label map (X, Y, Z)")
    values = torch.unique(image.as_tensor())
    known = module.config.model.label_values
    unknown = [int(v) for v in values if int(v) not in known]
    if unknown:
        names = ", ".join(f"{v} {n}" for v, n in zip(known, module.config.model.classes))
        raise BadInputError(path, f"label value(s) {', '.join(map(str, unknown))} not among the classes this model was trained on ({names})")
    labels = module.classes_of(image.as_tensor()[None])
    check_volume_shape(path, tuple(labels.shape[2:]), module)
    return labels, np.asarray(image.affine, dtype=np.float64)


def check_volume_shape(path: Path | str, shape: tuple[int, ...], module: SDMModule) -> None:
    """A label map the stage can sample: divisible by the pooling and network strides, not smaller than a patch."""
    model = module.config.model
    multiple = 2 ** (len(model.channels) - 1)
    if model.stage == "low":
        need = model.low_res_factor * multiple
        if any(s % need for s in shape):
            raise BadInputError(path, f"label map shape {list(shape)} must be divisible by {need} (low_res_factor x network stride)")
        return
    if any(s < p for s, p in zip(shape, model.patch_size)):
        raise BadInputError(path, f"patch size {model.patch_size} is larger than the volume {list(shape)}")
    if any(s % model.low_res_factor for s in shape):
        raise BadInputError(path, f"label map shape {list(shape)} must be divisible by low_res_factor {model.low_res_factor}")


def condition_files(condition: Path) -> list[Path]:
    """A label-map file, or the label maps in a folder (sorted by name)."""
    if condition.is_dir():
        files = sorted(p for p in condition.iterdir() if p.is_file() and suffix_of(p) in READABLE_SUFFIXES)
        if not files:
            raise BadInputError(condition, "folder holds no label-map files")
        return files
    if not condition.exists():
        raise BadInputError(condition, "file not found")
    return [condition]


def _stem(path: Path) -> str:
    suffix = suffix_of(path)
    return path.name[: -len(suffix)] if suffix and path.name.lower().endswith(suffix) else path.stem


# -- the recipe ---------------------------------------------------------------------------------


class SDMRecipe(Recipe):
    name = "sdm"
    config_class = SDMConfig
    # HU window -> [0, 1] (written back in HU); --size crops/pads around the heart at the --spacing grid.
    prepare_defaults = {"normalize": "ct", "crop": True}
    tiny_example = TinyExample(  # 16^3 volumes, the low stage on the 8^3 grid
        phantom="coronary", n=6, size=16, prepare={"ct_window": (-1000.0, 1000.0), "seed": 0}, config="sdm-tiny",
        overrides=("model.channels=[8, 16]", "model.attention_levels=[false, false]", "model.norm_num_groups=4", "model.num_head_channels=4",
                   "model.spade_channels=8", "model.low_res_factor=2", "train.batch_size=2", "train.num_threads=1", "sample.steps=4",
                   "evaluate.n_generated=2", "evaluate.segmenter_epochs=1", "evaluate.segmenter_channels=[4, 8]"))

    def resolve_config(self, config: SDMConfig) -> SDMConfig:
        data_dir = Path(config.data_dir)
        info = load_prepared_info(data_dir)
        model = config.model
        if info["spatial_dims"] != 3 or info["image_shape"] is None:
            raise MedsynthError(f"{data_dir}: sdm needs 3D volumes of one shape; prepare with --size")
        if not info["has_label"] or not info["labels"]:
            raise MedsynthError(f"{data_dir}: sdm needs label maps (an nnU-Net raw folder or a dataset with labelsTr)")
        if info["in_channels"] != 1:
            raise MedsynthError(f"{data_dir}: sdm synthesises one-channel CT; this dataset has {info['in_channels']} channels")
        settings = (load_prepared_manifest(data_dir).prepare or {}).get("settings", {})
        if settings.get("normalize") not in ("ct", "percentile"):
            raise MedsynthError(f"{data_dir}: sdm needs intensities in [0, 1]; prepare with --normalize ct (CT, HU window) "
                                f"or percentile, not '{settings.get('normalize')}'")
        shape = list(info["image_shape"])
        factor, multiple = model.low_res_factor, 2 ** (len(model.channels) - 1)
        if any(s % factor for s in shape):
            raise MedsynthError(f"sdm: volume shape {shape} is not divisible by model.low_res_factor {factor}")
        patch = model.patch_size
        if model.stage == "low" and any((s // factor) % multiple for s in shape):
            raise MedsynthError(f"sdm: low-res shape {[s // factor for s in shape]} must be divisible by {multiple} "
                                f"(2^(levels-1) for model.channels {model.channels})")
        if model.stage == "high":
            patch = patch or [max(multiple, (s // 2) // multiple * multiple) for s in shape]
            if len(patch) != 3:
                raise MedsynthError(f"sdm: model.patch_size needs 3 sizes, got {patch}")
            if any(p > s for p, s in zip(patch, shape)):
                raise MedsynthError(f"sdm: model.patch_size {patch} is larger than the volume {shape} ({data_dir})")
            if any(p % multiple for p in patch):
                raise MedsynthError(f"sdm: model.patch_size {patch} must be divisible by {multiple} (2^(levels-1) for model.channels)")
        labels = dict(sorted(info["labels"].items()))
        window = settings.get("ct_window") if settings.get("normalize") == "ct" else None
        model = model.model_copy(update={
            "image_shape": shape, "classes": list(labels.values()), "label_values": list(labels),
            "reference_affine": np.asarray(info["affine"]).tolist() if info.get("affine") is not None else None,
            "intensity_window": [float(v) for v in window] if window else None, "patch_size": patch,
        })
        sample = config.sample
        if sample.low_res_run is not None:
            sample = sample.model_copy(update={"low_res_run": str(Path(sample.low_res_run).resolve())})
        return config.model_copy(update={"model": model, "sample": sample})

    def build_module(self, config: SDMConfig) -> SDMModule:
        return SDMModule(config)

    def build_datamodule(self, config: SDMConfig) -> L.LightningDataModule:
        return PreparedDataModule(Path(config.data_dir), batch_size=config.train.batch_size,
                                  num_workers=config.train.num_workers, seed=config.train.seed, in_memory=True)

    # -- units ----------------------------------------------------------------------------------

    @staticmethod
    def to_units(x: Tensor, module: SDMModule) -> Tensor:
        """Model range [-1, 1] to the data's units: HU with a CT window, else [0, 1]."""
        unit = (x.float() + 1) / 2
        window = module.config.model.intensity_window
        return unit if window is None else window[0] + unit * (window[1] - window[0])

    # -- references (high stage) ----------------------------------------------------------------

    def low_res_module(self, module: SDMModule) -> tuple[SDMModule, SDMSampleConfig]:
        """The run named by ``sample.low_res_run``, checked against the high-res stage."""
        path = module.config.sample.low_res_run
        if path is None:
            raise MedsynthError("sdm high stage: set sample.low_res_run to a trained low-res run (it makes the references)")
        low = load_module(path, self)
        config = low.config
        if config.model.stage != "low":
            raise BadInputError(path, f"sample.low_res_run must be a low-stage sdm run, this one is '{config.model.stage}'")
        high = module.config.model
        if (config.model.low_res_factor, config.model.label_values) != (high.low_res_factor, high.label_values):
            raise BadInputError(path, "low-res run has another low_res_factor or other classes than this high-res run")
        return low.to(module.device), config.sample

    def references(self, module: SDMModule, labels: Tensor, seeds: Sequence[int]) -> Tensor:
        """The high stage's references: the low-res run's volumes for the label maps, upsampled."""
        low, settings = self.low_res_module(module)
        volumes = low.generate(labels, seeds, settings)
        return upsample_image(volumes, module.factor)

    def generate(self, module: SDMModule, labels: Tensor, seeds: Sequence[int], reference: Tensor | None = None,
                 settings: SDMSampleConfig | None = None) -> Tensor:
        """Volumes in [-1, 1] in batches of ``sample.batch_size`` (references from the low-res run when needed)."""
        settings = settings or module.config.sample
        outputs = []
        for start in range(0, len(labels), settings.batch_size):
            part, part_seeds = labels[start:start + settings.batch_size], seeds[start:start + settings.batch_size]
            ref = None
            if module.config.model.stage == "high":
                ref = reference[start:start + settings.batch_size] if reference is not None else self.references(module, part, part_seeds)
            outputs.append(module.generate(part, part_seeds, settings, ref))
        return torch.cat(outputs)

    # -- sampling -------------------------------------------------------------------------------

    def sample(self, module: SDMModule, request: SampleRequest, out: Path) -> list[Path]:
        if request.mode != "random":
            raise MedsynthError(f"sdm samples from label maps; mode '{request.mode}' is not available (use: random)")
        if request.class_name is not None:
            raise MedsynthError("sdm is conditioned on label maps, not classes: use --condition LABELS.nii.gz or a folder")
        module.eval()
        jobs: list[tuple[str, Tensor, np.ndarray]] = []  # (name, class indices (1, 1, *S), affine)
        if request.condition is not None:
            for path in condition_files(Path(request.condition)):
                labels, affine = read_label_map(path, module)
                jobs += [(_stem(path) if request.n == 1 else f"{_stem(path)}_{k:02d}", labels, affine) for k in range(request.n)]
        else:  # label maps of the prepared dataset's held-out cases, cycled
            cases = self.real_cases(module, ("test", "val", "train"))
            if not cases:
                raise MedsynthError(f"sdm: no --condition given and no prepared label maps in {module.config.data_dir}")
            for k in range(request.n):
                case = cases[k % len(cases)]
                jobs.append((f"{case['id']}_{k:03d}", module.classes_of(case["label"][None]), case["affine"].numpy()))
        folder = out / request.mode
        written: list[Path] = []
        model = module.config.model
        factor = model.low_res_factor if model.stage == "low" else 1
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for index, (_, labels, _) in enumerate(jobs):
            by_shape.setdefault(tuple(labels.shape[2:]), []).append(index)
        volumes: dict[int, Tensor] = {}
        for indices in by_shape.values():
            labels = torch.cat([jobs[i][1] for i in indices]).to(module.device)
            seeds = [request.seed * 100_003 + i for i in indices]
            for i, volume in zip(indices, self.generate(module, labels, seeds)):
                volumes[i] = volume
        for index, (name, labels, affine) in enumerate(jobs):
            grid_affine = low_res_affine(affine, factor)
            written.append(save_image(self.to_units(volumes[index], module).cpu(), folder / f"{name}.nii.gz", affine=grid_affine))
            if request.condition is None:
                low = downsample_labels(labels, len(model.classes), factor)[0]
                values = torch.tensor(model.label_values)[low]
                save_image(values.to(torch.int16), folder / "labels" / f"{name}.nii.gz", affine=grid_affine)
        return written

    def real_cases(self, module: SDMModule, splits: Sequence[str]) -> list[dict[str, Any]]:
        data_dir = module.config.data_dir
        if data_dir is None or not (Path(data_dir) / "dataset.json").exists():
            return []
        for split in splits:
            dataset = PreparedDataset(Path(data_dir), split=split)
            if len(dataset):
                return [dataset[i] for i in range(len(dataset))]
        return []

    # -- evaluation -----------------------------------------------------------------------------

    def evaluate(self, run: Run, module: SDMModule, data_dir: Path) -> dict[str, Any]:
        from medsynth.evaluate.metrics import nearest_ssim
        from medsynth.evaluate.segmentation import (
            dice_per_class,
            intensity_stats_per_label,
            seam_score,
            segment,
            sliding_window_borders,
            train_segmenter,
        )

        settings, model = module.config.evaluate, module.config.model
        classes, num_classes = model.classes, len(model.classes)
        factor = model.low_res_factor if model.stage == "low" else 1
        module = module.eval()

        def load(split: str) -> dict[str, Tensor]:
            """Volumes in [0, 1] and class maps of a split, on the prepared grid and on the evaluated one."""
            dataset = PreparedDataset(data_dir, split=split)
            items = [dataset[i] for i in range(len(dataset))]
            if not items:
                return {}
            images = torch.stack([item["image"] for item in items])
            labels = module.classes_of(torch.stack([item["label"] for item in items]))
            if (labels < 0).any():
                raise BadInputError(data_dir, "holds label values this model was not trained on")
            return {"image": images, "label": labels, "x": downsample_image(images, factor),
                    "y": downsample_labels(labels, num_classes, factor)[:, 0]}

        train, test = load("train"), load("test") or load("val")
        if not train or not test:
            raise MedsynthError(f"{data_dir}: evaluation needs training and held-out (test or val) cases")
        train_x, train_y, test_x, test_y = train["x"], train["y"], test["x"], test["y"]

        def units(x01: Tensor) -> Tensor:
            return self.to_units(x01 * 2 - 1, module)

        segmenter = train_segmenter(units(train_x), train_y, num_classes, epochs=settings.segmenter_epochs,
                                    seed=settings.seed, channels=settings.segmenter_channels)
        dice_real = dice_per_class(segment(segmenter, units(test_x)), test_y, num_classes, classes)

        # Generate from the held-out label maps, cycled to n_generated volumes.
        order = [k % len(test_x) for k in range(settings.n_generated)]
        cond_full, cond_y = test["label"][order], test_y[order]
        seeds = [settings.seed * 100_003 + k for k in range(settings.n_generated)]
        reference, reference_kind = None, None
        if model.stage == "high":
            if module.config.sample.low_res_run is not None:
                reference_kind = "low-res run (cascade)"
            else:  # no low-res run: judge the high stage alone, on the real volumes' low-res references
                reference_kind = "real volumes, average-pooled and upsampled (super-resolution)"
                reference = upsample_image(downsample_image(test["image"][order], module.factor), module.factor) * 2 - 1
        generated = (self.generate(module, cond_full.to(module.device), seeds, reference) + 1) / 2
        generated = generated.cpu()
        dice_generated = dice_per_class(segment(segmenter, units(generated)), cond_y, num_classes, classes)

        stats_real = intensity_stats_per_label(units(test_x), test_y, classes)
        stats_generated = intensity_stats_per_label(units(generated), cond_y, classes)
        shared = [name for name in classes if name in stats_real and name in stats_generated]
        nearest, _ = nearest_ssim(generated, train_x)
        nearest_real, _ = nearest_ssim(test_x, train_x)
        real_mean = _mean_foreground(dice_real)
        generated_mean = _mean_foreground(dice_generated)
        metrics: dict[str, Any] = {
            "stage": model.stage,
            "segmenter_dice_real": real_mean,
            "segmenter_dice_generated": generated_mean,
            "segmenter_dice_ratio": generated_mean / real_mean if real_mean > 0 else float("nan"),
            "segmenter_dice_real_per_class": _drop_mean(dice_real),
            "segmenter_dice_generated_per_class": _drop_mean(dice_generated),
            "intensity_units": "HU" if model.intensity_window else "[0, 1]",
            "intensity_real_per_label": stats_real,
            "intensity_generated_per_label": stats_generated,
            "intensity_mean_abs_difference": float(np.mean([abs(stats_real[n]["mean"] - stats_generated[n]["mean"]) for n in shared])),
            "memorisation_max_ssim": float(nearest.max()),
            "memorisation_mean_ssim": float(nearest.mean()),
            "memorisation_real_test_max_ssim": float(nearest_real.max()),
            "n_generated": settings.n_generated,
            "n_test_real": len(test_x),
            "evaluated_shape": list(generated.shape[2:]),
            "sampler": f"{module.config.sample.sampler} ({module.config.sample.steps or DEFAULT_STEPS[module.config.sample.sampler] or model.num_train_timesteps} steps), "
                       f"guidance {module.config.sample.guidance}",
        }
        if model.stage == "high":
            borders = sliding_window_borders(generated.shape[2:], model.patch_size, module.config.sample.patch_overlap)
            scores = [seam_score(volume, borders) for volume in units(generated)]
            metrics.update({
                "reference": reference_kind,
                "seam_step_at_borders": float(np.mean([s["step_at_borders"] for s in scores])),
                "seam_step_inside": float(np.mean([s["step_inside"] for s in scores])),
                "seam_ratio": float(np.mean([s["ratio"] for s in scores])),
            })
        samples = run.samples / "evaluate"
        for k, volume in enumerate(units(generated)):
            affine = low_res_affine(np.asarray(model.reference_affine if model.reference_affine is not None else np.eye(4)), factor)
            save_image(volume, samples / f"generated_{k:03d}.nii.gz", affine=affine)
            save_image(torch.tensor(model.label_values)[cond_y[k]][None].to(torch.int16), samples / f"labels_{k:03d}.nii.gz", affine=affine)
        return metrics

    def report_sections(self, run: Run, module: SDMModule) -> list[ReportSection]:
        from medsynth.report.html import figure_html, image_grid

        samples = run.samples / "evaluate"
        generated = sorted(samples.glob("generated_*.nii.gz"))[:6]
        if not generated:
            return [ReportSection("Generated volumes", "<p>Run <code>medsynth evaluate</code> first: it writes the generated volumes shown here.</p>")]
        model = module.config.model
        window = model.intensity_window or [0.0, 1.0]
        images, titles = [], []
        for path in generated:
            labels = module.classes_of(load_image(samples / path.name.replace("generated_", "labels_"), dtype=np.int64).as_tensor())
            image = load_image(path).as_tensor()
            images += [labels.float() / max(1, len(model.classes) - 1), (image - window[0]) / (window[1] - window[0])]
            titles += [f"labels {path.name[10:13]}", f"generated {path.name[10:13]}"]
        factor = model.low_res_factor if model.stage == "low" else 1
        reals = self.real_cases(module, ("test", "val"))[:6]
        for case in reals:
            labels = module.classes_of(case["label"][None])
            images += [downsample_labels(labels, len(model.classes), factor)[0].float() / max(1, len(model.classes) - 1),
                       downsample_image(case["image"][None], factor)[0]]
            titles += [f"labels {case['id']}", f"real {case['id']}"]
        figure = figure_html(image_grid(images, ncols=4, titles=titles, vmin=0.0, vmax=1.0), "label maps and volumes")
        return [ReportSection("Label maps with generated (top) and real (bottom) volumes, middle axial slices", figure)]


def _mean_foreground(dice: dict[str, float]) -> float:
    return float(dice["mean_foreground"])


def _drop_mean(dice: dict[str, float]) -> dict[str, float]:
    return {name: value for name, value in dice.items() if name != "mean_foreground"}


