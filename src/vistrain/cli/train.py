"""`vistrain train CONFIG [key=value ...] [--smoke]`: train a model from a YAML config."""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
from pathlib import Path

from vistrain.cli.common import fail
from vistrain.cli.evaluate import eval_command

NAME = "train"


def add_parser(sub) -> argparse.ArgumentParser:
    parser = sub.add_parser(NAME, help="train a model from a YAML config")
    parser.add_argument("config", help="YAML config file (see configs/)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=100")
    parser.add_argument("--smoke", action="store_true",
                        help="a few steps on tiny shapes in a temporary folder: checks a config in seconds")
    return parser


def run(parser: argparse.ArgumentParser, argv: list[str]) -> int:
    # Flags may stand anywhere, also between overrides (`train CONFIG --smoke a=1`): argparse then leaves the
    # overrides after the flag unparsed; they are overrides all the same.
    args, extra = parser.parse_known_args(argv)
    unknown = [item for item in extra if item.startswith("-") or "=" not in item]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    return train(args.config, list(args.overrides) + extra, args.smoke)


def train(config: str, overrides: list[str], smoke: bool = False) -> int:
    # imported here: CLI start-up (see cli/__init__.py)
    from vistrain.config import load_config
    from vistrain.engine.checkpoint_files import CheckpointError
    from vistrain.engine.dist import init_distributed, shutdown
    from vistrain.engine.rundir import RunDirError
    from vistrain.engine.trainer import EXIT_REQUEUE, AlreadyDone, Preempted, TrainingDiverged
    from vistrain.errors import ConfigError
    from vistrain.registry import make_trainer

    try:
        if smoke:
            overrides = smoke_overrides(config, overrides)
        cfg = load_config(config, overrides)
        ctx = init_distributed(cfg.run.device, cfg.run.dist_timeout_s, always=cfg.train.parallel == "fsdp")
    except ConfigError as e:
        return fail(f"config error: {e}", 2)
    prefix = f"[rank {ctx.rank}] " if ctx.world_size > 1 else ""
    clean = False
    try:
        command = eval_command(cfg) if cfg.eval.mode != "sync" else None
        final = make_trainer(cfg, ctx, eval_command=command).fit()
        clean = True
        if ctx.is_main:
            print(f"done: {final}\n  samples: {Path(cfg.run.out_dir) / 'samples'}", flush=True)
        return 0
    except AlreadyDone as e:
        clean = True
        if ctx.is_main:
            print(f"vistrain: {e}", flush=True)
        return 0
    except Preempted as e:
        clean = True
        # The scheduler may signal again while we exit: that must not turn status 75 into 143.
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, signal.SIG_IGN)
        if ctx.is_main:
            print(f"vistrain: {e}", file=sys.stderr, flush=True)
        return EXIT_REQUEUE
    except ConfigError as e:
        return fail(f"config error: {e}", 2, prefix)
    except (CheckpointError, RunDirError, TrainingDiverged, ValueError) as e:
        return fail(str(e), 1, prefix)
    finally:
        shutdown(ctx, clean)


def smoke_overrides(config_path: str, overrides: list[str]) -> list[str]:
    """Tiny shapes and a handful of steps, in a fresh temporary folder: never near the real run."""
    from vistrain.config import load_config  # imported here: CLI start-up (see cli/__init__.py)
    from vistrain.registry import get_spec

    cfg = load_config(config_path, overrides)
    out_dir = tempfile.mkdtemp(prefix="vistrain-smoke-")
    print(f"smoke run in {out_dir}", flush=True)
    smoke = [
        "train.max_steps=3", "train.log_every=1", "train.eval_every=3", "train.ckpt_every=3",
        "train.batch_size=8", "train.micro_batch_size=0", "data.num_workers=0", "run.resume=never",
        f"run.out_dir={out_dir}",
    ]
    return overrides + smoke + list(get_spec(cfg.task).smoke_overrides)
