"""Process groups and rank helpers for torchrun DDP (NCCL on GPU, gloo on CPU).

Everything a rank needs to know travels in one `DistContext` passed down explicitly: no module-level rank
variables. Collectives have a timeout (`run.dist_timeout_s`) so a rank whose peer died fails with an error
instead of hanging forever; torchrun then stops the remaining workers and reports the first failure.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist

from vistrain.engine.config_sections import DEVICES
from vistrain.errors import ConfigError


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    cpu_group: Optional[Any] = None  # gloo group for Python objects and host-side flags

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def pick_device(preference: str, local_rank: int) -> torch.device:
    if preference not in DEVICES:
        raise ConfigError(f"device {preference!r}: expected one of {', '.join(DEVICES)}")
    if preference == "cpu" or (preference == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("device cuda was asked for, but no CUDA device is visible; use cpu or auto")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def init_distributed(device_preference: str = "auto", timeout_s: int = 600, always: bool = False) -> DistContext:
    """Join the torchrun process group if there is one; otherwise a single-process context.

    `always`: make a process group of one when not launched by torchrun (FSDP needs a group even on one
    rank, and then saves the same sharded checkpoints as on many).
    """
    launched = launched_by_torchrun() and int(os.environ["WORLD_SIZE"]) > 1
    if not launched and not always:
        return DistContext(rank=0, world_size=1, local_rank=0, device=pick_device(device_preference, 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0)) if launched else 0
    device = pick_device(device_preference, local_rank)
    timeout = datetime.timedelta(seconds=timeout_s)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        kwargs: dict[str, Any] = {"device_id": device} if backend == "nccl" else {}
        if not launched:  # one process, no torchrun rendezvous: an in-memory store
            kwargs.update(store=dist.HashStore(), rank=0, world_size=1)
        dist.init_process_group(backend=backend, timeout=timeout, **kwargs)
    # Python objects (metrics dicts, RNG states) are gathered over gloo so they never take GPU memory.
    cpu_group = dist.new_group(backend="gloo", timeout=timeout) if backend != "gloo" else dist.group.WORLD
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, device, cpu_group)


def shutdown(ctx: DistContext, clean: bool = True) -> None:
    """Leave the process group. After a clean end, every rank first waits for the others: a rank tearing
    gloo down early can make a peer that still uses it abort. After an error, no waiting: the peers may be
    stuck in another collective, and the launcher stops them once this rank is gone."""
    if dist.is_initialized():
        if clean and ctx.distributed:
            dist.barrier(group=ctx.cpu_group)
        dist.destroy_process_group()


def gather_objects(obj: Any, ctx: DistContext) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank."""
    if not ctx.distributed:
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj, group=ctx.cpu_group)
    return out


def broadcast_object(obj: Any, ctx: DistContext, src: int = 0) -> Any:
    if not ctx.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=ctx.cpu_group)
    return box[0]


def any_rank(flag: bool, ctx: DistContext) -> bool:
    """True on every rank if `flag` is true on any rank (a host-side gloo all-reduce: no device sync)."""
    if not ctx.distributed:
        return flag
    t = torch.tensor([int(flag)], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=ctx.cpu_group)
    return bool(t.item())


def all_reduce_sum(values: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """`values` summed over ranks, in place on the device (no host sync); unchanged on one rank."""
    if ctx.distributed:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier(group=ctx.cpu_group)
