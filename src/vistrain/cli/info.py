"""`vistrain info PATH`: what a checkpoint or model folder is -- step, task, metrics, checksum status, provenance
and the config it was trained with."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from vistrain.cli.common import add_source, fail, source_message

NAME = "info"


def add_parser(sub) -> argparse.ArgumentParser:
    parser = sub.add_parser(NAME, help="what a checkpoint or model folder is: step, metrics, checksums, provenance")
    add_source(parser, what="a checkpoint or model folder, or a run folder (its latest checkpoint)")
    return parser


def run(parser: argparse.ArgumentParser, argv: list[str]) -> int:
    """Print what a checkpoint or model folder is: its step, task, metrics, checksum status, provenance and the
    config it was trained with. Exit 1 when it is not one, or when a file differs from its checksum."""
    # imported here: CLI start-up (see cli/__init__.py)
    import yaml

    from vistrain import provenance
    from vistrain.engine import checkpoint_files as ckpt_lib

    args = parser.parse_args(argv)
    try:
        folder = ckpt_lib.find_checkpoint(Path(args.source), args.which)
    except ckpt_lib.CheckpointError as e:
        return fail(source_message(e, args), 1)
    if not (folder / ckpt_lib.CONFIG_FILE).is_file() and not (folder / ckpt_lib.MODEL_FILE).is_file():
        return fail(f"{folder} is not a checkpoint or model folder (it has no config.json or model.safetensors)", 1)
    step = ckpt_lib.checkpoint_step(folder)
    try:
        task = json.loads((folder / ckpt_lib.CONFIG_FILE).read_text(encoding="utf-8")).get("task", "?")
    except (OSError, ValueError, AttributeError):
        task = "? (config.json is unreadable)"
    try:
        metrics = json.loads((folder / ckpt_lib.METRICS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        metrics = {}
    metrics = metrics if isinstance(metrics, dict) else {}  # not checksummed: read it with care
    if (folder / ckpt_lib.CHECKSUMS_FILE).exists() or (folder / ckpt_lib.TRAIN_STATE_FILE).exists():
        damaged = ckpt_lib.damaged_files(folder)
        checksums = "; ".join(f"{name} {what}" for name, what in damaged) or "every file matches"
    else:
        damaged, checksums = [], "none recorded (not written by vistrain), nothing to check"
    record = provenance.read(folder)
    shown = " ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items()) if isinstance(v, (int, float))) or "none"
    lines = [str(folder), f"  {'checkpoint at step ' + str(step) if step is not None else 'model folder'}, "
             f"task {task}", f"  metrics: {shown}", f"  checksums: {checksums}", "provenance:"]
    lines += provenance.describe(record, "  ") if record else ["  none recorded (written before vistrain kept it)"]
    trained = provenance.training_config(record) if record else None
    if trained is not None:
        lines += ["training config:", *("  " + line for line in yaml.safe_dump(trained, sort_keys=False).splitlines())]
    print("\n".join(lines))
    return 1 if damaged else 0
