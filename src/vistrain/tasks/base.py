"""What the engine needs from a task: networks, optimizers, phases, evaluation. Nothing more.

A *phase* is one optimizer step on one loss. VAR and VLM have one phase; a GAN has `d` and `g`, plus a lazy
`r1` phase every few steps. The engine owns everything around the loss: accumulation, DDP gradient sync,
autocast and loss scaling, clipping, the optimizer step, schedules and non-finite skipping.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Protocol

import numpy as np
import torch
from torch import Tensor, nn

from vistrain.engine.dist import DistContext
from vistrain.engine.optim import OptimConfig

Batch = dict[str, Tensor]
# loss(nets, micro_batch) -> (scalar loss to back-propagate, metrics to log as detached tensors)
LossFn = Callable[[Mapping[str, nn.Module], Batch], tuple[Tensor, dict[str, Tensor]]]


@dataclass
class Phase:
    name: str
    optimizer: str  # key into Task.optimizers; phases may share one (GAN: `d` and `r1`)
    trains: tuple[str, ...]  # networks whose gradients this phase computes, syncs and steps
    loss: LossFn
    every: int = 1  # run on steps where step % every == 0 (lazy regularisation)
    repeats: int = 1  # updates per iteration, each on its own slice of the loader batch (dis_step / gen_step)


@dataclass
class EvalResult:
    metrics: dict[str, float] = field(default_factory=dict)
    images: dict[str, np.ndarray] = field(default_factory=dict)  # tag -> uint8 H x W x 3 grid


@dataclass
class TaskEnv:
    """What a task may know about the run it is part of."""

    dist: DistContext
    max_steps: int
    batch_size: int  # global batch per optimizer step
    out_dir: Any  # pathlib.Path


class Task(Protocol):
    nets: dict[str, nn.Module]  # every network, by checkpoint prefix ("G", "D", "G_ema")
    trainable: tuple[str, ...]  # the ones the engine wraps in DDP / compiles
    optimizers: dict[str, tuple[torch.optim.Optimizer, OptimConfig]]
    phases: list[Phase]
    train_set: torch.utils.data.Dataset
    val_set: Optional[torch.utils.data.Dataset]
    batch_multiplier: int  # loader batch = per-rank batch x this; phases with repeats slice it
    best_metric: Optional[tuple[str, str]]  # (metric name, "min" | "max") used to keep the best checkpoint

    def on_step_end(self, step: int) -> None:
        """After all phases of an iteration (EMA updates, counters)."""

    def evaluate(self, step: int) -> EvalResult:
        """Called on every rank at train.eval_every; only rank 0's images are written."""

    def model_config(self) -> dict:
        """Enough to rebuild the networks alone (config.json in a checkpoint)."""

    def state_dict(self) -> dict:
        """Task counters that must survive a resume (e.g. images seen)."""

    def load_state_dict(self, state: dict) -> None: ...
