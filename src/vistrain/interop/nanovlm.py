"""Folders written by huggingface/nanoVLM's `save_pretrained` (config.json + model.safetensors) -> vistrain
VLM model folders that generate what nanoVLM generates (`vistrain import nanovlm DIR --out DIR`).

Written from a description of nanoVLM's format and behaviour (at commit 4e0c096, 2025-10-27), not from its
code. What differs from a vistrain-trained VLM, and what the import does about it:

* config.json is nanoVLM's flat VLMConfig (`vit_*`, `lm_*`, `mp_*`, ...). Every key read here must be
  present: nanoVLM itself fills a missing key with today's default, which for an old checkpoint can be the
  wrong value (e.g. `resize_to_max_side_len`). Keys not read here (training settings) are ignored.
* Weights: the vision blocks have one fused `qkv_proj` (rows q, k, v), split into q/k/v here; the position
  embedding is a Parameter [1, N, D]; the decoder's names differ (`out_proj` = o_proj, `norm1/norm2` =
  the attention/MLP norms); with tied embeddings the file holds only `decoder.head.weight` (safetensors
  keeps one name of a shared tensor), which becomes the token embedding; the RoPE `inv_freq` buffer is
  checked against the config and dropped. The full map is `nanovlm_key_map`.
* `lm_attn_scaling` multiplies RoPE's cos and sin, i.e. every rotated q and k: it is folded into the q and k
  projection weights (rotation is linear), exactly the same function up to float rounding.
* Refused, with an error naming the file and key: `vit_cls_flag` true (a CLS token leaves no square patch
  grid for the pixel shuffle), `lm_use_tokens` true (the decoder cannot take image embeddings then),
  `mp_image_token_length` that is not (vit_img_size / vit_patch_size / mp_pixel_shuffle_factor)^2,
  `vlm_extra_tokens` other than the 66 of nanoVLM since 2025-08 (`<|image|>`, `<|global_image|>`,
  `<row_1_col_1>` .. `<row_8_col_8>`, in that order, which is vistrain's own list), a `max_img_size` that is
  not a whole number of tiles.
* Images: nanoVLM feeds [0, 1] pixels without normalisation (the ViT config gets mean 0, std 1), resizes
  the long side to `max_img_size` (bicubic), rounds the short side UP to whole tiles, and adds the global
  view (antialiased bilinear) only for grids of 2+ tiles. The model folder records `"image_resize":
  "nanovlm"` (or `"nanovlm_tiles"` for `resize_to_max_side_len` false), which `vistrain generate` hands to
  ImageProcessor, and `"image_labels": true` (nanoVLM's `<image: k>` before each of several images).
* Tokenizer: config.json names a hub tokenizer (`lm_tokenizer`); offline, a local folder is needed (the
  `tokenizer` argument, or `lm_tokenizer` itself when it is a local folder). The extra tokens are added as
  special tokens in nanoVLM's order, so they get nanoVLM's ids (after the base vocabulary), pad = eos as in
  nanoVLM, and `lm_chat_template` becomes the tokenizer's chat template (the model folder says
  `"chat_template": "tokenizer"`); `"eos_token"` is the tokenizer's, as nanoVLM's generate uses it.

Not reproduced: nanoVLM's dynamic RoPE rescaling for sequences longer than `lm_max_position_embeddings`
(8192 by default; inconsistent with its own KV cache anyway), and its sampling (it filters top-k and top-p
on the logits before dividing by the temperature, and its top-p also drops the token that crosses the
threshold): greedy decoding is the same, sampling is vistrain's. nanoVLM never stops early; vistrain stops
when every row has produced the eos token, and the tokens up to it are the same.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from vistrain.data.vqa_images import MAX_GRID_SIDE
from vistrain.data.vqa_text import IMAGE_TOKEN, add_vqa_special_tokens, vqa_special_tokens
from vistrain.interop.json_files import read_json_object
from vistrain.models.llama import LlamaConfig
from vistrain.models.vit import ViTConfig
from vistrain.models.vlm import WEIGHTS_PREFIX, VisionLanguageModel, VLMConfig

__all__ = [
    "NanoVLMFormatError",
    "import_nanovlm",
    "nanovlm_key_map",
    "nanovlm_tokenizer",
    "read_nanovlm_config",
    "read_nanovlm_weights",
    "vlm_config_from_nanovlm",
    "vlm_state_dict_from_nanovlm",
]

CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"
_INV_FREQ = "decoder.rotary_embd.inv_freq"  # a recomputable buffer nanoVLM saves; checked, then dropped


class NanoVLMFormatError(ValueError):
    """A nanoVLM folder, config, state dict or tokenizer that cannot be imported; names the file and key."""


# --------------------------------------------------------------------------------------------- config


def read_nanovlm_config(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / CONFIG_FILE
    if not Path(folder).is_dir():
        raise NanoVLMFormatError(f"{folder}: no such folder (expected one written by nanoVLM's save_pretrained)")
    return read_json_object(path, NanoVLMFormatError)


_KINDS = {  # the type checks of config values
    "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
    "bool": lambda v: isinstance(v, bool),
    "str": lambda v: isinstance(v, str),
    "dict": lambda v: isinstance(v, dict),
}


class _Reader:
    """Typed access to config keys; every error names the file and the key."""

    def __init__(self, config: dict, source: str):
        self.config, self.source = config, source

    def __call__(self, key: str, kind: str = "int") -> Any:
        if key not in self.config:
            raise NanoVLMFormatError(
                f"{self.source}: key {key!r} is missing; is this a config.json written by nanoVLM's save_pretrained? "
                "(nanoVLM would silently take today's default, which need not be what the model was trained with)")
        value = self.config[key]
        if not _KINDS[kind](value):
            raise NanoVLMFormatError(f"{self.source}: key {key!r} must be of type {kind}, got {value!r}")
        return value

    def error(self, key: str, message: str) -> NanoVLMFormatError:
        return NanoVLMFormatError(f"{self.source}: key {key!r} {message}")


def vlm_config_from_nanovlm(config: dict, image_token_id: int, source: str = CONFIG_FILE) -> VLMConfig:
    """vistrain's VLMConfig for a nanoVLM config.json dict; image_token_id is `<|image|>`'s id (the tokenizer's)."""
    get = _Reader(config, source)
    if get("vit_cls_flag", "bool"):
        raise get.error("vit_cls_flag", "is true: a CLS token leaves no square patch grid for the pixel shuffle, "
                                        "and vistrain's vision encoder has none")
    if get("lm_use_tokens", "bool"):
        raise get.error("lm_use_tokens", "is true: the decoder then takes token ids, not the image embeddings a "
                                         "VLM gives it")
    factor = get("mp_pixel_shuffle_factor")
    try:
        vision = ViTConfig(
            image_size=get("vit_img_size"), patch_size=get("vit_patch_size"), hidden_size=get("vit_hidden_dim"),
            intermediate_size=get("vit_inter_dim"), num_layers=get("vit_n_blocks"), num_heads=get("vit_n_heads"),
            layer_norm_eps=float(get("vit_ln_eps", "number")),
            # nanoVLM feeds the [0, 1] pixels of ToTensor without any normalisation
            image_mean=[0.0, 0.0, 0.0], image_std=[1.0, 1.0, 1.0])
        lm = LlamaConfig(
            vocab_size=get("lm_vocab_size"), hidden_size=get("lm_hidden_dim"), intermediate_size=get("lm_inter_dim"),
            num_layers=get("lm_n_blocks"), num_heads=get("lm_n_heads"), num_kv_heads=get("lm_n_kv_heads"),
            head_dim=0,  # nanoVLM's head dim is always lm_hidden_dim / lm_n_heads
            rope_theta=float(get("lm_re_base", "number")), rms_norm_eps=float(get("lm_rms_eps", "number")),
            tie_embeddings=get("lm_tie_weights", "bool"),
            max_position_embeddings=get("lm_max_position_embeddings"))
        cfg = VLMConfig(vision=vision, lm=lm, pixel_shuffle_factor=factor, image_token_id=int(image_token_id))
        cfg.validate()
    except ValueError as e:  # ViTConfig / LlamaConfig / VLMConfig validation: a value that makes no model
        raise NanoVLMFormatError(f"{source}: {e}") from None
    if get("mp_image_token_length") != cfg.image_token_length:
        raise get.error("mp_image_token_length", f"is {config['mp_image_token_length']}, but a "
                        f"{vision.image_size} px tile of {vision.patch_size} px patches folded by "
                        f"{factor} gives {cfg.image_token_length} tokens (nanoVLM would fail on it too)")
    scaling = get("lm_attn_scaling", "number")
    if not scaling > 0:
        raise get.error("lm_attn_scaling", f"must be > 0, got {scaling!r}")
    return cfg


def _image_settings(config: dict, tile: int, source: str) -> dict[str, Any]:
    """The model folder's image keys: max_image_size, image_resize, image_labels."""
    get = _Reader(config, source)
    max_size = get("max_img_size")
    if max_size < tile or max_size % tile:
        raise get.error("max_img_size", f"is {max_size}: vistrain needs a whole number of {tile} px tiles "
                                        "(vit_img_size) for the long side")
    if max_size // tile > MAX_GRID_SIDE:
        raise get.error("max_img_size", f"is {max_size}: {max_size // tile} tiles per side, but the row/column "
                                        f"tokens go up to {MAX_GRID_SIDE}")
    resize = "nanovlm" if get("resize_to_max_side_len", "bool") else "nanovlm_tiles"
    return {"max_image_size": max_size, "image_resize": resize, "image_labels": True}


# --------------------------------------------------------------------------------------------- weights


def nanovlm_key_map(cfg: VLMConfig) -> dict[str, tuple[str, Optional[int]]]:
    """vistrain key (without the "vlm." prefix) -> (nanoVLM key, part): part k of 3 takes rows k*D..(k+1)*D
    of the fused qkv projection (q, k, v); None copies the tensor (the position embedding loses its
    leading 1). With tied embeddings the token embedding is `decoder.token_embedding.weight` or, as nanoVLM
    saves it, `decoder.head.weight` (vlm_state_dict_from_nanovlm takes whichever is there)."""
    keys: dict[str, tuple[str, Optional[int]]] = {
        "vision.patch_embed.weight": ("vision_encoder.patch_embedding.conv.weight", None),
        "vision.patch_embed.bias": ("vision_encoder.patch_embedding.conv.bias", None),
        "vision.pos_embed_ND": ("vision_encoder.patch_embedding.position_embedding", None),
    }
    for i in range(cfg.vision.num_layers):
        ours, theirs = f"vision.blocks.{i}.", f"vision_encoder.blocks.{i}."
        for kind in ("weight", "bias"):
            keys[f"{ours}norm1.{kind}"] = (f"{theirs}ln1.{kind}", None)
            for part, name in enumerate(("q_proj", "k_proj", "v_proj")):
                keys[f"{ours}attn.{name}.{kind}"] = (f"{theirs}attn.qkv_proj.{kind}", part)
            keys[f"{ours}attn.out_proj.{kind}"] = (f"{theirs}attn.out_proj.{kind}", None)
            keys[f"{ours}norm2.{kind}"] = (f"{theirs}ln2.{kind}", None)
            keys[f"{ours}mlp.fc1.{kind}"] = (f"{theirs}mlp.fc1.{kind}", None)
            keys[f"{ours}mlp.fc2.{kind}"] = (f"{theirs}mlp.fc2.{kind}", None)
    keys["vision.norm.weight"] = ("vision_encoder.layer_norm.weight", None)
    keys["vision.norm.bias"] = ("vision_encoder.layer_norm.bias", None)
    keys["projector.proj.weight"] = ("MP.proj.weight", None)
    keys["lm.embed_tokens.weight"] = ("decoder.token_embedding.weight", None)
    for i in range(cfg.lm.num_layers):
        ours, theirs = f"lm.blocks.{i}.", f"decoder.blocks.{i}."
        keys[ours + "attn_norm.weight"] = (theirs + "norm1.weight", None)
        for name in ("q_proj", "k_proj", "v_proj"):
            keys[f"{ours}attn.{name}.weight"] = (f"{theirs}attn.{name}.weight", None)
        keys[ours + "attn.o_proj.weight"] = (theirs + "attn.out_proj.weight", None)
        keys[ours + "mlp_norm.weight"] = (theirs + "norm2.weight", None)
        for name in ("gate_proj", "up_proj", "down_proj"):
            keys[f"{ours}mlp.{name}.weight"] = (f"{theirs}mlp.{name}.weight", None)
    keys["lm.norm.weight"] = ("decoder.norm.weight", None)
    if not cfg.lm.tie_embeddings:
        keys["lm.lm_head.weight"] = ("decoder.head.weight", None)
    return keys


def vlm_state_dict_from_nanovlm(state: dict[str, Tensor], cfg: VLMConfig, attn_scaling: float = 1.0,
                                source: str = WEIGHTS_FILE) -> dict[str, Tensor]:
    """A VisionLanguageModel state dict from nanoVLM's: every key mapped, shapes checked, nothing left over.
    attn_scaling (nanoVLM's lm_attn_scaling) is folded into the decoder's q and k projections."""
    state = dict(state)
    tied_head = "decoder.head.weight"
    if cfg.lm.tie_embeddings:
        emb = "decoder.token_embedding.weight"
        if emb not in state and tied_head in state:
            state[emb] = state.pop(tied_head)  # what save_model leaves of the shared tensor
        elif emb in state and tied_head in state:
            if not torch.equal(state[emb], state[tied_head]):
                raise NanoVLMFormatError(f"{source}: key {tied_head!r} differs from {emb!r}, but lm_tie_weights is "
                                         "true (one matrix for both)")
            state.pop(tied_head)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in VisionLanguageModel(cfg).state_dict().items()}
    key_map = nanovlm_key_map(cfg)
    if set(key_map) != set(shapes):  # the map and the model must cover the same tensors
        raise AssertionError(f"nanovlm_key_map is out of date: {sorted(set(key_map) ^ set(shapes))[:5]}")
    out = {}
    for ours, (theirs, part) in key_map.items():
        if theirs not in state:
            tied = theirs.endswith("token_embedding.weight")
            hint = f" (nor {tied_head!r}, which holds it when tied)" if tied else ""
            raise NanoVLMFormatError(f"{source}: key {theirs!r} is missing{hint}")
        value = state[theirs]
        if part is not None:
            if value.shape[0] % 3:
                raise NanoVLMFormatError(f"{source}: key {theirs!r} has shape {list(value.shape)}; a fused q/k/v "
                                         "projection has 3 x vit_hidden_dim rows")
            value = value.chunk(3, dim=0)[part].clone()  # its own storage: safetensors refuses shared ones
        elif ours == "vision.pos_embed_ND" and value.dim() == 3 and value.shape[0] == 1:
            value = value[0]
        if tuple(value.shape) != shapes[ours]:
            want = list(shapes[ours])
            if part is not None:
                want = [3 * want[0], *want[1:]]
            elif ours == "vision.pos_embed_ND":
                want = [1, *want]
            raise NanoVLMFormatError(f"{source}: key {theirs!r} has shape {list(state[theirs].shape)}, "
                                     f"config.json gives {want}")
        out[ours] = value.contiguous()
    if attn_scaling != 1.0:
        for i in range(cfg.lm.num_layers):
            for name in ("q_proj", "k_proj"):
                key = f"lm.blocks.{i}.attn.{name}.weight"
                out[key] = (out[key].float() * attn_scaling).to(out[key].dtype)
    used = {theirs for theirs, _ in key_map.values()}
    for key, value in state.items():
        if key in used:
            continue
        if key == _INV_FREQ:
            _check_inv_freq(value, cfg.lm, source)
            continue
        raise NanoVLMFormatError(f"{source}: unexpected key {key!r} (not part of a nanoVLM model of this config; "
                                 "a CLS token or another architecture?)")
    return out


def _check_inv_freq(value: Tensor, lm: LlamaConfig, source: str) -> None:
    c = lm.resolved_head_dim
    expected = 1.0 / (lm.rope_theta ** (torch.arange(0, c, 2).float() / c))
    if tuple(value.shape) != tuple(expected.shape) or not torch.allclose(value.float(), expected, rtol=1e-3):
        raise NanoVLMFormatError(f"{source}: key {_INV_FREQ!r} does not hold the RoPE frequencies of lm_re_base="
                                 f"{lm.rope_theta} and head dim {c}: another position encoding?")


def read_nanovlm_weights(folder: str | Path) -> dict[str, Tensor]:
    path = Path(folder) / WEIGHTS_FILE
    if not path.is_file():
        raise NanoVLMFormatError(f"{path}: no such file (nanoVLM's save_pretrained writes it next to config.json)")
    try:
        return load_file(str(path))
    except (OSError, SafetensorError, ValueError) as e:
        raise NanoVLMFormatError(f"{path}: cannot read it as safetensors ({type(e).__name__}: {e})") from None


# --------------------------------------------------------------------------------------------- tokenizer


def nanovlm_tokenizer(config: dict, tokenizer_dir: Optional[str | Path] = None, source: str = CONFIG_FILE) -> Any:
    """The base tokenizer (a local folder: `tokenizer_dir`, or config's `lm_tokenizer` if it is one) with
    nanoVLM's extra tokens and chat template, giving the ids nanoVLM gives."""
    from transformers import AutoTokenizer  # here: transformers is the optional `hf` extra, and slow to import

    get = _Reader(config, source)
    extra = get("vlm_extra_tokens", "dict")
    if list(extra.values()) != vqa_special_tokens():
        raise get.error("vlm_extra_tokens", f"holds {len(extra)} tokens ({', '.join(list(extra.values())[:3])}, ...); "
                        f"vistrain imports nanoVLM's list since 2025-08: {len(vqa_special_tokens())} tokens, "
                        "<|image|>, <|global_image|>, <row_1_col_1> .. <row_8_col_8> in that order")
    template = get("lm_chat_template", "str")
    name = get("lm_tokenizer", "str")
    if tokenizer_dir is None:
        if not Path(name).is_dir():
            raise get.error("lm_tokenizer", f"is {name!r}, not a local folder: download that tokenizer and give its "
                                            "folder (`--tokenizer DIR`)")
        tokenizer_dir, where = name, f"{source}: key 'lm_tokenizer' ({name})"
    else:
        where = f"tokenizer folder {tokenizer_dir}"
        if not Path(tokenizer_dir).is_dir():
            raise NanoVLMFormatError(f"{where}: no such folder")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir), use_fast=True)
    except Exception as e:  # transformers raises several kinds for a folder without tokenizer files
        raise NanoVLMFormatError(f"{where}: no usable tokenizer there ({type(e).__name__}: {e})") from None
    if not getattr(tokenizer, "is_fast", False):
        raise NanoVLMFormatError(f"{where}: not a fast tokenizer (tokenizer.json), which nanoVLM and vistrain use")
    if tokenizer.eos_token is None:
        raise NanoVLMFormatError(f"{where}: the tokenizer has no eos_token, which nanoVLM's generate needs")
    # special tokens in vlm_extra_tokens' order (checked above), each new one at the next id: nanoVLM's ids
    add_vqa_special_tokens(tokenizer, chatml=False)
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.chat_template = template
    vocab = get("lm_vocab_size")
    if len(tokenizer) > vocab:
        raise get.error("lm_vocab_size", f"is {vocab}, but {where} with the {len(extra)} extra tokens has "
                                         f"{len(tokenizer)}: not the tokenizer this model was trained with")
    return tokenizer


# --------------------------------------------------------------------------------------------- the import


def import_nanovlm(folder: str | Path, tokenizer_dir: Optional[str | Path] = None) -> tuple[dict, dict, Any]:
    """(model_config, weights, tokenizer) of a vistrain model folder from a nanoVLM one; the caller saves the
    tokenizer with it (interop/tokenizers.py tokenizer_assets)."""
    folder = Path(folder)
    config = read_nanovlm_config(folder)
    source = str(folder / CONFIG_FILE)
    tokenizer = nanovlm_tokenizer(config, tokenizer_dir, source)
    image_token_id = int(tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))
    cfg = vlm_config_from_nanovlm(config, image_token_id, source)
    images = _image_settings(config, cfg.vision.image_size, source)
    state = read_nanovlm_weights(folder)
    weights = vlm_state_dict_from_nanovlm(state, cfg, float(config["lm_attn_scaling"]), str(folder / WEIGHTS_FILE))
    model_config = {
        "task": "vlm",
        "model": dataclasses.asdict(cfg),
        "chat_template": "tokenizer",  # nanoVLM's lm_chat_template, saved with the tokenizer
        **images,
        "eos_token": str(tokenizer.eos_token),
        "imported_from": {"format": "nanovlm", "folder": str(folder.resolve()), "config": config},
    }
    return model_config, {WEIGHTS_PREFIX + k: v for k, v in weights.items()}, tokenizer
