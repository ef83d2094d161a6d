"""Fréchet distance between Gaussian fits of two feature sets (the formula behind FID)."""

from __future__ import annotations

import torch
from torch import Tensor


def frechet_distance(feats_a_ND: Tensor, feats_b_MD: Tensor) -> float:
    """|mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^(1/2)), in float64.

    tr((S_a S_b)^(1/2)) is the sum of square roots of the eigenvalues of S_a S_b, which are real and
    non-negative for covariance matrices; tiny negative / imaginary parts are numerical noise.
    """
    a, b = feats_a_ND.double(), feats_b_MD.double()
    if a.shape[0] < 2 or b.shape[0] < 2:
        raise ValueError("the Fréchet distance needs at least 2 samples per set")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    eigvals = torch.linalg.eigvals(cov_a @ cov_b)
    tr_sqrt = eigvals.real.clamp(min=0).sqrt().sum()
    return float((mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * tr_sqrt)
