"""Golden outputs of the official VAR VQ-VAE, for tests/test_vqvae_model.py.

The official model (FoundationVision/VAR, models/vqvae.py) hard-codes ch_mult (1, 1, 2, 2, 4) and
three image channels but takes the width, codebook and scales as arguments, so a small instance of the
very same code can run in a test: ch=32, V=64, Cvae=8, 128 px images (8 x 8 latent) and six scales,
which makes the 4 shared phi convs serve scales [0, 0, 1, 2, 3, 3]. Its weights are made here from a
seed, by key name, so that only the outputs need storing (tests/data/var_vae_golden.safetensors).

The golden file was made once, outside this repository, by running the original code (VAR @ 78b9539) on
these weights and images: quant_conv(encoder(img)) as `f`; img_to_idxBl -> `idx.{si}`; the cumulative
f_hat of f_to_idxBl_or_fhat -> `fhat.{si}`; idxBl_to_var_input -> `var_input`; idxBl_to_img (last one,
every 8th pixel) -> `idx_to_img`; and in training mode (it needs a one-process gloo group), the
reconstruction (every 8th pixel), vq_loss and the gradients of GRAD_KEYS for mse(recon, img) + vq_loss.
No code of the original is kept here.
"""

from __future__ import annotations

import math
import zlib
from pathlib import Path

import torch

GOLDEN = Path(__file__).resolve().parents[1] / "data" / "var_vae_golden.safetensors"
SMALL = dict(vocab_size=64, z_channels=8, ch=32, patch_nums=[1, 2, 3, 4, 6, 8], share_quant_resi=4)
RESOLUTION = 128
BATCH = 2
# Grads of (mse(recon, img) + vq_loss) compared in the test: codebook, the phi convs, the encoder's output
# and the decoder's input side (official names).
GRAD_KEYS = (
    "quantize.embedding.weight",
    "quantize.quant_resi.qresi_ls.0.weight",
    "quantize.quant_resi.qresi_ls.2.bias",
    "quantize.quant_resi.qresi_ls.3.weight",
    "quant_conv.weight",
    "encoder.conv_out.weight",
    "encoder.down.0.block.0.conv1.weight",
    "post_quant_conv.weight",
    "decoder.conv_in.bias",
)


def official_weights(named_shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """Seeded weights by official key: unit-scale activations, norms near identity, N(0, 1) codes."""
    out = {}
    for key, shape in named_shapes.items():
        g = torch.Generator().manual_seed(zlib.crc32(key.encode()))
        t = torch.randn(shape, generator=g)
        if "norm" in key and key.endswith(".weight"):
            t = 1.0 + 0.1 * t
        elif key.endswith(".bias"):
            t = 0.1 * t
        elif key == "quantize.embedding.weight":
            pass
        else:  # conv weights
            t = t / math.sqrt(math.prod(shape[1:]))
        out[key] = t
    return out


def images() -> torch.Tensor:
    g = torch.Generator().manual_seed(1234)
    # Smooth-ish images in [-1, 1]: a low-resolution random field, upsampled.
    low = torch.rand(BATCH, 3, 16, 16, generator=g) * 2 - 1
    return torch.nn.functional.interpolate(low, size=(RESOLUTION, RESOLUTION), mode="bilinear", align_corners=False)


def subsample(img_BCHW: torch.Tensor) -> torch.Tensor:
    """Every 8th pixel: enough to catch a wrong operation, small enough to store."""
    return img_BCHW[:, :, ::8, ::8].contiguous()
