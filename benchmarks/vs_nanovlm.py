"""vistrain beside huggingface/nanoVLM: the whole VLM training step and greedy generation, at the same shapes.

    python benchmarks/vs_nanovlm.py --ref PATH/TO/nanoVLM     # both, alternating rounds; ends "vistrain/original: X.XX"
    python benchmarks/vs_nanovlm.py                           # vistrain's half alone (no checkout needed)

PATH is a checkout of huggingface/nanoVLM (with its requirements: torchvision, einops); nothing of it is in
this repository: it is imported from PATH at run time. Both sides get random weights, one stand-in tokenizer
(a byte-level BPE of SmolLM2's 49,152 tokens at the GPU shapes, plus nanoVLM's 66 image tokens on both sides)
and one synthetic data set in the_cauldron's layout (images of whole tiles, so both processors cut the same
grids; a question and an answer of random words), written to a temporary folder. Nothing is downloaded.

The training step, on each side as its own code runs it:
  nanoVLM   its train.py's step: VQADataset -> ConstantLengthDataset (greedy knapsack packing) -> DataLoader with
            VQACollator; per micro-batch forward with targets (full logits, then cross entropy), loss / accum,
            backward; then clip_grad_norm_, AdamW with its three learning rates, zero_grad; .item() syncs as there.
  vistrain  `vistrain train`'s path: the recipe configs/vlm/nanovlm_{222m,460m}.yaml through the engine's Trainer
            (PackedOrder packing, collate_packed, document-masked attention, the chunked cross entropy of the
            labelled tokens only, the engine's accumulation, clipping, AdamW with the recipe's lr multipliers).
Same global batch, micro-batch, row length, precision (fp32 on a CPU, bf16 on a GPU) and optimizer settings.
Rounds alternate between the two sides, each side built afresh in every round; the table gives medians over
every measured step of every round. Useful tokens are the samples' own tokens (no padding), counted by each
side (nanoVLM: its attention mask; vistrain: its rows' num_tokens). Peak memory is CUDA's max_memory_allocated
over each side's whole run (model, optimizer, data, steps). MFU counts the decoder's 6N + attention FLOPs per
useful token (the VLM task's flops_per_token, what the engine logs as mfu) and, in its own column, the vision
tower's too (6N + attention per patch, times each side's image tiles per useful token), on GPUs whose peak is
known.

Generation: one image + a question, batch 1, greedy, exactly the shape's gen_tokens (no early stop on either
side): nanoVLM's VisionLanguageModel.generate (its KV cache grows by concatenation) against vistrain's
VisionLanguageModel.generate with its static cache and the decoding step compiled (--gen-compile; CUDA graphs
on a GPU). On a GPU both run with bf16 weights. The first call of each side is a warm-up (vistrain's includes
compiling); tokens/s counts the prompt's pass too.

Shapes (--shape): cpu (the default without a GPU: a few minutes of 2 cores), tiny (the tests), 222m and 460m
(nanoVLM-222M: SigLIP-B/16-224 + SmolLM2-135M; nanoVLM-460M: SigLIP2-B/16-512 + SmolLM2-360M; both at
nanoVLM's micro-batch of 2 rows of 4096 tokens and accumulation 8, as its train.py on one GPU), gpu (222m then
460m, the default with a GPU).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import io
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from vistrain.engine.meters import device_peak_tflops, peak_memory_mb

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "configs" / "vlm"  # nanovlm_460m.yaml for the 460m shape, nanovlm_222m.yaml for the others
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # SmolLM2's first three ids
NANOVLM_EXTRA_TOKENS = 66  # <|image|>, <|global_image|> and <row_i_col_j> for an 8 x 8 grid: both sides add them


@dataclass(frozen=True)
class Shape:
    name: str
    tile: int  # vision tower: square input side, patch, width, MLP width, blocks, heads
    patch: int
    vit_hidden: int
    vit_inter: int
    vit_layers: int
    vit_heads: int
    lm_hidden: int  # decoder
    lm_inter: int
    lm_layers: int
    lm_heads: int
    lm_kv_heads: int
    vocab: int  # the language model's own vocabulary (SmolLM2: 49152), before the image tokens
    shuffle: int  # pixel-shuffle factor of the projector
    seq_length: int  # tokens per packed row
    micro: int  # packed rows per forward
    batch: int  # packed rows per optimizer step (micro x accumulation)
    grids: tuple[tuple[int, int], ...]  # image grids of the synthetic samples, (rows, cols) of tiles
    question_words: tuple[int, int]  # words per question, per answer: uniform in [low, high]
    answer_words: tuple[int, int]
    samples: int  # synthetic samples written (enough for every round)
    steps: int  # measured optimizer steps per side and round, after `warmup`
    warmup: int
    gen_tokens: int

    @property
    def image_tokens(self) -> int:
        return ((self.tile // self.patch) // self.shuffle) ** 2

    @property
    def max_image_size(self) -> int:
        return self.tile * max(max(g) for g in self.grids)


SHAPES = {
    "tiny": Shape("tiny", tile=32, patch=8, vit_hidden=32, vit_inter=64, vit_layers=1, vit_heads=2, lm_hidden=64,
                  lm_inter=128, lm_layers=2, lm_heads=4, lm_kv_heads=2, vocab=512, shuffle=2, seq_length=128, micro=2,
                  batch=4, grids=((1, 1), (1, 2)), question_words=(2, 12), answer_words=(1, 6), samples=160, steps=2,
                  warmup=1, gen_tokens=4),
    "cpu": Shape("cpu", tile=64, patch=8, vit_hidden=96, vit_inter=384, vit_layers=2, vit_heads=4, lm_hidden=192,
                 lm_inter=512, lm_layers=4, lm_heads=6, lm_kv_heads=2, vocab=8192, shuffle=2, seq_length=512, micro=2,
                 batch=4, grids=((1, 1), (1, 2), (2, 2)), question_words=(8, 40), answer_words=(1, 24), samples=800,
                 steps=4, warmup=2, gen_tokens=32),
    "222m": Shape("222m", tile=224, patch=16, vit_hidden=768, vit_inter=3072, vit_layers=12, vit_heads=12,
                  lm_hidden=576, lm_inter=1536, lm_layers=30, lm_heads=9, lm_kv_heads=3, vocab=49152, shuffle=2,
                  seq_length=4096, micro=2, batch=16, grids=((1, 1), (1, 2), (2, 2)), question_words=(10, 80),
                  answer_words=(1, 60), samples=2400, steps=3, warmup=2, gen_tokens=128),
    "460m": Shape("460m", tile=512, patch=16, vit_hidden=768, vit_inter=3072, vit_layers=12, vit_heads=12,
                  lm_hidden=960, lm_inter=2560, lm_layers=32, lm_heads=15, lm_kv_heads=5, vocab=49152, shuffle=4,
                  seq_length=4096, micro=2, batch=16, grids=((1, 1), (1, 2), (2, 2)), question_words=(10, 80),
                  answer_words=(1, 60), samples=1600, steps=3, warmup=2, gen_tokens=128),
}


# ------------------------------------------------------------------------------------------------ stand-ins


def standin_tokenizer(folder: Path, vocab_size: int) -> Path:
    """A byte-level BPE of exactly vocab_size tokens (SmolLM2's three special tokens, the 256 bytes, then merges
    of byte pairs, letters first): the tokenizer of a model with that vocabulary, built without any download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    letters = sorted(set("abcdefghijklmnopqrstuvwxyz\u0120") & set(alphabet))  # \u0120 (G-dot): a space
    rest = sorted(set(alphabet) - set(letters))
    pairs = [(a, b) for a in letters for b in letters]
    pairs += [(a, b) for a in letters + rest for b in letters + rest if a in rest or b in rest]
    merges = pairs[: vocab_size - len(SPECIAL_TOKENS) - len(alphabet)]
    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS, *sorted(alphabet), *(a + b for a, b in merges)])}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=SPECIAL_TOKENS[1],
                                        eos_token=SPECIAL_TOKENS[2], pad_token=SPECIAL_TOKENS[2],
                                        unk_token=SPECIAL_TOKENS[0], additional_special_tokens=list(SPECIAL_TOKENS))
    assert len(tokenizer) == vocab_size, (len(tokenizer), vocab_size)
    tokenizer.save_pretrained(folder)
    return folder


def standin_llama(folder: Path, shape: Shape) -> Path:
    """A local Hugging Face Llama folder (config, random weights, the stand-in tokenizer): `model.lm_from`."""
    from safetensors.torch import save_file

    from vistrain.interop.hf import llama_config_to_hf, llama_state_dict_to_hf
    from vistrain.models.llama import LanguageModel, LlamaConfig

    cfg = LlamaConfig(vocab_size=shape.vocab, hidden_size=shape.lm_hidden, intermediate_size=shape.lm_inter,
                      num_layers=shape.lm_layers, num_heads=shape.lm_heads, num_kv_heads=shape.lm_kv_heads,
                      rope_theta=100000.0, max_position_embeddings=8192)
    folder.mkdir(parents=True)
    torch.manual_seed(0)
    state = llama_state_dict_to_hf(LanguageModel(cfg).state_dict(), cfg)
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(llama_config_to_hf(cfg), indent=2))
    standin_tokenizer(folder, shape.vocab)
    return folder


def synthetic_vqa(folder: Path, shape: Shape, seed: int = 0) -> Path:
    """the_cauldron-shaped rows (one JPEG image of whole tiles, one question and its answer of random words),
    saved with datasets' save_to_disk. A few distinct images per grid are reused: the rows still hold bytes."""
    import datasets
    from PIL import Image

    rng = np.random.default_rng(seed)
    pool: dict[tuple[int, int], list[bytes]] = {}
    for rows, cols in shape.grids:
        pool[rows, cols] = []
        for _ in range(4):
            low = rng.integers(0, 256, (max(rows * shape.tile // 16, 2), max(cols * shape.tile // 16, 2), 3),
                               dtype=np.uint8)
            image = Image.fromarray(low).resize((cols * shape.tile, rows * shape.tile), Image.BICUBIC)
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=90)
            pool[rows, cols].append(buffer.getvalue())

    def words(low_high: tuple[int, int]) -> str:
        n = int(rng.integers(low_high[0], low_high[1] + 1))
        return " ".join("".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), int(rng.integers(2, 9))))
                        for _ in range(n))

    rows = []
    for _ in range(shape.samples):
        grid = shape.grids[int(rng.integers(len(shape.grids)))]
        image = pool[grid][int(rng.integers(len(pool[grid])))]
        rows.append({"images": [{"bytes": image, "path": None}],
                     "texts": [{"user": words(shape.question_words) + "?", "assistant": words(shape.answer_words)}]})
    features = datasets.Features({"images": [datasets.Image()],
                                  "texts": [{"user": datasets.Value("string"), "assistant": datasets.Value("string")}]})
    datasets.Dataset.from_list(rows, features=features).save_to_disk(str(folder))
    return folder


@dataclass
class StandIns:
    llama: Path  # model.lm_from for vistrain; its tokenizer is nanoVLM's lm_tokenizer too
    data: Path
    work: Path

    @classmethod
    def make(cls, work: Path, shape: Shape) -> StandIns:
        return cls(llama=standin_llama(work / "llama", shape), data=synthetic_vqa(work / "vqa", shape), work=work)


# ------------------------------------------------------------------------------------------------ measuring


@dataclass
class Steps:
    """Measured optimizer steps of one side: seconds and useful tokens each, and the peak memory of its runs."""

    seconds: list[float] = dataclasses.field(default_factory=list)
    tokens: list[float] = dataclasses.field(default_factory=list)
    peak_mb: list[float] = dataclasses.field(default_factory=list)
    tiles: int = 0  # image tiles and useful tokens of micro-batches counted apart: the vision tower's share
    tile_tokens: int = 0

    def extend(self, other: Steps) -> None:
        self.seconds += other.seconds
        self.tokens += other.tokens
        self.peak_mb += other.peak_mb
        self.tiles += other.tiles
        self.tile_tokens += other.tile_tokens

    @property
    def tiles_per_token(self) -> float:
        return self.tiles / max(self.tile_tokens, 1)

    @property
    def tokens_per_s(self) -> float:
        return statistics.median(t / s for t, s in zip(self.tokens, self.seconds))

    @property
    def ms_per_step(self) -> float:
        return 1e3 * statistics.median(self.seconds)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def flops_per_token(shape: Shape) -> float:
    """The VLM task's count (its flops_per_token, what the engine's mfu uses): the decoder's 6N + 12 L D T per
    token, the vision tower left out."""
    from vistrain.models.llama import LanguageModel, LlamaConfig

    with torch.device("meta"):
        lm = LanguageModel(LlamaConfig(vocab_size=shape.vocab + NANOVLM_EXTRA_TOKENS, hidden_size=shape.lm_hidden,
                                       intermediate_size=shape.lm_inter, num_layers=shape.lm_layers,
                                       num_heads=shape.lm_heads, num_kv_heads=shape.lm_kv_heads))
    n_lm = sum(p.numel() for p in lm.parameters())
    return 6 * n_lm + 12 * shape.lm_layers * shape.lm_hidden * shape.seq_length


def flops_per_tile(shape: Shape) -> float:
    """The vision tower and the projector, the same count per patch: 6N + 12 L D P for P patches of a tile."""
    from vistrain.models.vit import VisionTransformer, ViTConfig

    with torch.device("meta"):
        vit = VisionTransformer(ViTConfig(image_size=shape.tile, patch_size=shape.patch, hidden_size=shape.vit_hidden,
                                          intermediate_size=shape.vit_inter, num_layers=shape.vit_layers,
                                          num_heads=shape.vit_heads))
    patches = (shape.tile // shape.patch) ** 2
    n = sum(p.numel() for p in vit.parameters()) + shape.vit_hidden * shape.shuffle**2 * shape.lm_hidden
    return patches * (6 * n + 12 * shape.vit_layers * shape.vit_hidden * patches)


# ------------------------------------------------------------------------------------------------ vistrain


def vistrain_overrides(shape: Shape, stand_ins: StandIns, out_dir: Path, precision: str, compile_mode: str,
                       workers: int) -> list[str]:
    """The recipe's keys changed for the benchmark: the shape, the stand-ins, a short run that logs every step."""
    return [
        f"run.out_dir={out_dir}", "run.loggers=[jsonl]", "run.resume=never",
        f"train.max_steps={shape.warmup + shape.steps}", f"train.batch_size={shape.batch}",
        f"train.micro_batch_size={shape.micro}", f"train.precision={precision}", f"train.compile={compile_mode}",
        "train.log_every=1", "train.eval_every=1000000", "train.ckpt_every=1000000", "train.async_checkpoint=false",
        "data.name=vqa", f"data.sources=[{{name: synthetic, path: {stand_ins.data}}}]", "data.val_size=8",
        f"data.seq_length={shape.seq_length}", f"data.max_image_size={shape.max_image_size}",
        f"data.num_workers={workers}", f"data.cache_dir={stand_ins.work / 'cache'}",
        f"model.lm_from={stand_ins.llama}", f"model.pixel_shuffle_factor={shape.shuffle}",
        f"model.vision.image_size={shape.tile}", f"model.vision.patch_size={shape.patch}",
        f"model.vision.hidden_size={shape.vit_hidden}", f"model.vision.intermediate_size={shape.vit_inter}",
        f"model.vision.num_layers={shape.vit_layers}", f"model.vision.num_heads={shape.vit_heads}",
        "vlm.val_questions=0",
    ]


def vistrain_round(shape: Shape, stand_ins: StandIns, device: torch.device, precision: str, compile_mode: str,
                   workers: int, out_dir: Path) -> Steps:
    """One run of `vistrain train` (warm-up + measured steps), timed by the engine itself (metrics.jsonl, one
    event per step: time/step_s, from drawing the step's micro-batches to the end of its optimizer step)."""
    from vistrain.config import load_config
    from vistrain.engine.dist import DistContext
    from vistrain.registry import make_trainer

    recipe = RECIPES / ("nanovlm_460m.yaml" if shape.name == "460m" else "nanovlm_222m.yaml")
    cfg = load_config(recipe, vistrain_overrides(shape, stand_ins, out_dir, precision, compile_mode, workers))
    reset_memory(device)
    trainer = make_trainer(cfg, DistContext(rank=0, world_size=1, local_rank=0, device=device))
    trainer.fit()
    peak = peak_memory_mb(device)
    more = [next(trainer.task.phases[0].data) for _ in range(4)]  # tiles per useful token of its packed rows
    del trainer
    events = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    train = [e for e in events if e.get("split") == "train" and e["step"] > shape.warmup]
    # packing_efficiency: the step's useful tokens over all its rows' tokens
    tokens = [e["packing_efficiency"] * shape.batch * shape.seq_length for e in train]
    return Steps(seconds=[e["time/step_s"] for e in train], tokens=tokens, peak_mb=[peak] if peak is not None else [],
                 tiles=sum(b["pixel_values"].shape[0] for b in more), tile_tokens=sum(b["num_tokens"] for b in more))


def vistrain_generation(checkpoint: Path, image: Any, prompt: str, shape: Shape, device: torch.device,
                        dtype: torch.dtype, compile_decode: bool | str):
    """A callable that answers the prompt with vistrain's model of a checkpoint, as `vistrain generate` loads it."""
    from vistrain.tasks.vlm_inference import encode_question, load_for_generation

    model, _, encoder, _ = load_for_generation(checkpoint, device)
    model = model.to(dtype)
    encoded = encode_question(encoder, [image], prompt)
    ids, pixels = encoded["input_ids"][None].to(device), encoded["pixel_values"].to(device, dtype)

    def generate(compile: bool | str = compile_decode) -> torch.Tensor:
        return model.generate(ids, pixels, max_new_tokens=shape.gen_tokens, compile=compile)

    return generate, ids.shape[1]


# ------------------------------------------------------------------------------------------------ nanoVLM


class NanoVLM:
    """huggingface/nanoVLM, imported from a checkout, built as its train.py builds its model, data and step."""

    def __init__(self, ref: Path):
        if not (ref / "models" / "vision_language_model.py").is_file():
            raise SystemExit(f"--ref {ref}: not a checkout of huggingface/nanoVLM (no models/vision_language_model.py)")
        sys.path.insert(0, str(ref))
        try:
            from data.advanced_datasets import ConstantLengthDataset
            from data.collators import VQACollator
            from data.datasets import VQADataset
            from data.processors import get_image_processor, get_image_string, get_tokenizer
            from models.config import TrainConfig, VLMConfig
            from models.vision_language_model import VisionLanguageModel
        except ImportError as e:
            raise SystemExit(f"--ref {ref}: nanoVLM does not import ({e}); install its requirements (torchvision, "
                             "einops) beside vistrain's") from None
        self.ConstantLengthDataset, self.VQACollator, self.VQADataset = ConstantLengthDataset, VQACollator, VQADataset
        self.get_image_processor, self.get_image_string = get_image_processor, get_image_string
        self.get_tokenizer, self.TrainConfig, self.VLMConfig = get_tokenizer, TrainConfig, VLMConfig
        self.VisionLanguageModel = VisionLanguageModel

    def config(self, shape: Shape, stand_ins: StandIns) -> Any:
        return self.VLMConfig(
            vit_hidden_dim=shape.vit_hidden, vit_inter_dim=shape.vit_inter, vit_patch_size=shape.patch,
            vit_img_size=shape.tile, vit_n_heads=shape.vit_heads, vit_n_blocks=shape.vit_layers,
            lm_hidden_dim=shape.lm_hidden, lm_inter_dim=shape.lm_inter, lm_n_heads=shape.lm_heads,
            lm_n_kv_heads=shape.lm_kv_heads, lm_n_blocks=shape.lm_layers, lm_base_vocab_size=shape.vocab,
            extra_token_amount=NANOVLM_EXTRA_TOKENS, lm_vocab_size=shape.vocab + NANOVLM_EXTRA_TOKENS,
            lm_max_length=shape.seq_length, lm_tokenizer=str(stand_ins.llama), lm_model_type="stand-in",
            vit_model_type="stand-in", mp_pixel_shuffle_factor=shape.shuffle, mp_image_token_length=shape.image_tokens,
            max_img_size=shape.max_image_size, resize_to_max_side_len=False, vlm_load_backbone_weights=False)

    def model(self, cfg: Any, device: torch.device) -> Any:
        with contextlib.redirect_stdout(io.StringIO()):  # it prints as it builds
            return self.VisionLanguageModel(cfg, load_backbone=False).to(device)

    def loader(self, cfg: Any, shape: Shape, stand_ins: StandIns, device: torch.device, workers: int) -> Any:
        """train.py's get_dataloaders for one local source: the same rows as vistrain trains on (val split off)."""
        import datasets

        train_cfg = self.TrainConfig()
        tokenizer = self.get_tokenizer(cfg.lm_tokenizer, cfg.vlm_extra_tokens, cfg.lm_chat_template)
        with contextlib.redirect_stdout(io.StringIO()):
            image_processor = self.get_image_processor(cfg.max_img_size, cfg.vit_img_size, cfg.resize_to_max_side_len)
        rows = datasets.load_from_disk(str(stand_ins.data))
        rows = rows.select(range(8, len(rows)))  # vistrain's data.val_size=8 rows are held out there too
        dataset = self.VQADataset(rows, tokenizer, image_processor, cfg.mp_image_token_length)
        packed = self.ConstantLengthDataset(
            dataset, infinite=True, max_sample_length=train_cfg.max_sample_length, seq_length=cfg.lm_max_length,
            num_of_sequences=shape.micro * 4, queue_size=8, max_images_per_example=train_cfg.max_images_per_example,
            max_images_per_knapsack=train_cfg.max_images_per_knapsack)
        return torch.utils.data.DataLoader(
            packed, batch_size=shape.micro, collate_fn=self.VQACollator(tokenizer, cfg.lm_max_length),
            num_workers=workers, pin_memory=device.type == "cuda", drop_last=True,
            generator=torch.Generator().manual_seed(0))

    def round(self, shape: Shape, stand_ins: StandIns, device: torch.device, precision: str, workers: int) -> Steps:
        """Warm-up + measured optimizer steps of train.py's loop body, on a fresh model, optimizer and loader."""
        train_cfg = self.TrainConfig()
        cfg = self.config(shape, stand_ins)
        reset_memory(device)
        model = self.model(cfg, device)
        groups = [{"params": list(model.MP.parameters()), "lr": train_cfg.lr_mp},
                  {"params": list(model.vision_encoder.parameters()), "lr": train_cfg.lr_vision_backbone},
                  {"params": list(model.decoder.parameters()), "lr": train_cfg.lr_language_backbone}]
        optimizer = torch.optim.AdamW(groups)
        params = [p for g in optimizer.param_groups for p in g["params"]]
        batches = iter(self.loader(cfg, shape, stand_ins, device, workers))
        accum = shape.batch // shape.micro
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
        steps = Steps()
        model.train()
        for step in range(shape.warmup + shape.steps):
            sync(device)
            t0 = time.perf_counter()
            tokens = 0
            for _ in range(accum):
                batch = next(batches)
                input_ids, labels = batch["input_ids"].to(device), batch["labels"].to(device)
                attention_mask = batch["attention_mask"].to(device)
                with autocast:
                    _, loss = model(input_ids, batch["images"], attention_mask=attention_mask, targets=labels)
                (loss / accum).backward()
                loss.item()  # train.py reads the loss and the token count of every micro-batch
                tokens += torch.sum(attention_mask).item()
                steps.tiles += sum(image.shape[0] for row in batch["images"] for image in row)
            torch.nn.utils.clip_grad_norm_(params, max_norm=train_cfg.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad()
            sync(device)
            steps.tile_tokens += tokens
            if step >= shape.warmup:
                steps.seconds.append(time.perf_counter() - t0)
                steps.tokens.append(tokens)
        peak = peak_memory_mb(device)
        steps.peak_mb = [peak] if peak is not None else []
        del model, optimizer, params, batches
        return steps

    def generation(self, shape: Shape, stand_ins: StandIns, image: Any, prompt: str, device: torch.device,
                   dtype: torch.dtype):
        """A callable that answers the prompt as nanoVLM's generate.py does (greedy here), and the prompt length."""
        cfg = self.config(shape, stand_ins)
        model = self.model(cfg, device).to(dtype).eval()
        tokenizer = self.get_tokenizer(cfg.lm_tokenizer, cfg.vlm_extra_tokens, cfg.lm_chat_template)
        with contextlib.redirect_stdout(io.StringIO()):
            processor = self.get_image_processor(cfg.max_img_size, cfg.vit_img_size, cfg.resize_to_max_side_len)
        tiles, grid = processor(image)
        text = self.get_image_string(tokenizer, [grid], cfg.mp_image_token_length) + prompt
        encoded = tokenizer.apply_chat_template([[{"role": "user", "content": text}]], tokenize=True,
                                                add_generation_prompt=True, return_dict=True)
        ids = torch.tensor(encoded["input_ids"], device=device)
        tiles = tiles.to(device, dtype)

        def generate() -> torch.Tensor:
            return model.generate(ids, tiles, max_new_tokens=shape.gen_tokens, greedy=True)

        return generate, ids.shape[1]


# ------------------------------------------------------------------------------------------------ the run


def time_generation(generate, tokens: int, device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    out = generate()
    sync(device)
    assert out.shape[-1] == tokens, out.shape
    return tokens / (time.perf_counter() - t0)


def a_question(stand_ins: StandIns) -> tuple[Any, str]:
    import datasets

    row = datasets.load_from_disk(str(stand_ins.data))[0]
    return row["images"][0].convert("RGB"), row["texts"][0]["user"]


def fmt(value: Optional[float], spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def percent(fraction: Optional[float]) -> str:
    return "n/a" if fraction is None else f"{100 * fraction:.1f}%"


def measure_shape(shape: Shape, args: argparse.Namespace, nanovlm: Optional[NanoVLM], device: torch.device) -> dict:
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    compile_mode = args.compile or ("blocks" if device.type == "cuda" else "false")
    workers = args.workers if args.workers is not None else (3 if device.type == "cuda" else 0)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    result: dict[str, Any] = {"shape": dataclasses.asdict(shape), "precision": precision, "compile": compile_mode,
                              "workers": workers}
    with tempfile.TemporaryDirectory(prefix=f"vs_nanovlm_{shape.name}_") as tmp:
        t0 = time.perf_counter()
        stand_ins = StandIns.make(Path(tmp), shape)
        print(f"[{shape.name}] stand-ins written in {time.perf_counter() - t0:.0f} s", flush=True)
        ours, theirs = Steps(), Steps()
        last_run = None
        for r in range(args.rounds):
            last_run = Path(tmp) / f"run_{r}"
            ours.extend(vistrain_round(shape, stand_ins, device, precision, compile_mode, workers, last_run))
            if nanovlm is not None:
                theirs.extend(nanovlm.round(shape, stand_ins, device, precision, workers))
            print(f"[{shape.name}] round {r + 1}/{args.rounds}: vistrain {ours.ms_per_step:.0f} ms/step"
                  + (f", nanoVLM {theirs.ms_per_step:.0f} ms/step" if nanovlm is not None else ""), flush=True)
        peak_tflops = device_peak_tflops(device, precision)  # None on a CPU
        lm_flops, tile_flops = flops_per_token(shape), flops_per_tile(shape)

        def mfu(flops: float, rate: float) -> Optional[float]:
            return flops * rate / (peak_tflops * 1e12) if peak_tflops else None

        sides = {"vistrain": ours} | ({"nanoVLM": theirs} if nanovlm is not None else {})
        result["train"] = {name: {"tokens_per_s": s.tokens_per_s, "ms_per_step": s.ms_per_step,
                                  "peak_memory_mb": max(s.peak_mb) if s.peak_mb else None,
                                  "mfu": mfu(lm_flops, s.tokens_per_s),
                                  "mfu_both_towers": mfu(lm_flops + s.tiles_per_token * tile_flops, s.tokens_per_s),
                                  "tiles_per_1k_tokens": 1000 * s.tiles_per_token,
                                  "tokens_per_step": statistics.median(s.tokens)}
                           for name, s in sides.items()}

        if not args.skip_generation:
            image, prompt = a_question(stand_ins)
            ckpt = last_run / "checkpoints" / (last_run / "checkpoints" / "latest").read_text().strip()
            compile_decode = {"true": True, "false": False}.get(args.gen_compile, args.gen_compile)
            generators = {"vistrain": vistrain_generation(ckpt, image, prompt, shape, device, dtype, compile_decode)}
            if nanovlm is not None:
                generators["nanoVLM"] = nanovlm.generation(shape, stand_ins, image, prompt, device, dtype)
            rates: dict[str, list[float]] = {name: [] for name in generators}
            warmup: dict[str, float] = {}
            for name, (generate, _) in generators.items():
                t0 = time.perf_counter()
                time_generation(generate, shape.gen_tokens, device)
                warmup[name] = time.perf_counter() - t0
            for _ in range(args.rounds):
                for name, (generate, _) in generators.items():
                    rates[name].append(time_generation(generate, shape.gen_tokens, device))
            result["generate"] = {name: {"tokens_per_s": statistics.median(rates[name]), "first_call_s": warmup[name],
                                         "prompt_tokens": generators[name][1]} for name in generators}
            # the compiled decoding's tokens against eager decoding's (rounding may flip a near tie in bf16)
            ours = generators["vistrain"][0]
            result["generate"]["vistrain"]["same_as_eager"] = int((ours() == ours(compile=False)).sum())
    return result


def print_tables(results: list[dict], device_name: str) -> list[float]:
    """The markdown tables; returns every vistrain / original throughput ratio."""
    ratios = []
    print(f"\nVLM training step and greedy generation, vistrain beside nanoVLM, on {device_name}, torch "
          f"{torch.__version__}, {time.strftime('%Y-%m-%d')}\n")
    print("| shape | side | useful tokens/s | ms/step | tokens/step | tiles/1k tokens | peak memory (MiB) | MFU "
          "(decoder) | MFU (both towers) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for res in results:
        shape, train = res["shape"], res["train"]
        label = (f"{shape['name']} ({shape['micro']} x {shape['seq_length']} rows, batch {shape['batch']}, "
                 f"{res['precision']}, compile {res['compile']})")
        for side, m in train.items():
            print(f"| {label} | {side} | {m['tokens_per_s']:,.0f} | {m['ms_per_step']:,.0f} | "
                  f"{m['tokens_per_step']:,.0f} | {m['tiles_per_1k_tokens']:.1f} | "
                  f"{fmt(m['peak_memory_mb'], ',.0f')} | {percent(m['mfu'])} | {percent(m['mfu_both_towers'])} |")
        if "nanoVLM" in train:
            ratio = train["vistrain"]["tokens_per_s"] / train["nanoVLM"]["tokens_per_s"]
            ratios.append(ratio)
            print(f"| {label} | vistrain / original | {ratio:.2f}x | | | | | | |")
    if any("generate" in res for res in results):
        print("\n| shape | side | greedy tokens/s | first call (s) | prompt tokens | tokens equal to eager decoding |")
        print("|---|---|---|---|---|---|")
        for res in results:
            if "generate" not in res:
                continue
            gen, name = res["generate"], res["shape"]["name"]
            label = f"{name} (batch 1, {res['shape']['gen_tokens']} new tokens)"
            for side, m in gen.items():
                same = f"{m['same_as_eager']} of {res['shape']['gen_tokens']}" if "same_as_eager" in m else ""
                print(f"| {label} | {side} | {m['tokens_per_s']:,.1f} | {m['first_call_s']:.1f} | {m['prompt_tokens']} "
                      f"| {same} |")
            if "nanoVLM" in gen:
                ratio = gen["vistrain"]["tokens_per_s"] / gen["nanoVLM"]["tokens_per_s"]
                ratios.append(ratio)
                print(f"| {label} | vistrain / original | {ratio:.2f}x | | | |")
    return ratios


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ref", type=Path, help="a checkout of huggingface/nanoVLM; without it, vistrain's half alone")
    parser.add_argument("--shape", choices=[*SHAPES, "gpu"], help="default: gpu on CUDA, else cpu")
    parser.add_argument("--rounds", type=int, default=None, help="alternating rounds (default 3 on a CPU, 2 on a GPU)")
    parser.add_argument("--steps", type=int, help="measured optimizer steps per side and round (default: the shape's)")
    parser.add_argument("--precision", choices=["fp32", "bf16"], help="default: bf16 on CUDA, fp32 on a CPU")
    parser.add_argument("--compile", choices=["false", "blocks", "model"],
                        help="vistrain's train.compile (default: the recipe's blocks on CUDA, false on a CPU)")
    parser.add_argument("--workers", type=int, help="data loader workers of both sides (default 3 on CUDA, 0 on a CPU)")
    parser.add_argument("--gen-compile", default="true",
                        help="vistrain generate's compile: true, false or a torch.compile backend (default true)")
    parser.add_argument("--skip-generation", action="store_true")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded: every tokenizer and model is local
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args.rounds = args.rounds or (2 if device.type == "cuda" else 3)
    names = {"gpu": ["222m", "460m"]}.get(args.shape or ("gpu" if device.type == "cuda" else "cpu"),
                                          [args.shape or "cpu"])
    shapes = [SHAPES[n] if args.steps is None else dataclasses.replace(SHAPES[n], steps=args.steps) for n in names]
    nanovlm = NanoVLM(args.ref.resolve()) if args.ref is not None else None
    device_name = (torch.cuda.get_device_name(device) if device.type == "cuda"
                   else f"CPU ({torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f})")
    results = [measure_shape(shape, args, nanovlm, device) for shape in shapes]
    ratios = print_tables(results, device_name)
    if args.json:
        args.json.write_text(json.dumps({"device": device_name, "torch": torch.__version__, "results": results,
                                         "date": time.strftime("%Y-%m-%d")}, indent=2) + "\n")
    if nanovlm is None:
        print("\nvistrain/original: n/a (no --ref: vistrain's half only)")
    else:
        # the headline: the lowest ratio measured, so > 1 means vistrain is faster at every step measured
        print(f"\nvistrain/original: {min(ratios):.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
