"""A small vision-language model in the nanoVLM mould: SigLIP-style encoder -> pixel-shuffle projector ->
Llama-style decoder.

Every image tile becomes (image_size / patch)^2 patch features; the projector folds each f x f neighbourhood of
them into one vector (pixel shuffle) and maps it to the decoder's width, so a tile costs
(image_size / patch / f)^2 tokens (64 for 512 px, patch 16, f 4). The text carries that many `<|image|>`
placeholder tokens per tile, in order; their embeddings are replaced by the tiles' features before the decoder
runs. Packed rows (several samples in one sequence) pass `position_ids` restarting per sample and `doc_ids`,
so that each sample attends only within itself.

    model = VisionLanguageModel.from_pretrained("runs/vlm_digits/checkpoints/step_00002000")
    logits_BTV = model(input_ids_BT, pixel_values_NCHW)
    new_ids = model.generate(input_ids_1T, pixel_values_NCHW, max_new_tokens=8, eos_token_id=eos)
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from vistrain.models.llama import LanguageModel, LlamaConfig
from vistrain.models.vit import VisionTransformer, ViTConfig

WEIGHTS_PREFIX = "vlm."  # the network's name in vistrain's checkpoints and model folders


@dataclass
class VLMConfig:
    vision: ViTConfig = field(default_factory=ViTConfig)
    lm: LlamaConfig = field(default_factory=LlamaConfig)
    pixel_shuffle_factor: int = 4
    image_token_id: int = -1  # the `<|image|>` placeholder's id in the (extended) vocabulary; set with the tokenizer

    @property
    def image_token_length(self) -> int:
        """Decoder tokens per image tile."""
        side = self.vision.image_size // self.vision.patch_size
        return (side // self.pixel_shuffle_factor) ** 2

    def validate(self) -> None:
        side = self.vision.image_size // self.vision.patch_size
        if self.pixel_shuffle_factor < 1 or side % self.pixel_shuffle_factor:
            raise ValueError(f"pixel_shuffle_factor={self.pixel_shuffle_factor} must divide the {side} x {side} patch "
                             f"grid of vision.image_size={self.vision.image_size} / vision.patch_size="
                             f"{self.vision.patch_size}")

    @classmethod
    def from_dict(cls, d: dict) -> VLMConfig:
        return cls(vision=ViTConfig(**d["vision"]), lm=LlamaConfig(**d["lm"]),
                   pixel_shuffle_factor=d["pixel_shuffle_factor"], image_token_id=d["image_token_id"])


class PixelShuffleProjector(nn.Module):
    """[N, S, D] -> [N, S / f^2, D f^2] by folding f x f patch neighbourhoods, then a bias-free Linear."""

    def __init__(self, vision_dim: int, lm_dim: int, factor: int):
        super().__init__()
        self.factor = factor
        self.proj = nn.Linear(vision_dim * factor * factor, lm_dim, bias=False)

    def forward(self, x_NSD: Tensor) -> Tensor:
        N, S, D = x_NSD.shape
        side, f = math.isqrt(S), self.factor
        x = x_NSD.view(N, side // f, f, side // f, f, D)  # (rows, f, cols, f): neighbourhoods side by side
        x = x.permute(0, 1, 3, 2, 4, 5).reshape(N, (side // f) ** 2, D * f * f)
        return self.proj(x)


class VisionLanguageModel(nn.Module):
    def __init__(self, cfg: VLMConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.vision = VisionTransformer(cfg.vision)
        self.projector = PixelShuffleProjector(cfg.vision.hidden_size, cfg.lm.hidden_size, cfg.pixel_shuffle_factor)
        self.lm = LanguageModel(cfg.lm)

    @property
    def blocks(self) -> list[nn.Module]:
        """The repeated blocks of both towers, for FSDP, per-block compile and activation checkpointing."""
        return [*self.vision.blocks, *self.lm.blocks]

    def image_features(self, pixel_values_NCHW: Tensor) -> Tensor:
        """(N tiles, image_token_length, lm width): what the `<|image|>` tokens of N tiles become."""
        return self.projector(self.vision(pixel_values_NCHW))

    def embed(self, input_ids_BT: Tensor, pixel_values_NCHW: Optional[Tensor]) -> Tensor:
        """Token embeddings with every `<|image|>` position holding its tile's feature, in order."""
        embeds_BTD = self.lm.embed(input_ids_BT)
        is_image_BT = input_ids_BT == self.cfg.image_token_id
        n_slots = int(is_image_BT.sum())  # a host sync, but one per forward; the check catches wrong data early
        if pixel_values_NCHW is None or pixel_values_NCHW.numel() == 0:
            if n_slots:
                raise ValueError(f"the text has {n_slots} image tokens but no pixel values were given")
            return embeds_BTD
        features = self.image_features(pixel_values_NCHW).reshape(-1, embeds_BTD.shape[-1])
        if features.shape[0] != n_slots:
            raise ValueError(f"{pixel_values_NCHW.shape[0]} image tiles give {features.shape[0]} image tokens, but the "
                             f"text has {n_slots} `<|image|>` tokens")
        return embeds_BTD.masked_scatter(is_image_BT.unsqueeze(-1), features.to(embeds_BTD.dtype))

    def forward(self, input_ids_BT: Tensor, pixel_values_NCHW: Optional[Tensor] = None,
                position_ids_BT: Optional[Tensor] = None, doc_ids_BT: Optional[Tensor] = None,
                labels_BT: Optional[Tensor] = None) -> Tensor:
        """Logits (B, T, V); with labels_BT (-100: no label), the float32 cross entropy summed over the labelled
        next tokens instead, computed without the logits (LanguageModel.next_token_loss). In the forward, so
        that FSDP has the tied head's weight gathered."""
        embeds_BTD = self.embed(input_ids_BT, pixel_values_NCHW)
        return self.lm(inputs_embeds_BTD=embeds_BTD, position_ids_BT=position_ids_BT, doc_ids_BT=doc_ids_BT,
                       labels_BT=labels_BT)

    @torch.no_grad()
    def generate(self, input_ids_BT: Tensor, pixel_values_NCHW: Optional[Tensor], max_new_tokens: int,
                 eos_token_id: Optional[int] = None, greedy: bool = True, temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 0.0, generator: Optional[torch.Generator] = None,
                 compile: bool | str = False) -> Tensor:
        """New token ids (B, <= max_new_tokens) after the prompt, with the decoder's KV cache; compile: the
        decoding step compiled (LanguageModel.generate)."""
        embeds_BTD = self.embed(input_ids_BT, pixel_values_NCHW)
        return self.lm.generate(inputs_embeds_BTD=embeds_BTD, max_new_tokens=max_new_tokens,
                                eos_token_id=eos_token_id, greedy=greedy, temperature=temperature, top_k=top_k,
                                top_p=top_p, generator=generator, compile=compile)

    # ------------------------------------------------------------------------------------- files

    def save_pretrained(self, folder: str | Path) -> Path:
        """config.json + model.safetensors in vistrain's layout (what vistrain's checkpoints hold too)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        config = {"task": "vlm", "model": dataclasses.asdict(self.cfg)}
        (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        state = {WEIGHTS_PREFIX + k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        if self.cfg.lm.tie_embeddings:  # one tensor, stored once: the head shares the embedding
            state.pop(WEIGHTS_PREFIX + "lm.lm_head.weight", None)
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
        return folder

    @classmethod
    def from_pretrained(cls, folder: str | Path, device: str | torch.device = "cpu") -> VisionLanguageModel:
        """A model from a folder with config.json and model.safetensors: a vistrain checkpoint (step_*), an
        exported or imported model folder, or one written by save_pretrained."""
        folder = Path(folder)
        for name in ("config.json", "model.safetensors"):
            if not (folder / name).is_file():
                raise FileNotFoundError(f"{folder / name} is missing: give a checkpoint or model folder of a VLM")
        config = json.loads((folder / "config.json").read_text())
        if config.get("task") != "vlm":
            raise ValueError(f"{folder} holds a {config.get('task')!r} model, not a vision-language model")
        model = cls(VLMConfig.from_dict(config["model"]))
        weights = load_file(str(folder / "model.safetensors"))
        own = {k[len(WEIGHTS_PREFIX):]: v for k, v in weights.items() if k.startswith(WEIGHTS_PREFIX)}
        missing, unexpected = model.load_state_dict(own, strict=False)
        tied = {"lm.lm_head.weight"} if model.cfg.lm.tie_embeddings else set()
        if set(missing) - tied or unexpected:
            raise ValueError(f"{folder / 'model.safetensors'} does not fit its config.json: missing "
                             f"{sorted(set(missing) - tied)[:5]}, unexpected {sorted(unexpected)[:5]}")
        return model.to(device).eval()
