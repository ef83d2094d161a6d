"""Small building blocks shared by the model files.

Kept free of any engine import: these are plain nn.Modules and functions.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm

__all__ = ["maybe_spectral_norm", "ConditionalBatchNorm2d", "check_labels"]


def maybe_spectral_norm(module: nn.Module, enabled: bool) -> nn.Module:
    """Wrap `module.weight` in spectral normalisation when `enabled`, else return it untouched.

    We use the parametrization API (not the older `torch.nn.utils.spectral_norm` hook) because it
    keeps the power-iteration vectors u and v as ordinary buffers: they land in `state_dict()` as
    plain tensors, survive a safetensors round-trip, and an eval-mode forward after loading is
    bit-identical. Initialise the weight *before* calling this: registration runs 15 power
    iterations on the current weight, and afterwards the raw weight lives at
    `parametrizations.weight.original`.
    """
    return spectral_norm(module) if enabled else module


class ConditionalBatchNorm2d(nn.Module):
    """BatchNorm whose per-channel gain and bias are looked up from the class label.

    The normalisation statistics are shared by all classes; only the affine part is per class, so a
    class changes the "style" of the features cheaply (BigGAN / SNGAN). Gains start at 1 and biases
    at 0, which makes the layer a plain BatchNorm at initialisation whatever the label.

    With `num_classes == 0` the layer is an ordinary affine BatchNorm and the labels are ignored;
    this lets generators use one code path for the conditional and unconditional cases.
    """

    def __init__(self, num_features: int, num_classes: int, eps: float = 1e-5, momentum: float = 0.1):
        super().__init__()
        self.num_classes = num_classes
        self.bn = nn.BatchNorm2d(num_features, eps=eps, momentum=momentum, affine=num_classes == 0)
        if num_classes > 0:
            self.gain = nn.Embedding(num_classes, num_features)
            self.bias = nn.Embedding(num_classes, num_features)
            nn.init.ones_(self.gain.weight)
            nn.init.zeros_(self.bias.weight)

    def forward(self, x_BCHW: Tensor, labels_B: Tensor | None = None) -> Tensor:
        h_BCHW = self.bn(x_BCHW)
        if self.num_classes == 0:
            return h_BCHW
        if labels_B is None:
            raise ValueError("ConditionalBatchNorm2d was built with classes and needs labels_B.")
        gain_BC = self.gain(labels_B)
        bias_BC = self.bias(labels_B)
        return h_BCHW * gain_BC[:, :, None, None] + bias_BC[:, :, None, None]


def check_labels(model_name: str, num_classes: int, labels_B: Tensor | None, batch: int) -> Tensor | None:
    """Validate the labels given to a (possibly) class-conditional network.

    Returns None for an unconditional network (labels are then ignored, so a caller may always pass
    them), the labels otherwise. The value range is not checked here on purpose: that would need a
    device sync on every forward; callers that read labels from the user should check the range.
    """
    if num_classes == 0:
        return None
    if labels_B is None:
        raise ValueError(
            f"{model_name} is class-conditional ({num_classes} classes) and needs labels_B, a [B] tensor "
            "of class indices; pass the batch labels (or build the model with num_classes=0)."
        )
    if labels_B.shape != (batch,):
        raise ValueError(
            f"{model_name}: labels_B must have shape [{batch}] (one class index per image), "
            f"got {tuple(labels_B.shape)}."
        )
    if labels_B.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{model_name}: labels_B must hold integer class indices, got dtype {labels_B.dtype}.")
    return labels_B
