"""The task registry: each task declares itself in one `TaskSpec`, found here by name.

A spec carries everything the rest of vistrain needs to know about a task: its config schema (its own
sections, its data options included), how to build it for the engine, how to sample from a checkpoint of
it, the command-line options of sampling, and the overrides `--smoke` applies. Built-in tasks are imported
on first use; your own task is a module that registers a spec named after its module path:

    # mylab/tasks/denoise.py
    from vistrain.tasks import TaskSpec, register
    register(TaskSpec(name=__name__, config=Config, build=DenoiseTask))

and a config with `task: mylab.tasks.denoise`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Optional

from torch import Tensor

from vistrain.engine.task import Task, TaskEnv
from vistrain.errors import ConfigError

# Built-in task name -> module that registers it. Imported lazily so that `vistrain --help` stays fast.
BUILTIN_TASKS = {"gan": "vistrain.tasks.gan", "vqvae": "vistrain.tasks.vqvae", "var": "vistrain.tasks.var",
                 "vlm": "vistrain.tasks.vlm"}


@dataclass(frozen=True)
class SampleOption:
    """A task-specific flag of `vistrain sample` (and `vistrain eval`), e.g. VAR's `--top-k`; a bool type makes a
    switch. The task that declares a flag says which values it accepts: `valid(value)`, and `rule` in words."""

    flag: str
    type: type
    default: Any
    help: str
    valid: Optional[Callable[[Any], bool]] = None
    rule: str = ""  # e.g. "must be >= 0 (0 = off)"

    @property
    def dest(self) -> str:
        """The option's key in SampleRequest.options (argparse's dest)."""
        return self.flag.lstrip("-").replace("-", "_")

    def check(self, value: Any) -> None:
        """Refuse a value the task cannot use, naming the flag (None: not given, nothing to check)."""
        if value is not None and self.valid is not None and not self.valid(value):
            raise ConfigError(f"{self.flag} {value}: {self.rule}")


@dataclass
class SampleRequest:
    """What `vistrain sample` asks a task for: `num` images, in chunks of at most `batch_size`."""

    num: int
    labels: Optional[list[int]]
    seed: int
    batch_size: int
    options: dict[str, Any] = field(default_factory=dict)  # the task's own sample options, by dest name


# sample(model_config, weights, request, device) -> chunks of images in [-1, 1], N x C x H x W, on the CPU,
# request.num images in all
SampleFn = Callable[[dict, dict[str, Tensor], SampleRequest, Any], Iterator[Tensor]]


@dataclass(frozen=True)
class TaskSpec:
    name: str
    config: type  # an ExperimentConfig subclass: the task's whole config schema
    build: Callable[[Any, TaskEnv], Task]  # (config, env) -> the task the engine runs
    sample: Optional[SampleFn] = None
    sample_options: tuple[SampleOption, ...] = ()
    # images per row of a .png from `vistrain sample` (model_config, request) -> int; None: a square grid
    grid_columns: Optional[Callable[[dict, SampleRequest], int]] = None
    # how many images `sample` yields for a request, when the task's own options decide (VAR's
    # --num-per-class); None: request.num
    sample_count: Optional[Callable[[dict, SampleRequest], int]] = None
    # `vistrain generate` (text from images and a prompt): (model folder, image paths, prompt, max_new_tokens,
    # greedy, temperature, top_k, top_p, seed, device) -> the answer
    generate: Optional[Callable[..., str]] = None
    # `vistrain eval` of a tokenizer: (model_config, weights, first, count, batch_size, device, val_set) ->
    # chunks of (originals, reconstructions) of val images first .. first + count - 1, in [-1, 1] on the CPU
    reconstruct: Optional[Callable[..., Iterator[tuple[Tensor, Tensor]]]] = None
    # the val images `reconstruct` draws on (built once, handed to it): (model_config) -> a data set
    val_images: Optional[Callable[[dict], Any]] = None
    # the number of classes of a conditional generator (model_config) -> int; None: unconditional.
    # `vistrain eval` asks for them in turn, so its samples are class-balanced
    num_classes: Optional[Callable[[dict], int]] = None
    smoke_overrides: tuple[str, ...] = ()  # tiny shapes so `--smoke` checks a config in seconds


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
            "vistrain.tasks.register(TaskSpec(name=__name__, ...)) in it"
        )
    return _REGISTRY[name]


def make_trainer(cfg: Any, dist_ctx: Any):
    """The engine's Trainer for a loaded config: its task's spec builds the task once the engine asks."""
    from vistrain.engine.trainer import Trainer

    spec = get_spec(cfg.task)
    command = None
    if getattr(cfg, "eval", None) is not None and cfg.eval.mode != "sync":
        from vistrain.evaluate import eval_command

        command = eval_command(cfg)
    return Trainer(cfg, lambda env: spec.build(cfg, env), dist_ctx, eval_command=command)
