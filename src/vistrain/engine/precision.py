"""Mixed precision: autocast for bf16 / fp16, and one GradScaler per optimizer for fp16."""

from __future__ import annotations

import contextlib

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class Precision:
    def __init__(self, mode: str, device: torch.device):
        self.mode = mode
        self.device = device
        self.dtype = DTYPES[mode]

    def autocast(self):
        if self.mode == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def make_scaler(self) -> torch.amp.GradScaler | None:
        """fp16 needs loss scaling; bf16 has fp32's exponent range and does not."""
        if self.mode != "fp16":
            return None
        return torch.amp.GradScaler(self.device.type)
