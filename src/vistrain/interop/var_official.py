"""The official FoundationVision/VAR checkpoints (vae_ch160v4096z32.pth, var_d16.pth ... var_d30.pth) <->
vistrain's VQVAE and VAR.

The official files are flat state dicts. vistrain's module names follow the official ones, with two
differences kept in explicit maps: the tokenizer's shared residual convs are `quantize.phi.{k}` (officially
`quantize.quant_resi.qresi_ls.{k}`), and buffers that are recomputed from the config -- the transformer's
`lvl_1L`, `attn_bias_for_masking` and per-block `zero_k_bias`, the tokenizer's usage statistics
`quantize.ema_vocab_hit_SV` -- are not stored. Architectures are read from the tensors' shapes; an error
names the file (by its flag, --vae or --var, and its path) and the key it could not read.

The scale schedule (patch_nums) is the one thing the shapes do not always pin down. The transformer's
`pos_start` (1, pn[0]^2, C), `lvl_embed.weight` (SN, C) and `pos_1LC` (1, L = sum pn^2, C) give the first
size, the number of scales and the token count; the tokenizer is fully convolutional and says nothing. So:

  1. `patch_nums` given (`vistrain import var --patch-nums 1,2,3,4`): used, after checking it against those
     three shapes;
  2. else the released schedule for L (680: the 256 px models, 2240: the 512 px one), if it fits the shapes;
  3. else the only strictly increasing schedule that fits them, if there is exactly one (e.g. L = 30 with
     4 scales from 1 is [1, 2, 3, 4]); several (L = 680 with 10 scales fits 5 schedules), none, or a search
     too long to finish (over 200,000 steps) is an error that asks for --patch-nums, listing what fits.

The tokenizer gets the same schedule; its last size is the latent size (images: 16x that, for ch_mult of 5 levels).
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

import torch
from torch import Tensor

from vistrain.models.var import VAR, VARConfig
from vistrain.models.vqvae import VQVAE, VQVAEConfig

# Scale schedules of the released models, by their token count L = sum of squares.
PATCH_NUMS_BY_L = {680: [1, 2, 3, 4, 5, 6, 8, 10, 13, 16], 2240: [1, 2, 3, 4, 6, 9, 13, 18, 24, 32]}
_SEARCH_STEPS = 200_000  # rule 3's budget: enough for any schedule seen so far, short enough to never hang
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


def _need(state: dict, key: str, source: str, ndim: int | None = None) -> Tensor:
    """state[key]; `source` names the file ("--var PATH"), for the error when it is missing or misshapen."""
    if key not in state:
        what = "tokenizer" if source.startswith("--vae") else "transformer"
        raise OfficialFormatError(f"{source}: key {key!r} is missing; is this an official VAR {what} checkpoint?")
    if ndim is not None and state[key].dim() != ndim:
        raise OfficialFormatError(f"{source}: key {key!r} has shape {list(state[key].shape)}; expected {ndim} "
                                  "dimensions, as in the official files")
    return state[key]


def vqvae_config_from_official(state: dict[str, Tensor], patch_nums: list[int], source: str = "--vae") -> VQVAEConfig:
    conv_in = _need(state, "encoder.conv_in.weight", source, ndim=4)
    ch = conv_in.shape[0]
    levels = sorted({int(m.group(1)) for k in state if (m := re.match(r"^encoder\.down\.(\d+)\.", k))})
    if not levels:
        _need(state, "encoder.down.0.block.0.conv1.weight", source)
    ch_mult = [_need(state, f"encoder.down.{i}.block.0.conv1.weight", source, ndim=4).shape[0] // ch for i in levels]
    blocks = {int(m.group(1)) for k in state if (m := re.match(r"^encoder\.down\.0\.block\.(\d+)\.", k))}
    vocab_size, z_channels = _need(state, "quantize.embedding.weight", source, ndim=2).shape
    phis = {int(m.group(1)) for k in state if (m := _PHI_OFFICIAL.match(k))}
    return VQVAEConfig(
        vocab_size=vocab_size, z_channels=z_channels, ch=ch, ch_mult=ch_mult, num_res_blocks=len(blocks),
        in_channels=conv_in.shape[1], share_quant_resi=len(phis), patch_nums=list(patch_nums),
        attn=any(k.startswith(f"encoder.down.{levels[-1]}.attn.") for k in state),
        mid_attn="encoder.mid.attn_1.qkv.weight" in state,
    )


def schedules_fitting(first: int, num_scales: int, num_tokens: int, max_steps: int = _SEARCH_STEPS
                      ) -> list[list[int]] | None:
    """Every strictly increasing schedule [first, ...] of num_scales sizes whose squares sum to num_tokens
    (at most 6 of them), or None when the search takes more than max_steps steps."""
    found: list[list[int]] = []
    steps = 0

    def extend(prefix: list[int], rest: int, left: int) -> bool:  # False: out of steps or enough found
        nonlocal steps
        steps += 1
        if steps > max_steps:
            return False
        if left == 0:
            if rest == 0:
                found.append(prefix)
            return len(found) < 6
        low = prefix[-1] + 1
        if sum((low + i) ** 2 for i in range(left)) > rest:  # even the smallest continuation is too big
            return True
        p = low
        while p * p <= rest:
            if not extend(prefix + [p], rest - p * p, left - 1):
                return False
            p += 1
        return True

    if first >= 1 and num_scales >= 1 and not extend([first], num_tokens - first * first, num_scales - 1):
        return found if len(found) >= 6 else None
    return found


def patch_nums_from_official(state: dict[str, Tensor], source: str = "--var",
                             given: list[int] | None = None) -> list[int]:
    """The scale schedule of an official transformer (the rules are in the module docstring)."""
    first_l = _need(state, "pos_start", source, ndim=3).shape[1]
    num_scales = _need(state, "lvl_embed.weight", source, ndim=2).shape[0]
    L = _need(state, "pos_1LC", source, ndim=3).shape[1]

    def misfit(pn: list[int]) -> str | None:
        if len(pn) != num_scales:
            return f"{len(pn)} scales, but lvl_embed.weight has {num_scales} rows (one per scale)"
        if pn[0] ** 2 != first_l:
            return f"a first size of {pn[0]}, but pos_start holds {first_l} token(s) (the first size squared)"
        if sum(p * p for p in pn) != L:
            return f"{sum(p * p for p in pn)} tokens, but pos_1LC has {L} positions (the sum of the sizes squared)"
        return None

    if given is not None:
        pn = [int(p) for p in given]
        if not pn or any(p < 1 for p in pn) or any(b <= a for a, b in zip(pn, pn[1:])):
            raise OfficialFormatError(f"--patch-nums {pn}: expected strictly increasing sizes >= 1, e.g. 1,2,3,4")
        why = misfit(pn)
        if why:
            raise OfficialFormatError(f"--patch-nums {','.join(map(str, pn))} does not fit {source}: it gives {why}")
        return pn
    released = PATCH_NUMS_BY_L.get(L)
    if released is not None and misfit(released) is None:
        return list(released)
    root = math.isqrt(first_l)
    fits = schedules_fitting(root, num_scales, L) if root * root == first_l else []
    if fits is not None and len(fits) == 1:
        return fits[0]
    shapes = (f"pos_start {list(state['pos_start'].shape)}, lvl_embed.weight {list(state['lvl_embed.weight'].shape)}, "
              f"pos_1LC {list(state['pos_1LC'].shape)}")
    if fits is None:
        found = "too many to search"
    elif not fits:
        found = "no schedule fits"
    else:
        found = ("several fit: " + "; ".join(",".join(map(str, pn)) for pn in fits[:5])
                 + ("; ..." if len(fits) > 5 else ""))
    raise OfficialFormatError(f"{source}: cannot tell the scale schedule from {shapes} "
                              f"({num_scales} scales, {L} tokens; {found}); "
                              "give it with --patch-nums, e.g. --patch-nums 1,2,3,4,5,6,8,10,13,16")


def var_config_from_official(state: dict[str, Tensor], source: str = "--var",
                             patch_nums: list[int] | None = None) -> VARConfig:
    C, z_channels = _need(state, "word_embed.weight", source, ndim=2).shape
    depth = len({int(m.group(1)) for k in state if (m := re.match(r"^blocks\.(\d+)\.", k))})
    if C != 64 * depth:
        raise OfficialFormatError(f"{source}: key 'word_embed.weight' gives width {C}, but there are {depth} blocks "
                                  "(blocks.{i}.*); VAR's depth rule is width = 64 x depth")
    return VARConfig(depth=depth, num_classes=_need(state, "class_emb.weight", source, ndim=2).shape[0] - 1,
                     vocab_size=_need(state, "head.weight", source, ndim=2).shape[0], z_channels=z_channels,
                     patch_nums=patch_nums_from_official(state, source, patch_nums),
                     shared_aln="shared_ada_lin.1.weight" in state)


def _phi_to_official(text: str) -> str:
    return re.sub(r"^quantize\.phi\.", "quantize.quant_resi.qresi_ls.", text)


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


def var_from_official(state: dict[str, Tensor], source: str = "--var") -> dict[str, Tensor]:
    out = {}
    for key, value in state.items():
        if _DROPPED_VAR.match(key):
            if key.endswith("zero_k_bias") and value.numel() and value.abs().max() != 0:
                raise OfficialFormatError(f"{source}: key {key!r} should be all zeros (it is a fixed zero bias)")
            continue
        out[key] = value
    return out


def var_to_official(state: dict[str, Tensor], cfg: VARConfig) -> dict[str, Tensor]:
    """Our transformer's weights with the buffers the official code keeps in its files."""
    out = dict(state)
    levels = torch.cat([torch.full((p * p,), i) for i, p in enumerate(cfg.patch_nums)]).view(1, -1)
    out["lvl_1L"] = levels
    allowed = levels.view(-1, 1) >= levels.view(1, -1)
    out["attn_bias_for_masking"] = torch.where(allowed, 0.0, float("-inf")).view(1, 1, *allowed.shape)
    C = 64 * cfg.depth
    for i in range(cfg.depth):
        out[f"blocks.{i}.attn.zero_k_bias"] = torch.zeros(C)
    return out


def official_file_names(var_cfg: VARConfig, vae_cfg: VQVAEConfig) -> tuple[str, str]:
    """The released files' names for these architectures: (vae_ch160v4096z32.pth, var_d16.pth) for VAR-d16."""
    return f"vae_ch{vae_cfg.ch}v{vae_cfg.vocab_size}z{vae_cfg.z_channels}.pth", f"var_d{var_cfg.depth}.pth"


def export_official(var_cfg: VARConfig, vae_cfg: VQVAEConfig, var_state: dict[str, Tensor],
                    vae_state: dict[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    """{file name: state dict} of the two files the official code's build_vae_var + load_state_dict take."""
    vae_name, var_name = official_file_names(var_cfg, vae_cfg)
    return {vae_name: vqvae_to_official(vae_state, len(vae_cfg.patch_nums)),
            var_name: var_to_official(var_state, var_cfg)}


def import_official(vae_path: str | Path, var_path: str | Path,
                    patch_nums: list[int] | None = None) -> tuple[dict, dict[str, Tensor]]:
    """(model_config, weights) of a vistrain model folder from the two official files; checked by loading.
    patch_nums: the scale schedule, when the transformer's shapes do not tell it (see the module docstring)."""
    var_state = read_state_dict(var_path, "var")
    vae_state = read_state_dict(vae_path, "vae")
    sources = {"var": f"--var {var_path}", "vae": f"--vae {vae_path}"}
    var_cfg = var_config_from_official(var_state, sources["var"], patch_nums)
    vae_cfg = vqvae_config_from_official(vae_state, var_cfg.patch_nums, sources["vae"])
    if (vae_cfg.vocab_size, vae_cfg.z_channels) != (var_cfg.vocab_size, var_cfg.z_channels):
        raise OfficialFormatError(f"{sources['vae']} and {sources['var']} do not belong together: the tokenizer has "
                                  f"{vae_cfg.vocab_size} codes of {vae_cfg.z_channels} channels "
                                  "(quantize.embedding.weight), the transformer expects "
                                  f"{var_cfg.vocab_size} of {var_cfg.z_channels} (head.weight, word_embed.weight)")
    vae_weights, var_weights = vqvae_from_official(vae_state), var_from_official(var_state, sources["var"])
    with torch.device("meta"):
        vae, var = VQVAE(vae_cfg), VAR(var_cfg)
    for name, model, weights in (("vae", vae, vae_weights), ("var", var, var_weights)):
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        got = {k: tuple(v.shape) for k, v in weights.items()}
        if expected != got:
            missing = sorted(set(expected) - set(got))[:5]
            extra = sorted(set(got) - set(expected))[:5]
            shapes = [f"{k} {list(got[k])} (expected {list(expected[k])})"
                      for k in expected if k in got and expected[k] != got[k]][:5]
            if name == "vae":  # report the file's own key names
                missing, extra = [_phi_to_official(k) for k in missing], [_phi_to_official(k) for k in extra]
                shapes = [_phi_to_official(k) for k in shapes]
            raise OfficialFormatError(f"{sources[name]}: does not match the architecture read from its shapes: "
                                      f"missing {missing}, unexpected {extra}, other shapes {shapes}")
    model_config = {"task": "var", "model": dataclasses.asdict(var_cfg), "vae": dataclasses.asdict(vae_cfg),
                    "tokenizer": None}
    weights = {f"var.{k}": v for k, v in var_weights.items()}
    weights.update({f"vae.{k}": v for k, v in vae_weights.items()})
    return model_config, weights
