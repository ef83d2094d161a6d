"""The task registry: each task declares itself in one `TaskSpec`, found here by name.

A spec says what the engine needs to train a task -- its config schema (its own sections, its data options
included), how to build it, the overrides `--smoke` applies -- and lists what a trained model of it can do
beyond training: its capabilities (tasks/capabilities.py), which the faces find with `spec.capability(Kind)`.
Built-in tasks are imported on first use; your own task is a module that registers a spec named after its
module path:

    # mylab/tasks/denoise.py
    from vistrain.registry import TaskSpec, register
    register(TaskSpec(name=__name__, config=Config, build=DenoiseTask, capabilities=(DenoiseSampler(),)))

and a config with `task: mylab.tasks.denoise`. The registry sits below the tasks and config.py (which looks a
task's schema up here) and imports only the engine's task protocol; it finds task modules by name.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional, TypeVar

from vistrain.engine.task import Task, TaskEnv
from vistrain.errors import ConfigError

# Built-in task name -> module that registers it. Imported by name on first use (a task module imports torch,
# its models and data: `vistrain --help` should not), the way a user's own task module is.
BUILTIN_TASKS = {"gan": "vistrain.tasks.gan", "vqvae": "vistrain.tasks.vqvae", "var": "vistrain.tasks.var",
                 "vlm": "vistrain.tasks.vlm"}

Capability = TypeVar("Capability")


@dataclass(frozen=True)
class TaskSpec:
    name: str
    config: type  # an ExperimentConfig subclass: the task's whole config schema
    build: Callable[[Any, TaskEnv], Task]  # (config, env) -> the task the engine runs
    smoke_overrides: tuple[str, ...] = ()  # tiny shapes, so that `--smoke` checks a config in seconds
    capabilities: tuple[Any, ...] = ()  # instances of the classes in tasks/capabilities.py

    def capability(self, kind: type[Capability]) -> Optional[Capability]:
        """The task's capability of this kind (an ImageSampler, a PromptAnswerer, ...), or None."""
        return next((c for c in self.capabilities if isinstance(c, kind)), None)


_REGISTRY: dict[str, TaskSpec] = {}


def register(spec: TaskSpec) -> TaskSpec:
    _REGISTRY[spec.name] = spec
    return spec


def get_spec(name: str) -> TaskSpec:
    """The spec of a built-in task, or of your own task module (importing it registers it)."""
    if name not in _REGISTRY:
        module = BUILTIN_TASKS.get(name, name)
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name not in (name, name.split(".")[0]):
                raise ConfigError(f"task {name!r}: importing it failed ({e})") from None
            raise ConfigError(
                f"unknown task {name!r}; built-in tasks: {', '.join(sorted(BUILTIN_TASKS))} (or the module path "
                "of your own task, such as mylab.tasks.denoise)"
            ) from None
    if name not in _REGISTRY:
        raise ConfigError(
            f"task module {name!r} registers no task named {name!r}: call "
            "vistrain.registry.register(TaskSpec(name=__name__, ...)) in it"
        )
    return _REGISTRY[name]


def make_trainer(cfg: Any, dist_ctx: Any, eval_command: Optional[Callable[..., list[str]]] = None):
    """The engine's Trainer for a loaded config: its task's spec builds the task once the engine asks.

    `eval_command(checkpoint, result_file)` is the command line of an eval job, needed with eval.mode local |
    slurm; the face that trains gives it (the `vistrain eval` command is the face's to know).
    """
    # Here rather than at the top: `vistrain sample`, `generate` and `--help` never load the trainer.
    from vistrain.engine.trainer import Trainer

    spec = get_spec(cfg.task)
    return Trainer(cfg, lambda env: spec.build(cfg, env), dist_ctx, eval_command=eval_command)


__all__ = ["BUILTIN_TASKS", "TaskSpec", "get_spec", "make_trainer", "register"]
