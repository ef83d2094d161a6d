"""Configuration: one dataclass schema per component, YAML files, dotted overrides, errors that name the key.

A run's config is a task-specific dataclass (for example `vistrain.tasks.gan.GanConfig`) that extends
`ExperimentConfig`, whose sections `run`, `train` and `data` carry the keys every task shares (DESIGN.md).
OmegaConf does the merging and the type checks; this module turns its exceptions into messages that say
which key was wrong, what was given, and what would have been valid.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml
from omegaconf import MISSING, OmegaConf
from omegaconf import errors as oc_errors

from vistrain.data.config import DataConfig

# Task name -> module defining `Config` (the schema) and `Task`. Imported lazily so that `vistrain --help`
# and config errors stay fast.
TASK_MODULES = {"gan": "vistrain.tasks.gan"}

PRECISIONS = ("fp32", "bf16", "fp16")
LOGGERS = ("console", "jsonl", "tensorboard", "wandb")


class ConfigError(ValueError):
    """A configuration problem, reported before any work starts."""


@dataclass
class RunConfig:
    out_dir: str = "runs/default"
    seed: Union[int, str] = 0  # an int, or "random": one is drawn and recorded in config.yaml
    resume: str = "auto"  # auto: continue from out_dir/checkpoints/latest | never | PATH to a checkpoint
    loggers: list[str] = field(default_factory=lambda: ["console", "jsonl"])
    name: Optional[str] = None  # run name for W&B; default: the out_dir's folder name
    wandb_project: str = "vistrain"
    wandb_mode: str = "offline"  # offline works with no network; "online" syncs
    device: str = "auto"  # auto (cuda if available) | cpu | cuda
    dist_timeout_s: int = 600  # a rank that waits longer than this on a collective fails instead of hanging


@dataclass
class TrainConfig:
    max_steps: int = 1000
    batch_size: int = 64  # GLOBAL batch per optimizer step, across ranks and accumulation
    micro_batch_size: int = 0  # per rank per forward; 0 = batch_size / world_size (no accumulation)
    precision: str = "fp32"  # fp32 | bf16 | fp16
    grad_clip: float = 0.0  # max global grad norm per optimizer; 0 disables clipping (the norm is still logged)
    compile: bool = False
    log_every: int = 50
    eval_every: int = 500
    ckpt_every: int = 500
    keep_last: int = 3  # step checkpoints to keep (the best one is kept as well); 0 keeps all
    max_nonfinite_steps: int = 5  # stop after this many skipped (non-finite) steps in a row
    profile: bool = False  # record a torch.profiler trace of steps [profile_start, profile_start+profile_steps)
    profile_start: int = 5
    profile_steps: int = 5
    smoke: bool = False  # a handful of steps on tiny shapes, for a quick check of a config


@dataclass
class ExperimentConfig:
    task: str = MISSING
    run: RunConfig = field(default_factory=RunConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)


def task_module(name: str):
    """A built-in task by name, or your own as a module path (`task: mylab.tasks.denoise`) that defines
    `Config` (an ExperimentConfig subclass) and `Task` (see vistrain/tasks/base.py)."""
    if name in TASK_MODULES:
        return importlib.import_module(TASK_MODULES[name])
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name != name.split(".")[0] and e.name != name:
            raise ConfigError(f"task {name!r}: importing it failed ({e})") from None
        raise ConfigError(f"unknown task {name!r}; valid tasks: {', '.join(sorted(TASK_MODULES))} "
                          "(or the module path of your own task, such as mylab.tasks.denoise)") from None
    if not (hasattr(module, "Config") and hasattr(module, "Task")):
        raise ConfigError(f"task module {name!r} must define `Config` and `Task` (see vistrain/tasks/base.py)")
    return module


def load_config(path: str | Path | None, overrides: list[str] = ()) -> ExperimentConfig:
    """Read a YAML file, apply `key=value` overrides, type-check everything, return the task's dataclass."""
    file_cfg = OmegaConf.create({})
    if path is not None:
        file_cfg = _read_yaml(Path(path))
    override_cfg = _parse_overrides(overrides)
    task = override_cfg.get("task", file_cfg.get("task"))
    if task is None:
        raise ConfigError(f"{path or 'the command line'} does not say which task to run: add `task: gan`")
    schema = OmegaConf.structured(task_module(str(task)).Config)
    merged = _merge(schema, file_cfg, source=str(path))
    merged = _merge(merged, override_cfg, source="the command line")
    try:
        cfg = OmegaConf.to_object(merged)
    except oc_errors.MissingMandatoryValue as e:
        raise ConfigError(f"config key {e.full_key!r} has no value: set it in the YAML or as {e.full_key}=...") from None
    validate_common(cfg)
    return cfg


def validate_common(cfg: ExperimentConfig) -> None:
    """Checks of the shared keys that the type system cannot express."""
    seed = cfg.run.seed
    if not (isinstance(seed, int) or seed == "random"):
        raise ConfigError(f"run.seed={seed!r}: expected an integer or 'random'")
    if cfg.train.precision not in PRECISIONS:
        raise ConfigError(f"train.precision={cfg.train.precision!r}: expected one of {', '.join(PRECISIONS)}")
    for name in cfg.run.loggers:
        if name not in LOGGERS:
            raise ConfigError(f"run.loggers: unknown logger {name!r}; valid: {', '.join(LOGGERS)}")
    for key in ("max_steps", "batch_size", "log_every", "eval_every", "ckpt_every", "max_nonfinite_steps"):
        if getattr(cfg.train, key) < 1:
            raise ConfigError(f"train.{key}={getattr(cfg.train, key)}: must be at least 1")
    if cfg.train.micro_batch_size < 0:
        raise ConfigError(f"train.micro_batch_size={cfg.train.micro_batch_size}: must be >= 0 (0 = no accumulation)")
    if cfg.run.device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"run.device={cfg.run.device!r}: expected auto, cpu or cuda")


def gradient_accumulation(batch_size: int, micro_batch_size: int, world_size: int) -> int:
    """Micro-batches per rank per optimizer step; refuses a global batch that does not split evenly."""
    micro = micro_batch_size or batch_size // world_size
    if micro < 1 or batch_size % (micro * world_size):
        raise ConfigError(
            f"train.batch_size={batch_size} is not a whole multiple of train.micro_batch_size={micro_batch_size}"
            f" x world size {world_size}: choose values so that batch_size = micro_batch_size x world_size x k"
        )
    return batch_size // (micro * world_size)


def to_yaml(cfg: ExperimentConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: ExperimentConfig) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg))


# ---------------------------------------------------------------------------------------------- internals


def _read_yaml(path: Path):
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys, not {type(data).__name__}")
    return OmegaConf.create(data)


def _parse_overrides(overrides) -> Any:
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override {item!r} is not of the form key=value (for example train.max_steps=100)")
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except Exception as e:  # grammar errors in a value, e.g. unbalanced brackets
        raise ConfigError(f"could not parse overrides {list(overrides)}: {e}") from None


def _merge(base, update, source: str):
    try:
        return OmegaConf.merge(base, update)
    except oc_errors.ConfigKeyError as e:
        raise ConfigError(_unknown_key_message(e, source)) from None
    except oc_errors.ValidationError as e:
        raise ConfigError(_wrong_type_message(e, source)) from None


def _unknown_key_message(e: oc_errors.ConfigKeyError, source: str) -> str:
    key = str(e.key) if e.key is not None else str(e.full_key).rsplit(".", 1)[-1]
    valid = [f.name for f in dataclasses.fields(e.object_type)] if dataclasses.is_dataclass(e.object_type) else []
    close = difflib.get_close_matches(key, valid, n=3, cutoff=0.5)
    msg = f"unknown config key {e.full_key!r} in {source}"
    if close:
        msg += f"; did you mean: {', '.join(_sibling(e.full_key, c) for c in close)}?"
    if valid:
        msg += f" (valid keys here: {', '.join(valid)})"
    return msg


def _wrong_type_message(e: oc_errors.ValidationError, source: str) -> str:
    expected = _expected_type(e.object_type, e.key)
    msg = f"config key {e.full_key!r} in {source}: value {e.value!r} is not valid"
    return msg + (f"; expected {expected}" if expected else f" ({e.msg.splitlines()[0]})")


def _expected_type(object_type, key) -> str | None:
    if not dataclasses.is_dataclass(object_type) or key is None:
        return None
    hints = typing.get_type_hints(object_type)
    hint = hints.get(str(key))
    if hint is None:
        return None
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _sibling(full_key, name: str) -> str:
    parent = str(full_key).rsplit(".", 1)[0] if "." in str(full_key) else ""
    return f"{parent}.{name}" if parent else name
