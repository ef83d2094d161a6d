"""Differentiable augmentation for GAN training (DiffAugment, Zhao et al. 2020).

With little data, D memorises the real images. Augmenting *both* real and fake images before D -- with
operations that gradients pass through, so G still learns -- stops that without leaking the
augmentation into G's samples. Apply the same policy to every image D sees, in both D and G steps.

Random draws use the global torch RNG on the images' device, so the trainer's RNG checkpointing makes
a resumed run draw the same augmentations.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["diff_augment", "AUGMENTATIONS"]


def _rand_B111(x_BCHW: Tensor) -> Tensor:
    """One U(0, 1) draw per image, shaped to broadcast over C, H, W."""
    return torch.rand(x_BCHW.shape[0], 1, 1, 1, device=x_BCHW.device, dtype=x_BCHW.dtype)


def _color(x_BCHW: Tensor) -> Tensor:
    # brightness: add U(-0.5, 0.5)
    x_BCHW = x_BCHW + (_rand_B111(x_BCHW) - 0.5)
    # saturation: scale by U(0, 2) the distance of each pixel from its own channel mean (grey level)
    grey_B1HW = x_BCHW.mean(dim=1, keepdim=True)
    x_BCHW = (x_BCHW - grey_B1HW) * (_rand_B111(x_BCHW) * 2.0) + grey_B1HW
    # contrast: scale by U(0.5, 1.5) the distance from the image mean
    mean_B111 = x_BCHW.mean(dim=(1, 2, 3), keepdim=True)
    return (x_BCHW - mean_B111) * (_rand_B111(x_BCHW) + 0.5) + mean_B111


def _translation(x_BCHW: Tensor, ratio: float = 0.125) -> Tensor:
    """Shift each image by an integer offset in [-ratio*size, ratio*size] per axis; vacated pixels are 0."""
    B, _, H, W = x_BCHW.shape
    max_dy, max_dx = int(H * ratio + 0.5), int(W * ratio + 0.5)
    dev = x_BCHW.device
    dy_B = torch.randint(-max_dy, max_dy + 1, (B,), device=dev)
    dx_B = torch.randint(-max_dx, max_dx + 1, (B,), device=dev)
    # Gather from a zero-padded copy: output pixel (i, j) reads input pixel (i - dy, j - dx).
    x_pad = torch.nn.functional.pad(x_BCHW, (max_dx, max_dx, max_dy, max_dy))
    rows_BH = torch.arange(H, device=dev)[None, :] - dy_B[:, None] + max_dy
    cols_BW = torch.arange(W, device=dev)[None, :] - dx_B[:, None] + max_dx
    b_B = torch.arange(B, device=dev)
    out_BHWC = x_pad.permute(0, 2, 3, 1)[b_B[:, None, None], rows_BH[:, :, None], cols_BW[:, None, :]]
    return out_BHWC.permute(0, 3, 1, 2).contiguous()


def _cutout(x_BCHW: Tensor, ratio: float = 0.5) -> Tensor:
    """Zero one square of ratio*size per image, centred anywhere (parts may fall outside the image)."""
    B, _, H, W = x_BCHW.shape
    h, w = int(H * ratio + 0.5), int(W * ratio + 0.5)
    dev = x_BCHW.device
    cy_B = torch.randint(0, H, (B,), device=dev)
    cx_B = torch.randint(0, W, (B,), device=dev)
    top_B, left_B = cy_B - h // 2, cx_B - w // 2
    ys_H, xs_W = torch.arange(H, device=dev), torch.arange(W, device=dev)
    in_rows_BH = (ys_H[None] >= top_B[:, None]) & (ys_H[None] < top_B[:, None] + h)
    in_cols_BW = (xs_W[None] >= left_B[:, None]) & (xs_W[None] < left_B[:, None] + w)
    keep_B1HW = ~(in_rows_BH[:, :, None] & in_cols_BW[:, None, :])
    return x_BCHW * keep_B1HW[:, None].to(x_BCHW.dtype)


AUGMENTATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "color": _color,
    "translation": _translation,
    "cutout": _cutout,
}


def diff_augment(x_BCHW: Tensor, policy: str) -> Tensor:
    """Apply the comma-separated `policy` (e.g. "color,translation,cutout") in the order given.

    "" is the identity. Every operation is differentiable with respect to `x_BCHW`.
    """
    names = [p.strip() for p in policy.split(",") if p.strip()]
    unknown = [n for n in names if n not in AUGMENTATIONS]
    if unknown:
        raise ValueError(
            f"unknown DiffAugment policy item(s) {unknown} in {policy!r}; valid items: "
            f"{', '.join(AUGMENTATIONS)} (comma-separated, or '' for none)."
        )
    for name in names:
        x_BCHW = AUGMENTATIONS[name](x_BCHW)
    return x_BCHW
