"""Training metrics: device-side accumulation, console smoothing, time estimates, memory.

The training loop adds a loss every step. Calling `.item()` there would force the host to wait for the GPU
each step, so `MetricAccumulator` keeps running sums on the device and synchronises only in `reduce()`,
which the trainer calls once per `train.log_every` steps.
"""

from __future__ import annotations

import math
import time
from collections import deque

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["ETA", "MetricAccumulator", "Smoothed", "format_duration", "peak_memory_mb"]


class MetricAccumulator:
    """Per-step values stay on device as detached tensors; nothing is synced to the host until reduce().

    `reduce()` returns the mean of every metric since the previous `reduce()`. Under torch.distributed it is
    a collective: every rank must call it, having added the same metric names (the order of `add` calls
    does not matter, names are sorted), or the ranks would sum mismatched values or hang.
    """

    def __init__(self, device: torch.device | str | None = None) -> None:
        # Where the reduction happens when only Python floats were added (NCCL cannot reduce CPU tensors).
        self.device = torch.device(device) if device is not None else None
        self._sums: dict[str, Tensor | float] = {}
        self._counts: dict[str, int] = {}

    def add(self, name: str, value: Tensor | float) -> None:
        """Add one step's value of `name`; a tensor must hold a single element and stays where it is."""
        if isinstance(value, Tensor):
            if value.numel() != 1:
                raise ValueError(
                    f"metric {name!r} must be a scalar, got a tensor of shape {tuple(value.shape)}; "
                    "reduce it (e.g. .mean()) before adding it"
                )
            # copy=True: the first value becomes the running sum and is updated in place below, so it must
            # not share storage with the caller's tensor.
            value = value.detach().reshape(()).to(torch.float32, copy=True)
        else:
            value = float(value)
        total = self._sums.get(name)
        if total is None:
            self._sums[name] = value
        elif isinstance(total, Tensor):
            total.add_(value if not isinstance(value, Tensor) else value.to(total.device))
        elif isinstance(value, Tensor):
            self._sums[name] = value.add_(total)
        else:
            self._sums[name] = total + value
        self._counts[name] = self._counts.get(name, 0) + 1

    def reduce(self, process_group: dist.ProcessGroup | None = None) -> dict[str, float]:
        """Mean of each metric since the last reduce (averaged over ranks when distributed), then clear."""
        names = sorted(self._sums)
        distributed = dist.is_available() and dist.is_initialized()
        if not names and not distributed:
            return {}
        device = self._reduction_device(process_group if distributed else None, distributed)
        sums = [torch.as_tensor(self._sums[n], dtype=torch.float32, device=device) for n in names]
        counts = torch.tensor([float(self._counts[n]) for n in names], dtype=torch.float32, device=device)
        # One tensor of [sum_1 .. sum_n, count_1 .. count_n]: a single collective, and summing counts makes
        # the result the true mean over all steps of all ranks even if ranks added different numbers of steps.
        packed = torch.cat([torch.stack(sums), counts]) if names else counts
        if distributed:
            dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=process_group)
        n = len(names)
        means = (packed[:n] / packed[n:]).tolist()  # the one host sync
        self._sums.clear()
        self._counts.clear()
        return dict(zip(names, means))

    def _reduction_device(self, group: dist.ProcessGroup | None, distributed: bool) -> torch.device:
        for total in self._sums.values():
            if isinstance(total, Tensor):
                return total.device
        if self.device is not None:
            return self.device
        if distributed and "nccl" in str(dist.get_backend(group)).lower():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")


class Smoothed:
    """Windowed median / mean of recent host values, for the console (a spiky loss reads better smoothed)."""

    def __init__(self, window: int = 20) -> None:
        if window < 1:
            raise ValueError(f"Smoothed window must be >= 1, got {window}")
        self._recent: deque[float] = deque(maxlen=window)
        self._total = 0.0
        self._count = 0

    def update(self, v: float) -> None:
        v = float(v)
        self._recent.append(v)
        self._total += v
        self._count += 1

    @property
    def median(self) -> float:
        """Median of the window (NaN before the first update)."""
        if not self._recent:
            return math.nan
        ordered = sorted(self._recent)
        mid = len(ordered) // 2
        return ordered[mid] if len(ordered) % 2 else 0.5 * (ordered[mid - 1] + ordered[mid])

    @property
    def avg(self) -> float:
        """Mean of the window (NaN before the first update)."""
        return sum(self._recent) / len(self._recent) if self._recent else math.nan

    @property
    def global_avg(self) -> float:
        """Mean of every value ever added (NaN before the first update)."""
        return self._total / self._count if self._count else math.nan


def format_duration(seconds: float | None) -> str:
    """'1:02:03' (hours are not wrapped into days); '--:--' when unknown."""
    if seconds is None or not math.isfinite(seconds):
        return "--:--"
    total = max(0, round(seconds))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


class ETA:
    """Remaining time from a smoothed time per step; ignores the first steps (compile / warm-up).

    Call `update(step)` whenever `step` optimizer steps are complete (every step or every log event). The
    clock starts at the first update at or after `start_step + warmup_steps`, so compilation, data-loader
    start-up and a resumed run's first steps do not inflate the estimate. The time per step is the total
    time over the total steps of the last `window` intervals, which follows speed changes within a run.
    """

    def __init__(self, total_steps: int, start_step: int = 0, warmup_steps: int = 2, window: int = 20) -> None:
        self.total_steps = total_steps
        self.start_step = start_step
        self.warmup_steps = warmup_steps
        self._intervals: deque[tuple[int, float]] = deque(maxlen=window)  # (steps done, seconds taken)
        self._last: tuple[int, float] | None = None
        self._step = start_step

    def update(self, step: int, now: float | None = None) -> None:
        now = time.perf_counter() if now is None else now
        self._step = step
        if step < self.start_step + self.warmup_steps:
            return
        if self._last is not None and step > self._last[0]:
            self._intervals.append((step - self._last[0], now - self._last[1]))
        if self._last is None or step > self._last[0]:
            self._last = (step, now)

    @property
    def seconds_per_step(self) -> float | None:
        steps = sum(s for s, _ in self._intervals)
        return sum(t for _, t in self._intervals) / steps if steps else None

    @property
    def steps_per_second(self) -> float | None:
        per_step = self.seconds_per_step
        return 1.0 / per_step if per_step else None

    def seconds_left(self) -> float | None:
        per_step = self.seconds_per_step
        if per_step is None:
            return None
        return max(0, self.total_steps - self._step) * per_step

    def format(self) -> str:
        return format_duration(self.seconds_left())


def peak_memory_mb(device: torch.device | str) -> float | None:
    """Peak CUDA memory allocated by tensors on `device` since start (or the last reset), in MiB; None on CPU."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return torch.cuda.max_memory_allocated(device) / 2**20
