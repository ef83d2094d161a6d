"""Exponential moving average of a model's weights (the GAN's G_ema; later VAR).

The decay is expressed as a half-life in images (StyleGAN2), not as a raw beta, so that it means the same
thing at any batch size: after ``half_life_kimg * 1000`` images the old weights count for one half.
A ramp-up caps the half-life at ``rampup * images_seen`` so that early in training, when the model changes
fast and the EMA would still remember the random init, the average follows the model closely.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

__all__ = ["ema_beta", "unwrap", "update_ema"]


def ema_beta(batch_size: int, half_life_kimg: float, rampup: Optional[float], images_seen: int) -> float:
    """Per-update EMA coefficient for one step of ``batch_size`` images.

    ``rampup`` None switches the ramp-up off; with ``images_seen`` 0 and a ramp-up, beta is 0 (the EMA
    copies the model).
    """
    if batch_size <= 0:
        raise ValueError(f"EMA batch_size must be > 0, got {batch_size}")
    if half_life_kimg < 0:
        raise ValueError(f"EMA half-life must be >= 0 kimg, got {half_life_kimg}")
    if rampup is not None and rampup <= 0:
        raise ValueError(f"EMA rampup must be > 0, or null to switch the ramp-up off; got {rampup}")
    ema_nimg = half_life_kimg * 1000.0
    if rampup is not None:
        ema_nimg = min(ema_nimg, images_seen * rampup)
    return 0.5 ** (batch_size / max(ema_nimg, 1e-8))


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under DDP (``.module``) and torch.compile (``._orig_mod``) wrappers, any nesting."""
    while True:
        inner = getattr(model, "_orig_mod", None)
        if inner is None and isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            inner = model.module
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def _matched(kind: str, ema_items: list, items: list) -> None:
    ema_names = [n for n, _ in ema_items]
    names = [n for n, _ in items]
    if ema_names != names:
        missing = sorted(set(names) - set(ema_names))[:5]
        extra = sorted(set(ema_names) - set(names))[:5]
        raise ValueError(
            f"EMA model and model have different {kind}: only in the model {missing}, only in the EMA {extra} "
            "(first 5 each); build the EMA as a deep copy of the unwrapped model"
        )
    for (name, e), (_, t) in zip(ema_items, items):
        if e.shape != t.shape:
            raise ValueError(f"EMA {kind[:-1]} {name!r} has shape {tuple(e.shape)}, the model's {tuple(t.shape)}")


@torch.no_grad()
def update_ema(ema_model: nn.Module, model: nn.Module, beta: float) -> None:
    """``ema = beta * ema + (1 - beta) * model`` for parameters; buffers (e.g. BatchNorm statistics) are
    copied, since averaging running statistics has no meaning. Either model may be wrapped in DDP or
    compiled. The EMA may keep its own dtype and device (e.g. fp32 on the same GPU)."""
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"EMA beta must be in [0, 1], got {beta}")
    ema_model, model = unwrap(ema_model), unwrap(model)

    ema_params, params = list(ema_model.named_parameters()), list(model.named_parameters())
    _matched("parameters", ema_params, params)
    ema_ts = [e for _, e in ema_params]
    # Under FSDP the model's parameters are shards (DTensors): the EMA copy is whole, so gather them (every
    # rank must call this then, as it is a collective).
    src_ts = [_full(p).detach().to(device=e.device, dtype=e.dtype) for e, (_, p) in zip(ema_ts, params)]
    if ema_ts:
        # lerp(ema, p, w) = ema + w * (p - ema) = beta * ema + (1 - beta) * p with w = 1 - beta
        torch._foreach_lerp_(ema_ts, src_ts, 1.0 - beta)

    ema_bufs, bufs = list(ema_model.named_buffers()), list(model.named_buffers())
    _matched("buffers", ema_bufs, bufs)
    for (_, e), (_, b) in zip(ema_bufs, bufs):
        e.copy_(_full(b))


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t
