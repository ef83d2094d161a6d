"""A VLM built from parts: a local Hugging Face SigLIP folder for the encoder and a Llama-family folder (with its
tokenizer) for the decoder, joined by a new pixel-shuffle projector. What `vistrain import vlm` writes, and what
training with model.vision_from / model.lm_from starts from.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Optional

from vistrain.data.vqa_text import add_layout_tokens
from vistrain.errors import ConfigError
from vistrain.interop.hf import load_llama_from_hf, load_vit_from_hf
from vistrain.interop.tokenizers import load_tokenizer, tokenizer_assets
from vistrain.models.llama import LlamaConfig
from vistrain.models.vit import ViTConfig
from vistrain.models.vlm import VisionLanguageModel, VLMConfig


def lm_tokenizer(folder: str, key: str = "model.lm_from", layout: str = "vistrain") -> Any:
    """A language model's own tokenizer, extended with the image tokens of an image layout; errors name `key` (the
    key or flag)."""
    try:
        tokenizer = load_tokenizer(Path(folder))
    except ValueError as e:
        raise ConfigError(f"{key}={folder}: {e}") from None
    add_layout_tokens(tokenizer, layout)
    return tokenizer


def build_vlm(vision_cfg: ViTConfig, lm_cfg: LlamaConfig, pixel_shuffle_factor: int, tokenizer: Any,
              vision_from: Optional[str] = None, lm_from: Optional[str] = None,
              image_token: str = "<|image|>") -> VisionLanguageModel:
    """A VLM of these shapes, or with the encoder / decoder (config and weights) of local Hugging Face folders;
    the decoder's vocabulary is the tokenizer's (extended with the image tokens: new rows N(0, 0.02)), and
    `image_token` (its image layout's) the placeholder its image features replace."""
    vision = lm = None
    if vision_from:
        vision_cfg, vision = load_vit_from_hf(vision_from)
    if lm_from:
        lm_cfg, lm = load_llama_from_hf(lm_from)
    cfg = VLMConfig(vision=vision_cfg, lm=dataclasses.replace(lm_cfg, vocab_size=len(tokenizer)),
                    pixel_shuffle_factor=pixel_shuffle_factor,
                    image_token_id=int(tokenizer.convert_tokens_to_ids(image_token)))
    model = VisionLanguageModel(cfg)
    if vision is not None:
        model.vision.load_state_dict(vision.state_dict())
    if lm is not None:
        lm.resize_vocab(len(tokenizer))
        model.lm.load_state_dict(lm.state_dict())
    return model


def import_hf(vision_from: str, lm_from: str, pixel_shuffle_factor: int) -> tuple[dict, dict, dict]:
    """`vistrain import vlm`: (model_config, weights, assets) of a VLM made of two local Hugging Face folders,
    with a new projector and the LM's tokenizer extended with the image tokens."""
    tokenizer = lm_tokenizer(lm_from, key="--lm")
    model = build_vlm(ViTConfig(), LlamaConfig(), pixel_shuffle_factor, tokenizer, vision_from, lm_from)
    model_config = {"task": "vlm", "model": dataclasses.asdict(model.cfg), "chat_template": "chatml",
                    "max_image_size": 4 * model.cfg.vision.image_size}
    weights = {f"vlm.{k}": v for k, v in model.state_dict().items()}
    return model_config, weights, tokenizer_assets(tokenizer)
