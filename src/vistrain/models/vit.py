"""A SigLIP-style vision transformer: the image encoder of a small VLM (nanoVLM's vision tower).

    last_hidden_BND = VisionTransformer(ViTConfig())(pixel_values_BCHW)   # (B, 1024, 768) for 512 px, patch 16

The image is cut into non-overlapping patches by a convolution whose kernel and stride are the patch size;
each patch gets a learned absolute position embedding (one per patch, no CLS token). Then pre-LN blocks
(LayerNorm -> multi-head self-attention -> residual, LayerNorm -> MLP with tanh-approximated GELU ->
residual) and a final LayerNorm. There is no pooling head: a VLM projects every patch token into the
language model, so the output is the whole sequence.

Fixed resolution: the position embedding has one row per patch of an image_size x image_size input, and
other sizes are rejected rather than interpolated.

Pixels go in already normalised, (image - image_mean) / image_std per channel. The mean and std are part of
the config because they belong to the pretrained weights (SigLIP's are 0.5 / 0.5, mapping [0, 1] to
[-1, 1]); the data pipeline reads them from here.

Weights of Hugging Face SigLIP / SigLIP2 checkpoints load through vistrain.interop.hf (load_vit_from_hf).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vistrain.models.attention import IMPLS, attention

__all__ = ["ViTConfig", "VisionTransformer"]


@dataclass
class ViTConfig:
    image_size: int = 512  # square input side in pixels (fixed resolution)
    patch_size: int = 16
    hidden_size: int = 768
    intermediate_size: int = 3072  # MLP width
    num_layers: int = 12
    num_heads: int = 12
    layer_norm_eps: float = 1e-6
    num_channels: int = 3
    # The normalisation the weights were trained with; the data pipeline applies it, not the model.
    image_mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    image_std: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    attn_impl: str = "auto"  # auto | sdpa | flex (see models/attention.py)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first bad key. VisionTransformer() calls it too (configs can change)."""

        def bad(key: str, want: str) -> ValueError:
            return ValueError(f"ViTConfig.{key} must be {want}, got {getattr(self, key)!r}.")

        for key in ("image_size", "patch_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                    "num_channels"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise bad(key, "an integer >= 1")
        if self.image_size % self.patch_size:
            raise bad("image_size", f"a multiple of patch_size ({self.patch_size})")
        if self.hidden_size % self.num_heads:
            raise bad("hidden_size", f"a multiple of num_heads ({self.num_heads})")
        if not (isinstance(self.layer_norm_eps, (int, float)) and 0 < self.layer_norm_eps < math.inf):
            raise bad("layer_norm_eps", "a number > 0")
        for key in ("image_mean", "image_std"):
            value = getattr(self, key)
            if (
                isinstance(value, (str, bytes))
                or not hasattr(value, "__len__")
                or len(value) != self.num_channels
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)
            ):
                raise bad(key, f"a list of num_channels ({self.num_channels}) finite numbers")
        if not all(s > 0 for s in self.image_std):
            raise bad("image_std", "made of numbers > 0")
        if self.attn_impl not in IMPLS:
            raise bad("attn_impl", f"one of {', '.join(IMPLS)}")

    @property
    def grid_size(self) -> int:
        """Patches per side."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2


# ---------------------------------------------------------------------------------------------------
# layers


class SelfAttention(nn.Module):
    """Multi-head self-attention, softmax(q k^T / sqrt(c)) v, with biased q/k/v/out projections and no mask."""

    def __init__(self, width: int, heads: int, attn_impl: str):
        super().__init__()
        self.heads, self.head_dim, self.attn_impl = heads, width // heads, attn_impl
        # Four separate projections, as SigLIP has them (a fused qkv would change the checkpoint layout).
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x_BND: Tensor) -> Tensor:
        B, N, D = x_BND.shape
        q_BHNc, k_BHNc, v_BHNc = (
            proj(x_BND).view(B, N, self.heads, self.head_dim).transpose(1, 2)
            for proj in (self.q_proj, self.k_proj, self.v_proj)
        )
        o_BHNc = attention(q_BHNc, k_BHNc, v_BHNc, None, impl=self.attn_impl)
        return self.out_proj(o_BHNc.transpose(1, 2).reshape(B, N, D))


class MLP(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x_BND: Tensor) -> Tensor:
        # The tanh approximation of GELU: SigLIP was trained with it (gelu_pytorch_tanh in transformers).
        return self.fc2(F.gelu(self.fc1(x_BND), approximate="tanh"))


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        D = cfg.hidden_size
        self.norm1 = nn.LayerNorm(D, eps=cfg.layer_norm_eps)
        self.attn = SelfAttention(D, cfg.num_heads, cfg.attn_impl)
        self.norm2 = nn.LayerNorm(D, eps=cfg.layer_norm_eps)
        self.mlp = MLP(D, cfg.intermediate_size)

    def forward(self, x_BND: Tensor) -> Tensor:
        x_BND = x_BND + self.attn(self.norm1(x_BND))
        return x_BND + self.mlp(self.norm2(x_BND))


# ---------------------------------------------------------------------------------------------------
# the model


class VisionTransformer(nn.Module):
    """Patch embedding + learned position embedding, pre-LN blocks, final LayerNorm; no pooling head."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        D, P = cfg.hidden_size, cfg.patch_size
        self.hidden_size = D
        self.patch_embed = nn.Conv2d(cfg.num_channels, D, kernel_size=P, stride=P)
        self.pos_embed_ND = nn.Parameter(torch.empty(cfg.num_patches, D))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm = nn.LayerNorm(D, eps=cfg.layer_norm_eps)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """An initialisation for training from scratch; a VLM loads pretrained weights over all of it.

        Position embeddings ~ N(0, 1/D), so they start at the scale of the patch embeddings (as big_vision's
        learned position embeddings); Linear weights truncated normal (std 0.02) with zero biases; the patch
        convolution and the LayerNorms keep PyTorch's defaults.
        """
        nn.init.normal_(self.pos_embed_ND, std=self.hidden_size**-0.5)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    @property
    def num_patches(self) -> int:
        """Output tokens per image (grid_size ** 2)."""
        return self.cfg.num_patches

    def forward(self, pixel_values_BCHW: Tensor) -> Tensor:
        """Normalised pixels (B, C, image_size, image_size) -> patch features (B, num_patches, hidden_size).

        Patches are in raster order (row by row). The output is after the final LayerNorm.
        """
        cfg = self.cfg
        if pixel_values_BCHW.dim() != 4 or tuple(pixel_values_BCHW.shape[1:]) != (
            cfg.num_channels, cfg.image_size, cfg.image_size,
        ):
            raise ValueError(
                f"VisionTransformer: pixel_values_BCHW must have shape [B, {cfg.num_channels}, {cfg.image_size}, "
                f"{cfg.image_size}] (fixed resolution), got {list(pixel_values_BCHW.shape)}."
            )
        # Pixels usually arrive in fp32; the convolution runs in the weights' dtype (bf16 under FSDP mixed
        # precision) so that no dtype mismatch stops it outside autocast.
        x_BDhw = self.patch_embed(pixel_values_BCHW.to(self.patch_embed.weight.dtype))
        x_BND = x_BDhw.flatten(2).transpose(1, 2) + self.pos_embed_ND
        for block in self.blocks:
            x_BND = block(x_BND)
        return self.norm(x_BND)
