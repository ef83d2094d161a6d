"""A tiny regression task for engine tests: `task: support.toy_task` (tests/ is on sys.path under pytest).

It is also the shortest complete example of the task contract: a config with its own section, networks and
an optimizer declared, one phase whose loss is a sum over samples with their count, a resumable data
stream, counters that survive a resume, and a registered spec.

Its knobs make failures happen on purpose: a NaN loss from a given step, an exception on one rank, a
SIGTERM (twice, the second during the preemption save), and uneven micro-batches.
"""

from __future__ import annotations

import itertools
import os
import signal
from dataclasses import dataclass, field

import torch
from torch import nn

from vistrain.config import ExperimentConfig
from vistrain.data.loader import MicroBatchStream
from vistrain.data.sampler import StreamOrder
from vistrain.engine.optim import OptimConfig
from vistrain.engine.task import EvalResult, OptimizerSpec, Phase, PhaseLoss, Task, TaskEnv
from vistrain.registry import TaskSpec, register
from vistrain.tasks.capabilities import ImageSampler


class PairsDataset(torch.utils.data.Dataset):
    """y = x @ w_true + noise, fixed by a seed of its own."""

    def __init__(self, n: int = 256, dim: int = 8):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, dim, generator=g)
        self.y = self.x @ torch.randn(dim, 1, generator=g) + 0.01 * torch.randn(n, 1, generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, key):
        i = key[0] if isinstance(key, tuple) else key
        return {"x": self.x[i], "y": self.y[i]}


class MLP(nn.Module):
    """Repeated blocks in `blocks`, so that FSDP, compile and activation checkpointing apply per block."""

    def __init__(self, dim: int = 8, width: int = 16, depth: int = 2, dropout: float = 0.1, unused: bool = False):
        super().__init__()
        self.inp = nn.Linear(dim, width)
        if unused:  # trainable, but never in the forward: it never gets a gradient, nor optimizer state
            self.unused = nn.Linear(width, width)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(width, width), nn.Tanh(), nn.Dropout(dropout))
                                    for _ in range(depth))
        self.out = nn.Linear(width, 1)

    def forward(self, x):
        h = self.inp(x)
        for block in self.blocks:
            h = h + block(h)
        return self.out(h)


@dataclass
class ToySection:
    nan_from_step: int = -1  # from this step on the loss value is NaN (its gradients stay finite); -1 never
    nan_rank: int = -1  # only this rank's loss is NaN (-1: every rank)
    dropout: float = 0.1  # some randomness in the step, so RNG restore matters
    width: int = 16  # the architecture: changing it makes older checkpoints mismatch
    fail_rank: int = -1  # this rank raises at fail_at_step (distributed failure tests)
    fail_at_step: int = -1
    sigterm_at_step: int = -1  # rank 0 sends itself SIGTERM after this step, and again while it saves
    # Uneven micro-batches: rank r keeps the first keep[r * k + i] samples of its i-th micro-batch of a step,
    # with k = len(keep) / world size micro-batches per step. Empty: keep every sample.
    keep: list[int] = field(default_factory=list)
    teacher: bool = False  # a frozen network loaded from elsewhere (`external`): not in the checkpoints
    data_ends: list[int] = field(default_factory=list)  # rank r's data runs out after data_ends[r] micro-batches
    flops_per_token: float = 0.0  # > 0: report tokens (4 per sample) and these FLOPs per token, for `mfu`
    unused_param: bool = False  # a trainable layer the forward never uses
    score: bool = False  # evaluate reports `score` = 1 / step, which picks `best` (lower is better)
    eval_fails_at_step: int = -1  # evaluate raises at this step


@dataclass
class Config(ExperimentConfig):
    task: str = __name__
    toy: ToySection = field(default_factory=ToySection)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-2))


class ToyTask(Task):
    def __init__(self, cfg: Config, env: TaskEnv):
        self.cfg, self.env = cfg, env
        self.train_set = PairsDataset()
        self.nets = {"net": MLP(width=cfg.toy.width, dropout=cfg.toy.dropout,
                                unused=cfg.toy.unused_param).to(env.dist.device)}
        self.trainable = ("net",)
        if cfg.toy.teacher:  # as if loaded from its own run: fixed weights, whatever the run's seed
            teacher = nn.Linear(8, 1).requires_grad_(False)
            nn.init.constant_(teacher.weight, 0.5)
            self.nets["teacher"] = teacher.to(env.dist.device)
            self.external = ("teacher",)
        self.flops_per_token = cfg.toy.flops_per_token or None
        self.optimizers = {"main": OptimizerSpec("net", cfg.optim)}
        self.data = MicroBatchStream(self.train_set, StreamOrder(len(self.train_set), env.seed),
                                     env.micro_batch_size, env.dist.rank, env.dist.world_size,
                                     cfg.data.num_workers)
        ends = cfg.toy.data_ends
        data = itertools.islice(self.data, ends[env.dist.rank]) if ends else self.data
        self.phases = [Phase("main", optimizer="main", loss=self.loss, data=data, finite_data=bool(ends))]
        self.best_metric = ("score", "min") if cfg.toy.score else None
        self.step = 0
        self.calls = 0  # loss calls so far: which micro-batch of the step this is

    def loss(self, nets, batch) -> PhaseLoss:
        x, y = batch["x"], batch["y"]
        keep = self.cfg.toy.keep
        if keep:
            per_rank = len(keep) // self.env.dist.world_size
            n = keep[self.env.dist.rank * per_rank + self.calls % per_rank]
            x, y = x[:n], y[:n]
        self.calls += 1
        if self.cfg.toy.teacher:
            y = y + nets["teacher"](x)
        loss_sum = (nets["net"](x) - y).square().sum()
        bad_rank = self.cfg.toy.nan_rank in (-1, self.env.dist.rank)
        if 0 <= self.cfg.toy.nan_from_step <= self.step and bad_rank:
            loss_sum = loss_sum + float("nan")
        tokens = 4 * len(x) if self.cfg.toy.flops_per_token else None
        return PhaseLoss(loss_sum, count=len(x), metrics={"loss": loss_sum}, samples=len(x), tokens=tokens)

    def on_step_end(self, step):
        self.step = step
        rank = self.env.dist.rank
        if rank == self.cfg.toy.fail_rank and step == self.cfg.toy.fail_at_step:
            raise RuntimeError(f"toy failure on rank {rank} at step {step}")
        if rank == 0 and step == self.cfg.toy.sigterm_at_step:
            os.kill(os.getpid(), signal.SIGTERM)

    def evaluate(self, step):
        if step == self.cfg.toy.eval_fails_at_step:
            raise RuntimeError(f"toy eval failure at step {step}")
        return EvalResult(metrics={"score": 1.0 / step} if self.cfg.toy.score else {})

    def model_config(self):
        return {"task": __name__, "width": self.cfg.toy.width, "unused_param": self.cfg.toy.unused_param}

    def state_dict(self):
        if self.env.dist.rank == 0 and self.step == self.cfg.toy.sigterm_at_step:
            os.kill(os.getpid(), signal.SIGTERM)  # a second signal while the preemption checkpoint is written
        return {"step": self.step, "data": self.data.state_dict()}

    def load_state_dict(self, state):
        self.step = int(state["step"])
        self.data.load_state_dict(state["data"])


class ToySampler(ImageSampler):
    """What a trained toy net can draw: 8 x 8 grey images whose pixels are its outputs on random inputs. Enough
    for `vistrain sample` and `vistrain eval` to treat the toy task like any generator."""

    def sample(self, model_config, weights, request, device):
        net = MLP(width=model_config["width"], unused=model_config.get("unused_param", False))
        net.load_state_dict({k[len("net."):]: v for k, v in weights.items() if k.startswith("net.")})
        net.eval()
        g = torch.Generator().manual_seed(request.seed)
        with torch.no_grad():
            for start in range(0, request.num, request.batch_size):
                n = min(request.batch_size, request.num - start)
                pixels = torch.tanh(net(torch.randn(n * 64, 8, generator=g)))
                yield pixels.view(n, 1, 8, 8).expand(n, 3, 8, 8)


register(TaskSpec(name=__name__, config=Config, build=ToyTask, capabilities=(ToySampler(),)))
