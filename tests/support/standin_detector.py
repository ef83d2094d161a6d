"""A TorchScript stand-in for the FID Inception (which tests cannot download), with its interface: uint8
N x 3 x H x W in, any size; `return_features=True` -> N x D features, without it -> N x K class logits.

`python tests/support/standin_detector.py OUT.pt` writes one, for trying `vistrain eval --detector` by hand.
"""

import sys
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class TwoHeaded(nn.Module):
    """Inception-like: 8 x 8 average pool (so any image size works) and fixed random projections."""

    def __init__(self, dim: int = 16, classes: int = 10):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.register_buffer("proj", torch.randn(3 * 8 * 8, dim, generator=g) / 8)
        self.register_buffer("head", torch.randn(dim, classes, generator=g))

    def forward(self, x: Tensor, return_features: bool = False) -> Tensor:
        feats = F.adaptive_avg_pool2d(x.float() / 255, 8).flatten(1) @ self.proj
        if return_features:
            return feats
        return feats @ self.head


def save_scripted(module: nn.Module, path) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit is deprecated, and still the format
        torch.jit.save(torch.jit.script(module), str(path))
    return str(path)


if __name__ == "__main__":
    print(save_scripted(TwoHeaded(), sys.argv[1]))
