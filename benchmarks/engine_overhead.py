"""How much time does the engine add to a training step? Prints a table.

The same CNN classifier, the same digits batches from the same stream, the same AdamW: once in a bare
PyTorch loop (zero_grad, forward, backward, step) and once through `vistrain.engine.Trainer` (schedules,
metrics, count normalisation, grad-norm, the shared non-finite check, phases). Rounds alternate between the
two so that machine noise hits both alike; the table reports the median step time of each and their ratio.

    python benchmarks/engine_overhead.py [--steps 150] [--rounds 3] [--batch 64] [--width 64]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from vistrain.config import ExperimentConfig, load_config
from vistrain.data.data_config import ImageDataConfig
from vistrain.data.loader import MicroBatchStream, build_image_dataset
from vistrain.data.sampler import StreamOrder
from vistrain.engine.dist import DistContext
from vistrain.engine.optim import OptimConfig
from vistrain.engine.task import OptimizerSpec, Phase, PhaseLoss, Task
from vistrain.registry import TaskSpec, make_trainer, register

WARMUP_STEPS = 10


def make_model(width: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        nn.Flatten(), nn.Linear(2 * width, 10),
    )


@dataclass
class BenchSection:
    width: int = 64


@dataclass
class Config(ExperimentConfig):
    task: str = "bench_classifier"
    data: ImageDataConfig = field(default_factory=ImageDataConfig)
    bench: BenchSection = field(default_factory=BenchSection)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3, weight_decay=0.0))


def digits_stream(cfg: Config, batch: int) -> MicroBatchStream:
    dataset = build_image_dataset(cfg.data, "train")
    return MicroBatchStream(dataset, StreamOrder(len(dataset), seed=0), batch, 0, 1, num_workers=0)


class Classifier(Task):
    """The classifier as a vistrain task; it records the wall clock at the end of every step."""

    def __init__(self, cfg: Config, env):
        self.nets, self.trainable = {"net": make_model(cfg.bench.width)}, ("net",)
        self.optimizers = {"main": OptimizerSpec("net", cfg.optim)}
        self.phases = [Phase("main", optimizer="main", loss=self.loss, data=digits_stream(cfg, env.batch_size))]
        self.stamps: list[float] = []

    def loss(self, nets, batch):
        B = len(batch["label"])
        loss_sum = F.cross_entropy(nets["net"](batch["image"]), batch["label"], reduction="sum")
        return PhaseLoss(loss_sum, count=B, metrics={"loss": loss_sum}, samples=B)

    def on_step_end(self, step):
        self.stamps.append(time.perf_counter())

    def model_config(self):
        return {"task": "bench_classifier"}


register(TaskSpec(name="bench_classifier", config=Config, build=Classifier))


def overrides(out_dir: str, steps: int, batch: int, width: int) -> list[str]:
    return [f"run.out_dir={out_dir}", "run.loggers=[]", "run.resume=never", f"train.max_steps={steps}",
            f"train.batch_size={batch}", f"train.log_every={steps}", f"train.eval_every={steps}",
            f"train.ckpt_every={steps}", "data.num_workers=0", "data.channels=1", "data.resolution=32",
            f"bench.width={width}"]


def step_times(stamps: list[float]) -> list[float]:
    return [b - a for a, b in zip(stamps[WARMUP_STEPS:], stamps[WARMUP_STEPS + 1:])]


def run_engine(steps: int, batch: int, width: int) -> list[float]:
    with tempfile.TemporaryDirectory() as out_dir:
        cfg = load_config(None, ["task=bench_classifier"] + overrides(out_dir, steps, batch, width))
        trainer = make_trainer(cfg, DistContext(0, 1, 0, torch.device("cpu")))
        trainer.fit()
        return step_times(trainer.task.stamps)


def run_bare(steps: int, batch: int, width: int) -> list[float]:
    cfg = load_config(None, ["task=bench_classifier"] + overrides("unused", steps, batch, width))
    torch.manual_seed(0)
    net = make_model(width)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0.0)
    loader = digits_stream(cfg, batch)
    stamps = []
    for _ in range(steps):
        b = next(loader)
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(net(b["image"]), b["label"]).backward()
        opt.step()
        stamps.append(time.perf_counter())
    return step_times(stamps)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--width", type=int, default=64)
    args = parser.parse_args()
    bare, engine = [], []
    for _ in range(args.rounds):
        bare += run_bare(args.steps, args.batch, args.width)
        engine += run_engine(args.steps, args.batch, args.width)
    b, e = statistics.median(bare), statistics.median(engine)
    print(f"\nengine overhead: CNN width {args.width}, batch {args.batch}, digits 32x32, "
          f"{args.rounds} alternating rounds x {args.steps} steps, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads\n")
    print("| loop   | median step (ms) | mean step (ms) | steps/s |")
    print("|--------|------------------|----------------|---------|")
    for name, times in (("bare", bare), ("engine", engine)):
        med = statistics.median(times)
        print(f"| {name:<6} | {1e3 * med:16.2f} | {1e3 * statistics.fmean(times):14.2f} | {1 / med:7.1f} |")
    print(f"\nengine / bare (median step time): {e / b:.3f}  ({100 * (e / b - 1):+.1f}%)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
