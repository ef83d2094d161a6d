"""The engine's own config sections, `run.*`, `train.*` and `eval.*`, and the one list of each set of choices.

Tasks add their sections (model, data, optim, ...) by extending the experiment config in vistrain/config.py (the
whole schema and its YAML loader; the `data` section's shared keys are data/data_config.py); the engine reads
only these.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional, Union

from vistrain.engine.loggers import LOGGERS
from vistrain.engine.precision import DTYPES
from vistrain.errors import ConfigError

PRECISIONS = tuple(DTYPES)
PARALLEL_MODES = ("ddp", "fsdp")
COMPILE_MODES = (False, "model", "blocks")
DEVICES = ("auto", "cpu", "cuda")


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
    parallel: str = "ddp"  # ddp | fsdp (FSDP2: parameters, gradients and optimizer state sharded)
    compile: Union[bool, str] = False  # false | model | blocks (torch.compile each repeated block)
    activation_checkpointing: bool = False  # recompute each block's activations in the backward
    # trainable networks' 4-D weights and the batches' 4-D float tensors (images) in channels_last: convolutions
    # run NHWC (cuDNN's tensor-core layout), with no transposes around each; values are the same to rounding
    channels_last: bool = False
    async_checkpoint: bool = False  # write checkpoints in the background; training goes on meanwhile
    peak_tflops: float = 0.0  # the device's peak for `mfu`; 0 = from a table of common GPUs
    log_every: int = 50
    eval_every: int = 500
    ckpt_every: int = 500
    keep_last: int = 3  # step checkpoints to keep (the best one is kept as well); 0 keeps all
    max_nonfinite_steps: int = 5  # stop after this many skipped (non-finite) steps in a row
    profile: bool = False  # record a torch.profiler trace of steps [profile_start, profile_start+profile_steps)
    profile_start: int = 5
    profile_steps: int = 5


EVAL_MODES = ("sync", "local", "slurm")


@dataclass
class SlurmEvalConfig:
    """Where `eval.mode=slurm` submits its jobs (through submitit)."""

    partition: Optional[str] = None
    account: Optional[str] = None
    time_min: int = 60
    gpus: int = 1
    cpus: int = 8
    mem_gb: int = 32
    cluster: Optional[str] = None  # submitit's cluster: none finds SLURM; "local" runs the jobs here (tests)


@dataclass
class EvalConfig:
    """Metrics of generated samples (`vistrain eval`), in the loop or as jobs beside training."""

    metrics: list[str] = field(default_factory=list)  # e.g. [fid, kid, is, pr] or [judge]; empty: none
    lmms_tasks: list[str] = field(default_factory=list)  # VLMs: lmms-eval benchmarks, e.g. [mmstar, mmmu_val]
    num_samples: int = 10000
    batch_size: int = 250
    ref: Optional[str] = None  # reference images: a folder, or a stats .npz (mu, sigma, count[, features])
    detector: Optional[str] = None  # the FID Inception TorchScript file; none: downloaded when online
    mode: str = "sync"  # sync: at train.eval_every, in the loop | local: a process per checkpoint | slurm
    device: str = "auto"  # the device of local jobs (the training's GPU stays the training's)
    max_jobs: int = 1  # eval jobs running at once; later checkpoints wait their turn
    slurm: SlurmEvalConfig = field(default_factory=SlurmEvalConfig)
    best: Optional[str] = None  # the metric that picks `best` (e.g. fid); none: the task's own choice
    best_mode: str = "min"  # min | max
    wait_at_end: bool = True  # a run that reaches max_steps waits for its eval jobs (false: leaves them running)


def _choice(key: str, value, choices) -> None:
    if value not in choices:
        shown = ", ".join("false" if c is False else str(c) for c in choices)
        raise ConfigError(f"{key}={value!r}: expected one of {shown}")


def validate(run: RunConfig, train: TrainConfig, evaluation: Optional[EvalConfig] = None) -> None:
    """Checks of the engine's keys that the type system cannot express; messages name the full key."""
    if not (isinstance(run.seed, int) or run.seed == "random"):
        raise ConfigError(f"run.seed={run.seed!r}: expected an integer or 'random'")
    if isinstance(run.seed, int) and not 0 <= run.seed < 2**32:
        raise ConfigError(f"run.seed={run.seed}: expected an integer in [0, 2**32)")
    _choice("run.device", run.device, DEVICES)
    for name in run.loggers:
        _choice("run.loggers", name, LOGGERS)
    if run.dist_timeout_s < 1:
        raise ConfigError(f"run.dist_timeout_s={run.dist_timeout_s}: must be at least 1 second")
    _choice("train.precision", train.precision, PRECISIONS)
    _choice("train.parallel", train.parallel, PARALLEL_MODES)
    _choice("train.compile", train.compile, COMPILE_MODES)
    for key in ("max_steps", "batch_size", "log_every", "eval_every", "ckpt_every", "max_nonfinite_steps",
                "profile_steps"):
        if getattr(train, key) < 1:
            raise ConfigError(f"train.{key}={getattr(train, key)}: must be at least 1")
    for key in ("micro_batch_size", "keep_last", "grad_clip", "peak_tflops", "profile_start"):
        if getattr(train, key) < 0:
            raise ConfigError(f"train.{key}={getattr(train, key)}: must be >= 0 (0 = {_ZERO_MEANS[key]})")
    if evaluation is not None:
        _choice("eval.mode", evaluation.mode, EVAL_MODES)
        _choice("eval.best_mode", evaluation.best_mode, ("min", "max"))
        if evaluation.device not in DEVICES and not re.fullmatch(r"cuda:\d+", evaluation.device):
            raise ConfigError(f"eval.device={evaluation.device!r}: expected auto, cpu, cuda or cuda:N")
        for key in ("num_samples", "batch_size", "max_jobs"):
            if getattr(evaluation, key) < 1:
                raise ConfigError(f"eval.{key}={getattr(evaluation, key)}: must be at least 1")
        if evaluation.mode != "sync" and not (evaluation.metrics or evaluation.lmms_tasks):
            raise ConfigError(f"eval.mode={evaluation.mode} runs eval jobs for eval.metrics (or eval.lmms_tasks), "
                              "which are empty")
    if train.parallel == "fsdp" and train.precision == "fp16":
        raise ConfigError(
            "train.precision=fp16 with train.parallel=fsdp: loss scaling over sharded gradients is not "
            "supported; use train.precision=bf16 (no loss scaling needed) or train.parallel=ddp"
        )


_ZERO_MEANS = {
    "micro_batch_size": "no accumulation", "keep_last": "keep all", "grad_clip": "no clipping",
    "peak_tflops": "look the device up", "profile_start": "the first step",
}


def gradient_accumulation(batch_size: int, micro_batch_size: int, world_size: int) -> int:
    """Micro-batches per rank per optimizer step; refuses a global batch that does not split evenly."""
    micro = micro_batch_size or batch_size // world_size
    if micro < 1 or batch_size % (micro * world_size):
        raise ConfigError(
            f"train.batch_size={batch_size} is not a whole multiple of train.micro_batch_size={micro}"
            f" x world size {world_size}: choose values so that batch_size = micro_batch_size x world_size x k"
        )
    return batch_size // (micro * world_size)
