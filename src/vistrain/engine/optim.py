"""Parameter groups and optimizer construction.

Groups are keyed by (lr multiplier, decays or not). Each group carries two extra keys, ``lr_mult`` and
``wd_mult``, so that the schedule can set every group's lr and weight decay from the base values each step
(``apply_schedule``); torch keeps extra group keys in ``state_dict``, so they survive a resume.

Which parameters decay: matrices and convolution kernels do. Biases, 1-D parameters (norm gains, scales),
embedding tables and normalisation layers do not: shrinking them towards 0 does not regularise anything
useful and hurts (VAR and nanoVLM both exclude them). Extra name substrings go in ``optim.no_decay``
(VAR's 3-D position embeddings, for instance: ``no_decay: [pos_start, pos_1LC]``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from vistrain.engine.schedule import ScheduleConfig, lr_factor, weight_decay_at
from vistrain.engine.schedule import validate as validate_schedule

__all__ = ["OptimConfig", "apply_schedule", "build_optimizer", "build_param_groups", "freeze_zero_lr", "validate"]

# Devices where fused Adam(W) is switched on without being asked (cfg.fused None). CPU has a fused kernel in
# recent torch too, but it is not reliably faster there, so it stays opt-in.
_AUTO_FUSED_DEVICES = {"cuda"}

# Layers whose own parameters never decay, whatever their shape.
_NO_DECAY_MODULES: tuple[type[nn.Module], ...] = (
    nn.Embedding,
    nn.EmbeddingBag,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    nn.modules.batchnorm._NormBase,  # BatchNorm*, SyncBatchNorm, InstanceNorm*
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)


@dataclass
class OptimConfig:
    name: str = "adamw"  # adamw | adam
    lr: float = 1e-4  # peak lr
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.0
    no_decay: list[str] = field(default_factory=list)  # extra parameter-name substrings without weight decay
    lr_mult: dict[str, float] = field(default_factory=dict)  # module-name prefix -> lr multiplier; 0 freezes
    fused: Optional[bool] = None  # None: fused where every parameter is on CUDA; True: insist; False: never
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)


_OPTIMIZERS = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam}


def validate(cfg: OptimConfig) -> None:
    """Check the optimizer settings; messages name the config key and what to do."""
    if cfg.name not in _OPTIMIZERS:
        raise ValueError(f"unknown optimizer optim.name={cfg.name!r}; choose one of: {', '.join(_OPTIMIZERS)}")
    if len(cfg.betas) != 2:
        raise ValueError(f"optim.betas needs exactly two numbers [beta1, beta2], got {list(cfg.betas)}")
    if not all(0.0 <= b < 1.0 for b in cfg.betas):
        raise ValueError(f"optim.betas must each be in [0, 1), got {list(cfg.betas)}")
    if cfg.lr < 0:
        raise ValueError(f"optim.lr must be >= 0, got {cfg.lr}")
    if cfg.eps <= 0:
        raise ValueError(f"optim.eps must be > 0, got {cfg.eps}")
    if cfg.weight_decay < 0:
        raise ValueError(f"optim.weight_decay must be >= 0, got {cfg.weight_decay}")
    for prefix, mult in cfg.lr_mult.items():
        if mult < 0:
            raise ValueError(f"optim.lr_mult[{prefix!r}] must be >= 0 (0 freezes), got {mult}")
    validate_schedule(cfg.schedule)


def _prefix_matches(prefix: str, name: str) -> bool:
    """Whole dotted components only: 'vision' matches 'vision.x.weight', not 'vision_proj.weight'."""
    return prefix == "" or name == prefix or name.startswith(prefix + ".")


def _lr_mult_of(name: str, lr_mult: dict[str, float]) -> float:
    best = max((p for p in lr_mult if _prefix_matches(p, name)), key=len, default=None)
    return 1.0 if best is None else float(lr_mult[best])


def _check_prefixes(model: nn.Module, lr_mult: dict[str, float]) -> None:
    names = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    for prefix in lr_mult:
        if not any(_prefix_matches(prefix, n) for n in names):
            top = [n for n, _ in model.named_children()] + [n for n, _ in model.named_parameters(recurse=False)]
            raise ValueError(
                f"optim.lr_mult has prefix {prefix!r}, which matches no parameter of the model; "
                f"prefixes are dotted module names, top-level ones are: {', '.join(top) or '(none)'}"
            )


def _no_decay_ids(model: nn.Module) -> set[int]:
    ids = set()
    for module in model.modules():
        if isinstance(module, _NO_DECAY_MODULES):
            ids.update(id(p) for p in module.parameters(recurse=False))
    return ids


def freeze_zero_lr(model: nn.Module, cfg: OptimConfig) -> None:
    """Freeze (requires_grad False) the parameters whose lr multiplier is 0.

    Call it before wrapping the model in DDP / FSDP: they decide at wrap time which parameters get gradients.
    """
    _check_prefixes(model, cfg.lr_mult)
    for name, p in model.named_parameters():
        if _lr_mult_of(name, cfg.lr_mult) == 0.0:
            p.requires_grad_(False)


def build_param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """Split the trainable parameters into groups by (lr multiplier, decays?).

    Side effect: parameters whose lr multiplier is 0 are frozen (``requires_grad_(False)``), so that no
    gradient is computed for them at all. Parameters already frozen are left out. A parameter shared under
    several names (tied embeddings) appears once; its names must agree on the lr multiplier.
    """
    _check_prefixes(model, cfg.lr_mult)
    no_decay_ids = _no_decay_ids(model)

    names_of: dict[int, list[str]] = {}
    params: dict[int, nn.Parameter] = {}  # insertion order = model order, so groups are deterministic
    for name, p in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(p), []).append(name)
        params.setdefault(id(p), p)

    groups: dict[tuple[float, bool], dict] = {}
    for pid, p in params.items():
        names = names_of[pid]
        mults = {_lr_mult_of(n, cfg.lr_mult) for n in names}
        if len(mults) > 1:
            raise ValueError(
                f"parameter shared as {', '.join(names)} gets different optim.lr_mult values {sorted(mults)}; "
                "give its names the same multiplier"
            )
        mult = mults.pop()
        if mult == 0.0:
            p.requires_grad_(False)
        if not p.requires_grad:
            continue
        decays = not (
            p.ndim < 2
            or pid in no_decay_ids
            or any(n.endswith("bias") for n in names)
            or any(s in n for s in cfg.no_decay for n in names)
        )
        key = (mult, decays)
        if key not in groups:
            label = "decay" if decays else "no_decay"
            groups[key] = {
                "params": [],
                "name": label if mult == 1.0 else f"{label}@lr_x{mult:g}",
                "lr_mult": mult,
                "wd_mult": 1.0 if decays else 0.0,
                "lr": cfg.lr * mult,
                "weight_decay": cfg.weight_decay * (1.0 if decays else 0.0),
            }
        groups[key]["params"].append(p)

    if not groups:
        raise ValueError(
            "the model has no trainable parameters left: every one is frozen "
            "(requires_grad=False or optim.lr_mult 0); nothing to optimise"
        )
    return list(groups.values())


def _fused_capable_devices() -> set[str]:
    """Device types with a fused Adam kernel in this torch; torch only checks at the first step, so we
    ask up front to fail at construction with a clear message instead."""
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

        return set(_get_fused_kernels_supported_devices())
    except ImportError:  # private helper moved: assume the one device that always had it
        return {"cuda"}


def _use_fused(groups: list[dict], cfg: OptimConfig) -> bool:
    params = [p for g in groups for p in g["params"]]
    devices = {p.device.type for p in params}
    all_float = all(p.is_floating_point() for p in params)
    if cfg.fused is None:
        return devices <= _AUTO_FUSED_DEVICES and all_float
    if cfg.fused and not (devices <= _fused_capable_devices() and all_float):
        dtypes = sorted({str(p.dtype) for p in params})
        raise ValueError(
            f"optim.fused=true, but torch {torch.__version__} has no fused {cfg.name} for parameters on "
            f"{', '.join(sorted(devices))} with dtypes {', '.join(dtypes)} (fused kernels exist for floating "
            f"point on: {', '.join(sorted(_fused_capable_devices()))}); set optim.fused=null to choose "
            "automatically, or false"
        )
    return cfg.fused


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """Adam or AdamW over ``build_param_groups(model, cfg)``, fused where that is possible and wanted."""
    validate(cfg)
    groups = build_param_groups(model, cfg)
    betas = (float(cfg.betas[0]), float(cfg.betas[1]))
    fused = _use_fused(groups, cfg)
    # fused=None (not False) when off, so torch may still pick its foreach implementation
    return _OPTIMIZERS[cfg.name](groups, lr=cfg.lr, betas=betas, eps=cfg.eps, fused=fused or None)


def apply_schedule(
    optimizer: torch.optim.Optimizer, cfg: OptimConfig, step: int, max_steps: int
) -> tuple[float, float]:
    """Set every group's lr and weight decay for optimizer step ``step``; return the base (lr, wd).

    Base values are those of a group with multipliers 1, i.e. what to log as "lr" and "wd".
    """
    lr = cfg.lr * lr_factor(cfg.schedule, step, max_steps)
    wd = weight_decay_at(cfg.schedule, cfg.weight_decay, step, max_steps)
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_mult", 1.0)
        group["weight_decay"] = wd * group.get("wd_mult", 1.0)
    return lr, wd
