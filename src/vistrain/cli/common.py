"""What the verbs share: one-line errors, finding the checkpoint a command names, and the task's own flags."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


def fail(message: str, status: int, prefix: str = "") -> int:
    """Print `vistrain: error: message` on stderr and return `status` (2: bad arguments, 1: could not go on)."""
    print(f"{prefix}vistrain: error: {message}", file=sys.stderr, flush=True)
    return status


def add_source(parser: argparse.ArgumentParser, what: str = "") -> None:
    """The SOURCE argument and --which that most verbs take."""
    parser.add_argument("source", help=what or "a run folder (its latest checkpoint), a checkpoint or a model folder")
    parser.add_argument("--which", choices=("latest", "best"), default="latest",
                        help="for a run folder: which checkpoint")


def find_source(source: str, which: str) -> tuple[Path, dict, Any]:
    """(checkpoint folder, its config.json, its task's spec) for SOURCE and --which. Raises CheckpointError or
    ConfigError, whose messages `source_message` words for the user."""
    from vistrain.engine import checkpoint_files as ckpt_lib  # imported here: CLI start-up (see cli/__init__.py)
    from vistrain.registry import get_spec

    ckpt = ckpt_lib.find_checkpoint(Path(source), which)
    model_config = ckpt_lib.load_model_config(ckpt)
    return ckpt, model_config, get_spec(str(model_config.get("task")))


def source_message(err: Exception, args: argparse.Namespace) -> str:
    """An error about SOURCE as the user should read it (a run with no `best` yet says so)."""
    text = str(err)
    if getattr(args, "which", None) == "best" and "no checkpoint found" in text:
        return f"{args.source} has no `best` checkpoint (no eval metric was recorded yet); use --which latest"
    return text


def add_task_options(parser: argparse.ArgumentParser, options) -> None:
    """A task's own flags (VAR's --cfg, --top-k, ...), once the task is known."""
    for option in options:
        if option.type is bool:
            parser.add_argument(option.flag, action="store_true", help=option.help)
        else:
            parser.add_argument(option.flag, type=option.type, default=option.default, help=option.help)


def task_options(args: argparse.Namespace, options) -> dict:
    """The task's own flags by dest name, each checked by the task that declares it (ConfigError naming it)."""
    for option in options:
        option.check(getattr(args, option.dest))
    return {option.dest: getattr(args, option.dest) for option in options}


def comma_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]
