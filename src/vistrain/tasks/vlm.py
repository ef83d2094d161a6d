"""A small vision-language model (nanoVLM's recipe) trained on packed visual question answering.

One phase, `main`: packed rows of several samples (each attending only within itself, positions restarting)
through the VLM; the loss is the cross entropy of the assistant tokens (answers and their end-of-turn
token), reported as a sum over them with their count, so the engine's global mean is per assistant token
whatever the packing. Learning rates per part (projector, vision, LM) are the engine's lr multipliers.

The tokenizer: the language model's own (`model.lm_from`, extended with the image tokens) or, for the digits
default, one trained at start from the data's text. It is saved in every checkpoint (an asset), so a
checkpoint answers questions alone.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from vistrain.config import ExperimentConfig
from vistrain.data.data_config import VLMDataConfig
from vistrain.data.loader import MicroBatchStream
from vistrain.data.packing import StreamingMicroBatches
from vistrain.data.vqa import (
    IGNORE_INDEX,
    ImageProcessor,
    PackedOrder,
    PackedVQADataset,
    ReadableRows,
    StreamingPacker,
    VQAEncoder,
    VQARows,
    collate_packed,
    collate_padded,
    digits_vqa,
    load_vqa_sources,
    sample_lengths,
    train_tokenizer,
    vqa_texts,
)
from vistrain.data.vqa_text import (
    SMOLVLM_IMAGE_TOKEN,
    add_layout_tokens,
    layout_eos_token,
    layout_special_tokens,
)
from vistrain.engine import checkpoint_files as ckpt_lib
from vistrain.engine.dist import gather_objects
from vistrain.engine.optim import OptimConfig
from vistrain.engine.schedule import ScheduleConfig
from vistrain.engine.task import EvalResult, OptimizerSpec, Phase, PhaseLoss, Task, TaskEnv, to_device
from vistrain.errors import ConfigError
from vistrain.interop.tokenizers import TOKENIZER_DIR, tokenizer_assets
from vistrain.interop.vlm_parts import build_vlm, lm_tokenizer
from vistrain.models.llama import LlamaConfig
from vistrain.models.vit import ViTConfig
from vistrain.models.vlm import VisionLanguageModel
from vistrain.registry import TaskSpec, register
from vistrain.tasks.vlm_inference import (
    TransformersExport,
    VLMAnswerer,
    answer_ids,
    checkpoint_tokenizer,
    context_room,
    decode_answer,
    load_vlm,
    training_image_style,
    vlm_folder,
)


@dataclass
class VLMModelConfig:
    vision: ViTConfig = field(default_factory=lambda: ViTConfig(
        image_size=32, patch_size=4, hidden_size=64, intermediate_size=256, num_layers=2, num_heads=4))
    # lm.vocab_size is set from the tokenizer (the language model's own, or one trained on the data)
    lm: LlamaConfig = field(default_factory=lambda: LlamaConfig(
        vocab_size=512, hidden_size=128, intermediate_size=384, num_layers=4, num_heads=4, num_kv_heads=2,
        rope_theta=10000.0, max_position_embeddings=2048))
    pixel_shuffle_factor: int = 2
    vision_from: Optional[str] = None  # a local Hugging Face SigLIP folder: its config and weights
    lm_from: Optional[str] = None  # a local Hugging Face Llama-family folder: config, weights and tokenizer
    init: Optional[str] = None  # a vistrain VLM checkpoint or model folder to start from (fine-tuning)
    tokenizer_vocab_size: int = 512  # with neither lm_from nor init: a tokenizer trained on the data


@dataclass
class VLMTrainConfig:
    val_questions: int = 120  # val prompts answered by generation at every eval (accuracy per question type)
    max_new_tokens: int = 8


def _vlm_optim() -> OptimConfig:
    # nanoVLM: projector 5.12e-3, vision and LM 5e-5 (lr_mult 0 freezes a part); cosine, 3% warmup, to 10%
    return OptimConfig(name="adamw", lr=5.12e-3, betas=[0.9, 0.999], weight_decay=0.0,
                       lr_mult={"vision": 5e-5 / 5.12e-3, "lm": 5e-5 / 5.12e-3},
                       schedule=ScheduleConfig(name="cosine", warmup_frac=0.03, end_ratio=0.1))


@dataclass
class VLMExperimentConfig(ExperimentConfig):
    task: str = "vlm"
    data: VLMDataConfig = field(default_factory=VLMDataConfig)
    model: VLMModelConfig = field(default_factory=VLMModelConfig)
    vlm: VLMTrainConfig = field(default_factory=VLMTrainConfig)
    optim: OptimConfig = field(default_factory=_vlm_optim)


# ------------------------------------------------------------------------------------------------ task


class VLMTask(Task):
    def __init__(self, cfg: VLMExperimentConfig, env: TaskEnv):
        self.cfg, self.env = cfg, env
        self.device = env.dist.device
        d = cfg.data
        if d.name not in ("digits", "vqa"):
            raise ConfigError(f"data.name={d.name!r}: expected digits or vqa")
        self.train_set, self.val_set = self._datasets()
        # a model imported from elsewhere (nanoVLM, SmolVLM) keeps its image processing when fine-tuned
        self.image_style = training_image_style(d.image_layout, cfg.model.init)
        self.layout = self.image_style.get("image_layout", "vistrain")
        self.tokenizer = self._tokenizer()
        model = self._model().to(self.device)
        self.nets: dict[str, nn.Module] = {"vlm": model}
        self.trainable = ("vlm",)
        self.optimizers = {"main": OptimizerSpec("vlm", cfg.optim)}
        vcfg = model.cfg.vision
        # digits images are one tile; real images are tiled up to data.max_image_size
        self.max_image_size = (d.max_image_size or 4 * vcfg.image_size) if d.name == "vqa" else vcfg.image_size
        self.chat_template = "tokenizer" if self.layout == "smolvlm" else d.chat_template
        try:
            processor = ImageProcessor(vcfg.image_size, self.max_image_size, vcfg.image_mean, vcfg.image_std,
                                       resize=self.image_style.get("image_resize", "vistrain"))
        except ValueError as e:
            raise ConfigError(str(e)) from None
        self.encoder = VQAEncoder(self.tokenizer, processor, model.cfg.image_token_length, self.chat_template,
                                  d.min_ratings or None, image_labels=self.image_style.get("image_labels", False),
                                  layout=self.layout)
        self.pad_id = int(self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None
                          else self.tokenizer.eos_token_id)
        self.eos_id = int(self.tokenizer.convert_tokens_to_ids(layout_eos_token(self.layout)))
        self.packed = self._packed_stream()
        self.phases = [Phase("main", optimizer="main", loss=self.loss, data=self.packed,
                             finite_data=isinstance(self.packed, StreamingMicroBatches))]
        self.best_metric = ("val_loss", "min")
        n_lm = sum(p.numel() for p in model.lm.parameters())
        lm = model.cfg.lm
        # the decoder's 6N + attention FLOPs per token (torchtitan's count); the vision tower is left out
        self.flops_per_token = 6 * n_lm + 12 * lm.num_layers * lm.hidden_size * d.seq_length

    # ------------------------------------------------------------------------------------- building

    def _datasets(self):
        d = self.cfg.data
        if d.name == "digits":
            return digits_vqa("train", d.digits_image_size), digits_vqa("val", d.digits_image_size)
        if not d.sources:
            raise ConfigError("data.name=vqa needs data.sources: a list of {name, path[, split]} (save_to_disk "
                              "folders or parquet files of the_cauldron-shaped subsets)")
        try:
            train = load_vqa_sources(d.sources, d.cache_dir)
            val = load_vqa_sources(d.val_sources, d.cache_dir, key="data.val_sources") if d.val_sources else None
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if train.rows is not None and train.stream is not None:
            raise ConfigError("data.sources mixes streaming and map-style sources, and a run trains on one kind: "
                              "give every source the same streaming setting")
        # validation reads past a row it cannot use (ReadableRows): a bad val image never stops a run
        if val is not None:
            val_rows = val.rows if val.rows is not None else VQARows.of(list(val.stream.take(d.val_size)),
                                                                          "streamed data.val_sources")
            return train.rows if train.rows is not None else train.stream, ReadableRows(val_rows)
        if train.rows is None:  # streaming: the first val_size samples are the val set
            first = VQARows.of(list(train.stream.take(d.val_size)), "streamed data.sources")
            return train.stream.skip(d.val_size), ReadableRows(first)
        n = len(train.rows)
        if n <= d.val_size:
            raise ConfigError(f"data.sources hold {n} samples; data.val_size={d.val_size} would leave none to train on")
        return train.rows.select(range(d.val_size, n)), ReadableRows(train.rows.select(range(d.val_size)))

    def _tokenizer(self) -> Any:
        m = self.cfg.model
        resumed = self.env.resume_from
        if resumed is not None and (Path(resumed) / TOKENIZER_DIR).is_dir():
            return checkpoint_tokenizer(Path(resumed))  # the run's own, exactly
        if m.init:
            try:
                return checkpoint_tokenizer(vlm_folder(m.init, "model.init"))
            except ckpt_lib.CheckpointError as e:
                raise ConfigError(f"model.init={m.init}: {e}") from None
        if m.lm_from:
            return lm_tokenizer(m.lm_from, layout=self.layout)
        tokenizer = train_tokenizer(vqa_texts(self.train_set), layout_special_tokens(self.layout),
                                    vocab_size=m.tokenizer_vocab_size)
        add_layout_tokens(tokenizer, self.layout)  # the layout's chat template (its tokens are there already)
        return tokenizer

    def _model(self) -> VisionLanguageModel:
        m = self.cfg.model
        if m.init:
            return load_vlm(vlm_folder(m.init, "model.init"))
        try:
            return build_vlm(m.vision, m.lm, m.pixel_shuffle_factor, self.tokenizer, m.vision_from, m.lm_from,
                             image_token=SMOLVLM_IMAGE_TOKEN if self.layout == "smolvlm" else "<|image|>")
        except ValueError as e:
            raise ConfigError(str(e)) from None

    def _packed_stream(self):
        d, env = self.cfg.data, self.env
        if not hasattr(self.train_set, "__len__"):  # a streaming source: packed on the fly, per rank
            from datasets.distributed import split_dataset_by_node

            shard = split_dataset_by_node(self.train_set, rank=env.dist.rank, world_size=env.dist.world_size)
            packer = StreamingPacker(shard, self.encoder, d.seq_length, d.max_images_per_pack, self.pad_id,
                                     seed=env.seed)
            return StreamingMicroBatches(packer, env.micro_batch_size, env.dist.rank, env.dist.world_size,
                                         gather=lambda state: gather_objects(state, env.dist))
        try:
            tokens, images = sample_lengths(self.train_set, self.encoder, cache_dir=d.cache_dir)
            order = PackedOrder(tokens, images, d.seq_length, d.max_images_per_pack, env.seed, window=d.pack_window)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        dataset = PackedVQADataset(self.train_set, self.encoder, d.seq_length, self.pad_id)
        return MicroBatchStream(dataset, order, env.micro_batch_size, env.dist.rank, env.dist.world_size,
                                d.num_workers, collate_fn=collate_packed)

    # ----------------------------------------------------------------------------------------- loss

    def loss(self, nets, batch) -> PhaseLoss:
        input_ids = batch["input_ids"]
        loss_sum, count = _next_token_loss(nets["vlm"], batch, batch["position_ids"])
        B, T = input_ids.shape
        metrics = {"loss": loss_sum.detach(),
                   "images_per_sample": (batch["num_images"], batch["num_samples"]),
                   # samples skipped for an image that cannot be decoded, per sample met (each is warned about)
                   "unreadable_frac": (batch["num_skipped"], batch["num_samples"] + batch["num_skipped"]),
                   "packing_efficiency": (batch["num_tokens"], B * T)}
        return PhaseLoss(loss_sum, count=count, metrics=metrics, samples=batch["num_samples"],
                         tokens=batch["num_tokens"])

    # ------------------------------------------------------------------------------------- evaluation

    @torch.no_grad()
    def evaluate(self, step: int) -> EvalResult:
        """Val loss over every rank's shard of the val set; on digits, answers by generation per question type.
        Every rank takes part (under FSDP the model's forward is a collective)."""
        model = self.nets["vlm"]
        was_training = model.training
        model.eval()
        rank, world = self.env.dist.rank, self.env.dist.world_size
        n = min(len(self.val_set), self.cfg.data.val_size)
        mine = list(range(rank, n, world))
        total = torch.zeros(2, device=self.device)  # loss sum, assistant tokens
        for start in range(0, max(len(mine), 1), 8):
            idx = mine[start:start + 8]
            samples = [s for s in (self.encoder.encode(self.val_set[i]) for i in (idx or [0])) if s is not None]
            batch = to_device(collate_padded(samples, self.pad_id), self.device)
            loss_sum, count = _next_token_loss(model, batch, None)
            if idx:
                total += torch.stack([loss_sum.float(), count.float()])
        if dist.is_initialized() and world > 1:
            dist.all_reduce(total)
        metrics = {"val_loss": float(total[0] / total[1].clamp(min=1))}
        metrics.update(self._answer_accuracy(model))
        model.train(was_training)
        return EvalResult(metrics=metrics)

    def _answer_accuracy(self, model: VisionLanguageModel) -> dict[str, float]:
        """Greedy answers to the first val questions, scored per question type (exact match)."""
        hits: dict[str, list[int]] = {}
        k = min(self.cfg.vlm.val_questions, len(self.val_set))
        # evenly spread over the val set, so that every question type is asked whatever the data's order
        for i in torch.linspace(0, len(self.val_set) - 1, k).round().long().tolist() if k else []:
            prompt = self.encoder.encode_prompt(self.val_set[i])
            if prompt is None or prompt.get("qtype") is None:
                continue
            answer = self.answer(model, prompt)
            hits.setdefault(prompt["qtype"], []).append(int(answer.strip() == prompt["answer"].strip()))
        metrics = {f"acc/{qtype}": 100.0 * sum(h) / len(h) for qtype, h in hits.items()}
        if hits:
            metrics["acc"] = 100.0 * sum(sum(h) for h in hits.values()) / sum(len(h) for h in hits.values())
        return metrics

    def answer(self, model: VisionLanguageModel, prompt: dict) -> str:
        """The greedy answer to an encoded val question (as long as the model's context lets it be)."""
        room = min(self.cfg.vlm.max_new_tokens, context_room(model, prompt))
        return decode_answer(self.tokenizer, answer_ids(model, prompt, room, self.eos_id), self.eos_id) if room else ""

    # ---------------------------------------------------------------------------------- state, export

    def model_config(self) -> dict:
        end = {"eos_token": layout_eos_token(self.layout)} if self.layout != "vistrain" else {}
        return {"task": "vlm", "model": dataclasses.asdict(self.nets["vlm"].cfg),
                "chat_template": self.chat_template, "max_image_size": self.max_image_size, **self.image_style, **end}

    def assets(self) -> dict[str, bytes]:
        return tokenizer_assets(self.tokenizer)

    def state_dict(self) -> dict:
        return {"data": self.packed.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.packed.load_state_dict(state["data"])


def _next_token_loss(model: nn.Module, batch: dict, position_ids: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """Cross entropy summed over the labelled next tokens, computed by the model without the full logits (its
    labels ignore -100, IGNORE_INDEX), and their count (a device tensor, no sync)."""
    labels = batch["labels"]
    loss_sum = model(batch["input_ids"], batch["pixel_values"], position_ids, batch["doc_ids"], labels_BT=labels)
    return loss_sum, (labels[:, 1:] != IGNORE_INDEX).sum()


register(TaskSpec(name="vlm", config=VLMExperimentConfig, build=VLMTask,
                  capabilities=(VLMAnswerer(), TransformersExport()), smoke_overrides=(
    "data.seq_length=256", "vlm.val_questions=6", "data.val_size=8", "model.lm.num_layers=1",
    "model.vision.num_layers=1",
)))
