"""Hugging Face checkpoint folders (config.json + safetensors, as transformers' save_pretrained writes them)
<-> vistrain models, as explicit key maps checked by parity tests against transformers itself.

Only local folders are read: downloading is the caller's business (e.g. huggingface_hub.snapshot_download).
Each model family has its own section below.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor

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
    "ViTImportError",
    "load_vit_from_hf",
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


def _read_json(path: Path, source: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ViTImportError(f"{source}: cannot read {path.name} ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict):
        raise ViTImportError(f"{source}: {path.name} is not a JSON object")
    return data


def _read_hf_weights(folder: Path, source: str) -> dict[str, Tensor]:
    """The tensors of model.safetensors, of a sharded model.safetensors.index.json, or of pytorch_model.bin."""
    single, index, pickle = (folder / n for n in ("model.safetensors", "model.safetensors.index.json",
                                                  "pytorch_model.bin"))
    try:
        if single.is_file():
            return load_file(single)
        if index.is_file():
            weight_map = _read_json(index, source).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ViTImportError(f"{source}: {index.name} has no 'weight_map'")
            state: dict[str, Tensor] = {}
            for shard in sorted(set(weight_map.values())):
                state.update(load_file(folder / shard))
            return state
        if pickle.is_file():
            state = torch.load(pickle, map_location="cpu", weights_only=True)
            if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
                raise ViTImportError(f"{source}: {pickle.name} is not a flat state dict of tensors")
            return state
    except ViTImportError:
        raise
    except Exception as e:
        raise ViTImportError(f"{source}: cannot read the weights ({type(e).__name__}: {e})") from None
    raise ViTImportError(f"{source}: no weights (model.safetensors, model.safetensors.index.json or "
                         "pytorch_model.bin)")


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
    hf_config = _read_json(folder / "config.json", source)
    pre_path = folder / "preprocessor_config.json"
    preprocessor = _read_json(pre_path, source) if pre_path.is_file() else None
    cfg = vit_config_from_hf(hf_config, preprocessor, source, attn_impl)
    raw = _read_hf_weights(folder, source)
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
