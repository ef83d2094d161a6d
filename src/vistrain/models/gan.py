"""GAN generators and discriminators: a DCGAN pair and a residual (SNGAN / BigGAN-like) pair.

    G(z_BZ, labels_B=None) -> img_BCHW in [-1, 1]
    D(img_BCHW, labels_B=None) -> logits_B

Both pairs share one width schedule: features at spatial size r have `_width(r)` channels in G and D
alike, wide at 4x4 and halving towards the image, so the cost per layer stays roughly flat.

Class conditioning (num_classes > 0) follows the usual recipe: conditional BatchNorm in G (per-class
gain and bias) and a projection discriminator, logit = linear(phi(x)) + <embed(y), phi(x)>, where phi(x)
are D's pooled features. With num_classes == 0 labels are accepted and ignored, so a task can always
pass them.

Weights are initialised before spectral norm is attached (see layers.maybe_spectral_norm), which is
why every layer is made through `_make`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vistrain.models.layers import ConditionalBatchNorm2d, check_labels, maybe_spectral_norm

__all__ = [
    "GeneratorConfig",
    "DiscriminatorConfig",
    "GENERATORS",
    "DISCRIMINATORS",
    "build_generator",
    "build_discriminator",
    "DCGANGenerator",
    "DCGANDiscriminator",
    "ResNetGenerator",
    "ResNetDiscriminator",
]


@dataclass
class GeneratorConfig:
    name: str = "dcgan"  # dcgan | resnet
    z_dim: int = 128
    base_channels: int = 64  # width multiplier: the 4x4 features have up to 8x this many channels
    spectral_norm: bool = False  # BigGAN puts spectral norm in G too; off by default (costs a little)


@dataclass
class DiscriminatorConfig:
    name: str = "dcgan"  # dcgan | resnet
    base_channels: int = 64
    spectral_norm: bool = True  # the main stabiliser of hinge-loss GANs; keep on unless you know why


# ---------------------------------------------------------------------------------------------------
# shared helpers


def _check_shape_args(what: str, resolution: int, channels: int, num_classes: int, base_channels: int) -> None:
    if resolution < 16 or resolution > 256 or resolution & (resolution - 1):
        raise ValueError(
            f"{what}: resolution must be a power of two between 16 and 256, got {resolution}; "
            "resize the data (data resolution) to one of 16, 32, 64, 128, 256."
        )
    if channels < 1:
        raise ValueError(f"{what}: image channels must be >= 1, got {channels}.")
    if num_classes < 0:
        raise ValueError(f"{what}: num_classes must be >= 0 (0 = unconditional), got {num_classes}.")
    if base_channels < 1:
        raise ValueError(f"{what}: base_channels must be >= 1, got {base_channels}.")


def _width(r: int, resolution: int, base: int) -> int:
    """Channels of the features at spatial size r: base/2 at full size, doubling per halving, <= 8*base."""
    return min(8 * base, max(1, base * resolution // (2 * r)))


def _make(module: nn.Module, init: str, sn: bool) -> nn.Module:
    """Initialise a conv / linear / embedding layer, then optionally attach spectral norm.

    init "dcgan": N(0, 0.02), the DCGAN paper's choice; "xavier": Xavier-uniform, as in SNGAN, which keeps
    activations at unit scale through the residual blocks.
    """
    weight = module.weight
    if init == "dcgan":
        nn.init.normal_(weight, 0.0, 0.02)
    elif init == "xavier":
        nn.init.xavier_uniform_(weight)
    else:
        raise ValueError(f"unknown init {init!r}")
    bias = getattr(module, "bias", None)
    if isinstance(bias, Tensor):
        nn.init.zeros_(bias)
    return maybe_spectral_norm(module, sn)


def _check_z(model: nn.Module, z_BZ: Tensor) -> None:
    z_dim = model.z_dim
    if z_BZ.dim() != 2 or z_BZ.shape[1] != z_dim:
        raise ValueError(f"{type(model).__name__}: z must have shape [B, {z_dim}], got {tuple(z_BZ.shape)}.")


def _check_img(model: nn.Module, img_BCHW: Tensor) -> None:
    c, r = model.channels, model.resolution
    if img_BCHW.dim() != 4 or tuple(img_BCHW.shape[1:]) != (c, r, r):
        raise ValueError(
            f"{type(model).__name__}: images must have shape [B, {c}, {r}, {r}] (the resolution and channels "
            f"the model was built for), got {tuple(img_BCHW.shape)}."
        )


class _Projection(nn.Module):
    """Output head of both discriminators: linear logit plus the projection term <embed(y), features>."""

    def __init__(self, in_features: int, feat_dim: int, num_classes: int, init: str, sn: bool):
        super().__init__()
        self.num_classes = num_classes
        self.linear = _make(nn.Linear(in_features, 1), init, sn)
        if num_classes > 0:
            self.embed = _make(nn.Embedding(num_classes, feat_dim), init, sn)

    def forward(self, flat_BF: Tensor, pooled_BC: Tensor, labels_B: Tensor | None) -> Tensor:
        logits_B = self.linear(flat_BF).squeeze(1)
        if labels_B is not None:
            logits_B = logits_B + (self.embed(labels_B) * pooled_BC).sum(dim=1)
        return logits_B


# ---------------------------------------------------------------------------------------------------
# DCGAN pair


class _DCGANUp(nn.Module):
    """ConvTranspose 4x4 stride 2 (doubles the size) -> (conditional) BatchNorm -> ReLU."""

    def __init__(self, c_in: int, c_out: int, num_classes: int, sn: bool):
        super().__init__()
        # No bias: the BatchNorm right after would cancel it.
        self.conv = _make(nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1, bias=False), "dcgan", sn)
        self.bn = ConditionalBatchNorm2d(c_out, num_classes)

    def forward(self, x_BCHW: Tensor, labels_B: Tensor | None) -> Tensor:
        return F.relu(self.bn(self.conv(x_BCHW), labels_B))


class DCGANGenerator(nn.Module):
    """Linear z -> 4x4 features, transposed-conv blocks up to the resolution, 3x3 conv + tanh."""

    def __init__(self, cfg: GeneratorConfig, resolution: int, channels: int, num_classes: int):
        super().__init__()
        _check_shape_args("DCGANGenerator", resolution, channels, num_classes, cfg.base_channels)
        self.z_dim, self.resolution, self.channels, self.num_classes = cfg.z_dim, resolution, channels, num_classes
        sn = cfg.spectral_norm

        def width(r: int) -> int:
            return _width(r, resolution, cfg.base_channels)

        self.c0 = width(4)
        self.fc = _make(nn.Linear(cfg.z_dim, self.c0 * 16, bias=False), "dcgan", sn)
        self.bn0 = ConditionalBatchNorm2d(self.c0, num_classes)
        sizes = [4 * 2**i for i in range(int(math.log2(resolution // 4)) + 1)]  # 4, 8, ..., resolution
        self.blocks = nn.ModuleList(
            _DCGANUp(width(r), width(2 * r), num_classes, sn) for r in sizes[:-1]
        )
        self.to_img = _make(nn.Conv2d(width(resolution), channels, 3, padding=1), "dcgan", sn)

    def forward(self, z_BZ: Tensor, labels_B: Tensor | None = None) -> Tensor:
        _check_z(self, z_BZ)
        labels_B = check_labels(type(self).__name__, self.num_classes, labels_B, z_BZ.shape[0])
        h_BCHW = self.fc(z_BZ).view(z_BZ.shape[0], self.c0, 4, 4)
        h_BCHW = F.relu(self.bn0(h_BCHW, labels_B))
        for block in self.blocks:
            h_BCHW = block(h_BCHW, labels_B)
        return torch.tanh(self.to_img(h_BCHW))


class DCGANDiscriminator(nn.Module):
    """Strided 4x4 convs + LeakyReLU(0.2) down to 4x4, then a linear logit (+ projection).

    No BatchNorm: it couples the samples of a batch, which interferes with R1 and with real/fake
    batches being scored separately; spectral norm does the stabilising instead.
    """

    def __init__(self, cfg: DiscriminatorConfig, resolution: int, channels: int, num_classes: int):
        super().__init__()
        _check_shape_args("DCGANDiscriminator", resolution, channels, num_classes, cfg.base_channels)
        self.resolution, self.channels, self.num_classes = resolution, channels, num_classes
        sn = cfg.spectral_norm

        def width(r: int) -> int:
            return _width(r, resolution, cfg.base_channels)

        blocks: list[nn.Module] = []
        c_in, r = channels, resolution
        while r > 4:  # each block halves the size
            conv = _make(nn.Conv2d(c_in, width(r // 2), 4, stride=2, padding=1), "dcgan", sn)
            blocks.append(nn.Sequential(conv, nn.LeakyReLU(0.2)))
            c_in, r = width(r // 2), r // 2
        self.blocks = nn.ModuleList(blocks)
        self.head = _Projection(c_in * 16, c_in, num_classes, "dcgan", sn)

    def forward(self, img_BCHW: Tensor, labels_B: Tensor | None = None) -> Tensor:
        _check_img(self, img_BCHW)
        labels_B = check_labels(type(self).__name__, self.num_classes, labels_B, img_BCHW.shape[0])
        h_BCHW = img_BCHW
        for block in self.blocks:
            h_BCHW = block(h_BCHW)  # ends as [B, C, 4, 4]
        return self.head(h_BCHW.flatten(1), h_BCHW.sum(dim=(2, 3)), labels_B)


# ---------------------------------------------------------------------------------------------------
# residual pair (SNGAN / BigGAN-like)


class _ResUp(nn.Module):
    """BN -> ReLU -> upsample -> conv3x3 -> BN -> ReLU -> conv3x3, plus an upsampled 1x1 shortcut."""

    def __init__(self, c_in: int, c_out: int, num_classes: int, sn: bool):
        super().__init__()
        self.bn1 = ConditionalBatchNorm2d(c_in, num_classes)
        self.conv1 = _make(nn.Conv2d(c_in, c_out, 3, padding=1), "xavier", sn)
        self.bn2 = ConditionalBatchNorm2d(c_out, num_classes)
        self.conv2 = _make(nn.Conv2d(c_out, c_out, 3, padding=1), "xavier", sn)
        self.shortcut = _make(nn.Conv2d(c_in, c_out, 1), "xavier", sn)

    def forward(self, x_BCHW: Tensor, labels_B: Tensor | None) -> Tensor:
        h = F.relu(self.bn1(x_BCHW, labels_B))
        h = self.conv1(F.interpolate(h, scale_factor=2.0, mode="nearest"))
        h = self.conv2(F.relu(self.bn2(h, labels_B)))
        # A 1x1 conv commutes with nearest upsampling, so apply it at the small size (4x cheaper).
        return h + F.interpolate(self.shortcut(x_BCHW), scale_factor=2.0, mode="nearest")


class ResNetGenerator(nn.Module):
    """Linear z -> 4x4 features, residual up-blocks to the resolution, BN -> ReLU -> conv3x3 -> tanh."""

    def __init__(self, cfg: GeneratorConfig, resolution: int, channels: int, num_classes: int):
        super().__init__()
        _check_shape_args("ResNetGenerator", resolution, channels, num_classes, cfg.base_channels)
        self.z_dim, self.resolution, self.channels, self.num_classes = cfg.z_dim, resolution, channels, num_classes
        sn = cfg.spectral_norm

        def width(r: int) -> int:
            return _width(r, resolution, cfg.base_channels)

        self.c0 = width(4)
        self.fc = _make(nn.Linear(cfg.z_dim, self.c0 * 16), "xavier", sn)
        sizes = [4 * 2**i for i in range(int(math.log2(resolution // 4)) + 1)]
        self.blocks = nn.ModuleList(_ResUp(width(r), width(2 * r), num_classes, sn) for r in sizes[:-1])
        # The last normalisation is unconditional, as in SNGAN/BigGAN: class style is set by then.
        self.bn_out = ConditionalBatchNorm2d(width(resolution), 0)
        self.to_img = _make(nn.Conv2d(width(resolution), channels, 3, padding=1), "xavier", sn)

    def forward(self, z_BZ: Tensor, labels_B: Tensor | None = None) -> Tensor:
        _check_z(self, z_BZ)
        labels_B = check_labels(type(self).__name__, self.num_classes, labels_B, z_BZ.shape[0])
        h_BCHW = self.fc(z_BZ).view(z_BZ.shape[0], self.c0, 4, 4)
        for block in self.blocks:
            h_BCHW = block(h_BCHW, labels_B)
        return torch.tanh(self.to_img(F.relu(self.bn_out(h_BCHW))))


class _ResDown(nn.Module):
    """[ReLU] -> conv3x3 -> ReLU -> conv3x3 -> avgpool, plus a pooled 1x1 shortcut.

    The first block skips the leading ReLU: its input is the image, which a ReLU would half erase.
    """

    def __init__(self, c_in: int, c_out: int, sn: bool, first: bool):
        super().__init__()
        self.first = first
        self.conv1 = _make(nn.Conv2d(c_in, c_out, 3, padding=1), "xavier", sn)
        self.conv2 = _make(nn.Conv2d(c_out, c_out, 3, padding=1), "xavier", sn)
        self.shortcut = _make(nn.Conv2d(c_in, c_out, 1), "xavier", sn)

    def forward(self, x_BCHW: Tensor) -> Tensor:
        h = x_BCHW if self.first else F.relu(x_BCHW)
        h = self.conv2(F.relu(self.conv1(h)))
        # 1x1 conv and average pooling are both linear and commute; pooling first is 4x cheaper.
        return F.avg_pool2d(h, 2) + self.shortcut(F.avg_pool2d(x_BCHW, 2))


class ResNetDiscriminator(nn.Module):
    """Residual down-blocks to 4x4, ReLU, global sum pooling, linear logit (+ projection)."""

    def __init__(self, cfg: DiscriminatorConfig, resolution: int, channels: int, num_classes: int):
        super().__init__()
        _check_shape_args("ResNetDiscriminator", resolution, channels, num_classes, cfg.base_channels)
        self.resolution, self.channels, self.num_classes = resolution, channels, num_classes
        sn = cfg.spectral_norm
        blocks: list[nn.Module] = []
        c_in, r = channels, resolution
        while r > 4:  # each block computes at size r with the width G uses at r, then halves the size
            c_out = _width(r, resolution, cfg.base_channels)
            blocks.append(_ResDown(c_in, c_out, sn, first=not blocks))
            c_in, r = c_out, r // 2
        self.blocks = nn.Sequential(*blocks)
        self.head = _Projection(c_in, c_in, num_classes, "xavier", sn)

    def forward(self, img_BCHW: Tensor, labels_B: Tensor | None = None) -> Tensor:
        _check_img(self, img_BCHW)
        labels_B = check_labels(type(self).__name__, self.num_classes, labels_B, img_BCHW.shape[0])
        # Sum (not mean) pooling, as in SNGAN: with spectral norm every layer is at most 1-Lipschitz, and
        # averaging would shrink the logits by the 4x4 area, leaving too small a range for the hinge margin.
        pooled_BC = F.relu(self.blocks(img_BCHW)).sum(dim=(2, 3))
        return self.head(pooled_BC, pooled_BC, labels_B)


# ---------------------------------------------------------------------------------------------------
# registries and builders

GENERATORS: dict[str, type[nn.Module]] = {"dcgan": DCGANGenerator, "resnet": ResNetGenerator}
DISCRIMINATORS: dict[str, type[nn.Module]] = {"dcgan": DCGANDiscriminator, "resnet": ResNetDiscriminator}


def build_generator(cfg: GeneratorConfig, resolution: int, channels: int, num_classes: int) -> nn.Module:
    """Build the generator named by `cfg.name` for images of `channels` x `resolution`^2."""
    if cfg.name not in GENERATORS:
        raise ValueError(f"unknown generator name {cfg.name!r}; "
                         f"registered generators: {', '.join(sorted(GENERATORS))}.")
    return GENERATORS[cfg.name](cfg, resolution, channels, num_classes)


def build_discriminator(cfg: DiscriminatorConfig, resolution: int, channels: int, num_classes: int) -> nn.Module:
    """Build the discriminator named by `cfg.name` for images of `channels` x `resolution`^2."""
    if cfg.name not in DISCRIMINATORS:
        raise ValueError(
            f"unknown discriminator name {cfg.name!r}; registered discriminators: {', '.join(sorted(DISCRIMINATORS))}."
        )
    return DISCRIMINATORS[cfg.name](cfg, resolution, channels, num_classes)
