"""Meters of the training loop: device-side accumulation of logged values, timers, MFU peaks, memory (the
metrics of generated images are eval/image_metrics.py).

The training loop adds a loss every step. Calling `.item()` there would force the host to wait for the GPU
each step, so `MetricAccumulator` keeps running sums on the device and synchronises only in `reduce()`,
which the trainer calls once per `train.log_every` steps.
"""

from __future__ import annotations

import math
import time
from collections import deque
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["ETA", "DeviceTimer", "MetricAccumulator", "device_peak_tflops", "format_duration", "peak_memory_mb"]


class MetricAccumulator:
    """Per-step values stay on device as detached tensors; nothing is synced to the host until reduce().

    Two kinds of metric:
    - `add(name, value, weight=1)`: logged as sum(value) / sum(weight) over all steps and ranks since the
      last reduce. With weight 1 that is the plain mean; a loss reported as a sum over a micro-batch's
      tokens with weight = their count gives the token-weighted mean of the whole window.
    - `add_total(name, value)`: logged as the plain sum over steps and ranks (throughput counts).

    `reduce()` is one collective under torch.distributed: every rank must call it, having added the same
    metric names (the order of the calls does not matter, names are sorted), or the ranks would sum
    mismatched values or hang.
    """

    def __init__(self, device: torch.device | str | None = None) -> None:
        # Where the reduction happens when only Python floats were added (NCCL cannot reduce CPU tensors).
        self.device = torch.device(device) if device is not None else None
        self._sums: dict[str, Tensor | float] = {}
        self._weights: dict[str, Tensor | float] = {}
        self._totals: dict[str, Tensor | float] = {}

    @staticmethod
    def _scalar(name: str, value: Tensor | float) -> Tensor | float:
        if isinstance(value, Tensor):
            if value.numel() != 1:
                raise ValueError(
                    f"metric {name!r} must be a scalar, got a tensor of shape {tuple(value.shape)}; "
                    "reduce it (e.g. .sum()) before adding it"
                )
            # copy=True: a first value becomes a running sum updated in place, so it must not share storage
            # with the caller's tensor.
            return value.detach().reshape(()).to(torch.float32, copy=True)
        return float(value)

    @classmethod
    def _accumulate(cls, into: dict[str, Tensor | float], name: str, value: Tensor | float) -> None:
        value = cls._scalar(name, value)
        total = into.get(name)
        if total is None:
            into[name] = value
        elif isinstance(total, Tensor):
            total.add_(value.to(total.device) if isinstance(value, Tensor) else value)
        elif isinstance(value, Tensor):
            into[name] = value.add_(total)
        else:
            into[name] = total + value

    def add(self, name: str, value: Tensor | float, weight: Tensor | float = 1.0) -> None:
        """Add `value` (a sum over `weight` units, or one step's value with weight 1); stays on its device."""
        self._accumulate(self._sums, name, value)
        self._accumulate(self._weights, name, weight)

    def add_total(self, name: str, value: Tensor | float) -> None:
        self._accumulate(self._totals, name, value)

    def reduce(self, process_group: dist.ProcessGroup | None = None) -> dict[str, float]:
        """Weighted means and totals since the last reduce (over all ranks when distributed), then clear."""
        names, totals = sorted(self._sums), sorted(self._totals)
        distributed = dist.is_available() and dist.is_initialized()
        if not names and not totals and not distributed:
            return {}
        device = self._reduction_device(process_group if distributed else None, distributed)

        def stacked(values: list) -> Tensor:
            if not values:
                return torch.zeros(0, device=device)
            return torch.stack([torch.as_tensor(v, dtype=torch.float32, device=device) for v in values])

        # One tensor [sums, weights, totals]: a single collective for everything.
        packed = torch.cat([stacked([self._sums[n] for n in names]), stacked([self._weights[n] for n in names]),
                            stacked([self._totals[n] for n in totals])])
        if distributed:
            dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=process_group)
        n = len(names)
        means = (packed[:n] / packed[n:2 * n]).tolist()  # the one host sync
        result = dict(zip(names, means))
        result.update(zip(totals, packed[2 * n:].tolist()))
        self._sums.clear()
        self._weights.clear()
        self._totals.clear()
        return result

    def _reduction_device(self, group: dist.ProcessGroup | None, distributed: bool) -> torch.device:
        for values in (self._sums, self._weights, self._totals):
            for value in values.values():
                if isinstance(value, Tensor):
                    return value.device
        if self.device is not None:
            return self.device
        if distributed and "nccl" in str(dist.get_backend(group)).lower():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")


class DeviceTimer:
    """Time spent in a stretch of device work, summed over a log window, without a sync per step.

    On CUDA each stretch is a pair of events read only at `total()` (once per log event); elsewhere it is the
    host clock, which is the device's there.
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = torch.device(device).type == "cuda"
        self._pairs: list = []
        self._seconds = 0.0
        self._t0: object = None

    def start(self) -> None:
        if self.cuda:
            self._t0 = torch.cuda.Event(enable_timing=True)
            self._t0.record()
        else:
            self._t0 = time.perf_counter()

    def stop(self) -> None:
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._pairs.append((self._t0, end))
        else:
            self._seconds += time.perf_counter() - self._t0

    def total(self) -> float:
        """Seconds since the last total(); on CUDA this waits for the last stretch to finish."""
        seconds = self._seconds
        if self._pairs:
            self._pairs[-1][1].synchronize()  # events complete in order: when the last is done, all are
            seconds += sum(start.elapsed_time(end) for start, end in self._pairs) / 1e3
        self._pairs, self._seconds = [], 0.0
        return seconds


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


def device_peak_tflops(device: torch.device | str, precision: str) -> Optional[float]:
    """Dense bf16/fp16 tensor-core peak of common GPUs, for `mfu`; None where unknown (CPUs, fp32)."""
    device = torch.device(device)
    if device.type != "cuda" or precision == "fp32" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in _PEAK_BF16_TFLOPS:
        if key in name:
            return tflops
    return None


# Vendor data sheets, dense (no sparsity). Checked in order: the first substring of the device name wins.
_PEAK_BF16_TFLOPS = (
    ("GB200", 2500.0), ("B200", 2250.0), ("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0),
    ("H800", 989.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0), ("L4", 121.0), ("A10G", 125.0),
    ("A10", 125.0), ("RTX 4090", 165.0), ("RTX 3090", 71.0), ("V100", 125.0),
)
