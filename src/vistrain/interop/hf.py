"""Local Hugging Face model folders (config.json + safetensors, as transformers' save_pretrained writes them)
<-> vistrain models, as explicit key maps checked by parity tests against transformers itself.

Only local folders are read (downloading is the caller's business, e.g. huggingface_hub.snapshot_download),
and nothing here needs `transformers`: config.json is read as a dict and the safetensors files as flat state
dicts. Every error names the folder (or file) and the key it could not use. Each model family has its own
section below.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor

from vistrain.interop.json_files import read_json_object
from vistrain.models.llama import LanguageModel, LlamaConfig
from vistrain.models.vit import VisionTransformer, ViTConfig

# ---------------------------------------------------------------------------------------------------
# --- SigLIP vision encoder ---
#
# Fixed-resolution SigLIP and SigLIP2 checkpoints (SigLIP2's fixed-resolution models, e.g.
# google/siglip2-base-patch16-512, nanoVLM's vision tower, are plain SiglipModel checkpoints; the NaFlex
# variable-resolution ones, model_type "siglip2", have a linear patch embedding and resized position
# embeddings and are not supported). Where the vision weights sit depends on what wrote the file:
#
#   * transformers 5 SiglipVisionModel.save_pretrained: no prefix (`embeddings.patch_embedding.weight`);
#     version 5 dropped the inner `vision_model` module of SiglipVisionModel;
#   * transformers 4 SiglipVisionModel, and SiglipModel in both versions: `vision_model.embeddings...`,
#     next to `text_model.*`, `logit_scale` and `logit_bias` (SiglipModel);
#   * VLMs that embed the tower elsewhere (`model.vision_tower.vision_model.embeddings...`).
#
# So the prefix is found, not assumed: it is whatever precedes the one `embeddings.patch_embedding.weight`.
# Under it, the attention-pooling head `head.*` (SigLIP's contrastive image embedding; a VLM uses every
# patch token) and the `embeddings.position_ids` buffer that older transformers saved are dropped; any other key there
# that the map does not know is an error (a different architecture). Keys outside the prefix, and
# SiglipModel's text tower and logit scale/bias wherever the prefix is, are ignored.

__all__ = [
    "LlamaFormatError",
    "ViTImportError",
    "llama_config_from_hf",
    "llama_config_to_hf",
    "llama_state_dict_from_hf",
    "llama_state_dict_to_hf",
    "load_llama_from_hf",
    "load_vit_from_hf",
    "read_hf_weights",
    "vit_config_from_hf",
    "vit_config_to_hf",
    "vit_state_dict_from_hf",
    "vit_state_dict_to_hf",
]

# vistrain name -> transformers name (after the prefix), per block and for the rest.
_VIT_BLOCK_KEYS = {
    "norm1": "layer_norm1",
    "attn.q_proj": "self_attn.q_proj",
    "attn.k_proj": "self_attn.k_proj",
    "attn.v_proj": "self_attn.v_proj",
    "attn.out_proj": "self_attn.out_proj",
    "norm2": "layer_norm2",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
_VIT_OTHER_KEYS = {
    "patch_embed.weight": "embeddings.patch_embedding.weight",
    "patch_embed.bias": "embeddings.patch_embedding.bias",
    "pos_embed_ND": "embeddings.position_embedding.weight",
    "norm.weight": "post_layernorm.weight",
    "norm.bias": "post_layernorm.bias",
}
_VIT_ANCHOR = "embeddings.patch_embedding.weight"  # the key whose prefix locates the vision tower
_VIT_DROPPED = re.compile(r"^(head\..*|embeddings\.position_ids)$")  # under the prefix
_SIGLIP_NOT_VISION = re.compile(r"^(text_model\..*|logit_scale|logit_bias)$")  # SiglipModel's other weights
_VIT_LAYER = re.compile(r"^encoder\.layers\.(\d+)\.")

# SiglipVisionConfig's defaults: transformers 4 wrote only the values that differ from them into config.json.
_SIGLIP_VISION_DEFAULTS = {
    "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
    "num_channels": 3, "image_size": 224, "patch_size": 16, "hidden_act": "gelu_pytorch_tanh",
    "layer_norm_eps": 1e-6,
}
# Both compute 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), the GELU this model has.
_TANH_GELUS = ("gelu_pytorch_tanh", "gelu_new")
_SIGLIP_MEAN_STD = [0.5, 0.5, 0.5]


class ViTImportError(ValueError):
    """A checkpoint that is not a readable fixed-resolution SigLIP vision tower; the message names the
    folder (or state dict) and the key."""


def _vit_key_pairs(num_layers: int) -> list[tuple[str, str]]:
    """(vistrain key, transformers key without prefix) for every tensor of the model."""
    pairs = list(_VIT_OTHER_KEYS.items())
    for i in range(num_layers):
        for ours, theirs in _VIT_BLOCK_KEYS.items():
            for kind in ("weight", "bias"):
                pairs.append((f"blocks.{i}.{ours}.{kind}", f"encoder.layers.{i}.{theirs}.{kind}"))
    return pairs


def _vit_prefix(keys: list[str], source: str) -> str:
    prefixes = sorted(k[: -len(_VIT_ANCHOR)] for k in keys if k.endswith(_VIT_ANCHOR))
    prefixes = [p for p in prefixes if p == "" or p.endswith(".")]
    if not prefixes:
        raise ViTImportError(
            f"{source}: key {_VIT_ANCHOR!r} (or 'vision_model.{_VIT_ANCHOR}') is missing; is this a SigLIP "
            "vision checkpoint?"
        )
    if len(prefixes) > 1:
        raise ViTImportError(f"{source}: several vision towers ({', '.join(p + _VIT_ANCHOR for p in prefixes)}); "
                             "pass prefix= to pick one")
    return prefixes[0]


def vit_state_dict_from_hf(
    state_dict: dict[str, Tensor],
    num_layers: int | None = None,
    prefix: str | None = None,
    source: str = "state dict",
) -> dict[str, Tensor]:
    """transformers' SigLIP vision weights -> VisionTransformer's state dict (the same tensors, renamed).

    `prefix` (e.g. "vision_model.") is found from the keys when None; `num_layers` is counted from the
    `encoder.layers.{i}` keys when None. `source` names the checkpoint in errors (load_vit_from_hf passes
    its folder).
    """
    keys = list(state_dict)
    if prefix is None:
        prefix = _vit_prefix(keys, source)
    ours_by_theirs = {}
    if num_layers is None:
        layers = {int(m.group(1)) for k in keys if k.startswith(prefix) and (m := _VIT_LAYER.match(k[len(prefix):]))}
        num_layers = max(layers) + 1 if layers else 0
    for ours, theirs in _vit_key_pairs(num_layers):
        ours_by_theirs[prefix + theirs] = ours
    missing = [k for k in ours_by_theirs if k not in state_dict]
    if missing:
        raise ViTImportError(f"{source}: key {missing[0]!r} is missing"
                             + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    unknown = [
        k for k in keys
        if k.startswith(prefix) and k not in ours_by_theirs and not _VIT_DROPPED.match(k[len(prefix):])
        and not _SIGLIP_NOT_VISION.match(k)
    ]
    if unknown:
        raise ViTImportError(f"{source}: unexpected key {unknown[0]!r}"
                             + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else "")
                             + f"; a SigLIP vision tower of {num_layers} layers has no such weight")
    return {ours: state_dict[theirs] for theirs, ours in ours_by_theirs.items()}


def vit_state_dict_to_hf(state_dict: dict[str, Tensor], prefix: str = "") -> dict[str, Tensor]:
    """VisionTransformer's state dict -> transformers' names, without a pooling head.

    prefix "" is transformers 5's SiglipVisionModel layout (load it with vision_use_head=False);
    "vision_model." is SiglipModel's (and transformers 4's SiglipVisionModel's).
    """
    layers = {int(m.group(1)) for k in state_dict if (m := re.match(r"^blocks\.(\d+)\.", k))}
    num_layers = max(layers) + 1 if layers else 0
    pairs = _vit_key_pairs(num_layers)
    expected = {ours for ours, _ in pairs}
    if set(state_dict) != expected:
        odd = sorted(set(state_dict) ^ expected)
        raise ViTImportError(f"state dict: not a VisionTransformer's ({len(odd)} keys differ, e.g. {odd[0]!r})")
    return {prefix + theirs: state_dict[ours] for ours, theirs in pairs}


def vit_config_from_hf(
    hf_config: dict[str, Any],
    preprocessor_config: dict[str, Any] | None = None,
    source: str = "config",
    attn_impl: str = "auto",
) -> ViTConfig:
    """ViTConfig from a config.json dict: a SiglipVisionConfig, or a SiglipConfig with a "vision_config".

    Image mean and std come from a preprocessor_config.json dict when given, else SigLIP's 0.5 / 0.5.
    Missing architecture keys take SiglipVisionConfig's defaults (transformers 4 omitted them from the file).
    """
    model_type = hf_config.get("model_type")
    if isinstance(model_type, str) and model_type.startswith("siglip2"):
        raise ViTImportError(f"{source}: model_type {model_type!r} is SigLIP2 NaFlex (variable resolution), which "
                             "is not supported; fixed-resolution SigLIP2 checkpoints have model_type 'siglip'")
    if "vision_config" in hf_config or model_type == "siglip":
        vision = hf_config.get("vision_config") or {}
        where = "vision_config."
    else:
        vision = hf_config
        where = ""
    vision_type = vision.get("model_type", "siglip_vision_model")
    if vision_type != "siglip_vision_model":
        raise ViTImportError(f"{source}: key '{where}model_type' is {vision_type!r}, expected 'siglip_vision_model'")

    def get(key: str) -> Any:
        return vision.get(key, _SIGLIP_VISION_DEFAULTS[key])

    if get("hidden_act") not in _TANH_GELUS:
        raise ViTImportError(f"{source}: key '{where}hidden_act' is {get('hidden_act')!r}; this model has the "
                             f"tanh-approximated GELU ({' or '.join(_TANH_GELUS)})")
    mean, std = list(_SIGLIP_MEAN_STD), list(_SIGLIP_MEAN_STD)
    channels = get("num_channels")
    if preprocessor_config is not None:
        if preprocessor_config.get("do_normalize", True) is False:
            mean, std = [0.0] * channels, [1.0] * channels
        else:
            mean = list(preprocessor_config.get("image_mean", mean))
            std = list(preprocessor_config.get("image_std", std))
    try:
        return ViTConfig(
            image_size=get("image_size"), patch_size=get("patch_size"), hidden_size=get("hidden_size"),
            intermediate_size=get("intermediate_size"), num_layers=get("num_hidden_layers"),
            num_heads=get("num_attention_heads"), layer_norm_eps=get("layer_norm_eps"), num_channels=channels,
            image_mean=mean, image_std=std, attn_impl=attn_impl,
        )
    except ValueError as e:
        raise ViTImportError(f"{source}: {e}") from None


def vit_config_to_hf(cfg: ViTConfig) -> dict[str, Any]:
    """A SiglipVisionConfig dict for cfg, without a pooling head (image mean/std go in a preprocessor config)."""
    return {
        "model_type": "siglip_vision_model", "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads, "num_channels": cfg.num_channels, "image_size": cfg.image_size,
        "patch_size": cfg.patch_size, "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": cfg.layer_norm_eps,
        "attention_dropout": 0.0, "vision_use_head": False,
    }


def read_hf_weights(folder: str | Path, error: type[ValueError] = ValueError, where: str = "") -> dict[str, Tensor]:
    """All tensors of a folder's model.safetensors, of the shards its model.safetensors.index.json lists, or of its
    pytorch_model.bin (read as plain tensors only: weights_only). Raises `error` naming `where` (default: the
    folder) and the file it could not use."""
    folder = Path(folder)
    where = where or str(folder)
    single, index, pickle = (folder / n for n in ("model.safetensors", "model.safetensors.index.json",
                                                  "pytorch_model.bin"))
    if single.is_file():
        files = [single]
    elif index.is_file():
        weight_map = read_json_object(index, error, where).get("weight_map")
        if not isinstance(weight_map, dict):
            raise error(f"{where}: {index.name} has no 'weight_map'")
        files = [folder / name for name in sorted(set(weight_map.values()))]
    elif pickle.is_file():
        files = [pickle]
    else:
        raise error(f"{where}: no weights (model.safetensors, model.safetensors.index.json or pytorch_model.bin)")
    state: dict[str, Tensor] = {}
    for path in files:
        if not path.is_file():
            raise error(f"{path}: missing, but {index.name} lists it")
        try:
            part = load_file(path) if path.suffix == ".safetensors" else torch.load(path, map_location="cpu",
                                                                                     weights_only=True)
        except Exception as e:  # safetensors and torch.load raise many kinds for a damaged file
            raise error(f"{where}: {path.name} is not a readable weights file ({type(e).__name__}: {e})") from None
        if not isinstance(part, dict) or not all(isinstance(v, Tensor) for v in part.values()):
            raise error(f"{where}: {path.name} is not a flat state dict of tensors")
        state.update(part)
    return state


def load_vit_from_hf(
    folder: str | Path, attn_impl: str = "auto", prefix: str | None = None
) -> tuple[ViTConfig, VisionTransformer]:
    """(config, model) from a local SigLIP / SigLIP2 checkpoint folder: config.json, the weights, and
    preprocessor_config.json if present (for the image mean/std). The model is fp32 on the CPU whatever
    dtype the file holds; move and cast it as the run needs. `prefix` picks the vision tower's key prefix
    (e.g. "vision_model."); None finds it (see the notes at the top of this section)."""
    folder = Path(folder)
    source = f"SigLIP checkpoint {folder}"
    if not folder.is_dir():
        raise ViTImportError(f"{source}: no such folder")
    if not (folder / "config.json").is_file():
        raise ViTImportError(f"{source}: no config.json")
    hf_config = read_json_object(folder / "config.json", ViTImportError, source)
    pre_path = folder / "preprocessor_config.json"
    preprocessor = read_json_object(pre_path, ViTImportError, source) if pre_path.is_file() else None
    cfg = vit_config_from_hf(hf_config, preprocessor, source, attn_impl)
    raw = read_hf_weights(folder, ViTImportError, source)
    if prefix is None:
        prefix = _vit_prefix(list(raw), source)
    weights = vit_state_dict_from_hf(raw, num_layers=cfg.num_layers, prefix=prefix, source=source)

    # Built on the meta device and given the file's tensors: no time spent on an initialisation that the
    # weights would overwrite. Every key is there (checked above); the shapes are checked here, so that a
    # mismatch names the key rather than failing inside load_state_dict.
    with torch.device("meta"):
        model = VisionTransformer(cfg)
    theirs_by_ours = dict(_vit_key_pairs(cfg.num_layers))
    for key, param in model.state_dict().items():
        if weights[key].shape != param.shape:
            raise ViTImportError(f"{source}: key '{prefix}{theirs_by_ours[key]}' has shape {list(weights[key].shape)}, "
                                 f"but config.json implies {list(param.shape)}")
    model.load_state_dict({k: v.to(torch.float32) for k, v in weights.items()}, strict=True, assign=True)
    return cfg, model


# --- Llama language model ---
#
# A LlamaForCausalLM folder (e.g. HuggingFaceTB/SmolLM2-135M / -360M, the language models of nanoVLM) ->
# (LlamaConfig, LanguageModel). Config keys are those of transformers' LlamaConfig, in both the 4.x form
# (top-level rope_theta, rope_scaling) and the 5.x form (rope_parameters: {"rope_type", "rope_theta"}).
# Only unscaled RoPE is supported (rope type none or "default"); linear / dynamic / yarn / llama3 scaling
# is refused rather than silently ignored. Tied checkpoints usually omit lm_head.weight; when they do
# store it, it must equal the embedding (this model has no separate head to put it in).

LLAMA_MODEL_TYPES = ("llama",)
_LLAMA_ROPE_TYPES = (None, "default")
# Recomputable buffers that older transformers versions saved with the weights; dropped on import.
_LLAMA_DROPPED_SUFFIX = "rotary_emb.inv_freq"


class LlamaFormatError(ValueError):
    """A Hugging Face Llama folder, config or state dict that cannot be imported; names the source and key."""


def llama_config_from_hf(hf_config: dict, source: str = "config.json") -> LlamaConfig:
    """LlamaConfig from a transformers LlamaConfig dict (config.json); `source` names it in errors.

    Absent optional keys take transformers' LlamaConfig defaults (num_key_value_heads = num_attention_heads,
    rms_norm_eps 1e-6, tie_word_embeddings false, rope_theta 10000, max_position_embeddings 2048).
    """
    checks = {
        "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        "bool": lambda v: isinstance(v, bool),
    }

    def get(key: str, default: object = ..., kind: str = "int"):
        value = hf_config.get(key)
        if value is None:
            if default is ...:
                raise LlamaFormatError(f"{source}: key {key!r} is missing; is this a Llama (LlamaForCausalLM) config?")
            return default
        if not checks[kind](value):
            raise LlamaFormatError(f"{source}: key {key!r} must be of type {kind}, got {value!r}")
        return value

    model_type = hf_config.get("model_type")
    if model_type is not None and model_type not in LLAMA_MODEL_TYPES:
        raise LlamaFormatError(f"{source}: key 'model_type' is {model_type!r}; only {', '.join(LLAMA_MODEL_TYPES)} "
                               "(LlamaForCausalLM) folders can be imported as a vistrain LanguageModel")
    if hf_config.get("hidden_act", "silu") != "silu":
        raise LlamaFormatError(f"{source}: key 'hidden_act' is {hf_config['hidden_act']!r}; "
                               "the MLP here is SwiGLU (silu)")
    for key, why in (("attention_bias", "this model's projections have no biases"),
                     ("mlp_bias", "this model's projections have no biases"),
                     ("rope_interleaved", "this model rotates halves (Llama's convention), not interleaved pairs")):
        if hf_config.get(key):  # rope_interleaved: a nanotron key that SmolLM2's configs carry as false
            raise LlamaFormatError(f"{source}: key {key!r} is true; {why}")

    heads, hidden = get("num_attention_heads"), get("hidden_size")
    head_dim = get("head_dim", 0)
    if hidden % heads == 0 and head_dim == hidden // heads:
        head_dim = 0  # the default: keep the config in its shortest form
    try:
        return LlamaConfig(
            vocab_size=get("vocab_size"),
            hidden_size=hidden,
            intermediate_size=get("intermediate_size"),
            num_layers=get("num_hidden_layers"),
            num_heads=heads,
            num_kv_heads=get("num_key_value_heads", heads),
            head_dim=head_dim,
            rope_theta=_llama_rope_theta(hf_config, source),
            rms_norm_eps=float(get("rms_norm_eps", 1e-6, "number")),
            tie_embeddings=get("tie_word_embeddings", False, "bool"),
            max_position_embeddings=get("max_position_embeddings", 2048),
        )
    except LlamaFormatError:
        raise
    except ValueError as e:  # LlamaConfig.validate: a value of the right type that makes no model
        raise LlamaFormatError(f"{source}: {e}") from None


def _llama_rope_theta(hf_config: dict, source: str) -> float:
    """The rotary base, from rope_parameters (transformers 5) or rope_theta + rope_scaling (transformers 4);
    either dict asking for RoPE scaling is refused."""
    for key in ("rope_parameters", "rope_scaling"):
        params = hf_config.get(key)
        if params is None:
            continue
        if not isinstance(params, dict) or any(isinstance(v, dict) for v in params.values()):
            raise LlamaFormatError(f"{source}: key {key!r} must be one dict of RoPE settings (not one per layer "
                                   f"type) or null, got {params!r}")
        rope_type = params.get("rope_type", params.get("type"))
        if rope_type not in _LLAMA_ROPE_TYPES:
            raise LlamaFormatError(f"{source}: key {key!r} asks for RoPE scaling of type {rope_type!r}; only "
                                   "unscaled RoPE (type none or 'default') is supported")
    params = hf_config.get("rope_parameters") or {}
    where = "rope_parameters.rope_theta" if "rope_theta" in params else "rope_theta"
    theta = params.get("rope_theta", hf_config.get("rope_theta", 10000.0))
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not 0 < theta < math.inf:
        raise LlamaFormatError(f"{source}: key {where!r} must be a number > 0, got {theta!r}")
    return float(theta)


def llama_config_to_hf(cfg: LlamaConfig) -> dict:
    """The config.json dict of transformers' LlamaConfig for cfg (both rope forms, so 4.x and 5.x read it)."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.resolved_head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "tie_word_embeddings": cfg.tie_embeddings,
        "max_position_embeddings": cfg.max_position_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
    }


def llama_key_map(cfg: LlamaConfig) -> dict[str, str]:
    """vistrain key -> Hugging Face key, for every tensor of a LanguageModel with this config."""
    keys = {"embed_tokens.weight": "model.embed_tokens.weight"}
    for i in range(cfg.num_layers):
        ours, theirs = f"blocks.{i}.", f"model.layers.{i}."
        keys[ours + "attn_norm.weight"] = theirs + "input_layernorm.weight"
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            keys[f"{ours}attn.{proj}.weight"] = f"{theirs}self_attn.{proj}.weight"
        keys[ours + "mlp_norm.weight"] = theirs + "post_attention_layernorm.weight"
        for proj in ("gate_proj", "up_proj", "down_proj"):
            keys[f"{ours}mlp.{proj}.weight"] = f"{theirs}mlp.{proj}.weight"
    keys["norm.weight"] = "model.norm.weight"
    if not cfg.tie_embeddings:
        keys["lm_head.weight"] = "lm_head.weight"
    return keys


def llama_state_dict_from_hf(state_dict: dict[str, Tensor], cfg: LlamaConfig,
                             source: str = "state dict") -> dict[str, Tensor]:
    """A LanguageModel state dict from a LlamaForCausalLM one: every key mapped, shapes checked, nothing left over."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in LanguageModel(cfg).state_dict().items()}
    out = {}
    for ours, theirs in llama_key_map(cfg).items():
        if theirs not in state_dict:
            raise LlamaFormatError(f"{source}: key {theirs!r} is missing")
        value = state_dict[theirs]
        if value.shape != shapes[ours]:
            raise LlamaFormatError(f"{source}: key {theirs!r} has shape {list(value.shape)}, the config gives "
                                   f"{list(shapes[ours])}")
        out[ours] = value
    used = set(llama_key_map(cfg).values())
    for key, value in state_dict.items():
        if key in used or key.endswith(_LLAMA_DROPPED_SUFFIX):
            continue
        if key == "lm_head.weight" and cfg.tie_embeddings:
            if not torch.equal(value, state_dict["model.embed_tokens.weight"]):
                raise LlamaFormatError(f"{source}: key 'lm_head.weight' differs from 'model.embed_tokens.weight', "
                                       "but tie_word_embeddings is true (one matrix for both)")
            continue
        raise LlamaFormatError(f"{source}: unexpected key {key!r} (not part of a Llama causal LM)")
    return out


def llama_state_dict_to_hf(state_dict: dict[str, Tensor], cfg: LlamaConfig) -> dict[str, Tensor]:
    """The inverse map: a LlamaForCausalLM state dict (without lm_head.weight when tied, as HF saves it)."""
    return {theirs: state_dict[ours] for ours, theirs in llama_key_map(cfg).items()}


def load_llama_from_hf(folder: str | Path, dtype: torch.dtype = torch.float32,
                       attn_impl: str = "auto") -> tuple[LlamaConfig, LanguageModel]:
    """(config, model in eval mode on the CPU, in `dtype`) from a local LlamaForCausalLM folder."""
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise LlamaFormatError(f"{folder}: no config.json; expected a Hugging Face model folder")
    hf_config = read_json_object(config_path, LlamaFormatError)
    cfg = llama_config_from_hf(hf_config, source=str(config_path))
    cfg.attn_impl = attn_impl
    cfg.validate()
    state = llama_state_dict_from_hf(read_hf_weights(folder, LlamaFormatError), cfg, source=str(folder))
    with torch.device("meta"):  # no random init of weights about to be overwritten
        model = LanguageModel(cfg)
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True, assign=True)
    return cfg, model.eval()
