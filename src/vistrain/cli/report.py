"""`vistrain report RUN [--out FILE]`: one self-contained HTML page of a run (html_report.py)."""

from __future__ import annotations

import argparse
from pathlib import Path

from vistrain.cli.common import fail

NAME = "report"


def add_parser(sub) -> argparse.ArgumentParser:
    parser = sub.add_parser(NAME, help="one self-contained HTML page of a run: curves, evals, samples, config")
    parser.add_argument("run", help="a run folder (its run.out_dir)")
    parser.add_argument("--out", default=None, help="the HTML file to write; default RUN/report.html")
    return parser


def run(parser: argparse.ArgumentParser, argv: list[str]) -> int:
    # imported here: CLI start-up (see cli/__init__.py)
    from vistrain import html_report, run_folder
    from vistrain.errors import ConfigError
    from vistrain.outpaths import check_output_file

    args = parser.parse_args(argv)
    try:
        folder = run_folder.check_run_folder(Path(args.run))
        out = check_output_file(args.out or folder / "report.html", "--out", example="report.html")
    except (run_folder.NotARun, ConfigError) as e:
        return fail(str(e), 2)
    try:
        size = html_report.write(run_folder.read_run(folder), out)
    except OSError as e:
        return fail(f"--out {out}: the report could not be written ({e.strerror})", 1)
    print(f"wrote {out} ({run_folder.human_bytes(size)}): open it in a browser")
    return 0
