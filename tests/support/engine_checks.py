"""Engine checks run under torchrun by tests/test_parallel.py (not a test module itself).

    python -m torch.distributed.run --nproc_per_node=2 tests/support/engine_checks.py MODE OUT_DIR [key=value ...]

MODE grads: train the toy task for one step and save the gradients each rank's optimizer was given.
MODE reductions: train the toy task and save how many FSDP reduce-scatters each rank ran.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the support package

from vistrain.config import load_config  # noqa: E402
from vistrain.engine.dist import init_distributed, shutdown  # noqa: E402
from vistrain.registry import make_trainer  # noqa: E402


def main() -> None:
    mode, out_dir, overrides = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
    cfg = load_config(None, ["task=support.toy_task", f"run.out_dir={out_dir / 'run'}", "run.loggers=[]",
                             "data.num_workers=0", *overrides])
    ctx = init_distributed("cpu", 60, always=cfg.train.parallel == "fsdp")
    trainer = make_trainer(cfg, ctx)
    if mode == "grads":
        grads = capture_gradients(trainer)
        trainer.fit()
        torch.save(grads, out_dir / f"grads_rank{ctx.rank}.pt")
    elif mode == "reductions":
        calls = count_reduce_scatters()
        trainer.fit()
        (out_dir / f"reductions_rank{ctx.rank}.json").write_text(json.dumps({"reduce_scatters": calls[0]}))
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    shutdown(ctx)


def capture_gradients(trainer) -> dict:
    """The gradients the optimizer steps with (after the engine's normalisation), full tensors by name."""
    opt, net = trainer.optimizers["main"], trainer.task.nets["net"]
    grads: dict[str, torch.Tensor] = {}
    original = opt.step

    def step(*args, **kwargs):
        for name, p in net.named_parameters():
            g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            grads[name] = g.detach().clone()
        return original(*args, **kwargs)

    opt.step = step
    return grads


def count_reduce_scatters() -> list[int]:
    calls = [0]
    original = dist.reduce_scatter_single

    def counting(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    dist.reduce_scatter_single = counting
    return calls


if __name__ == "__main__":
    main()
