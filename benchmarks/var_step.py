"""VAR training-step speed: images/s and ms/step of the transformer's forward + backward + AdamW step, for
each attention path this device has, and what the frozen tokenizer's on-the-fly encoding costs beside it.
Prints a table; also counts host synchronisations with the profiler: none in the model's forward + backward
(the optimizer's depend on the kind: fused AdamW on CUDA has none, CPU AdamW reads its step counts).

    python benchmarks/var_step.py [--depth 16] [--resolution 256] [--batch 8] [--steps 10] [--precision bf16]
    python benchmarks/var_step.py --depth 3 --resolution 16 --batch 64 --vae-ch 32 --precision fp32   # digits-sized

Random weights and random token maps: speed does not depend on what the weights know.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from vistrain.models.attention import flex_available
from vistrain.models.var import VAR, VARConfig
from vistrain.models.vqvae import VQVAE, VQVAEConfig

SCHEDULES = {256: [1, 2, 3, 4, 5, 6, 8, 10, 13, 16], 512: [1, 2, 3, 4, 6, 9, 13, 18, 24, 32],
             128: [1, 2, 3, 4, 5, 6, 8], 64: [1, 2, 3, 4], 16: [1, 2, 3, 4]}
# the tokenizer's downsampling for each resolution: 16 for the released models, 4 for the digits default
CH_MULT = {16: [1, 2, 2]}
SYNC_OPS = ("aten::item", "aten::_local_scalar_dense", "cudaStreamSynchronize", "cudaDeviceSynchronize")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_batch(cfg: VARConfig, batch: int, device: torch.device):
    L = sum(p * p for p in cfg.patch_nums)
    label_B = torch.randint(0, cfg.num_classes, (batch,), device=device)
    x_BLCv = torch.randn(batch, L - 1, cfg.z_channels, device=device)
    gt_BL = torch.randint(0, cfg.vocab_size, (batch, L), device=device)
    return label_B, x_BLCv, gt_BL


def forward_backward(model, batch, autocast) -> None:
    label_B, x_BLCv, gt_BL = batch
    with autocast():
        logits_BLV = model(label_B, x_BLCv)
    F.cross_entropy(logits_BLV.float().transpose(1, 2), gt_BL).backward()


def optimizer_step(opt) -> None:
    opt.step()
    opt.zero_grad(set_to_none=True)


def time_steps(fn, steps: int, device: torch.device) -> list[float]:
    times = []
    for _ in range(steps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def count_syncs(fn) -> int:
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key in SYNC_OPS)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=16)
    parser.add_argument("--resolution", type=int, default=256, choices=sorted(SCHEDULES))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--precision", default="bf16", choices=("fp32", "bf16"))
    parser.add_argument("--compile", action="store_true", help="torch.compile each block")
    parser.add_argument("--vae-ch", type=int, default=160, help="the tokenizer's base width (160: the official)")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    patch_nums = SCHEDULES[args.resolution]

    def autocast():
        return torch.autocast(device.type, dtype=dtype, enabled=args.precision != "fp32")

    impls = ["sdpa"] + (["flex"] if device.type == "cuda" and flex_available() else [])
    rows = []
    for impl in impls:
        cfg = VARConfig(depth=args.depth, patch_nums=patch_nums, attn_impl=impl)
        torch.manual_seed(0)
        model = VAR(cfg).to(device).train()
        if args.compile:
            for block in model.blocks:
                block.compile()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), fused=device.type == "cuda")
        batch = make_batch(cfg, args.batch, device)

        def step() -> None:
            forward_backward(model, batch, autocast)
            optimizer_step(opt)

        time_steps(step, args.warmup, device)
        times = time_steps(step, args.steps, device)
        model_syncs = count_syncs(lambda: forward_backward(model, batch, autocast))
        opt_syncs = count_syncs(lambda: optimizer_step(opt))
        ms = 1e3 * statistics.median(times)
        rows.append((impl, ms, args.batch / (ms / 1e3), model_syncs, opt_syncs))

    # The frozen tokenizer's share: encoding this batch of images to tokens, as the VAR task does each step.
    vae_cfg = VQVAEConfig(ch=args.vae_ch, patch_nums=patch_nums, ch_mult=CH_MULT.get(args.resolution, [1, 1, 2, 2, 4]))
    vae = VQVAE(vae_cfg).to(device).eval().requires_grad_(False)
    images = torch.rand(args.batch, 3, args.resolution, args.resolution, device=device) * 2 - 1

    def encode() -> None:
        with torch.no_grad():
            idx = vae.img_to_idx(images)
            vae.quantize.idx_to_var_input(idx)

    time_steps(encode, 2, device)
    encode_ms = 1e3 * statistics.median(time_steps(encode, max(3, args.steps // 2), device))

    n_params = sum(p.numel() for p in VAR(VARConfig(depth=args.depth, patch_nums=patch_nums)).parameters())
    print(f"\nVAR-d{args.depth} ({n_params / 1e6:.0f}M) training step, {args.resolution} px "
          f"(L={sum(p * p for p in patch_nums)} tokens), batch {args.batch}, {args.precision}, {device} "
          f"({torch.cuda.get_device_name(device) if device.type == 'cuda' else f'{torch.get_num_threads()} threads'}), "
          f"torch {torch.__version__}{', compiled blocks' if args.compile else ''}\n")
    print("| attention | ms/step | images/s | host syncs: forward + backward | host syncs: optimizer |")
    print("|---|---|---|---|---|")
    for impl, ms, ips, model_syncs, opt_syncs in rows:
        print(f"| {impl} | {ms:.1f} | {ips:.1f} | {model_syncs} | {opt_syncs} |")
    best = min(row[1] for row in rows)
    print(f"\ntokenizer (ch {args.vae_ch}) encoding the batch on the fly: {encode_ms:.1f} ms "
          f"= {100 * encode_ms / (encode_ms + best):.0f}% of a step with it")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
