"""Golden numbers of the official VAR (tokenizer + transformer), for tests/test_var_import.py.

The official code builds its models with models.build_vae_var, whose sizes are arguments (the tokenizer
hard-codes ch_mult (1, 1, 2, 2, 4), two res blocks and attention, so a small instance is the very same
code): here V=64 codes of Cvae=8 channels, ch=32, share_quant_resi=4, patch_nums [1, 2, 3, 4] (L = 30
tokens; 64 px images, 4 x 4 latent), and a transformer of depth 2 (width 128, 2 heads) for 10 classes.
The names, shapes, kinds and dtypes of both official state dicts are in tests/data/var_small_state_dicts.txt.
Parameters are made here from a seed, by key name (crc32 of the key, as tests/var_vae_golden.py does);
the persistent buffers are made as the original's constructors make them. So only outputs need storing
(tests/data/var_golden.safetensors).

The golden file was made once, outside this repository, by running the original code (VAR @ 78b9539,
unmodified, CPU, fp32, torch 2.13, one thread) on these weights: build_vae_var(device='cpu', <the sizes
above>), then vae.load_state_dict and var.load_state_dict (strict) with official_vae_state() and
official_var_state() -- their buffers were checked to equal the constructors' bit for bit -- and eval():

  * teacher forcing: `tf.var_input` = vae.quantize.idxBl_to_var_input(teacher_forcing_idx()); with
    var.cond_drop_rate = 0, `tf.logits` = var(TF_LABELS, tf.var_input), all of them (3 x 30 x 64),
    and `tf.argmax` their argmax over the vocabulary;
  * greedy generation: var.autoregressive_infer_cfg(2, GEN_LABELS, g_seed=0, cfg, top_k=1, top_p=0) for
    cfg in GREEDY_CFGS: `greedy{cfg}.idx.{si}` the token indices of scale si, as returned by
    models.helpers.sample_with_top_k_top_p_ (the module attribute of models.var was wrapped to record
    them), `greedy{cfg}.img` the returned image in [0, 1], every 4th pixel (subsample);
  * sampled generation: the same call with SAMPLED's cfg, top_k, top_p and g_seed (the model's own CPU
    generator, var.rng.manual_seed(seed)): `sampled.idx.{si}` and `sampled.img`.
  * `greedy{cfg}.margin`: the smallest gap between the best and the second-best guided logit over all
    greedy picks (the logits given to sample_with_top_k_top_p_): 0.018 (cfg 1.5) and 0.027 (cfg 4), so
    the greedy indices are far from ties (the teacher-forced argmax's smallest gap is 0.0046).

With these seeds both heads of block 0 have scale_mul_1H11 above log(100) (5.05, 4.72), so the cap on
the attention temperature is exercised; about 9 % of the generated pixels are clamped to [-1, 1].
vistrain reproduced every stored number bit for bit (max |difference| 0) when the file was made.

No code of the original is kept here.
"""

from __future__ import annotations

import math
import zlib
from pathlib import Path

import torch

from support import var_vae_golden

DATA = Path(__file__).resolve().parents[1] / "data"
GOLDEN = DATA / "var_golden.safetensors"
STATE_DICTS = DATA / "var_small_state_dicts.txt"

PATCH_NUMS = [1, 2, 3, 4]
VOCAB, CVAE, CH, DEPTH, NUM_CLASSES = 64, 8, 32, 2, 10
RESOLUTION = 64
TF_LABELS = [3, 7, NUM_CLASSES]  # the last one is the null class of classifier-free guidance
GEN_LABELS = [3, 7]
GREEDY_CFGS = (1.5, 4.0)
SAMPLED = dict(cfg=1.5, top_k=20, top_p=0.9, seed=2024)


def official_layout() -> dict[str, list[tuple[str, tuple[int, ...], str, torch.dtype]]]:
    """{"vae": [...], "var": [...]}: (key, shape, "param" | "buffer", dtype) in the official order."""
    out: dict[str, list] = {"vae": [], "var": []}
    for line in STATE_DICTS.read_text().splitlines():
        if not line or line.startswith("#"):
            continue
        model, key, shape, kind, dtype = line.split()
        out[model].append((key, tuple(int(s) for s in shape.split("x")), kind, getattr(torch, dtype)))
    return out


def _var_param(key: str, shape: tuple[int, ...]) -> torch.Tensor:
    """Seeded transformer parameter: unit-scale embeddings (the class embedding drives every AdaLN), Linear
    weights scaled by 1/sqrt(fan_in), small biases, per-head attention temperatures log(scale) spread
    around and above the cap log(100) (so the clamp is exercised)."""
    g = torch.Generator().manual_seed(zlib.crc32(key.encode()))
    t = torch.randn(shape, generator=g)
    if key.endswith("scale_mul_1H11"):
        return 3.0 + 2.0 * t
    if key in ("pos_start", "pos_1LC", "class_emb.weight", "lvl_embed.weight"):
        return t
    if key.endswith("bias"):  # also q_bias and v_bias
        return 0.1 * t
    return t / math.sqrt(math.prod(shape[1:]))


def _levels_1L() -> torch.Tensor:
    return torch.cat([torch.full((pn * pn,), si) for si, pn in enumerate(PATCH_NUMS)]).view(1, -1)


def _buffer(key: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """The persistent buffers, as the original's constructors make them."""
    if key == "quantize.ema_vocab_hit_SV":  # usage statistics, zeros until DDP training updates them
        t = torch.full(shape, 0.0)
    elif key == "lvl_1L":  # scale index of every token
        t = _levels_1L()
    elif key == "attn_bias_for_masking":  # block-causal: 0 where a token may look, -inf elsewhere
        lvl = _levels_1L().view(1, -1, 1)
        t = torch.where(lvl >= lvl.transpose(1, 2), 0.0, -torch.inf).reshape(shape)
    elif key.endswith("attn.zero_k_bias"):
        t = torch.zeros(shape)
    else:
        raise KeyError(key)
    assert tuple(t.shape) == shape and t.dtype == dtype, (key, t.shape, t.dtype)
    return t


def official_vae_state() -> dict[str, torch.Tensor]:
    """The small tokenizer's official state dict (parameters seeded as in tests/var_vae_golden.py)."""
    layout = official_layout()["vae"]
    params = var_vae_golden.official_weights({k: s for k, s, kind, _ in layout if kind == "param"})
    return {k: params[k] if kind == "param" else _buffer(k, s, d) for k, s, kind, d in layout}


def official_var_state() -> dict[str, torch.Tensor]:
    """The small transformer's official state dict."""
    return {k: _var_param(k, s) if kind == "param" else _buffer(k, s, d) for k, s, kind, d in official_layout()["var"]}


def teacher_forcing_idx() -> list[torch.Tensor]:
    """Code indices (3, pn^2) per scale: the teacher-forcing targets whose inputs the tokenizer builds."""
    g = torch.Generator().manual_seed(4321)
    return [torch.randint(VOCAB, (len(TF_LABELS), pn * pn), generator=g) for pn in PATCH_NUMS]


def subsample(img_BCHW: torch.Tensor) -> torch.Tensor:
    """Every 4th pixel of a 64 px image: 16 x 16 per channel."""
    return img_BCHW[:, :, ::4, ::4].contiguous()
