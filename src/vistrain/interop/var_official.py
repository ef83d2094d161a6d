"""The official FoundationVision/VAR checkpoints (vae_ch160v4096z32.pth, var_d16.pth ... var_d30.pth) <->
vistrain's VQVAE and VAR.

The official files are flat state dicts. vistrain's module names follow the official ones, with two
differences kept in explicit maps: the tokenizer's shared residual convs are `quantize.phi.{k}` (officially
`quantize.quant_resi.qresi_ls.{k}`), and buffers that are recomputed from the config -- the transformer's
`lvl_1L`, `attn_bias_for_masking` and per-block `zero_k_bias`, the tokenizer's usage statistics
`quantize.ema_vocab_hit_SV` -- are not stored. Architectures are read from the tensors' shapes.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import torch
from torch import Tensor

from vistrain.models.var import VAR, VARConfig
from vistrain.models.vqvae import VQVAE, VQVAEConfig

# Scale schedules of the released models, by their token count L = sum of squares.
PATCH_NUMS_BY_L = {680: [1, 2, 3, 4, 5, 6, 8, 10, 13, 16], 2240: [1, 2, 3, 4, 6, 9, 13, 18, 24, 32]}
_PHI_OFFICIAL = re.compile(r"^quantize\.quant_resi\.qresi_ls\.(\d+)\.(weight|bias)$")
_PHI_OURS = re.compile(r"^quantize\.phi\.(\d+)\.(weight|bias)$")
_DROPPED_VAE = ("quantize.ema_vocab_hit_SV",)
_DROPPED_VAR = re.compile(r"^(lvl_1L|attn_bias_for_masking|blocks\.\d+\.attn\.zero_k_bias)$")


class OfficialFormatError(ValueError):
    """An official file that is not what it should be; the message names the file and the key."""


def read_state_dict(path: str | Path, what: str) -> dict[str, Tensor]:
    path = Path(path)
    if not path.is_file():
        raise OfficialFormatError(f"--{what} {path}: no such file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise OfficialFormatError(f"--{what} {path}: not a readable checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise OfficialFormatError(f"--{what} {path}: expected a flat state dict of tensors, as the official files are")
    return state


def _need(state: dict, key: str, what: str) -> Tensor:
    if key not in state:
        raise OfficialFormatError(f"--{what}: key {key!r} is missing; is this an official VAR {what} checkpoint?")
    return state[key]


def vqvae_config_from_official(state: dict[str, Tensor], patch_nums: list[int]) -> VQVAEConfig:
    ch = _need(state, "encoder.conv_in.weight", "vae").shape[0]
    levels = sorted({int(m.group(1)) for k in state if (m := re.match(r"^encoder\.down\.(\d+)\.", k))})
    ch_mult = [_need(state, f"encoder.down.{i}.block.0.conv1.weight", "vae").shape[0] // ch for i in levels]
    blocks = {int(m.group(1)) for k in state if (m := re.match(r"^encoder\.down\.0\.block\.(\d+)\.", k))}
    vocab_size, z_channels = _need(state, "quantize.embedding.weight", "vae").shape
    phis = {int(m.group(1)) for k in state if (m := _PHI_OFFICIAL.match(k))}
    return VQVAEConfig(
        vocab_size=vocab_size, z_channels=z_channels, ch=ch, ch_mult=ch_mult, num_res_blocks=len(blocks),
        in_channels=state["encoder.conv_in.weight"].shape[1], share_quant_resi=len(phis), patch_nums=patch_nums,
        attn=any(k.startswith(f"encoder.down.{levels[-1]}.attn.") for k in state),
        mid_attn="encoder.mid.attn_1.qkv.weight" in state,
    )


def var_config_from_official(state: dict[str, Tensor]) -> VARConfig:
    C, z_channels = _need(state, "word_embed.weight", "var").shape
    depth = len({int(m.group(1)) for k in state if (m := re.match(r"^blocks\.(\d+)\.", k))})
    if C != 64 * depth:
        raise OfficialFormatError(f"--var: width {C} with {depth} blocks does not follow VAR's depth rule (64 x depth)")
    L = _need(state, "pos_1LC", "var").shape[1]
    if L not in PATCH_NUMS_BY_L:
        raise OfficialFormatError(f"--var: pos_1LC has {L} positions; known scale schedules have {sorted(PATCH_NUMS_BY_L)}")
    return VARConfig(depth=depth, num_classes=_need(state, "class_emb.weight", "var").shape[0] - 1,
                     vocab_size=_need(state, "head.weight", "var").shape[0], z_channels=z_channels,
                     patch_nums=PATCH_NUMS_BY_L[L], shared_aln="shared_ada_lin.1.weight" in state)


def vqvae_from_official(state: dict[str, Tensor]) -> dict[str, Tensor]:
    out = {}
    for key, value in state.items():
        if key in _DROPPED_VAE:
            continue
        m = _PHI_OFFICIAL.match(key)
        out[f"quantize.phi.{m.group(1)}.{m.group(2)}" if m else key] = value
    return out


def vqvae_to_official(state: dict[str, Tensor], num_scales: int) -> dict[str, Tensor]:
    out = {}
    for key, value in state.items():
        m = _PHI_OURS.match(key)
        out[f"quantize.quant_resi.qresi_ls.{m.group(1)}.{m.group(2)}" if m else key] = value
    any_tensor = next(iter(state.values()))
    vocab = state["quantize.embedding.weight"].shape[0]
    out["quantize.ema_vocab_hit_SV"] = torch.zeros(num_scales, vocab, dtype=any_tensor.dtype)
    return out


def var_from_official(state: dict[str, Tensor]) -> dict[str, Tensor]:
    out = {}
    for key, value in state.items():
        if _DROPPED_VAR.match(key):
            if key.endswith("zero_k_bias") and value.abs().max() != 0:
                raise OfficialFormatError(f"--var: {key} should be all zeros (it is a fixed zero bias)")
            continue
        out[key] = value
    return out


def var_to_official(var: VAR) -> dict[str, Tensor]:
    """Our transformer's weights with the buffers the official code keeps in its files."""
    out = dict(var.state_dict())
    cfg = var.cfg
    levels = torch.cat([torch.full((p * p,), i) for i, p in enumerate(cfg.patch_nums)]).view(1, -1)
    out["lvl_1L"] = levels
    allowed = levels.view(-1, 1) >= levels.view(1, -1)
    out["attn_bias_for_masking"] = torch.where(allowed, 0.0, float("-inf")).view(1, 1, *allowed.shape)
    C = 64 * cfg.depth
    for i in range(cfg.depth):
        out[f"blocks.{i}.attn.zero_k_bias"] = torch.zeros(C)
    return out


def import_official(vae_path: str | Path, var_path: str | Path) -> tuple[dict, dict[str, Tensor]]:
    """(model_config, weights) of a vistrain model folder from the two official files; checked by loading."""
    var_state = read_state_dict(var_path, "var")
    vae_state = read_state_dict(vae_path, "vae")
    var_cfg = var_config_from_official(var_state)
    vae_cfg = vqvae_config_from_official(vae_state, var_cfg.patch_nums)
    if (vae_cfg.vocab_size, vae_cfg.z_channels) != (var_cfg.vocab_size, var_cfg.z_channels):
        raise OfficialFormatError(f"--vae and --var do not belong together: the tokenizer has {vae_cfg.vocab_size} codes of "
                           f"{vae_cfg.z_channels} channels, the transformer expects {var_cfg.vocab_size} of "
                           f"{var_cfg.z_channels}")
    vae_weights, var_weights = vqvae_from_official(vae_state), var_from_official(var_state)
    with torch.device("meta"):
        vae, var = VQVAE(vae_cfg), VAR(var_cfg)
    for name, model, weights in (("vae", vae, vae_weights), ("var", var, var_weights)):
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        got = {k: tuple(v.shape) for k, v in weights.items()}
        if expected != got:
            missing = sorted(set(expected) - set(got))[:5]
            extra = sorted(set(got) - set(expected))[:5]
            shapes = [k for k in expected if k in got and expected[k] != got[k]][:5]
            raise OfficialFormatError(f"--{name}: does not match the architecture read from its shapes: missing {missing}, "
                               f"unexpected {extra}, other shapes {shapes}")
    model_config = {"task": "var", "model": dataclasses.asdict(var_cfg), "vae": dataclasses.asdict(vae_cfg),
                    "tokenizer": None}
    weights = {f"var.{k}": v for k, v in var_weights.items()}
    weights.update({f"vae.{k}": v for k, v in vae_weights.items()})
    return model_config, weights
