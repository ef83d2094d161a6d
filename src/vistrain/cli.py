"""`vistrain train | sample`: the one entry point (also `python -m vistrain`, and under torchrun)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

USAGE_EXAMPLES = """examples:
  vistrain train configs/gan/digits.yaml
  vistrain train configs/gan/digits.yaml train.max_steps=100 run.out_dir=runs/try
  torchrun --nproc_per_node=2 -m vistrain train configs/gan/digits.yaml
  vistrain sample runs/gan_digits --out grid.png --num 64 --labels 3,7
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vistrain", epilog=USAGE_EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a model from a YAML config")
    train.add_argument("config", help="YAML config file (see configs/)")
    train.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=100")
    train.add_argument("--smoke", action="store_true", help="a few steps on tiny shapes, for a quick check")
    sample = sub.add_parser("sample", help="draw images from a trained model")
    sample.add_argument("source", help="a run folder (uses its latest checkpoint) or a checkpoint folder")
    sample.add_argument("--out", required=True, help="FILE.png (a grid) or FILE.npz (arr_0: N x H x W x 3 uint8)")
    sample.add_argument("--num", type=int, default=64)
    sample.add_argument("--labels", default=None, help="comma-separated class ids to cycle through, e.g. 0,1,2")
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--which", choices=("latest", "best"), default="latest",
                        help="for a run folder: which checkpoint to use")
    sample.add_argument("--device", default="auto", help="auto | cpu | cuda")
    args = parser.parse_args(argv)
    return run_train(args) if args.command == "train" else run_sample(args)


def run_train(args) -> int:
    from vistrain.config import ConfigError, load_config
    from vistrain.engine.checkpoint import CheckpointError

    overrides = list(args.overrides)
    try:
        if args.smoke:
            overrides = smoke_overrides(args.config, overrides)
        cfg = load_config(args.config, overrides)
    except ConfigError as e:
        print(f"vistrain: config error: {e}", file=sys.stderr)
        return 2
    from vistrain.engine.dist import init_distributed, shutdown
    from vistrain.engine.trainer import EXIT_REQUEUE, Preempted, Trainer, TrainingDiverged

    ctx = init_distributed(cfg.run.device, cfg.run.dist_timeout_s)
    prefix = f"[rank {ctx.rank}] " if ctx.distributed else ""
    try:
        final = Trainer(cfg, ctx).fit()
        if ctx.is_main:
            print(f"done: {final}\n  samples: {Path(cfg.run.out_dir) / 'samples'}", flush=True)
        return 0
    except Preempted as e:
        if ctx.is_main:
            print(f"vistrain: {e}", file=sys.stderr, flush=True)
        return EXIT_REQUEUE
    except (ConfigError, CheckpointError, TrainingDiverged, ValueError) as e:
        print(f"{prefix}vistrain: error: {e}", file=sys.stderr, flush=True)
        return 2 if isinstance(e, ConfigError) else 1
    finally:
        shutdown(ctx)


def smoke_overrides(config_path: str, overrides: list[str]) -> list[str]:
    """Tiny shapes and a handful of steps, written beside the real run so it never touches its checkpoints."""
    from vistrain.config import load_config, task_module

    cfg = load_config(config_path, overrides)
    smoke = [
        "train.smoke=true", "train.max_steps=3", "train.log_every=1", "train.eval_every=3",
        "train.ckpt_every=3", "train.batch_size=8", "train.micro_batch_size=0", "data.num_workers=0",
        "run.resume=never", f"run.out_dir={cfg.run.out_dir.rstrip('/')}-smoke",
    ]
    return overrides + smoke + list(getattr(task_module(cfg.task), "SMOKE_OVERRIDES", []))


def run_sample(args) -> int:
    import numpy as np

    from vistrain.config import task_module
    from vistrain.engine import checkpoint as ckpt_lib
    from vistrain.engine.dist import pick_device
    from vistrain.engine.images import make_grid, save_png, to_uint8_hwc

    out = Path(args.out)
    if out.suffix not in (".png", ".npz"):
        print(f"vistrain: --out {out}: expected a .png or .npz file name", file=sys.stderr)
        return 2
    try:
        ckpt = ckpt_lib.find_checkpoint(Path(args.source), args.which)
        model_config = ckpt_lib.load_model_config(ckpt)
        weights = ckpt_lib.load_weights(ckpt)
        labels = [int(c) for c in args.labels.split(",")] if args.labels else None
        module = task_module(model_config["task"])
        images = module.sample(model_config, weights, args.num, labels, args.seed, pick_device(args.device, 0))
    except (ckpt_lib.CheckpointError, ValueError) as e:
        print(f"vistrain: error: {e}", file=sys.stderr)
        return 1
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".npz":
        np.savez(out, arr_0=to_uint8_hwc(images))
    else:
        save_png(out, make_grid(images))
    print(f"wrote {len(images)} images from {ckpt} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
