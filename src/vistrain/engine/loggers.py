"""Logging sinks: console progress lines, metrics.jsonl, TensorBoard and Weights & Biases.

Only rank 0 logs. The trainer passes the configured `run.loggers` names to `build_loggers` on rank 0 and an
empty list on the other ranks, which gives an empty `LoggerGroup` whose methods do nothing; this module
therefore never asks torch.distributed for the rank itself.

TensorBoard and W&B are optional dependencies, imported only when their sink is built.
"""

from __future__ import annotations

import json
import math
import secrets
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from vistrain.durable import write_atomic
from vistrain.engine.meters import ETA

__all__ = [
    "ConsoleLogger",
    "JsonlLogger",
    "Logger",
    "LoggerGroup",
    "TensorBoardLogger",
    "WandbLogger",
    "build_loggers",
    "format_number",
]

LOGGERS = ("console", "jsonl", "tensorboard", "wandb")  # the names run.loggers accepts


class Logger:
    """The sink protocol: every sink takes metrics per (step, split) and image grids, and is closed once.

    `split` is "train" or "val". Sinks that have no use for images (console, jsonl) inherit the no-op.
    """

    def log_metrics(self, step: int, split: str, metrics: dict[str, float]) -> None:
        raise NotImplementedError

    def log_images(self, step: int, tag: str, grid_HWC: np.ndarray) -> None:
        """`grid_HWC` is a uint8 H x W x 3 array, e.g. from engine.images.make_grid."""

    def close(self) -> None:
        """Flush and release files / runs; called once at the end of training (also after an error)."""


def format_number(value: Any) -> str:
    """4 significant digits, compact: 1.234, 0.0001, 1.235e+05, nan."""
    if isinstance(value, bool) or isinstance(value, int):
        return str(value)
    try:
        return f"{float(value):.4g}"
    except (TypeError, ValueError):
        return str(value)


class ConsoleLogger(Logger):
    """One plain progress line per log event, flushed at once (readable in a terminal and in a job log).

    Train: `step 120/2000 (6%) | d_loss 1.23 g_loss 0.98 | 3.1 steps/s | ETA 0:10:05`
    Val:   `[val] step 120/2000 | fid 12.34`
    Metrics named `group/name` are left off the line (they are in metrics.jsonl / TensorBoard / W&B).
    Speed and ETA come from the train events' steps and wall time; they read `--:--` until two events
    after the warm-up have been seen.
    """

    def __init__(self, max_steps: int, eta: ETA | None = None, stream: TextIO | None = None) -> None:
        self.max_steps = max_steps
        self.eta = eta if eta is not None else ETA(max_steps)
        self._stream = stream  # None: whatever sys.stdout is at print time

    def log_metrics(self, step: int, split: str, metrics: dict[str, float]) -> None:
        # Grouped metrics (lr/..., time/..., grad_norm/...) go to the files; the line keeps the headline ones.
        values = " ".join(f"{name} {format_number(v)}" for name, v in metrics.items() if "/" not in name)
        if split == "train":
            self.eta.update(step)
            percent = f" ({100 * step // self.max_steps}%)" if self.max_steps > 0 else ""
            parts = [f"step {step}/{self.max_steps}{percent}"]
            if values:
                parts.append(values)
            rate = self.eta.steps_per_second
            if rate is not None:
                parts.append(f"{format_number(rate)} steps/s")
            parts.append(f"ETA {self.eta.format()}")
            line = " | ".join(parts)
        else:
            line = f"[{split}] step {step}/{self.max_steps}" + (f" | {values}" if values else "")
        print(line, file=self._stream or sys.stdout, flush=True)


def _json_safe(value: Any) -> Any:
    """JSON has no NaN / Infinity: non-finite floats are written as null so every line stays valid JSON."""
    if isinstance(value, (bool, int, str)) or value is None:
        return value
    try:
        value = float(value)  # also numpy scalars and 1-element tensors
    except (TypeError, ValueError):
        return str(value)
    return value if math.isfinite(value) else None


class JsonlLogger(Logger):
    """Appends one JSON object per event to `out_dir/metrics.jsonl`, flushed at each write.

    Line format: `{"step": N, "split": "train"|"val", "time": <unix seconds>, "<metric>": value, ...}`.
    Non-finite values (NaN, +-inf) are written as `null`. A resumed run appends to the same file, so steps
    between the resumed checkpoint and the interruption can appear twice; the later line is the one that
    belongs to the continued run.
    """

    RESERVED = ("step", "split", "time")

    def __init__(self, out_dir: Path) -> None:
        self.path = Path(out_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        needs_newline = self.path.exists() and self.path.stat().st_size > 0 and not self._ends_with_newline()
        self._file = self.path.open("a", encoding="utf-8")
        if needs_newline:  # a run killed mid-write left half a line: keep the next event on its own line
            self._file.write("\n")

    def _ends_with_newline(self) -> bool:
        with self.path.open("rb") as f:
            f.seek(-1, 2)
            return f.read(1) == b"\n"

    def log_metrics(self, step: int, split: str, metrics: dict[str, float]) -> None:
        clash = [k for k in metrics if k in self.RESERVED]
        if clash:
            raise ValueError(f"metric names {clash} clash with the metrics.jsonl fields {self.RESERVED}; rename them")
        record = {"step": int(step), "split": split, "time": time.time()}
        record.update({name: _json_safe(v) for name, v in metrics.items()})
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()


def _missing(package: str, extra: str, name: str, err: ImportError) -> ImportError:
    return ImportError(
        f"run.loggers includes {name!r} but the {package!r} package is not installed ({err}). "
        f"Install it with: pip install 'vistrain[{extra}]', or drop {name!r} from run.loggers."
    )


class TensorBoardLogger(Logger):
    """TensorBoard events under `out_dir/tb`: scalars as "<split>/<name>", image grids under their tag."""

    def __init__(self, out_dir: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            raise _missing("tensorboard", "tensorboard", "tensorboard", err) from err
        self._writer = SummaryWriter(log_dir=str(Path(out_dir) / "tb"))

    def log_metrics(self, step: int, split: str, metrics: dict[str, float]) -> None:
        for name, value in metrics.items():
            self._writer.add_scalar(f"{split}/{name}", float(value), global_step=step)

    def log_images(self, step: int, tag: str, grid_HWC: np.ndarray) -> None:
        self._writer.add_image(tag, grid_HWC, global_step=step, dataformats="HWC")

    def close(self) -> None:
        self._writer.close()


class WandbLogger(Logger):
    """A Weights & Biases run that survives resumes.

    The run id is generated once and kept in `out_dir/wandb_run_id.txt`; a resumed run reads it and continues
    the same W&B run (resume="allow"). Metrics are plotted against their own "step" key rather than W&B's
    internal counter, which only moves forward: after a resume from an earlier checkpoint the repeated
    steps are still recorded instead of being dropped. Offline mode writes under `out_dir/wandb` and needs
    no network or account (upload later with `wandb sync`). W&B is told not to capture the console, so it
    does not replace sys.stdout.
    """

    ID_FILE = "wandb_run_id.txt"

    def __init__(
        self,
        out_dir: Path,
        run_config: dict,
        *,
        project: str = "vistrain",
        mode: str = "offline",
        run_name: str | None = None,
    ) -> None:
        try:
            import wandb
        except ImportError as err:
            raise _missing("wandb", "wandb", "wandb", err) from err
        self._wandb = wandb
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        self.run_id = self._run_id(out_dir)
        self._run = wandb.init(
            project=project,
            dir=str(out_dir),
            id=self.run_id,
            resume="allow",
            mode=mode,
            config=run_config,
            name=run_name,
            settings=wandb.Settings(console="off"),
        )
        self._run.define_metric("step", hidden=True)
        self._run.define_metric("*", step_metric="step")

    @classmethod
    def _run_id(cls, out_dir: Path) -> str:
        path = out_dir / cls.ID_FILE
        if path.exists():
            run_id = path.read_text(encoding="utf-8").strip()
            if run_id:
                return run_id
        run_id = secrets.token_hex(4)
        write_atomic(path, run_id + "\n")
        return run_id

    def log_metrics(self, step: int, split: str, metrics: dict[str, float]) -> None:
        record: dict[str, Any] = {f"{split}/{name}": value for name, value in metrics.items()}
        record["step"] = step
        self._run.log(record)

    def log_images(self, step: int, tag: str, grid_HWC: np.ndarray) -> None:
        self._run.log({tag: self._wandb.Image(grid_HWC, caption=f"step {step}"), "step": step})

    def close(self) -> None:
        self._run.finish()


class LoggerGroup(Logger):
    """Fans every call out to a list of sinks; an empty group (ranks other than 0) does nothing."""

    def __init__(self, sinks: list[Logger] | None = None) -> None:
        self.sinks: list[Logger] = list(sinks or [])

    def log_metrics(self, step: int, split: str, metrics: dict[str, float]) -> None:
        for sink in self.sinks:
            sink.log_metrics(step, split, metrics)

    def log_images(self, step: int, tag: str, grid_HWC: np.ndarray) -> None:
        for sink in self.sinks:
            sink.log_images(step, tag, grid_HWC)

    def close(self) -> None:
        """Close every sink, even if one fails (the first error is re-raised afterwards)."""
        first_error: BaseException | None = None
        for sink in self.sinks:
            try:
                sink.close()
            except Exception as err:  # noqa: BLE001 - keep closing the others, e.g. the jsonl file
                first_error = first_error or err
        self.sinks = []
        if first_error is not None:
            raise first_error

    def __enter__(self) -> LoggerGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def build_loggers(
    names: list[str],
    out_dir: Path,
    run_config: dict,
    max_steps: int,
    *,
    wandb_project: str = "vistrain",
    wandb_mode: str = "offline",
    run_name: str | None = None,
) -> LoggerGroup:
    """Build the sinks named in `run.loggers` (call with names on rank 0 only, [] elsewhere)."""
    unknown = [n for n in names if n not in LOGGERS]
    if unknown:
        raise ValueError(f"unknown logger(s) {unknown} in run.loggers; valid names: {', '.join(LOGGERS)}")
    out_dir = Path(out_dir)
    group = LoggerGroup()
    try:
        for name in dict.fromkeys(names):  # drop repeats, keep order
            if name == "console":
                group.sinks.append(ConsoleLogger(max_steps))
            elif name == "jsonl":
                group.sinks.append(JsonlLogger(out_dir))
            elif name == "tensorboard":
                group.sinks.append(TensorBoardLogger(out_dir))
            else:
                group.sinks.append(
                    WandbLogger(out_dir, run_config, project=wandb_project, mode=wandb_mode, run_name=run_name)
                )
    except BaseException:
        try:  # release what was built before the failing sink; the build error is the one to report
            group.close()
        except Exception:  # noqa: BLE001
            pass
        raise
    return group
