"""`vistrain eval SOURCE`: the metrics of one checkpoint, printed and written as JSON.

What is scored follows the checkpoint's task:

    gan, var   class-balanced samples (image i asks for class i mod C), each rank generating its share:
               fid, kid, is, pr (the FID Inception or --detector, against --ref) and judge (the digits judge)
    vqvae      reconstructions of the val split: rfid, psnr, ssim
    vlm        lmms-eval benchmarks (--lmms-tasks mmstar,mmmu_val,...)

`eval_command` is the same command as a job: what eval.mode local | slurm runs for each checkpoint.

The result file: {"checkpoint", "step", "task", "metrics": {name: value}, "num_images", "seconds", "settings"},
written atomically by rank 0 once everything is computed, so a file that exists is complete.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from vistrain.engine import checkpoint as ckpt_lib
from vistrain.engine.dist import DistContext
from vistrain.engine.rundir import write_text_atomic
from vistrain.errors import ConfigError
from vistrain.eval.score import ImageScorer, balanced_share, check_judge_data
from vistrain.tasks import SampleRequest, TaskSpec, get_spec


@dataclass
class EvalRequest:
    metrics: list[str]
    num: int = 10000  # images (samples, or reconstructions: at most the val split)
    batch_size: int = 250
    seed: int = 0
    ref: Optional[str] = None
    detector: Optional[str] = None
    lmms_tasks: list[str] = field(default_factory=list)
    lmms_limit: Optional[float] = None  # lmms-eval's --limit: a smoke test, not the benchmark
    options: dict[str, Any] = field(default_factory=dict)  # the task's sample options (VAR's cfg, top_k, ...)


def evaluate(ckpt: Path, request: EvalRequest, ctx: DistContext) -> dict:
    """Score checkpoint `ckpt` (every rank calls this); every rank returns the same record."""
    model_config = ckpt_lib.load_model_config(ckpt)
    spec = get_spec(str(model_config.get("task")))
    start = time.perf_counter()
    if request.lmms_tasks:
        metrics, count = _lmms(ckpt, spec, request, ctx), None
    elif spec.reconstruct is not None:
        metrics, count = _reconstructions(ckpt, model_config, spec, request, ctx)
    elif spec.sample is not None:
        metrics, count = _samples(ckpt, model_config, spec, request, ctx)
    else:
        raise ConfigError(f"task {spec.name!r} of {ckpt} has nothing `vistrain eval` can score")
    settings = {k: v for k, v in asdict(request).items() if v not in (None, [], {})}
    return {"checkpoint": str(ckpt), "step": ckpt_lib.checkpoint_step(ckpt), "task": spec.name, "metrics": metrics,
            "num_images": count, "seconds": round(time.perf_counter() - start, 2), "settings": settings}


def _share(total: int, ctx: DistContext) -> tuple[int, int]:
    """This rank's contiguous slice [first, first + count) of `total` val images (no collective generates them,
    so shares may differ by one)."""
    first = total * ctx.rank // ctx.world_size
    return first, total * (ctx.rank + 1) // ctx.world_size - first


def _progress(chunks: Iterator, total: int, ctx: DistContext, what: str, size=len) -> Iterator:
    from tqdm import tqdm

    with tqdm(total=total, unit="img", desc=what, file=sys.stderr, disable=None if ctx.is_main else True) as bar:
        for chunk in chunks:
            bar.update(size(chunk))
            yield chunk


def _samples(ckpt: Path, model_config: dict, spec: TaskSpec, request: EvalRequest, ctx: DistContext):
    # Everything that can fail fast (what was asked, detector, reference statistics, judge) is checked and loaded
    # before the first sample.
    data_name = trained_on(ckpt, model_config)
    check_judge_data(request.metrics, data_name, "--metrics",
                     f"{ckpt} was trained on data.name={data_name}" if data_name else
                     f"{ckpt} does not record which data it was trained on (no run config.yaml beside it)")
    if request.options.get("num_per_class") is not None:
        raise ConfigError("--num-per-class is for vistrain sample: vistrain eval balances the classes of "
                          "--num-images itself")
    scorer = ImageScorer(request.metrics, ref=request.ref, detector=request.detector, device=ctx.device,
                         batch_size=request.batch_size, dist_ctx=ctx)
    scorer.check_num_images(request.num, "--num-images")
    classes = spec.num_classes(model_config) if spec.num_classes is not None else 0
    share = balanced_share(request.num, classes, ctx)
    labels, count = (share if classes else None), len(share)
    # the rank's own noise: its share is disjoint from every other rank's
    sample_request = SampleRequest(count, labels.tolist() if classes else None, request.seed * 1009 + ctx.rank,
                                   request.batch_size, request.options)
    weights = ckpt_lib.load_weights(ckpt)

    def with_labels() -> Iterator:
        done = 0
        for images in spec.sample(model_config, weights, sample_request, ctx.device):
            yield images, (labels[done:done + len(images)] if labels is not None else None)
            done += len(images)

    chunks = _progress(with_labels(), count, ctx, "sampling", size=lambda chunk: len(chunk[0]))
    return scorer.score_samples(chunks), count * ctx.world_size


def _reconstructions(ckpt: Path, model_config: dict, spec: TaskSpec, request: EvalRequest, ctx: DistContext):
    scorer = ImageScorer(request.metrics, detector=request.detector, device=ctx.device,
                         batch_size=request.batch_size, dist_ctx=ctx, reconstructions=True)
    val_set = spec.val_images(model_config)
    total = min(request.num, len(val_set))
    first, count = _share(total, ctx)
    pairs = spec.reconstruct(model_config, ckpt_lib.load_weights(ckpt), first, count, request.batch_size, ctx.device,
                             val_set)
    return scorer.score_reconstructions(_progress(pairs, count, ctx, "reconstructing", size=lambda p: len(p[0]))), total


def _lmms(ckpt: Path, spec: TaskSpec, request: EvalRequest, ctx: DistContext) -> dict:
    if spec.name != "vlm":
        raise ConfigError(f"--lmms-tasks: lmms-eval benchmarks are for vision-language models, not task {spec.name!r}")
    if ctx.world_size > 1:
        raise ConfigError("--lmms-tasks runs in one process: start it without torchrun")
    from vistrain.lmms import run_lmms_eval

    record = run_lmms_eval(ckpt, request.lmms_tasks, None, batch_size=1, device=str(ctx.device),
                           limit=request.lmms_limit)
    return record["metrics"]


def trained_on(ckpt: Path, model_config: dict) -> Optional[str]:
    """The data.name a checkpoint was trained on: from its config.json when that says (tokenizers record their
    data), else from the config.yaml of the run it belongs to; None when neither tells."""
    data = model_config.get("data")
    if isinstance(data, dict) and data.get("name"):
        return str(data["name"])
    run_config = ckpt.parent.parent / "config.yaml"
    if ckpt.parent.name != "checkpoints" or not run_config.is_file():
        return None
    try:
        data = (yaml.safe_load(run_config.read_text()) or {}).get("data") or {}
    except (OSError, yaml.YAMLError, AttributeError):  # AttributeError: not a mapping; then it does not tell
        return None
    return str(data["name"]) if isinstance(data, dict) and data.get("name") else None


def write_result(path: Path, record: dict) -> None:
    """Atomically: an eval job's result file exists only complete (the trainer reads it when it appears)."""
    write_text_atomic(path, json.dumps(record, indent=2) + "\n")


def default_result_path(ckpt: Path) -> Path:
    """<run>/eval/step_N.json for a checkpoint of a run; beside the folder otherwise."""
    step = ckpt_lib.checkpoint_step(ckpt)
    if step is not None and ckpt.parent.name == "checkpoints":
        return ckpt.parent.parent / "eval" / f"{ckpt.name}.json"
    return ckpt.parent / f"{ckpt.name}.eval.json"


def eval_command(cfg: Any):
    """The command of an eval job (eval.mode local | slurm): `vistrain eval CKPT --out RESULT` with the run's
    eval settings, in this Python."""
    ev = cfg.eval

    def command(checkpoint: Path, result: Path) -> list[str]:
        argv = [sys.executable, "-m", "vistrain", "eval", str(checkpoint), "--out", str(result),
                "--num-images", str(ev.num_samples), "--batch-size", str(ev.batch_size), "--device", ev.device]
        if ev.metrics:
            argv += ["--metrics", ",".join(ev.metrics)]
        if ev.lmms_tasks:
            argv += ["--lmms-tasks", ",".join(ev.lmms_tasks)]
        if ev.ref:
            argv += ["--ref", str(ev.ref)]
        if ev.detector:
            argv += ["--detector", str(ev.detector)]
        return argv

    return command
