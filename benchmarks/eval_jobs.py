"""Does training wait for evaluation? The same GAN digits run three ways, timed side by side. Prints a table.

    none          eval.metrics empty: the in-loop eval the task always does (fd_pixels, the grid), nothing more
    sync          eval.metrics scored in the loop at every train.eval_every: training stops meanwhile
    local         a `vistrain eval` process per checkpoint beside the training (eval.mode=local)

Every run is `--steps` steps with a checkpoint (and, for local, an eval job) every `--every` steps, scoring
`--num-images` samples with `--metrics` (default: the digits judge, which needs no download). Per run: the
median step time (time/step_s, which excludes evals and checkpoints), the longest pause between two logged
steps (train.log_every=10: ten steps, plus whatever training waited for -- a sync eval, a checkpoint), the wall
time to the last step, and the wall time until every eval result is logged.

    python benchmarks/eval_jobs.py [--steps 600] [--every 100] [--num-images 2000] [--metrics judge]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(out: Path, args, mode: str) -> dict:
    overrides = [f"run.out_dir={out}", f"train.max_steps={args.steps}", f"train.ckpt_every={args.every}",
                 f"train.eval_every={args.every}", "train.log_every=10", "run.loggers=[jsonl]"]
    if mode == "none":
        overrides += ["eval.metrics=[]"]
    else:
        overrides += [f"eval.mode={mode}", f"eval.metrics=[{args.metrics}]", f"eval.num_samples={args.num_images}",
                      "eval.batch_size=500", "eval.device=cpu"]
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "vistrain", "train", str(REPO / "configs/gan/digits.yaml"), *overrides],
                   check=True, capture_output=True)
    total = time.perf_counter() - start
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    # the last train record is written after the last step, before the run waits for its eval jobs
    last_step_at = train[-1]["time"] - records[0]["time"]
    evals = [r for r in records if r["split"] == "eval" or (mode == "sync" and r["split"] == "val")]
    longest_pause = max(b["time"] - a["time"] for a, b in zip(train, train[1:]))
    return {"step_s": statistics.median(r["time/step_s"] for r in train), "pause_s": longest_pause,
            "to_last_step_s": last_step_at,
            "total_s": total, "evals": len(evals)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--num-images", type=int, default=2000)
    parser.add_argument("--metrics", default="judge")
    args = parser.parse_args()
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("none", "sync", "local"):
            rows[mode] = run(Path(tmp) / mode, args, mode)
    base = rows["none"]
    print(f"\nGAN digits, {args.steps} steps, eval of {args.num_images} samples ({args.metrics}) every {args.every}\n")
    print("| eval | median step (ms) | vs none | longest pause, 10 steps (s) | wall to last step (s) "
          "| wall to all results (s) | results logged |")
    print("|---|---|---|---|---|---|---|")
    for mode, row in rows.items():
        print(f"| {mode} | {1000 * row['step_s']:.1f} | {row['step_s'] / base['step_s']:.2f} | {row['pause_s']:.1f} | "
              f"{row['to_last_step_s']:.1f} | {row['total_s']:.1f} | {row['evals'] if mode != 'none' else '-'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
