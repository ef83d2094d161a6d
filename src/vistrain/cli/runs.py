"""`vistrain runs DIR`: the runs under a folder, one line each (task, step, state, best, last eval, size)."""

from __future__ import annotations

import argparse
from pathlib import Path

from vistrain.cli.common import fail

NAME = "runs"


def add_parser(sub) -> argparse.ArgumentParser:
    parser = sub.add_parser(NAME, help="list the runs under a folder: task, step, state, best, last eval, size")
    parser.add_argument("folder", help="the folder to look in, e.g. runs")
    return parser


def run(parser: argparse.ArgumentParser, argv: list[str]) -> int:
    from vistrain import run_folder  # imported here: CLI start-up (see cli/__init__.py)

    args = parser.parse_args(argv)
    folder = Path(args.folder)
    if not folder.is_dir():
        return fail(f"{folder} is not a folder; give the folder that holds your runs, e.g. runs", 2)
    rows = run_folder.table(folder)
    print(run_folder.format_table(rows) if len(rows) > 1 else f"no runs under {folder}")
    return 0
