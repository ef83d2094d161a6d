"""`vistrain eval SOURCE`: the metrics of one checkpoint, printed and written as JSON.

What is scored follows what the checkpoint's task can do (tasks/capabilities.py):

    ImageSampler    (gan, var) class-balanced samples (image i asks for class i mod C), each rank generating its
                    share: fid, kid, is, pr (the FID Inception or --detector, against --ref), judge (the digits judge)
    Reconstructor   (vqvae) reconstructions of the val split: rfid, psnr, ssim
    --lmms-tasks    (vlm) lmms-eval benchmarks, e.g. mmstar,mmmu_val (lmms.py)

`eval_command` is the same command as a job: what eval.mode local | slurm runs for each checkpoint.

The result file: {"checkpoint", "step", "task", "metrics": {name: value}, "num_images", "seconds", "settings"},
written atomically by rank 0 once everything is computed, so a file that exists is complete.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from vistrain.cli.common import (
    add_source,
    add_task_options,
    comma_list,
    fail,
    find_source,
    source_message,
    task_options,
)

NAME = "eval"


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


def add_parser(sub) -> argparse.ArgumentParser:
    parser = sub.add_parser(NAME, help="score a checkpoint: FID/KID/IS/PR, the digits judge, rFID/PSNR/SSIM, "
                                       "lmms-eval benchmarks; writes JSON")
    add_source(parser)
    parser.add_argument("--metrics", default="",
                        help="comma-separated; samples (gan, var): fid,kid,is,pr,judge; tokenizers (vqvae): "
                             "rfid,psnr,ssim")
    parser.add_argument("--ref", default=None, help="real images for fid/kid/pr: a folder, or a statistics .npz "
                                                    "(mu, sigma, count[, features]); folder statistics are cached")
    # not `--num` alone: under torchrun that prefix is ambiguous with torchrun's own --numa-binding
    parser.add_argument("--num-images", "--num", dest="num", type=int, default=10000,
                        help="images to generate (or reconstruct: at most the val split)")
    parser.add_argument("--batch-size", type=int, default=250, help="images per forward pass")
    parser.add_argument("--detector", default=None,
                        help="the FID Inception TorchScript file (inception-2015-12-05.pt); default: the torch hub "
                             "cache, downloaded when online")
    parser.add_argument("--lmms-tasks", default="", help="vlm: lmms-eval tasks, e.g. mmstar,mmmu_val")
    parser.add_argument("--lmms-limit", type=float, default=None,
                        help="vlm: lmms-eval's --limit (a count, or a fraction below 1): a smoke test only")
    parser.add_argument("--out", default=None, help="the result JSON; default <run>/eval/step_N.json")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    return parser


def run(parser: argparse.ArgumentParser, argv: list[str]) -> int:
    # imported here: CLI start-up (see cli/__init__.py)
    import dataclasses

    import torch

    from vistrain.engine import checkpoint_files as ckpt_lib
    from vistrain.engine.dist import init_distributed, shutdown
    from vistrain.errors import ConfigError
    from vistrain.outpaths import check_output_file
    from vistrain.tasks.capabilities import ImageSampler

    args, _ = parser.parse_known_args(argv)  # the task's own flags are not known yet
    try:
        ckpt, _, spec = find_source(args.source, args.which)
    except (ckpt_lib.CheckpointError, ConfigError) as e:
        return fail(source_message(e, args), 1)
    sampler = spec.capability(ImageSampler)
    options = sampler.options if sampler is not None else ()
    add_task_options(parser, options)
    args = parser.parse_args(argv)
    try:
        request = EvalRequest(comma_list(args.metrics), args.num, args.batch_size, args.seed, args.ref, args.detector,
                              comma_list(args.lmms_tasks), args.lmms_limit, task_options(args, options))
        if not (request.metrics or request.lmms_tasks):
            raise ConfigError("nothing to score: give --metrics (e.g. fid,kid,is,pr or judge) or --lmms-tasks")
        if args.num < 1 or args.batch_size < 1:
            raise ConfigError(f"--num-images {args.num} and --batch-size {args.batch_size}: both must be at least 1")
        # the result's place is checked before any work: a score must never be lost to a bad --out
        out = check_output_file(args.out or default_result_path(ckpt), "--out")
    except ConfigError as e:
        return fail(str(e), 2)
    try:
        ctx = init_distributed(args.device.split(":")[0])
        if ":" in args.device:  # one process on a chosen GPU (an eval job beside training)
            ctx = dataclasses.replace(ctx, device=torch.device(args.device))
    except (ConfigError, RuntimeError) as e:
        return fail(f"--device {args.device}: {e}", 2)
    clean = False
    try:
        record = evaluate(ckpt, request, ctx)
        clean = True
    except ConfigError as e:
        return fail(str(e), 2)
    except (ckpt_lib.CheckpointError, ValueError, ImportError) as e:
        return fail(str(e), 1)
    finally:
        shutdown(ctx, clean)
    if ctx.is_main:
        shown = " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record["metrics"].items())
        print(f"{ckpt} ({record['seconds']:.0f} s): {shown}", flush=True)  # first: a failed write loses no score
        try:
            write_result(out, record)
        except OSError as e:
            return fail(f"--out {out}: the result could not be written ({e}); the scores are printed above", 1)
        print(f"wrote {out}", flush=True)
    return 0


def evaluate(ckpt: Path, request: EvalRequest, ctx) -> dict:
    """Score checkpoint `ckpt` (every rank calls this); every rank returns the same record."""
    # imported here: CLI start-up (see cli/__init__.py)
    from vistrain.engine import checkpoint_files as ckpt_lib
    from vistrain.errors import ConfigError
    from vistrain.registry import get_spec
    from vistrain.tasks.capabilities import ImageSampler, Reconstructor

    model_config = ckpt_lib.load_model_config(ckpt)
    spec = get_spec(str(model_config.get("task")))
    start = time.perf_counter()
    if request.lmms_tasks:
        metrics, count = _lmms(ckpt, spec, request, ctx), None
    elif spec.capability(Reconstructor) is not None:
        metrics, count = _reconstructions(ckpt, model_config, spec.capability(Reconstructor), request, ctx)
    elif spec.capability(ImageSampler) is not None:
        metrics, count = _samples(ckpt, model_config, spec.capability(ImageSampler), request, ctx)
    else:
        raise ConfigError(f"task {spec.name!r} of {ckpt} has nothing `vistrain eval` can score")
    settings = {k: v for k, v in asdict(request).items() if v not in (None, [], {})}
    return {"checkpoint": str(ckpt), "step": ckpt_lib.checkpoint_step(ckpt), "task": spec.name, "metrics": metrics,
            "num_images": count, "seconds": round(time.perf_counter() - start, 2), "settings": settings}


def _share(total: int, ctx) -> tuple[int, int]:
    """This rank's contiguous slice [first, first + count) of `total` val images (no collective generates them,
    so shares may differ by one)."""
    first = total * ctx.rank // ctx.world_size
    return first, total * (ctx.rank + 1) // ctx.world_size - first


def _progress(chunks: Iterator, total: int, ctx, what: str, size=len) -> Iterator:
    from tqdm import tqdm  # imported here: CLI start-up (see cli/__init__.py)

    with tqdm(total=total, unit="img", desc=what, file=sys.stderr, disable=None if ctx.is_main else True) as bar:
        for chunk in chunks:
            bar.update(size(chunk))
            yield chunk


def _samples(ckpt: Path, model_config: dict, sampler, request: EvalRequest, ctx):
    # imported here: CLI start-up (see cli/__init__.py)
    from vistrain.engine import checkpoint_files as ckpt_lib
    from vistrain.errors import ConfigError
    from vistrain.eval.score import ImageScorer, balanced_share, check_judge_data
    from vistrain.tasks.capabilities import SampleRequest

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
    classes = sampler.num_classes(model_config)
    share = balanced_share(request.num, classes, ctx)
    labels, count = (share if classes else None), len(share)
    # the rank's own noise: its share is disjoint from every other rank's
    sample_request = SampleRequest(count, labels.tolist() if classes else None, request.seed * 1009 + ctx.rank,
                                   request.batch_size, request.options)
    weights = ckpt_lib.load_weights(ckpt)

    def with_labels() -> Iterator:
        done = 0
        for images in sampler.sample(model_config, weights, sample_request, ctx.device):
            yield images, (labels[done:done + len(images)] if labels is not None else None)
            done += len(images)

    chunks = _progress(with_labels(), count, ctx, "sampling", size=lambda chunk: len(chunk[0]))
    return scorer.score_samples(chunks), count * ctx.world_size


def _reconstructions(ckpt: Path, model_config: dict, reconstructor, request: EvalRequest, ctx):
    # imported here: CLI start-up (see cli/__init__.py)
    from vistrain.engine import checkpoint_files as ckpt_lib
    from vistrain.eval.score import ImageScorer

    scorer = ImageScorer(request.metrics, detector=request.detector, device=ctx.device,
                         batch_size=request.batch_size, dist_ctx=ctx, reconstructions=True)
    val_set = reconstructor.val_images(model_config)
    total = min(request.num, len(val_set))
    first, count = _share(total, ctx)
    pairs = reconstructor.reconstruct(model_config, ckpt_lib.load_weights(ckpt), val_set=val_set, first=first,
                                      count=count, batch_size=request.batch_size, device=ctx.device)
    return scorer.score_reconstructions(_progress(pairs, count, ctx, "reconstructing", size=lambda p: len(p[0]))), total


def _lmms(ckpt: Path, spec, request: EvalRequest, ctx) -> dict:
    # imported here: CLI start-up (see cli/__init__.py); lmms-eval itself is an optional extra
    from vistrain.errors import ConfigError
    from vistrain.lmms import run_lmms_eval
    from vistrain.tasks.capabilities import PromptAnswerer

    if spec.capability(PromptAnswerer) is None:
        raise ConfigError(f"--lmms-tasks: lmms-eval benchmarks are for vision-language models, not task {spec.name!r}")
    if ctx.world_size > 1:
        raise ConfigError("--lmms-tasks runs in one process: start it without torchrun")
    record = run_lmms_eval(ckpt, request.lmms_tasks, None, batch_size=1, device=str(ctx.device),
                           limit=request.lmms_limit)
    return record["metrics"]


def trained_on(ckpt: Path, model_config: dict) -> Optional[str]:
    """The data.name a checkpoint was trained on: from its config.json when that says (tokenizers record their
    data), else from the config.yaml of the run it belongs to; None when neither tells."""
    import yaml  # imported here: CLI start-up (see cli/__init__.py)

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
    from vistrain.engine.rundir import write_text_atomic  # imported here: CLI start-up (see cli/__init__.py)

    write_text_atomic(path, json.dumps(record, indent=2) + "\n")


def default_result_path(ckpt: Path) -> Path:
    """<run>/eval/step_N.json for a checkpoint of a run; beside the folder otherwise."""
    from vistrain.engine import checkpoint_files as ckpt_lib  # imported here: CLI start-up (see cli/__init__.py)

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
