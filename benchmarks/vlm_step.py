"""VLM training-step speed, packed against unpacked, and the packer's own throughput. Prints tables.

1. The digits model on the digits data: the same samples as packed rows (several samples per row, each
   attending only within itself) and unpacked (one sample per row, padded to the longest): useful
   (non-pad) tokens/s, ms/step, packing efficiency (non-pad / all tokens).
2. The packer: samples/s through encoding (tokenise, tile the images) and packing into rows.

The nanoVLM-222M and -460M shapes, through the engine and beside nanoVLM itself (MFU at the recipe's
micro-batch): benchmarks/vs_nanovlm.py.

    python benchmarks/vlm_step.py [--steps 5] [--rows 8] [--seq 256]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from vistrain.data.vqa import (
    ImageProcessor,
    PackedOrder,
    PackedVQADataset,
    VQAEncoder,
    collate_packed,
    collate_padded,
    digits_vqa,
    sample_lengths,
    train_tokenizer,
    vqa_special_tokens,
    vqa_texts,
)
from vistrain.models.llama import LlamaConfig
from vistrain.models.vit import ViTConfig
from vistrain.models.vlm import VisionLanguageModel, VLMConfig


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_time(model, opt, batch, steps: int, device: torch.device, autocast) -> float:
    def step() -> None:
        with autocast():
            loss_sum = model(batch["input_ids"], batch["pixel_values"], batch.get("position_ids"), batch.get("doc_ids"),
                             labels_BT=batch["labels"])
        loss_sum.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up
    times = []
    for _ in range(steps):
        sync(device)
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def digits_setup(seq_length: int):
    data = digits_vqa("train", 16)
    tokenizer = train_tokenizer(vqa_texts(data), vqa_special_tokens(), vocab_size=512)
    vision = ViTConfig(image_size=16, patch_size=4, hidden_size=64, intermediate_size=256, num_layers=2, num_heads=4)
    lm = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=384, num_layers=4, num_heads=4,
                     num_kv_heads=2, rope_theta=10000.0, max_position_embeddings=2048)
    cfg = VLMConfig(vision, lm, pixel_shuffle_factor=2, image_token_id=tokenizer.convert_tokens_to_ids("<|image|>"))
    encoder = VQAEncoder(tokenizer, ImageProcessor(16, 16, vision.image_mean, vision.image_std), cfg.image_token_length)
    tokens, images = sample_lengths(data, encoder)
    order = PackedOrder(tokens, images, seq_length, 18, seed=0)
    return data, tokenizer, cfg, encoder, order, (tokens, images)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rows", type=int, default=8, help="packed rows per digits step")
    parser.add_argument("--seq", type=int, default=256, help="digits packed row length")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bf16 = device.type == "cuda"

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"\nVLM training steps on {where}, torch {torch.__version__}, {'bf16' if bf16 else 'fp32'}\n")

    # 1. packed vs unpacked on the digits model
    data, tokenizer, cfg, encoder, order, (lengths, images) = digits_setup(args.seq)
    pad = tokenizer.pad_token_id
    dataset = PackedVQADataset(data, encoder, args.seq, pad)
    rows = [dataset[bin_] for bin_ in order.keys(0, args.rows)]
    packed = to(collate_packed(rows), device)
    samples = [encoder.encode(data[i]) for bin_ in order.keys(0, args.rows) for i, _ in bin_]
    unpacked = to(collate_padded(samples, pad), device)
    print("| digits model | rows x length | samples | efficiency | ms/step | useful tokens/s |")
    print("|---|---|---|---|---|---|")
    for name, batch in (("packed", packed), ("unpacked", unpacked)):
        torch.manual_seed(0)
        model = VisionLanguageModel(cfg).to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        seconds = step_time(model, opt, batch, args.steps, device, autocast)
        useful = int((batch["input_ids"] != pad).sum())
        B, T = batch["input_ids"].shape
        print(f"| {name} | {B} x {T} | {len(samples)} | {useful / (B * T):.2f} | {1e3 * seconds:.0f} | "
              f"{useful / seconds:,.0f} |")

    # 2. the packer
    t0 = time.perf_counter()
    n = 0
    for bin_ in order.keys(args.rows, 64):
        dataset[bin_]
        n += len(bin_)
    packer = n / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    fresh = PackedOrder(lengths, images, args.seq, 18, seed=1)
    bins = fresh.keys(0, 2000)
    planned = sum(len(b) for b in bins) / (time.perf_counter() - t0)
    print(f"\npacker: {packer:,.0f} samples/s encoded and packed into rows (one process); the packing plan "
          f"alone: {planned:,.0f} samples/s")

    return 0


if __name__ == "__main__":
    raise SystemExit(main())
