"""Typed configs: pydantic models with defaults, loaded from YAML plus ``key=value`` overrides.

Every recipe's config subclasses :class:`RecipeConfig` and adds its own ``model`` (and,
where it needs them, ``data``/``sample``/``evaluate``) sections. Unknown keys and values
of the wrong type are refused with one line naming the key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from medsynth.errors import BadInputError, MedsynthError
from medsynth.runs import atomic_write_text, read_structured

CONFIG_DIR = Path(__file__).parent / "configs"

Precision = Literal["32", "32-true", "64", "bf16-mixed", "16-mixed", "bf16-true"]


class StrictModel(BaseModel):
    """A config section that refuses unknown keys and non-finite floats (``nan``, ``inf``)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class TrainConfig(StrictModel):
    """Training loop settings shared by every recipe (Lightning Trainer + optimiser)."""

    max_epochs: int = Field(30, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(2e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    lr_schedule: Literal["constant", "cosine"] = "cosine"
    precision: Precision = "32"
    accelerator: str = "auto"
    devices: int | str = 1
    num_nodes: int = Field(1, ge=1)
    strategy: str = "auto"
    seed: int = Field(0, ge=0, le=2**32 - 1)
    ema_decay: float | None = Field(None, gt=0, lt=1)
    grad_clip: float | None = Field(1.0, gt=0)
    num_workers: int = Field(0, ge=0)
    log_every_n_steps: int = Field(10, ge=1)
    num_threads: int | None = Field(None, ge=1, description="torch CPU threads; None keeps torch's default")
    accumulate_grad_batches: int = Field(1, ge=1, description="batches whose gradients are summed per optimiser step")
    checkpoint_every_n_steps: int | None = Field(
        None, ge=1, description="also save checkpoints/last.ckpt every N optimiser steps (epochs of hours); None: per epoch only")
    effective_batch_size: int | None = Field(
        None, ge=1, description="filled by `medsynth train`: batch_size x devices x num_nodes x accumulate_grad_batches "
        "(samples per optimiser step over all processes)")
    lr_scaling: Literal["none", "linear"] = Field(
        "none", description="none: lr is used as given for any effective batch; linear: lr x effective_batch_size / batch_size")


class RecipeConfig(StrictModel):
    """Base of every recipe's config: the recipe name, the prepared data and training."""

    recipe: str
    data_dir: str | None = Field(None, description="prepared dataset folder (set by `medsynth train --data`)")
    train: TrainConfig = TrainConfig()


ConfigT = TypeVar("ConfigT", bound=RecipeConfig)


def resolve_config_path(name_or_path: str | Path) -> Path:
    """A config file path, or the name of a shipped one (``cvae-224`` -> ``configs/cvae-224.yaml``)."""
    path = Path(name_or_path)
    if path.exists():
        return path
    shipped = CONFIG_DIR / f"{name_or_path}.yaml"
    if shipped.exists():
        return shipped
    known = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
    raise BadInputError(path, f"no such config file (shipped configs: {known})")


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping of config keys, refusing anything else with one line."""
    return read_structured(path, "config")


def format_validation_error(exc: ValidationError, source: str | Path) -> str:
    """Pydantic's report as one line: ``<source>: <key>: <problem> (got <value>)``.

    The first error is shown (the count when there are more); ``Value error, `` prefixes of
    model validators are dropped and unknown keys are named as such.
    """
    error = exc.errors()[0]
    key = ".".join(str(part) for part in error["loc"])
    more = f" (and {exc.error_count() - 1} more error(s))" if exc.error_count() > 1 else ""
    if error["type"] == "extra_forbidden":
        return f"{source}: unknown config key '{key}'{more}"
    message = error["msg"].removeprefix("Value error, ")
    shown = "" if error["type"].startswith("value_error") or "input" not in error else f" (got {error['input']!r})"
    return f"{source}: {key + ': ' if key else ''}{message}{shown}{more}"


def apply_overrides(data: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides (values parsed as YAML: ``3``, ``1e-3``, ``[32, 64]``, ``null``)."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise MedsynthError(f"override '{item}': expected key=value, e.g. train.max_epochs=5")
        node = data
        *parents, leaf = key.strip().split(".")
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise MedsynthError(f"override '{item}': '{part}' is not a config section")
            node = child
        node[leaf] = parse_value(raw)
    return data


def parse_value(raw: str) -> Any:
    """A YAML scalar or list; ``1e-4`` is a float (YAML 1.1 would keep it a string)."""
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def validate_config(config_cls: type[ConfigT], data: dict[str, Any], source: str = "config") -> ConfigT:
    """Build a config, turning pydantic's report into one line naming the key."""
    try:
        return config_cls.model_validate(data)
    except ValidationError as exc:
        raise MedsynthError(format_validation_error(exc, source)) from None


def load_config(
    config_cls: type[ConfigT],
    path: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    base: dict[str, Any] | None = None,
    source: str = "config",
) -> ConfigT:
    """Defaults <- ``base`` <- YAML file <- overrides, validated into ``config_cls``.

    A refusal names the override that set the failing key (``--set train.lr=inf: ...``), else the
    YAML file, else ``source`` (where ``base`` came from)."""
    data: dict[str, Any] = dict(base or {})
    if path is not None:
        resolved = resolve_config_path(path)
        data = _deep_merge(data, read_yaml(resolved))
        source = str(resolved)
    data = apply_overrides(data, list(overrides))
    try:
        return config_cls.model_validate(data)
    except ValidationError as exc:
        raise MedsynthError(format_validation_error(exc, _blamed(exc, overrides, source))) from None


def _blamed(exc: ValidationError, overrides: list[str] | tuple[str, ...], source: str) -> str:
    """What to name for a validation error: the last ``--set KEY=VALUE`` that set the failing key
    (or a section above or below it), else the config file."""
    failing = ".".join(str(part) for part in exc.errors()[0]["loc"])
    for item in reversed(list(overrides)):
        key = item.partition("=")[0].strip()
        if failing == key or failing.startswith(key + ".") or key.startswith(failing + "."):
            return f"--set {item}"
    return source


def dump_config(config: BaseModel, path: str | Path) -> Path:
    """Write the fully resolved config as YAML (atomically)."""
    path = Path(path)
    atomic_write_text(path, yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    return path


def _deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        merged[key] = _deep_merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
    return merged
