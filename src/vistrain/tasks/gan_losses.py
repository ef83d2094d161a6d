"""Adversarial losses and the R1 gradient penalty.

Every loss is a mean over the batch, and real and fake batches are averaged separately (so they may
differ in size). Logits are promoted to float32 first: under bf16/fp16 autocast, softplus and squares
of large logits lose too much precision.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["LOSSES", "discriminator_loss", "generator_loss", "r1_penalty"]

LOSSES = ("hinge", "non_saturating", "least_squares", "wasserstein")


def _check_kind(kind: str) -> None:
    if kind not in LOSSES:
        raise ValueError(f"unknown GAN loss {kind!r}; valid kinds: {', '.join(LOSSES)}.")


def discriminator_loss(kind: str, real_logits_B: Tensor, fake_logits_B: Tensor) -> Tensor:
    """D's loss: push real logits up and fake logits down. Returns a float32 scalar."""
    _check_kind(kind)
    real, fake = real_logits_B.float(), fake_logits_B.float()
    if kind == "hinge":
        # Only logits inside the margin contribute: D stops pushing once it is confident.
        return F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean()
    if kind == "non_saturating":
        # -log sigmoid(real) - log(1 - sigmoid(fake)), written with softplus for stability.
        return F.softplus(-real).mean() + F.softplus(fake).mean()
    if kind == "least_squares":
        return 0.5 * ((real - 1.0).square().mean() + fake.square().mean())
    return fake.mean() - real.mean()  # wasserstein: needs a Lipschitz D (spectral norm / R1)


def generator_loss(kind: str, fake_logits_B: Tensor) -> Tensor:
    """G's loss on D's logits for generated images. Returns a float32 scalar."""
    _check_kind(kind)
    fake = fake_logits_B.float()
    if kind == "non_saturating":
        # -log sigmoid(fake): strong gradients early on, when D easily rejects the fakes.
        return F.softplus(-fake).mean()
    if kind == "least_squares":
        return 0.5 * (fake - 1.0).square().mean()
    return -fake.mean()  # hinge and wasserstein


def r1_penalty(real_logits_B: Tensor, real_img_BCHW: Tensor) -> Tensor:
    """Mean over the batch of the squared norm of dD(x)/dx at real images (Mescheder et al. 2018).

    `real_img_BCHW` must have requires_grad=True *before* D was applied to it. The gradient is taken with
    create_graph=True so the penalty can itself be back-propagated into D. The caller scales it by
    gamma / 2 (and by the lazy-regularisation interval when it is applied every N steps).
    Summing the logits is how one call yields each image's own gradient: image i only affects logit i.
    """
    if not real_img_BCHW.requires_grad:
        raise ValueError(
            "r1_penalty needs the gradient with respect to the real images: call "
            "real_img_BCHW.requires_grad_(True) before computing D(real_img_BCHW)."
        )
    (grad_BCHW,) = torch.autograd.grad(real_logits_B.float().sum(), real_img_BCHW, create_graph=True)
    return grad_BCHW.float().square().flatten(1).sum(dim=1).mean()
