"""A tiny regression task for engine tests: `task: toy_task` (tests/ is on sys.path under pytest).

Small enough that a run takes well under a second, and it can be told to produce a NaN loss from a given
step on, to test non-finite skipping.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from vistrain.config import ExperimentConfig
from vistrain.engine.optim import OptimConfig, build_optimizer
from vistrain.tasks.base import EvalResult, Phase


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


@dataclass
class ToySection:
    nan_from_step: int = -1  # from this step on the loss is NaN; -1 never
    dropout: float = 0.1  # some randomness in the step, so RNG restore matters
    fail_rank: int = -1  # this rank raises at fail_at_step (distributed failure tests)
    fail_at_step: int = -1


@dataclass
class Config(ExperimentConfig):
    task: str = "toy_task"
    toy: ToySection = field(default_factory=ToySection)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-2))


class Task:
    def __init__(self, cfg: Config, env):
        self.cfg, self.env = cfg, env
        self.train_set = PairsDataset()
        self.val_set = None
        net = nn.Sequential(nn.Linear(8, 16), nn.Dropout(cfg.toy.dropout), nn.Linear(16, 1)).to(env.dist.device)
        self.nets = {"net": net}
        self.trainable = ("net",)
        self.optimizers = {"main": (build_optimizer(net, cfg.optim), cfg.optim)}
        self.phases = [Phase("main", optimizer="main", trains=("net",), loss=self.loss)]
        self.batch_multiplier = 1
        self.best_metric = None
        self.step = 0

    def loss(self, nets, batch):
        loss = (nets["net"](batch["x"]) - batch["y"]).square().mean()
        if 0 <= self.cfg.toy.nan_from_step <= self.step:
            loss = loss * float("nan")
        return loss, {"loss": loss}

    def on_step_end(self, step):
        self.step = step
        if self.env.dist.rank == self.cfg.toy.fail_rank and step == self.cfg.toy.fail_at_step:
            raise RuntimeError(f"toy failure on rank {self.env.dist.rank} at step {step}")

    def evaluate(self, step):
        return EvalResult()

    def model_config(self):
        return {"task": "toy_task"}

    def state_dict(self):
        return {"step": self.step}

    def load_state_dict(self, state):
        self.step = int(state.get("step", 0))
