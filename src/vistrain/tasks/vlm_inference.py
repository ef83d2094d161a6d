"""A VLM's folder put to use: a checkpoint or model folder found and read back (model, tokenizer, how it processes
images and prompts -- also for a run that fine-tunes it), answers generated from it, and its export to
transformers. What `vistrain generate`, `vistrain export` and the lmms-eval adapter (lmms.py) use, without the
training task (tasks/vlm.py).

A folder says how its images and prompts are processed in config.json: `max_image_size`, `image_layout`,
`image_resize`, `image_labels`, `chat_template` and `eos_token` (models imported from nanoVLM or SmolVLM keep
their original's processing this way); its tokenizer is the `tokenizer/` asset, read against its checksums.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
from PIL import Image
from torch import Tensor

from vistrain.data.vqa import ImageProcessor, VQAEncoder
from vistrain.data.vqa_text import IMAGE_LAYOUTS
from vistrain.engine import checkpoint_files as ckpt_lib
from vistrain.errors import ConfigError
from vistrain.interop.smolvlm import SmolVLMFormatError, to_transformers
from vistrain.interop.tokenizers import TOKENIZER_DIR, load_tokenizer
from vistrain.models.vlm import VisionLanguageModel
from vistrain.provenance import describe
from vistrain.tasks.capabilities import Exporter, Prompt, PromptAnswerer


def checkpoint_tokenizer(folder: Path) -> Any:
    """The tokenizer of a VLM checkpoint or model folder (its tokenizer/ asset), its files checked first against
    the checksums recorded when they were written: CheckpointError names a damaged file or the missing folder."""
    tokenizer_dir = Path(folder) / TOKENIZER_DIR
    if not tokenizer_dir.is_dir():
        raise ckpt_lib.CheckpointError(f"{folder} has no {TOKENIZER_DIR}/ folder, so it is not a complete VLM "
                                       "checkpoint or model folder: give one that vistrain wrote (train, export or "
                                       "import)")
    files = tuple(p.relative_to(folder).as_posix() for p in sorted(tokenizer_dir.rglob("*")) if p.is_file())
    ckpt_lib.verify_checkpoint(Path(folder), only=files)
    try:
        return load_tokenizer(tokenizer_dir)
    except ValueError as e:
        raise ckpt_lib.CheckpointError(str(e)) from None


def image_style(model_config: dict) -> dict[str, Any]:
    """A model folder's image processing keys that differ from vistrain's defaults: image_layout (VQAEncoder's,
    "vistrain" when absent), image_resize (an ImageProcessor resize mode, "vistrain" when absent) and image_labels
    (VQAEncoder's, false when absent). Models imported from nanoVLM have the last two (interop/nanovlm.py), from
    SmolVLM the first two (interop/smolvlm.py)."""
    style: dict[str, Any] = {}
    if model_config.get("image_layout", "vistrain") != "vistrain":
        style["image_layout"] = str(model_config["image_layout"])
    if model_config.get("image_resize", "vistrain") != "vistrain":
        style["image_resize"] = str(model_config["image_resize"])
    if model_config.get("image_labels"):
        style["image_labels"] = True
    return style


def vlm_folder(path: str, key: str) -> Path:
    """The VLM checkpoint or model folder that config key `key` names (a run folder: its latest checkpoint)."""
    try:
        folder = ckpt_lib.find_checkpoint(Path(path))
        task = ckpt_lib.load_model_config(folder).get("task")
    except ckpt_lib.CheckpointError as e:
        raise ConfigError(f"{key}={path}: {e}") from None
    if task != "vlm":
        raise ConfigError(f"{key}={path} holds a {task!r} model, not a vision-language model: give the run, "
                          "checkpoint or model folder of a VLM")
    return folder


def training_image_style(image_layout: str, init: Optional[str]) -> dict[str, Any]:
    """The image style a run trains with: model.init's (a model keeps the layout it was made with), or a new
    model's of data.image_layout. data.image_layout, when given, must be model.init's."""
    if image_layout and image_layout not in IMAGE_LAYOUTS:
        raise ConfigError(f"data.image_layout={image_layout!r}: expected one of {', '.join(IMAGE_LAYOUTS)} (or empty: "
                          "model.init's layout)")
    if init:
        style = image_style(ckpt_lib.load_model_config(vlm_folder(init, "model.init")))
        if image_layout and image_layout != style.get("image_layout", "vistrain"):
            raise ConfigError(f"data.image_layout={image_layout}, but model.init={init} was made with the "
                              f"{style.get('image_layout', 'vistrain')!r} layout (its tokens and image tiling): "
                              "give that layout, or leave data.image_layout empty")
        return style
    return {"image_layout": "smolvlm", "image_resize": "smolvlm"} if image_layout == "smolvlm" else {}


def load_vlm(folder: Path, device: torch.device | str = "cpu") -> VisionLanguageModel:
    """The VLM of a checkpoint or model folder, its checksums verified."""
    ckpt_lib.verify_checkpoint(folder, only=(ckpt_lib.MODEL_FILE, ckpt_lib.CONFIG_FILE))
    return VisionLanguageModel.from_pretrained(folder, device)


def load_for_generation(folder: Path, device: torch.device | str = "cpu") -> tuple[VisionLanguageModel, Any,
                                                                                 VQAEncoder, int]:
    """(model, tokenizer, prompt encoder, eos id) of a checkpoint or model folder, processing images and prompts
    as its config.json says (see the module's docstring); the eos token defaults to <|im_end|>."""
    folder = Path(folder)
    tokenizer = checkpoint_tokenizer(folder)  # first: seconds, and a folder without one needs no model loaded
    model = load_vlm(folder, device)
    model_config = ckpt_lib.load_model_config(folder)
    vcfg = model.cfg.vision
    style = image_style(model_config)
    processor = ImageProcessor(vcfg.image_size, model_config.get("max_image_size", vcfg.image_size),
                               vcfg.image_mean, vcfg.image_std, resize=style.get("image_resize", "vistrain"))
    encoder = VQAEncoder(tokenizer, processor, model.cfg.image_token_length,
                         model_config.get("chat_template", "chatml"), image_labels=style.get("image_labels", False),
                         layout=style.get("image_layout", "vistrain"))
    eos_token = str(model_config.get("eos_token", "<|im_end|>"))
    eos_id = tokenizer.convert_tokens_to_ids(eos_token)
    if eos_id is None or eos_id == tokenizer.unk_token_id and eos_token != tokenizer.unk_token:
        raise ValueError(f"{folder}: the eos_token {eos_token!r} of config.json is not in its tokenizer")
    return model, tokenizer, encoder, int(eos_id)


def encode_question(encoder: VQAEncoder, images: list, prompt: str) -> dict[str, Any]:
    """A question as `vistrain generate` (and the lmms-eval adapter) asks it: the images (PIL, in order) before
    the prompt in one user turn, up to the assistant header. VQAEncoder.encode_prompt's dict: input_ids (L,),
    pixel_values (V, 3, tile, tile), num_images."""
    encoded = encoder.encode_prompt({"images": list(images), "texts": [{"user": prompt, "assistant": ""}]})
    if encoded is None:  # cannot happen: a turn without ratings is always kept
        raise ValueError("the prompt was filtered out")
    return encoded


def context_room(model: VisionLanguageModel, encoded: dict[str, Any]) -> int:
    """How many new tokens fit in the model's context (lm.max_position_embeddings) after an encoded question."""
    return model.cfg.lm.max_position_embeddings - len(encoded["input_ids"])


def answer_ids(model: VisionLanguageModel, encoded: dict[str, Any], max_new_tokens: int, eos_id: int,
               greedy: bool = True, temperature: float = 1.0, top_k: int = 0, top_p: float = 0.0,
               generator: Optional[torch.Generator] = None, compile: bool = False) -> Tensor:
    """The new token ids (N,), N <= max_new_tokens, that the model writes after an encoded question (on the
    model's device); the last is eos_id when it stopped by itself. At most `context_room` tokens: the cache
    for more would only hold positions the model never learnt. compile: the decoding step compiled (worth it
    for many answers on a GPU, as a benchmark asks them; one answer is faster eager)."""
    if max_new_tokens > context_room(model, encoded):
        raise ValueError(f"max_new_tokens {max_new_tokens}: at most {context_room(model, encoded)} fit in the "
                         f"model's context after this prompt")
    device = next(model.parameters()).device
    ids = model.generate(encoded["input_ids"][None].to(device), encoded["pixel_values"].to(device),
                         max_new_tokens=max_new_tokens, eos_token_id=eos_id, greedy=greedy, temperature=temperature,
                         top_k=top_k, top_p=top_p, generator=generator, compile=compile)
    return ids[0]


def decode_answer(tokenizer: Any, ids: Tensor, eos_id: int) -> str:
    """The text of generated ids, up to (not including) the end of the answer."""
    ids = ids.tolist()
    if eos_id in ids:
        ids = ids[: ids.index(eos_id)]
    return tokenizer.decode(ids, skip_special_tokens=True)


class VLMAnswerer(PromptAnswerer):
    """`vistrain generate`: one answer to a prompt about the given images."""

    def answer(self, folder: Path, prompt: Prompt, device: torch.device) -> str:
        model, tokenizer, encoder, eos_id = load_for_generation(folder, device)
        pictures = []
        for path in prompt.images:
            try:
                pictures.append(Image.open(path).convert("RGB"))
            except (OSError, ValueError) as e:
                raise ValueError(f"--image {path}: cannot be read as an image ({e})") from None
        encoded = encode_question(encoder, pictures, prompt.text)
        room = context_room(model, encoded)
        if room < 1:
            raise ConfigError(f"--prompt and --image take {len(encoded['input_ids'])} tokens, more than this model's "
                              f"context of {model.cfg.lm.max_position_embeddings}: ask with fewer or smaller images "
                              "or a shorter prompt")
        if prompt.max_new_tokens > room:
            raise ConfigError(f"--max-new-tokens {prompt.max_new_tokens}: this model's context is "
                              f"{model.cfg.lm.max_position_embeddings} tokens and the prompt with its images takes "
                              f"{len(encoded['input_ids'])}, which leaves room for at most {room}")
        generator = torch.Generator(device).manual_seed(prompt.seed)
        ids = answer_ids(model, encoded, prompt.max_new_tokens, eos_id, greedy=prompt.greedy,
                         temperature=prompt.temperature, top_k=prompt.top_k, top_p=prompt.top_p, generator=generator)
        return decode_answer(tokenizer, ids, eos_id)


class TransformersExport(Exporter):
    """`vistrain export --format transformers`: an Idefics3 (SmolVLM) folder that transformers' Auto classes load,
    for a VLM of the smolvlm image layout (interop/smolvlm.py)."""

    formats = ("transformers",)

    def export(self, fmt: str, folder: Path, out: Path, provenance: dict) -> Path:
        weights = ckpt_lib.load_weights(folder)
        try:
            hf_config, hf_weights, files = to_transformers(ckpt_lib.load_model_config(folder), weights,
                                                           checkpoint_tokenizer(folder), str(folder),
                                                           describe(provenance))
        except SmolVLMFormatError as e:
            raise ConfigError(str(e)) from None
        return ckpt_lib.write_model_folder(out, hf_weights, hf_config, files, provenance_record=provenance)
