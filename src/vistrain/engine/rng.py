"""Seeding and exact capture / restore of every global RNG stream a training step may draw from.

Resuming "as if never stopped" needs the python, numpy, torch CPU and accelerator streams back exactly
where they were. The captured state goes into train_state.pt, which is read with
torch.load(weights_only=True), so it is expressed only with tensors, ints, floats, strings, lists and
dicts: no numpy arrays, no tuples of arbitrary objects.

Each process has its own streams: in a distributed run, capture on every rank and store them all
(e.g. gathered to rank 0), then restore each rank's own state.
"""

from __future__ import annotations

import random
import warnings
from typing import Any, Optional

import numpy as np
import torch

# numpy's legacy global RandomState accepts seeds in [0, 2**32).
_MAX_SEED = 2**32 - 1


def seed_everything(seed: int) -> None:
    """Seed python's `random`, numpy's global RandomState and torch (CPU and all CUDA devices: torch
    .manual_seed covers both). Deterministic kernels are a separate choice left to the trainer."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= _MAX_SEED:
        raise ValueError(f"run.seed must be an integer in [0, {_MAX_SEED}], got {seed!r}")
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _accelerator_module(device_type: str) -> Optional[Any]:
    """torch.cuda / torch.mps / torch.xpu ...: whichever exposes get_rng_state for this device type."""
    if device_type == "cpu":
        return None
    module = getattr(torch, device_type, None)
    if module is None or not hasattr(module, "get_rng_state") or not hasattr(module, "set_rng_state"):
        return None
    return module


def capture_rng_state(device: torch.device) -> dict:
    """Snapshot of this process's RNG streams: python, numpy, torch CPU and `device`'s accelerator.

    Returned layout (all weights_only-loadable)::

        {"python": {"version": int, "state": int64 tensor [625], "gauss_next": float | None},
         "numpy": {"key": int64 tensor [624], "pos": int, "has_gauss": int, "cached_gaussian": float},
         "torch_cpu": uint8 tensor,
         "accelerator": {"type": "cuda", "state": uint8 tensor} | None}

    "accelerator" is None on CPU and on device types without a get_rng_state API.
    """
    device = torch.device(device)
    version, mt_state, gauss_next = random.getstate()
    name, key_N, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    if name != "MT19937":  # the legacy global generator is always MT19937; guard the assumption
        raise RuntimeError(f"numpy global RNG is {name}, expected MT19937")

    accelerator = None
    module = _accelerator_module(device.type)
    if module is not None:
        state = module.get_rng_state(device) if device.index is not None else module.get_rng_state()
        accelerator = {"type": device.type, "state": state.cpu()}

    return {
        # MT19937 words are < 2**32, so int64 holds them exactly.
        "python": {
            "version": int(version),
            "state": torch.tensor(mt_state, dtype=torch.int64),
            "gauss_next": None if gauss_next is None else float(gauss_next),
        },
        "numpy": {
            "key": torch.from_numpy(np.asarray(key_N, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch_cpu": torch.get_rng_state(),
        "accelerator": accelerator,
    }


def restore_rng_state(state: dict, device: torch.device) -> None:
    """Put back the streams from capture_rng_state so the next draws repeat exactly.

    If the state was captured on another accelerator type (a CUDA run resumed on CPU, say), its
    accelerator stream cannot be restored: that is warned about, since the run then continues
    correctly but not bit-for-bit.
    """
    device = torch.device(device)
    for key in ("python", "numpy", "torch_cpu"):
        if key not in state:
            raise ValueError(
                f"RNG state lacks '{key}' (found {sorted(state)}); it was not made by capture_rng_state"
            )

    py = state["python"]
    mt_state = tuple(int(x) for x in torch.as_tensor(py["state"]).tolist())
    gauss_next = py["gauss_next"]
    random.setstate((int(py["version"]), mt_state, None if gauss_next is None else float(gauss_next)))

    npy = state["numpy"]
    key_N = np.asarray(torch.as_tensor(npy["key"]).numpy(), dtype=np.uint32)
    np.random.set_state(
        ("MT19937", key_N, int(npy["pos"]), int(npy["has_gauss"]), float(npy["cached_gaussian"]))
    )

    torch.set_rng_state(torch.as_tensor(state["torch_cpu"], dtype=torch.uint8).cpu())

    saved = state.get("accelerator")
    if saved is None:
        return
    module = _accelerator_module(device.type)
    if saved["type"] != device.type or module is None:
        warnings.warn(
            f"RNG state was captured on a {saved['type']} device but this run uses {device}; its "
            f"{saved['type']} random stream is not restored, so results will not repeat bit-for-bit.",
            stacklevel=2,
        )
        return
    accel_state = saved["state"].cpu()
    if device.index is not None:
        module.set_rng_state(accel_state, device)
    else:
        module.set_rng_state(accel_state)
