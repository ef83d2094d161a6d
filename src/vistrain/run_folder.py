"""What a run folder holds, read for people: its metrics by split, its evaluations per checkpoint, its sample
grids, whether it runs, and `vistrain runs`' table of every run under a folder.

Only reads (the report and the table may look at a run while it trains): a metrics.jsonl line being appended,
or any line that is not a JSON object, is skipped; an unreadable config.yaml or metrics.json counts as absent.
The folder layout is docs/engine.md's "Output folder".
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import yaml

from vistrain import provenance
from vistrain.engine import checkpoint_files as ckpt_lib
from vistrain.engine.rundir import holds_a_run, lock_holder

EVAL_SPLITS = ("val", "eval")  # in metrics.jsonl: the in-loop evaluation and the eval jobs beside training
_SAMPLE_RE = re.compile(r"^(?:(?P<tag>.+)_)?step_(?P<step>\d+)\.png$")  # samples/step_N.png, <tag>_step_N.png
_RESERVED = ("step", "split", "time")


class NotARun(ValueError):
    """The path is not a run folder; the message names it."""


@dataclass
class Run:
    path: Path
    config: dict  # config.yaml ({} when absent or unreadable)
    config_text: str
    curves: dict[str, dict[str, list[tuple[int, float]]]]  # split -> metric -> [(step, value)], by step
    checkpoints: dict[int, Path]  # step -> folder, of those on disk
    evals: dict[int, dict[str, float]]  # step -> eval metrics, from every source

    @property
    def task(self) -> str:
        return str(self.config.get("task", "?"))

    @property
    def max_steps(self) -> Optional[int]:
        value = (self.config.get("train") or {}).get("max_steps")
        return value if isinstance(value, int) else None

    @property
    def step(self) -> int:
        """The newest step the run logged or saved."""
        logged = [points[-1][0] for metrics in self.curves.values() for points in metrics.values() if points]
        return max([*logged, *self.checkpoints, 0])

    @property
    def latest_checkpoint(self) -> Optional[Path]:
        try:
            return ckpt_lib.latest_checkpoint(self.path / "checkpoints")
        except ckpt_lib.CheckpointError:  # `latest` names a missing folder: no usable checkpoint
            return None

    def state(self) -> str:
        """"running (pid N)", "finished" (its latest checkpoint is at train.max_steps) or "stopped"."""
        holder = lock_holder(self.path)
        if holder is not None:
            host = f" on {holder['host']}" if holder.get("host") else ""
            return f"running (pid {holder.get('pid')}{host})"
        latest = self.latest_checkpoint
        step = ckpt_lib.checkpoint_step(latest) if latest is not None else None
        done = step is not None and self.max_steps is not None and step >= self.max_steps
        return "finished" if done else "stopped"

    def best(self) -> Optional[tuple[int, Optional[str], Optional[float]]]:
        """(step, metric, value) of the checkpoint `best` names; metric and value None when not recorded."""
        try:
            folder = ckpt_lib.find_checkpoint(self.path, ckpt_lib.BEST_FILE)
        except ckpt_lib.CheckpointError:
            return None
        step = ckpt_lib.checkpoint_step(folder)
        if step is None:
            return None
        name = self.best_metric()
        value = self.evals.get(step, {}).get(name) if name else None
        return step, name, value

    def best_metric(self) -> Optional[str]:
        """The metric that picks `best`: as the latest checkpoint's provenance records it, else eval.best."""
        latest = self.latest_checkpoint
        record = provenance.read(latest) if latest is not None else None
        if record and isinstance(record.get("best_metric"), dict):
            return record["best_metric"].get("name")
        return (self.config.get("eval") or {}).get("best")

    def samples(self) -> dict[int, list[tuple[str, Path]]]:
        """step -> [(tag, png)] of samples/, by step then tag ("samples" for the plain step_N.png grids)."""
        found: dict[int, list[tuple[str, Path]]] = {}
        folder = self.path / "samples"
        for path in sorted(folder.iterdir()) if folder.is_dir() else []:
            match = _SAMPLE_RE.match(path.name)
            if match and path.is_file():
                found.setdefault(int(match["step"]), []).append((match["tag"] or "samples", path))
        return dict(sorted(found.items()))

    def provenances(self) -> list[tuple[list[int], dict]]:
        """The distinct provenance records of the checkpoints on disk, each with the steps it holds for (a run
        resumed by another command or commit has several)."""
        groups: list[tuple[list[int], dict]] = []
        for step, folder in sorted(self.checkpoints.items()):
            record = provenance.read(folder)
            if record is None:
                continue
            same = next((steps for steps, known in groups if _same_process(known, record)), None)
            if same is not None:
                same.append(step)
            else:
                groups.append(([step], record))
        return groups


def _same_process(a: dict, b: dict) -> bool:
    return {k: v for k, v in a.items() if k != "time"} == {k: v for k, v in b.items() if k != "time"}


def check_run_folder(path: Path) -> Path:
    """`path` if it holds a run, else NotARun naming it."""
    path = Path(path)
    if not path.is_dir() or not holds_a_run(path):
        raise NotARun(f"{path} is not a run folder (it has no config.yaml, metrics.jsonl or checkpoints/); give "
                      "the run.out_dir of a training run")
    return path


def read_run(path: Path) -> Run:
    """Everything the report and the table show of the run folder `path`; NotARun if it holds none."""
    path = check_run_folder(path)
    config_text = _read_text(path / "config.yaml")
    try:
        config = yaml.safe_load(config_text) if config_text else {}
    except yaml.YAMLError:
        config = {}
    if not isinstance(config, dict):
        config = {}
    steps = {p: ckpt_lib.checkpoint_step(p) for p in sorted((path / "checkpoints").glob("step_*")) if p.is_dir()}
    checkpoints = {step: p for p, step in steps.items() if step is not None}
    curves = _read_curves(path / "metrics.jsonl")
    return Run(path, config, config_text, curves, checkpoints, _collect_evals(path, curves, checkpoints))


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return ""


def _read_curves(path: Path) -> dict[str, dict[str, list[tuple[int, float]]]]:
    curves: dict[str, dict[str, list[tuple[int, float]]]] = {}
    try:
        lines = path.open(encoding="utf-8", errors="replace")
    except OSError:
        return curves
    with lines:
        for line in lines:
            try:
                record = json.loads(line)
                step, split = int(record["step"]), str(record["split"])
            except (ValueError, KeyError, TypeError):
                continue  # a line being written, or not a log event
            for name, value in record.items():
                if name not in _RESERVED and isinstance(value, (int, float)) and not isinstance(value, bool):
                    curves.setdefault(split, {}).setdefault(name, []).append((step, float(value)))
    for metrics in curves.values():
        for points in metrics.values():
            points.sort(key=lambda point: point[0])
    return curves


def _collect_evals(path: Path, curves: dict, checkpoints: dict[int, Path]) -> dict[int, dict[str, float]]:
    """step -> eval metrics: the eval splits of metrics.jsonl, the eval results under eval/, and the metrics.json
    of each checkpoint on disk (the same numbers where they overlap; the last read wins)."""
    evals: dict[int, dict[str, float]] = {}
    for split in EVAL_SPLITS:
        for name, points in curves.get(split, {}).items():
            for step, value in points:
                evals.setdefault(step, {})[name] = value
    for result in sorted((path / "eval").glob("step_*.json")):
        record = _read_json(result)
        if isinstance(record.get("step"), int) and isinstance(record.get("metrics"), dict):
            evals.setdefault(record["step"], {}).update(_numbers(record["metrics"]))
    for step, folder in checkpoints.items():
        metrics = _numbers(_read_json(folder / ckpt_lib.METRICS_FILE))
        if metrics:
            evals.setdefault(step, {}).update(metrics)
    return dict(sorted(evals.items()))


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _numbers(values: dict) -> dict[str, float]:
    return {k: float(v) for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


# ------------------------------------------------------------------------------------------ vistrain runs


def find_runs(root: Path) -> list[Path]:
    """The run folders under `root` (or `root` itself), never looking inside a run or a hidden folder."""
    found = []
    for folder, subfolders, _ in os.walk(root):
        if holds_a_run(Path(folder)):
            found.append(Path(folder))
            subfolders.clear()
        else:
            subfolders[:] = sorted(s for s in subfolders if not s.startswith("."))
    return found


def disk_usage(path: Path) -> int:
    """Bytes the folder takes on disk (allocated blocks, as du counts them; links not followed)."""
    total = 0
    for folder, _, files in os.walk(path):
        for name in files:
            try:
                stat = os.lstat(os.path.join(folder, name))
            except OSError:  # removed while we looked (a pruned checkpoint)
                continue
            total += getattr(stat, "st_blocks", 0) * 512 or stat.st_size
    return total


def table(root: Path) -> list[list[str]]:
    """`vistrain runs`: a header and one row per run under `root`."""
    rows = [["run", "task", "step", "state", "best", "last eval", "size"]]
    for path in find_runs(root):
        run = read_run(path)
        step = f"{run.step}/{run.max_steps if run.max_steps is not None else '?'}"
        rows.append([_shown_path(path, root), run.task, step, run.state(), best_text(run), last_eval_text(run),
                     human_bytes(disk_usage(path))])
    return rows


def format_table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows)


def _shown_path(path: Path, root: Path) -> str:
    relative = os.path.relpath(path, root)
    return str(path) if relative == "." else relative


def best_text(run: Run) -> str:
    best = run.best()
    if best is None:
        return "-"
    step, name, value = best
    return f"{name}={format_number(value)} @ {step}" if name and value is not None else f"@ {step}"


def last_eval_text(run: Run, shown: int = 3) -> str:
    if not run.evals:
        return "-"
    step, metrics = next(reversed(run.evals.items()))
    first = run.best_metric()
    names = sorted(metrics, key=lambda name: (name != first, name))[:shown]
    more = " ..." if len(metrics) > shown else ""
    return f"@ {step}: " + " ".join(f"{name}={format_number(metrics[name])}" for name in names) + more


def format_number(value: float) -> str:
    return f"{value:.4g}" if math.isfinite(value) else str(value)


def human_bytes(count: int) -> str:
    size, units = float(count), ["B", "KB", "MB", "GB", "TB"]
    while size >= 1024 and len(units) > 1:
        size, units = size / 1024, units[1:]
    return f"{size:.0f} B" if units[0] == "B" else f"{size:.1f} {units[0]}"
