"""Golden outputs of the official VAR VQ-VAE, for tests/test_vqvae_model.py.

The official model (FoundationVision/VAR, models/vqvae.py) hard-codes ch_mult (1, 1, 2, 2, 4) and
three image channels but takes the width, codebook and scales as arguments, so a small instance of the
very same code can run in a test: ch=32, V=64, Cvae=8, 128 px images (8 x 8 latent) and six scales,
which makes the 4 shared phi convs serve scales [0, 0, 1, 2, 3, 3]. Its weights are made here from a
seed, by key name, so that only the outputs need storing (tests/data/var_vae_golden.safetensors).

Regenerate (needs the original source tree, e.g. a checkout of VAR @ 78b9539, and nothing of ours):

    PYTHONPATH=tests python tests/var_vae_golden.py /path/to/VAR [/path/to/stubs]

The training forward of the original needs torch.distributed (it calls get_world_size); the script
starts a one-process gloo group for it.
"""

from __future__ import annotations

import math
import sys
import zlib
from pathlib import Path

import torch

GOLDEN = Path(__file__).resolve().parent / "data" / "var_vae_golden.safetensors"
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


def main(var_root: str, stubs: str | None = None) -> None:  # pragma: no cover - run by hand
    import os

    import torch.distributed as tdist
    from safetensors.torch import save_file

    sys.path[:0] = [var_root] + ([stubs] if stubs else [])
    from models.vqvae import VQVAE as OfficialVQVAE  # the original project

    vae = OfficialVQVAE(vocab_size=SMALL["vocab_size"], z_channels=SMALL["z_channels"], ch=SMALL["ch"],
                        share_quant_resi=SMALL["share_quant_resi"], v_patch_nums=tuple(SMALL["patch_nums"]),
                        test_mode=False)
    shapes = {k: tuple(v.shape) for k, v in vae.state_dict().items() if k != "quantize.ema_vocab_hit_SV"}
    vae.load_state_dict({**official_weights(shapes), "quantize.ema_vocab_hit_SV": vae.quantize.ema_vocab_hit_SV})
    vae.eval()
    img = images()
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        f = vae.quant_conv(vae.encoder(img))
        idx = vae.img_to_idxBl(img)
        fhats = vae.quantize.f_to_idxBl_or_fhat(f, to_fhat=True)
        out["f"] = f
        for si, (i, fh) in enumerate(zip(idx, fhats)):
            out[f"idx.{si}"] = i
            out[f"fhat.{si}"] = fh
        out["var_input"] = vae.quantize.idxBl_to_var_input(idx)
        out["idx_to_img"] = subsample(vae.idxBl_to_img(idx, same_shape=True, last_one=True))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    tdist.init_process_group("gloo", rank=0, world_size=1)
    try:
        vae.train()
        recon, _, vq_loss = vae(img)
        loss = (recon - img).square().mean() + vq_loss
        loss.backward()
    finally:
        tdist.destroy_process_group()
    params = dict(vae.named_parameters())
    out["train.recon"] = subsample(recon.detach())
    out["train.vq_loss"] = vq_loss.detach().reshape(1)
    for k in GRAD_KEYS:
        out[f"grad.{k}"] = params[k].grad
    GOLDEN.parent.mkdir(exist_ok=True)
    save_file({k: v.contiguous() for k, v in out.items()}, str(GOLDEN))
    print(f"wrote {GOLDEN}: {len(out)} tensors")


if __name__ == "__main__":  # pragma: no cover
    main(*sys.argv[1:])
