"""Learning-rate and weight-decay schedules as pure functions of the optimizer step.

A schedule returns a *factor* that multiplies the peak lr, so the same schedule serves every parameter
group (each group adds its own lr multiplier, see engine/optim.py). Being a pure function of
``(step, max_steps)`` means nothing about the schedule needs saving in a checkpoint: resuming at step N
gives exactly the lr the uninterrupted run had at step N.

``step`` is 0-based: the index of the optimizer step about to be taken. ``max_steps`` is the run length.

Every schedule is ``warmup(step) * shape(step)``:

- warmup: ``start + (1 - start) * min(1, (step + 1) / warmup)``. This is nanoVLM's rule when
  ``warmup_start_ratio`` is 0 (step 0 trains with ``1/warmup`` of the peak instead of a wasted lr of
  exactly 0; the peak is reached at step ``warmup - 1``). With a start ratio (VAR uses 0.005) the ramp
  begins one increment above it, a shift of one step against VAR's own rule, which starts exactly at the
  ratio; chosen so that one formula covers both and step 0 never has lr 0.
- shape, with ``p`` the progress through the post-warmup steps, 0 at the end of warmup, 1 at max_steps
  and clamped to 1 after it (the lr stays at its floor if a run goes on past max_steps):
  ``constant`` 1; ``cosine`` / ``cos`` cosine from 1 to ``end_ratio``; ``linear`` straight line from 1 to
  ``end_ratio``; ``lin0`` / ``lin`` / ``linT`` hold 1 for the first 5% / 15% / ``hold_frac`` of ``p``,
  then a straight line to ``end_ratio`` (VAR); ``step`` ``gamma ** (step // step_size)`` counted from
  step 0 (imaginaire's StepLR).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

__all__ = [
    "SCHEDULES",
    "ScheduleConfig",
    "lr_factor",
    "validate",
    "warmup_length",
    "weight_decay_at",
]


@dataclass
class ScheduleConfig:
    name: str = "constant"  # constant | cosine | lin0 | lin | linT | cos | linear | step
    warmup_steps: int = 0  # linear warmup length in optimizer steps (wins over warmup_frac when > 0)
    warmup_frac: float = 0.0  # ... or as a fraction of max_steps
    warmup_start_ratio: float = 0.0  # lr at the start of warmup as a fraction of the peak (VAR: 0.005)
    end_ratio: float = 0.1  # final lr as a fraction of the peak (nanoVLM 0.1; VAR 0.01 or 0.1)
    hold_frac: float = 0.15  # linT: fraction of the post-warmup steps held at the peak
    step_size: int = 0  # step: multiply the lr by gamma every step_size steps
    gamma: float = 0.1
    wd_end: Optional[float] = None  # None: constant weight decay; else cosine from the optimizer's wd to this


def warmup_length(cfg: ScheduleConfig, max_steps: int) -> int:
    """Warmup length in steps: ``warmup_steps`` if set, else ``warmup_frac`` of the run (rounded down)."""
    if cfg.warmup_steps > 0:
        return cfg.warmup_steps
    return int(cfg.warmup_frac * max_steps)


def _progress(step: int, warmup: int, max_steps: int) -> float:
    """Fraction of the post-warmup steps done: 0 until warmup ends, 1 at max_steps and after."""
    decay_steps = max(max_steps - warmup, 1)  # a warmup as long as the run leaves nothing to decay
    return min(max(step - warmup, 0) / decay_steps, 1.0)


def _cosine(cfg: ScheduleConfig, p: float) -> float:
    return cfg.end_ratio + (1.0 - cfg.end_ratio) * 0.5 * (1.0 + math.cos(math.pi * p))


def _linear(cfg: ScheduleConfig, p: float) -> float:
    return cfg.end_ratio + (1.0 - cfg.end_ratio) * (1.0 - p)


def _hold_then_linear(hold: float, cfg: ScheduleConfig, p: float) -> float:
    if p < hold:
        return 1.0
    return cfg.end_ratio + (1.0 - cfg.end_ratio) * (1.0 - p) / (1.0 - hold)


# name -> shape(cfg, step, p); the step schedule is the only one that looks at the raw step
_SHAPES: dict[str, Callable[[ScheduleConfig, int, float], float]] = {
    "constant": lambda cfg, step, p: 1.0,
    "cosine": lambda cfg, step, p: _cosine(cfg, p),
    "cos": lambda cfg, step, p: _cosine(cfg, p),
    "linear": lambda cfg, step, p: _linear(cfg, p),
    "lin0": lambda cfg, step, p: _hold_then_linear(0.05, cfg, p),
    "lin": lambda cfg, step, p: _hold_then_linear(0.15, cfg, p),
    "linT": lambda cfg, step, p: _hold_then_linear(cfg.hold_frac, cfg, p),
    "step": lambda cfg, step, p: cfg.gamma ** (step // cfg.step_size),
}
SCHEDULES: tuple[str, ...] = tuple(_SHAPES)


def _check_name(name: str) -> None:
    if name not in _SHAPES:
        raise ValueError(
            f"unknown lr schedule {name!r} (optim.schedule.name); choose one of: {', '.join(SCHEDULES)}"
        )


def _check_step(step: int, max_steps: int) -> None:
    if max_steps <= 0:
        raise ValueError(f"max_steps must be > 0 to evaluate a schedule, got {max_steps}")
    if step < 0:
        raise ValueError(f"schedule step must be >= 0, got {step}")


def validate(cfg: ScheduleConfig) -> None:
    """Refuse settings that would silently train with a nonsense lr; messages name the config key."""
    _check_name(cfg.name)
    key = "optim.schedule"
    problems = []
    if cfg.warmup_steps < 0:
        problems.append(f"{key}.warmup_steps must be >= 0, got {cfg.warmup_steps}")
    if not 0.0 <= cfg.warmup_frac < 1.0:
        problems.append(f"{key}.warmup_frac must be in [0, 1), got {cfg.warmup_frac}")
    if not 0.0 <= cfg.warmup_start_ratio <= 1.0:
        problems.append(f"{key}.warmup_start_ratio must be in [0, 1], got {cfg.warmup_start_ratio}")
    if not 0.0 <= cfg.end_ratio <= 1.0:
        problems.append(f"{key}.end_ratio must be in [0, 1], got {cfg.end_ratio}")
    if not 0.0 <= cfg.hold_frac < 1.0:
        problems.append(f"{key}.hold_frac must be in [0, 1), got {cfg.hold_frac}")
    if cfg.name == "step":
        if cfg.step_size <= 0:
            problems.append(f"{key}.step_size must be > 0 for the 'step' schedule, got {cfg.step_size}")
        if cfg.gamma <= 0:
            problems.append(f"{key}.gamma must be > 0, got {cfg.gamma}")
    if cfg.wd_end is not None and cfg.wd_end < 0:
        problems.append(f"{key}.wd_end must be >= 0 or null, got {cfg.wd_end}")
    if problems:
        raise ValueError("invalid schedule settings:\n  " + "\n  ".join(problems))


def lr_factor(cfg: ScheduleConfig, step: int, max_steps: int) -> float:
    """Multiplier of the peak lr for the optimizer step ``step`` (0-based) of a ``max_steps`` run."""
    _check_name(cfg.name)
    _check_step(step, max_steps)
    if cfg.name == "step" and cfg.step_size <= 0:
        raise ValueError(f"optim.schedule.step_size must be > 0 for the 'step' schedule, got {cfg.step_size}")
    warmup = warmup_length(cfg, max_steps)
    warm = 1.0
    if warmup > 0:
        start = cfg.warmup_start_ratio
        warm = start + (1.0 - start) * min(1.0, (step + 1) / warmup)
    return warm * _SHAPES[cfg.name](cfg, step, _progress(step, warmup, max_steps))


def weight_decay_at(cfg: ScheduleConfig, base_wd: float, step: int, max_steps: int) -> float:
    """Weight decay for ``step``: ``base_wd`` throughout, or (VAR) a cosine from ``base_wd`` at step 0 to
    ``wd_end`` at max_steps, held there after."""
    _check_step(step, max_steps)
    if cfg.wd_end is None:
        return base_wd
    p = min(step / max_steps, 1.0)
    return cfg.wd_end + (base_wd - cfg.wd_end) * 0.5 * (1.0 + math.cos(math.pi * p))
