"""The protocol the engine runs. Tasks implement it; the engine imports no task and no data code.

A task owns networks, optimizers (declared, built by the engine once the networks are wrapped), *phases*,
evaluation and its own counters. A phase is one optimizer step on one loss: VAR and VLM have one phase; a
GAN has `d` and `g`, plus a lazy `r1` phase every few steps. For each step of a phase the engine draws
micro-batches from the phase's data with `next()` -- a micro-batch is whatever the task's collate function
builds -- and owns everything around the loss: accumulation without gradient sync until the last
micro-batch, autocast and loss scaling, normalising by the global count, clipping, the optimizer step,
schedules and skipping non-finite steps.

The loss of a micro-batch is reported as a *sum* over the task's units (images, tokens, ...) and the *count*
of those units. The engine divides by the count summed over all micro-batches of the step and all ranks, so
the gradient is that of the mean over the global batch however unevenly the units fall into micro-batches.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union

import numpy as np
import torch
from torch import Tensor, nn

from vistrain.engine.dist import DistContext
from vistrain.engine.optim import OptimConfig

Number = Union[int, float, Tensor]


@dataclass
class PhaseLoss:
    """One micro-batch's loss, as a sum over the task's units and their count.

    `metrics` are sums over the same units (the engine logs each as sum / count, weighted like the loss), or
    `(sum, count)` pairs in a unit of their own (images per packed sample, say). `samples` and `tokens`, when
    given, count this micro-batch's throughput (`samples_per_s`, `tokens_per_s`); report them in the one
    phase whose data defines the task's throughput.
    """

    loss_sum: Tensor
    count: Number
    metrics: dict[str, Union[Tensor, tuple[Number, Number]]] = field(default_factory=dict)
    samples: Optional[Number] = None
    tokens: Optional[Number] = None


# loss(networks by name, micro_batch) -> PhaseLoss. The networks a phase trains are its wrapped (DDP / FSDP)
# views; the others are plain modules.
LossFn = Callable[[Mapping[str, nn.Module], Any], PhaseLoss]


@dataclass
class Phase:
    name: str
    optimizer: str  # key into Task.optimizers; phases may share one (GAN: `d` and `r1`)
    loss: LossFn
    # Where the micro-batches come from: an iterator the engine calls next() on (`data`), or the name of an
    # earlier phase of the same step whose micro-batches this phase uses again (`same_data_as`; a GAN's
    # generator update on the discriminator's batch, as imaginaire does).
    data: Optional[Iterator[Any]] = None
    same_data_as: Optional[str] = None
    # True when `data` can run out (a streaming data set): the engine then checks every step that all ranks
    # still have data, and when one has not, every rank saves and stops together instead of hanging.
    finite_data: bool = False
    every: int = 1  # run on steps where step % every == 0 (lazy regularisation)
    repeats: int = 1  # optimizer steps of this phase per training step (a GAN's dis_step / gen_step)
    start: int = 0  # first step the phase runs at (an adversarial loss switched on later, say)

    def __post_init__(self) -> None:
        if (self.data is None) == (self.same_data_as is None):
            raise ValueError(f"phase {self.name!r}: give exactly one of `data` and `same_data_as`")
        if self.every < 1 or self.repeats < 1 or self.start < 0:
            raise ValueError(f"phase {self.name!r}: `every` and `repeats` must be at least 1, `start` >= 0")

    def runs_at(self, step: int) -> bool:
        return step >= self.start and step % self.every == 0


@dataclass
class OptimizerSpec:
    """An optimizer over one network's trainable parameters; the engine builds it after wrapping."""

    net: str
    config: OptimConfig


@dataclass
class EvalResult:
    metrics: dict[str, float] = field(default_factory=dict)
    images: dict[str, np.ndarray] = field(default_factory=dict)  # tag -> uint8 H x W x 3 grid


@dataclass
class TaskEnv:
    """What a task may know about the run it is part of."""

    dist: DistContext
    seed: int  # the run's seed (the same on every rank): seeds the data order
    max_steps: int
    batch_size: int  # global batch per optimizer step, in micro-batch items, over all ranks
    micro_batch_size: int  # items per micro-batch on this rank
    out_dir: Path
    resume_from: Optional[Path] = None  # the checkpoint this run continues from (its assets are there)


class Task:
    """Base class of every task: the attributes the engine reads, with defaults for the optional ones.

    Required: `nets`, `optimizers`, `phases` and `model_config()`. A network the task names in `trainable`
    is wrapped (DDP / FSDP, compile, activation checkpointing) and trained; the others are frozen: no wrapper,
    no gradients. A frozen network named in `external` was loaded from elsewhere (VAR's tokenizer, from its
    own run) and is neither saved in nor loaded from this run's checkpoints.
    """

    nets: dict[str, nn.Module]  # every network, by checkpoint prefix ("G", "D", "G_ema")
    trainable: tuple[str, ...] = ()
    external: tuple[str, ...] = ()
    optimizers: dict[str, OptimizerSpec]
    phases: list[Phase]
    best_metric: Optional[tuple[str, str]] = None  # (metric name, "min" | "max") that picks `best`
    # Training FLOPs per unit of throughput (6N + attention per token, say): the engine then logs `mfu`.
    flops_per_token: Optional[float] = None
    flops_per_sample: Optional[float] = None

    def on_step_end(self, step: int) -> None:
        """After all phases of a step (EMA updates, counters); `step` is the number of steps done."""

    def evaluate(self, step: int) -> EvalResult:
        """Called on every rank at train.eval_every; only rank 0's results are logged and written."""
        return EvalResult()

    def model_config(self) -> dict:
        """Enough to rebuild the networks alone (config.json in a checkpoint); includes "task"."""
        raise NotImplementedError

    def assets(self) -> dict[str, bytes]:
        """Files a checkpoint needs beside the weights to be used alone ({relative path: bytes}): a tokenizer."""
        return {}

    def state_dict(self) -> dict:
        """Counters and data positions that must survive a resume (the same on every rank)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what state_dict() returned."""


def to_device(batch: Any, device: torch.device, channels_last: bool = False) -> Any:
    """A micro-batch with every tensor moved to `device`, through dicts, lists and tuples; with `channels_last`
    (train.channels_last) its 4-D floating-point tensors -- images -- in that memory format too. A memory
    format changes no value, so a 4-D tensor that is no image costs a copy at most, never a wrong result."""
    if isinstance(batch, Tensor):
        if channels_last and batch.dim() == 4 and batch.is_floating_point():
            return batch.to(device, non_blocking=True, memory_format=torch.channels_last)
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device, channels_last) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device, channels_last) for v in batch)
    return batch


__all__ = ["EvalResult", "LossFn", "OptimizerSpec", "Phase", "PhaseLoss", "Task", "TaskEnv", "to_device"]
