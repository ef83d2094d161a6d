"""Hugging Face SmolVLM / Idefics3 folders <-> vistrain VLM model folders (`vistrain import smolvlm DIR --out
MODEL`, `vistrain export RUN --format transformers --out DIR`).

SmolVLM (HuggingFaceTB/SmolVLM-256M / 500M / 2.2B, transformers' SmolVLMForConditionalGeneration) is the
Idefics3 architecture, which is vistrain's VLM: a SigLIP-style encoder (Idefics3's embeddings allow variable
resolution, but a whole tile takes the plain position ids 0..N-1), a pixel shuffle whose order is vistrain's
PixelShuffleProjector's (tile token (r, c) holds patches (f r + i, f c + j) at channels (i f + j) D .. + D,
checked by tests/test_smolvlm.py), a bias-free linear connector and a Llama decoder. Only the prompt differs:
SmolVLM's tokens, tile order and chat template are the "smolvlm" image layout of vistrain/data (vqa_text.py,
vqa_images.py), which an imported model folder names (`"image_layout": "smolvlm"`) and keeps when fine-tuned.

Import reads config.json (model_type "idefics3" or "smolvlm": the same weights layout, so no SmolVLM class is
needed), the safetensors weights, the tokenizer, the image processor settings (preprocessor_config.json, or
processor_config.json's "image_processor" as transformers 5 writes it) and the chat template (chat_template.jinja,
chat_template.json, processor_config.json or the tokenizer's). Refused, naming the file and key: an image
processor that does not resize (do_resize false), resamples with another filter than Lanczos, rescales by
other than 1/255, or whose tile (max_image_size.longest_edge) is not the encoder's image_size; image_seq_len
that the encoder does not give; a tokenizer without SmolVLM's special tokens or not matching image_token_id.

Export writes an Idefics3 folder (model_type "idefics3": AutoModelForImageTextToText and AutoProcessor load it
without torchvision, which SmolVLM's processor needs for video) in the files transformers 4 and 5 both read:
config.json, model.safetensors, generation_config.json (eos = <end_of_utterance>), preprocessor_config.json,
processor_config.json, chat_template.json and the tokenizer's files. Only a model of the smolvlm layout exports:
transformers' processor writes no other prompt.

Weights (transformers' names): `model.vision_model.*` (SigLIP's names, interop/hf.py), `model.connector.
modality_projection.proj.weight`, `model.text_model.*` (a LlamaModel's, interop/hf.py without its `model.`)
and `lm_head.weight` (absent when tied). Nothing here needs transformers except reading the tokenizer.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

from torch import Tensor

from vistrain.data.vqa_images import SMOLVLM_MODES
from vistrain.data.vqa_text import END_OF_UTTERANCE, SMOLVLM_IMAGE_TOKEN, smolvlm_special_tokens
from vistrain.interop.hf import (
    llama_config_from_hf,
    llama_config_to_hf,
    llama_state_dict_from_hf,
    llama_state_dict_to_hf,
    read_hf_weights,
    vit_config_to_hf,
    vit_state_dict_from_hf,
    vit_state_dict_to_hf,
)
from vistrain.interop.json_files import read_json_object
from vistrain.models.vit import ViTConfig
from vistrain.models.vlm import WEIGHTS_PREFIX, VLMConfig

__all__ = [
    "SmolVLMFormatError",
    "import_smolvlm",
    "to_transformers",
    "vlm_config_from_smolvlm",
    "vlm_config_to_smolvlm",
    "vlm_state_dict_from_smolvlm",
    "vlm_state_dict_to_smolvlm",
]

MODEL_TYPES = ("idefics3", "smolvlm")
VISION_TYPES = ("idefics3_vision", "smolvlm_vision")
# Idefics3VisionConfig's and SmolVLMVisionConfig's defaults (the same): transformers 4 wrote only other values
_VISION_DEFAULTS = {
    "hidden_size": 1152, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 16,
    "num_channels": 3, "image_size": 224, "patch_size": 32, "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6,
}
_TEXT_RMS_EPS = 1e-5  # Idefics3Config's and SmolVLMConfig's text_config default (Llama's own is 1e-6)
_TANH_GELUS = ("gelu_pytorch_tanh", "gelu_new")
# Idefics3ImageProcessor's defaults, for keys a processor file leaves out
_PROCESSOR_DEFAULTS = {
    "do_resize": True, "resample": 1, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
    "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "do_image_splitting": True,
}
_LANCZOS = 1  # PIL's number for it, as processor files store `resample`
VISION_PREFIX, TEXT_PREFIX = "model.vision_model.", "model.text_model."
CONNECTOR_KEY = "model.connector.modality_projection.proj.weight"
LM_HEAD_KEY = "lm_head.weight"
PROCESSOR_CLASS, IMAGE_PROCESSOR_CLASS = "Idefics3Processor", "Idefics3ImageProcessor"


class SmolVLMFormatError(ValueError):
    """A SmolVLM / Idefics3 folder that cannot be imported, or a model that cannot be exported as one; names the
    file (or folder) and the key."""


# --------------------------------------------------------------------------------------------- config


def _int(section: dict, key: str, source: str, where: str = "") -> int:
    value = section.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise SmolVLMFormatError(f"{source}: key '{where}{key}' must be an integer, got {value!r}")
    return value


def vlm_config_from_smolvlm(config: dict, mean: list[float], std: list[float],
                            source: str = "config.json") -> VLMConfig:
    """vistrain's VLMConfig for an Idefics3 / SmolVLM config.json dict; mean and std are the image processor's."""
    model_type = config.get("model_type")
    if model_type not in MODEL_TYPES:
        raise SmolVLMFormatError(f"{source}: key 'model_type' is {model_type!r}; `vistrain import smolvlm` reads "
                                 f"{' or '.join(MODEL_TYPES)} folders (transformers' SmolVLM / Idefics3)")
    vision, text = config.get("vision_config"), config.get("text_config")
    for key, section in (("vision_config", vision), ("text_config", text)):
        if not isinstance(section, dict):
            raise SmolVLMFormatError(f"{source}: key {key!r} must be a JSON object, got {section!r}")
    vision = {**_VISION_DEFAULTS, **vision}
    if vision.get("model_type", VISION_TYPES[0]) not in VISION_TYPES:
        raise SmolVLMFormatError(f"{source}: key 'vision_config.model_type' is {vision['model_type']!r}, expected "
                                 f"{' or '.join(VISION_TYPES)}")
    if vision["hidden_act"] not in _TANH_GELUS:
        raise SmolVLMFormatError(f"{source}: key 'vision_config.hidden_act' is {vision['hidden_act']!r}; this encoder "
                                 f"has the tanh-approximated GELU ({' or '.join(_TANH_GELUS)})")
    lm = llama_config_from_hf({"rms_norm_eps": _TEXT_RMS_EPS, **text}, source=f"{source} (text_config)")
    # transformers 5 ties the head by the top-level key; a file without one meant its text_config's
    tied = config.get("tie_word_embeddings", text.get("tie_word_embeddings", False))
    if not isinstance(tied, bool):
        raise SmolVLMFormatError(f"{source}: key 'tie_word_embeddings' must be true or false, got {tied!r}")
    try:
        cfg = VLMConfig(
            vision=ViTConfig(
                image_size=_int(vision, "image_size", source, "vision_config."),
                patch_size=_int(vision, "patch_size", source, "vision_config."),
                hidden_size=_int(vision, "hidden_size", source, "vision_config."),
                intermediate_size=_int(vision, "intermediate_size", source, "vision_config."),
                num_layers=_int(vision, "num_hidden_layers", source, "vision_config."),
                num_heads=_int(vision, "num_attention_heads", source, "vision_config."),
                layer_norm_eps=float(vision["layer_norm_eps"]),
                num_channels=_int(vision, "num_channels", source, "vision_config."),
                image_mean=list(mean), image_std=list(std)),
            lm=dataclasses.replace(lm, tie_embeddings=tied),
            pixel_shuffle_factor=_int(config, "scale_factor", source) if "scale_factor" in config else 2,
            image_token_id=_int(config, "image_token_id", source))
        cfg.validate()
    except (TypeError, ValueError) as e:  # ViTConfig / LlamaConfig / VLMConfig validation: no such model
        if isinstance(e, SmolVLMFormatError):
            raise
        raise SmolVLMFormatError(f"{source}: {e}") from None
    if not 0 <= cfg.image_token_id < cfg.lm.vocab_size:
        raise SmolVLMFormatError(f"{source}: key 'image_token_id' is {cfg.image_token_id}, outside the vocabulary of "
                                 f"{cfg.lm.vocab_size} (text_config.vocab_size)")
    return cfg


def vlm_config_to_smolvlm(cfg: VLMConfig) -> dict[str, Any]:
    """An Idefics3Config dict (config.json) for cfg; the head's tying in both places transformers 4 and 5 read."""
    vision = {**vit_config_to_hf(cfg.vision), "model_type": VISION_TYPES[0]}
    vision.pop("vision_use_head")  # SigLIP's pooling head: no such key in Idefics3's vision config
    text = llama_config_to_hf(cfg.lm)
    text.pop("architectures")
    return {
        "architectures": ["Idefics3ForConditionalGeneration"],
        "model_type": MODEL_TYPES[0],
        "image_token_id": cfg.image_token_id,
        "scale_factor": cfg.pixel_shuffle_factor,
        "tie_word_embeddings": cfg.lm.tie_embeddings,
        "use_cache": True,
        "vision_config": vision,
        "text_config": text,
    }


# --------------------------------------------------------------------------------------------- image processing


def _image_processor(folder: Path) -> tuple[dict[str, Any], str]:
    """The image processor's settings and the file they come from."""
    legacy, nested = folder / "preprocessor_config.json", folder / "processor_config.json"
    if legacy.is_file():
        return read_json_object(legacy, SmolVLMFormatError), str(legacy)
    settings = read_json_object(nested, SmolVLMFormatError).get("image_processor") if nested.is_file() else None
    if isinstance(settings, dict):
        return settings, f"{nested} (image_processor)"
    raise SmolVLMFormatError(f"{folder}: no image processor settings (preprocessor_config.json, or "
                             "processor_config.json with an 'image_processor'), which say how SmolVLM resizes and "
                             "tiles images")


def _longest_edge(settings: dict, key: str, source: str) -> int:
    value = settings.get(key)
    edge = value.get("longest_edge") if isinstance(value, dict) else None
    if isinstance(edge, bool) or not isinstance(edge, int) or edge < 1:
        raise SmolVLMFormatError(f"{source}: key '{key}' must be {{\"longest_edge\": pixels}}, got {value!r}")
    return edge


def _image_settings(processor: dict[str, Any], source: str) -> tuple[dict[str, Any], list, list, int]:
    """(the model folder's image keys, image mean, image std, tile) from Idefics3ImageProcessor's settings."""
    settings = {**_PROCESSOR_DEFAULTS, **processor}
    if settings["do_resize"] is not True:
        raise SmolVLMFormatError(f"{source}: key 'do_resize' is {settings['do_resize']!r}; vistrain resizes every "
                                 "image to its size.longest_edge, as SmolVLM's own processors do")
    if settings["resample"] != _LANCZOS:
        raise SmolVLMFormatError(f"{source}: key 'resample' is {settings['resample']!r}; vistrain resizes as SmolVLM "
                                 f"does, with Lanczos ({_LANCZOS})")
    scale = settings["rescale_factor"]
    if settings["do_rescale"] is not True or not isinstance(scale, (int, float)) or abs(scale - 1 / 255) > 1e-12:
        raise SmolVLMFormatError(f"{source}: keys 'do_rescale' / 'rescale_factor' are {settings['do_rescale']!r} / "
                                 f"{scale!r}; vistrain scales 8-bit pixels by 1/255")
    mean, std = settings["image_mean"], settings["image_std"]
    if settings["do_normalize"] is False:
        mean, std = [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]
    elif isinstance(mean, (int, float)) and isinstance(std, (int, float)):  # one number for every channel
        mean, std = [mean] * 3, [std] * 3
    if not isinstance(settings["do_image_splitting"], bool):
        raise SmolVLMFormatError(f"{source}: key 'do_image_splitting' must be true or false, got "
                                 f"{settings['do_image_splitting']!r}")
    keys = {
        "image_layout": "smolvlm",
        "image_resize": SMOLVLM_MODES[0] if settings["do_image_splitting"] else SMOLVLM_MODES[1],
        "max_image_size": _longest_edge(settings, "size", source),
    }
    return keys, mean, std, _longest_edge(settings, "max_image_size", source)


def _preprocessor_config(model_config: dict, cfg: VLMConfig) -> dict[str, Any]:
    """Idefics3ImageProcessor's settings for a model of the smolvlm layout (preprocessor_config.json)."""
    return {
        "image_processor_type": IMAGE_PROCESSOR_CLASS, "processor_class": PROCESSOR_CLASS,
        "do_convert_rgb": True, "do_resize": True, "size": {"longest_edge": int(model_config["max_image_size"])},
        "resample": _LANCZOS, "do_image_splitting": model_config["image_resize"] == SMOLVLM_MODES[0],
        "max_image_size": {"longest_edge": cfg.vision.image_size}, "do_rescale": True, "rescale_factor": 1 / 255,
        "do_normalize": True, "image_mean": list(cfg.vision.image_mean), "image_std": list(cfg.vision.image_std),
        "do_pad": True,
    }


# --------------------------------------------------------------------------------------------- weights


def vlm_state_dict_from_smolvlm(state: dict[str, Tensor], cfg: VLMConfig, source: str) -> dict[str, Tensor]:
    """A VisionLanguageModel state dict (no prefix) from an Idefics3ForConditionalGeneration one: every key mapped,
    shapes checked, nothing left over."""
    if cfg.lm.tie_embeddings is False and LM_HEAD_KEY not in state:
        raise SmolVLMFormatError(f"{source}: key {LM_HEAD_KEY!r} is missing, but tie_word_embeddings is false")
    text = {"model." + k[len(TEXT_PREFIX):]: v for k, v in state.items() if k.startswith(TEXT_PREFIX)}
    if LM_HEAD_KEY in state:
        text[LM_HEAD_KEY] = state[LM_HEAD_KEY]
    out = {f"vision.{k}": v for k, v in vit_state_dict_from_hf(state, cfg.vision.num_layers, VISION_PREFIX,
                                                                source).items()}
    # errors name a text key as a Llama's (model.*): say where it sits
    text_source = f"{source} (its {TEXT_PREFIX}* read as a Llama's model.*)"
    out.update({f"lm.{k}": v for k, v in llama_state_dict_from_hf(text, cfg.lm, text_source).items()})
    if CONNECTOR_KEY not in state:
        raise SmolVLMFormatError(f"{source}: key {CONNECTOR_KEY!r} is missing")
    want = [cfg.lm.hidden_size, cfg.vision.hidden_size * cfg.pixel_shuffle_factor ** 2]
    if list(state[CONNECTOR_KEY].shape) != want:
        raise SmolVLMFormatError(f"{source}: key {CONNECTOR_KEY!r} has shape {list(state[CONNECTOR_KEY].shape)}, "
                                 f"config.json gives {want}")
    out["projector.proj.weight"] = state[CONNECTOR_KEY]
    known = (VISION_PREFIX, TEXT_PREFIX, CONNECTOR_KEY, LM_HEAD_KEY)
    unknown = sorted(k for k in state if not k.startswith(known))
    if unknown:
        raise SmolVLMFormatError(f"{source}: unexpected key {unknown[0]!r} (not part of an Idefics3 / SmolVLM model)")
    return out


def vlm_state_dict_to_smolvlm(state: dict[str, Tensor], cfg: VLMConfig) -> dict[str, Tensor]:
    """The inverse map: Idefics3ForConditionalGeneration's names (without lm_head.weight when tied)."""
    part = lambda prefix: {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}  # noqa: E731
    out = vit_state_dict_to_hf(part("vision."), prefix=VISION_PREFIX)
    for key, value in llama_state_dict_to_hf(part("lm."), cfg.lm).items():
        out[TEXT_PREFIX + key[len("model."):] if key.startswith("model.") else key] = value
    out[CONNECTOR_KEY] = state["projector.proj.weight"]
    return out


# --------------------------------------------------------------------------------------------- tokenizer


def _chat_template(folder: Path, tokenizer: Any) -> Optional[str]:
    """The processor's chat template, wherever transformers 4 or 5 put it; else the tokenizer's."""
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text()
    for name in ("chat_template.json", "processor_config.json"):
        if (folder / name).is_file():
            template = read_json_object(folder / name, SmolVLMFormatError).get("chat_template")
            if isinstance(template, str):
                return template
    return getattr(tokenizer, "chat_template", None)


def smolvlm_tokenizer(folder: Path, image_token_id: int, vocab_size: int) -> Any:
    """The folder's tokenizer with the processor's chat template; its SmolVLM tokens and ids checked."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:  # transformers raises several kinds for a folder without tokenizer files
        raise SmolVLMFormatError(f"{folder}: no usable tokenizer there ({type(e).__name__}: {e})") from None
    if not getattr(tokenizer, "is_fast", False):
        raise SmolVLMFormatError(f"{folder}: not a fast tokenizer (tokenizer.json), which vistrain needs")
    split = [t for t in smolvlm_special_tokens() if len(tokenizer(t, add_special_tokens=False)["input_ids"]) != 1]
    if split:
        raise SmolVLMFormatError(f"{folder}: the tokenizer has no single token for {', '.join(split[:3])}"
                                 f"{', ...' if len(split) > 3 else ''}: not a SmolVLM / Idefics3 tokenizer")
    if tokenizer.convert_tokens_to_ids(SMOLVLM_IMAGE_TOKEN) != image_token_id:
        raise SmolVLMFormatError(f"{folder}: config.json's image_token_id is {image_token_id}, but the tokenizer's "
                                 f"{SMOLVLM_IMAGE_TOKEN} is {tokenizer.convert_tokens_to_ids(SMOLVLM_IMAGE_TOKEN)}")
    if len(tokenizer) > vocab_size:
        raise SmolVLMFormatError(f"{folder}: the tokenizer has {len(tokenizer)} tokens, more than config.json's "
                                 f"text_config.vocab_size of {vocab_size}")
    template = _chat_template(folder, tokenizer)
    if not template:
        raise SmolVLMFormatError(f"{folder}: no chat template (chat_template.jinja, chat_template.json, "
                                 "processor_config.json or the tokenizer's), which says how a prompt is written")
    tokenizer.chat_template = template
    return tokenizer


# --------------------------------------------------------------------------------------------- import, export


def import_smolvlm(folder: str | Path) -> tuple[dict, dict[str, Tensor], Any]:
    """(model_config, weights, tokenizer) of a vistrain model folder from a SmolVLM / Idefics3 one; the caller
    saves the tokenizer with it (its chat template is the processor's)."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise SmolVLMFormatError(f"{folder}: no config.json; give a local SmolVLM / Idefics3 folder (download it "
                                 "first, e.g. `huggingface-cli download HuggingFaceTB/SmolVLM-256M-Instruct "
                                 "--local-dir DIR`)")
    source = str(folder / "config.json")
    config = read_json_object(folder / "config.json", SmolVLMFormatError)
    processor, processor_source = _image_processor(folder)
    images, mean, std, tile = _image_settings(processor, processor_source)
    cfg = vlm_config_from_smolvlm(config, mean, std, source)
    if tile != cfg.vision.image_size:
        raise SmolVLMFormatError(f"{processor_source}: key 'max_image_size' is {processor['max_image_size']}, but "
                                 f"the encoder's tiles are {cfg.vision.image_size} px (config.json's "
                                 "vision_config.image_size): vistrain's encoder has one fixed resolution")
    _check_image_seq_len(folder, cfg)
    tokenizer = smolvlm_tokenizer(folder, cfg.image_token_id, cfg.lm.vocab_size)
    try:
        weights = vlm_state_dict_from_smolvlm(read_hf_weights(folder, SmolVLMFormatError), cfg, str(folder))
    except SmolVLMFormatError:
        raise
    except ValueError as e:  # interop/hf.py's errors name the folder and key already
        raise SmolVLMFormatError(str(e)) from None
    model_config = {
        "task": "vlm",
        "model": dataclasses.asdict(cfg),
        "chat_template": "tokenizer",  # the processor's, saved with the tokenizer
        **images,
        "eos_token": END_OF_UTTERANCE,
        "imported_from": {"format": config["model_type"], "folder": str(folder.resolve()), "config": config,
                          "image_processor": processor},
    }
    return model_config, {WEIGHTS_PREFIX + k: v for k, v in weights.items()}, tokenizer


def _check_image_seq_len(folder: Path, cfg: VLMConfig) -> None:
    path = folder / "processor_config.json"
    seq_len = read_json_object(path, SmolVLMFormatError).get("image_seq_len") if path.is_file() else None
    if seq_len is not None and seq_len != cfg.image_token_length:
        raise SmolVLMFormatError(f"{path}: key 'image_seq_len' is {seq_len!r}, but a {cfg.vision.image_size} px tile "
                                 f"of {cfg.vision.patch_size} px patches folded by {cfg.pixel_shuffle_factor} gives "
                                 f"{cfg.image_token_length} tokens")


def to_transformers(model_config: dict, weights: dict[str, Tensor], tokenizer: Any, source: str,
                    provenance: Sequence[str] = ()) -> tuple[dict, dict[str, Tensor], dict[str, bytes]]:
    """(config.json dict, weights, other files) of an Idefics3 folder that transformers loads, from a vistrain VLM
    checkpoint or model folder (`source` names it in errors) of the smolvlm image layout; `provenance`: lines for
    the model card (vistrain/provenance.py's describe)."""
    if model_config.get("task") != "vlm":
        raise SmolVLMFormatError(f"{source} holds a {model_config.get('task')!r} model; --format transformers "
                                 "exports vision-language models")
    layout = model_config.get("image_layout", "vistrain")
    if layout != "smolvlm" or model_config.get("image_resize") not in SMOLVLM_MODES:
        raise SmolVLMFormatError(
            f"{source}: its image layout is {layout!r}, and transformers' SmolVLM / Idefics3 processor writes only "
            "SmolVLM's prompt (<image> tokens, the global view last): --format transformers exports a model of the "
            "smolvlm layout (imported with `vistrain import smolvlm`, or trained with data.image_layout=smolvlm)")
    cfg = VLMConfig.from_dict(model_config["model"])
    if not getattr(tokenizer, "chat_template", None):
        raise SmolVLMFormatError(f"{source}: its tokenizer has no chat template, which transformers' processor needs")
    own = {k[len(WEIGHTS_PREFIX):]: v for k, v in weights.items() if k.startswith(WEIGHTS_PREFIX)}
    files = _tokenizer_files(tokenizer)
    files.update({
        "preprocessor_config.json": _json_bytes(_preprocessor_config(model_config, cfg)),
        "processor_config.json": _json_bytes({"processor_class": PROCESSOR_CLASS,
                                              "image_seq_len": cfg.image_token_length}),
        "chat_template.json": _json_bytes({"chat_template": tokenizer.chat_template}),
        "generation_config.json": _json_bytes(_generation_config(tokenizer, model_config)),
        "README.md": _model_card(source, cfg, provenance).encode(),
    })
    return vlm_config_to_smolvlm(cfg), vlm_state_dict_to_smolvlm(own, cfg), files


def _tokenizer_files(tokenizer: Any) -> dict[str, bytes]:
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        return {p.name: p.read_bytes() for p in sorted(Path(tmp).iterdir()) if p.is_file()}


def _generation_config(tokenizer: Any, model_config: dict) -> dict[str, Any]:
    """transformers' generate stops where `vistrain generate` does: at the model's end-of-turn token."""
    ids = {"bos_token_id": tokenizer.bos_token_id, "pad_token_id": tokenizer.pad_token_id,
           "eos_token_id": tokenizer.convert_tokens_to_ids(model_config.get("eos_token", END_OF_UTTERANCE))}
    return {k: int(v) for k, v in ids.items() if v is not None}


def _json_bytes(data: dict) -> bytes:
    return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()


def _model_card(source: str, cfg: VLMConfig, provenance: Sequence[str]) -> str:
    n_tokens = cfg.image_token_length
    made = ["## Provenance", "", "```text", *provenance, "```", ""] if provenance else []
    return "\n".join([
        "# A vistrain vision-language model in transformers' Idefics3 (SmolVLM) format", "",
        f"Exported from `{source}` by `vistrain export --format transformers`; {n_tokens} tokens per "
        f"{cfg.vision.image_size} px tile.", "", "## Use", "", "```python",
        "from transformers import AutoModelForImageTextToText, AutoProcessor",
        "processor = AutoProcessor.from_pretrained('THIS_FOLDER')",
        "model = AutoModelForImageTextToText.from_pretrained('THIS_FOLDER')",
        "messages = [{'role': 'user', 'content': [{'type': 'image'}, {'type': 'text', 'text': 'What is this?'}]}]",
        "prompt = processor.apply_chat_template(messages, add_generation_prompt=True)",
        "inputs = processor(text=prompt, images=[image], return_tensors='pt')",
        "new = model.generate(**inputs, max_new_tokens=32, do_sample=False)[:, inputs['input_ids'].shape[1]:]",
        "```", "", "Back into vistrain (to fine-tune it): `vistrain import smolvlm THIS_FOLDER --out MODEL`.", "",
        *made,
    ])
