"""The experiment config: the schema every task extends, YAML files, dotted overrides, errors that name the key.

A run's config is a task's dataclass (for example `vistrain.tasks.gan.GanConfig`) that extends
`ExperimentConfig`, whose sections `run` and `train` belong to the engine (vistrain/engine/config_sections.py) and
whose `data` section each task extends with its own keys. OmegaConf does the merging and the type checks;
this module turns its exceptions into messages that say which key was wrong, what was given, and what
would have been valid.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import importlib.util
import shutil
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import MISSING, OmegaConf
from omegaconf import errors as oc_errors

from vistrain.data.data_config import DataConfig
from vistrain.engine import config_sections as engine_config
from vistrain.engine.config_sections import EvalConfig, RunConfig, TrainConfig
from vistrain.engine.optim import OptimConfig
from vistrain.engine.optim import validate as validate_optim
from vistrain.errors import ConfigError
from vistrain.outpaths import check_path_length
from vistrain.registry import get_spec

__all__ = ["ConfigError", "ExperimentConfig", "load_config", "to_yaml"]


@dataclass
class ExperimentConfig:
    task: str = MISSING
    run: RunConfig = field(default_factory=RunConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def load_config(path: str | Path | None, overrides: list[str] = ()) -> ExperimentConfig:
    """Read a YAML file, apply `key=value` overrides, type-check everything, return the task's dataclass."""
    file_cfg = OmegaConf.create({})
    if path is not None:
        file_cfg = _read_yaml(Path(path))
    override_cfg = _parse_overrides(overrides)
    task = override_cfg.get("task", file_cfg.get("task"))
    if task is None:
        raise ConfigError(f"{path or 'the command line'} does not say which task to run: add `task: gan`")
    schema = OmegaConf.structured(get_spec(str(task)).config)
    merged = _merge(schema, file_cfg, source=str(path))
    given = {item.split("=", 1)[0] for item in overrides}  # optim.lr_mult={} replaces the map, optim.lr_mult.x=1 sets x
    merged = _merge(merged, override_cfg, source="the command line", replaceable=given.__contains__)
    try:
        cfg = OmegaConf.to_object(merged)
    except oc_errors.MissingMandatoryValue as e:
        raise ConfigError(f"config key {e.full_key!r} has no value: "
                          f"set it in the YAML or as {e.full_key}=...") from None
    validate(cfg)
    return cfg


def validate(cfg: ExperimentConfig) -> None:
    """Checks that the type system cannot express, each naming the full key."""
    engine_config.validate(cfg.run, cfg.train, cfg.eval)
    check_path_length(cfg.run.out_dir, "run.out_dir")
    _check_eval_executor(cfg.eval)
    if cfg.data.num_workers < 0:
        raise ConfigError(f"data.num_workers={cfg.data.num_workers}: must be >= 0 (0 loads in the training process)")
    for key, optim in _sections_of_type(cfg, OptimConfig):
        try:
            validate_optim(optim)
        except ValueError as e:  # its messages say "optim.<key>": name the section it sits in
            raise ConfigError(str(e).replace("optim.", f"{key}.", 1)) from None


def _check_eval_executor(evaluation: EvalConfig) -> None:
    """eval.mode=slurm submits eval jobs to SLURM through submitit. Without submitit the run would fail at its
    first checkpoint; without SLURM, submitit would quietly run the jobs on this machine instead. Both are known
    now, so say so now."""
    if evaluation.mode != "slurm":
        return
    if importlib.util.find_spec("submitit") is None:
        raise ConfigError("eval.mode=slurm submits eval jobs through submitit, which is not installed: "
                          "pip install 'vistrain[eval]', or set eval.mode=local to run them as local processes")
    if evaluation.slurm.cluster is None and shutil.which("srun") is None:  # how submitit looks for SLURM
        raise ConfigError("eval.mode=slurm, but this machine has no SLURM (no srun on the PATH), so submitit would "
                          "run the eval jobs here: start the run on a SLURM cluster, or set eval.mode=local (or "
                          "eval.slurm.cluster=local to run them here through submitit)")


def _sections_of_type(node: Any, kind: type, key: str = "") -> list[tuple[str, Any]]:
    """(dotted key, value) of every nested dataclass of type `kind`, e.g. every optimizer section."""
    if isinstance(node, kind):
        return [(key, node)]
    if not dataclasses.is_dataclass(node):
        return []
    found = []
    for f in dataclasses.fields(node):
        found += _sections_of_type(getattr(node, f.name), kind, f"{key}.{f.name}" if key else f.name)
    return found


def to_yaml(cfg: ExperimentConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


# ---------------------------------------------------------------------------------------------- internals


def _read_yaml(path: Path):
    if path.is_dir():
        raise ConfigError(f"config file {path} is a folder; give a YAML file such as configs/gan/digits.yaml")
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    if not path.is_file():
        raise ConfigError(f"config file {path} is not a regular file; give a YAML file such as configs/gan/digits.yaml")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    except RecursionError:
        raise ConfigError(f"config file {path} is nested too deeply to be a config") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys, not {type(data).__name__}")
    _check_expanded_size(data, path)
    return OmegaConf.create(data)


MAX_CONFIG_VALUES = 100_000  # the shipped configs hold a few hundred values; a YAML alias bomb holds billions


def _check_expanded_size(data: Any, path: Path) -> None:
    """Refuse a config whose YAML aliases (`*name` repeats the section `&name`) expand beyond MAX_CONFIG_VALUES
    values, or into a section that holds itself: expanding it would take memory without bound. The loaded data
    shares each aliased section, so its expanded size is counted once per distinct section."""
    sizes: dict[int, int] = {}
    open_sections: set[int] = set()

    def size(node: Any) -> int:
        if not isinstance(node, (dict, list)):
            return 1
        if id(node) in sizes:
            return sizes[id(node)]
        if id(node) in open_sections:
            raise ConfigError(f"config file {path}: a section holds itself through a YAML alias, so it never ends")
        open_sections.add(id(node))
        total = 1 + sum(size(child) for child in (node.values() if isinstance(node, dict) else node))
        if total > MAX_CONFIG_VALUES:
            raise ConfigError(f"config file {path} expands to more than {MAX_CONFIG_VALUES} values through its YAML "
                              "aliases (*name repeats the section &name); a config holds a few hundred: is it an "
                              "alias bomb?")
        open_sections.discard(id(node))
        sizes[id(node)] = total
        return total

    try:
        size(data)
    except RecursionError:
        raise ConfigError(f"config file {path} is nested too deeply to be a config") from None


def _parse_overrides(overrides) -> Any:
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override {item!r} is not of the form key=value (for example train.max_steps=100)")
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except Exception as e:  # grammar errors in a value, e.g. unbalanced brackets
        raise ConfigError(f"could not parse overrides {list(overrides)}: {e}") from None


def _check_sections(base, update, source: str, prefix: str = "") -> None:
    """A section given a plain value (`train=5`) gets a message of its own; OmegaConf's names no key."""
    if not OmegaConf.is_dict(update):
        return
    for key in update.keys():
        if key not in base or not OmegaConf.is_dict(base[key]):
            continue
        full = f"{prefix}{key}"
        value = update._get_node(key)._value()
        if not OmegaConf.is_dict(value) and not isinstance(value, dict) and value is not None:
            keys = ", ".join(str(k) for k in base[key].keys())
            raise ConfigError(f"config key {full!r} in {source} is a section, not a value (given {value!r}); set "
                              f"its keys instead, such as {full}.<key>=... (its keys: {keys})")
        _check_sections(base[key], update[key], source, full + ".")


def _whole_maps(base, update, prefix: str = "") -> list[str]:
    """Dotted keys of the map-typed values (``dict[str, float]``, not sections) that ``update`` gives whole.

    OmegaConf merges two mappings key by key, so ``lr_mult: {}`` in a YAML would keep every default entry of
    the task; a map given whole replaces the default instead, as its writer means.
    """
    keys = []
    for key in update.keys() if OmegaConf.is_dict(update) else ():
        if key not in base or not OmegaConf.is_dict(update[key]):
            continue
        full = f"{prefix}{key}"
        if OmegaConf.get_type(base, key) is dict:
            keys.append(full)
        elif OmegaConf.is_dict(base[key]):
            keys += _whole_maps(base[key], update[key], full + ".")
    return keys


def _merge(base, update, source: str, replaceable: Callable[[str], bool] = lambda key: True):
    """``update`` over ``base``; a map ``update`` gives whole replaces base's where ``replaceable(dotted key)``."""
    _check_sections(base, update, source)
    replaced = [key for key in _whole_maps(base, update) if replaceable(key)]
    if replaced:
        base = copy.deepcopy(base)
        for key in replaced:
            OmegaConf.update(base, key, {}, merge=False)
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
    return msg + (f"; expected {expected}" if expected else f" ({str(e).splitlines()[0]})")


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
