"""torchrun with the gloo backend on CPU: a failing rank ends the job with a message, not a hang."""

import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # end to end: whole runs, or processes of their own


def test_a_failing_rank_stops_the_job_with_a_clear_error(tmp_path, subprocess_env):
    config = tmp_path / "toy.yaml"
    config.write_text("task: support.toy_task\ntrain: {max_steps: 50, batch_size: 16}\ndata: {num_workers: 0}\n")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "vistrain",
           "train", str(config), f"run.out_dir={tmp_path / 'run'}", "run.loggers=[console]",
           "run.dist_timeout_s=30", "toy.fail_rank=1", "toy.fail_at_step=3"]
    start = time.time()
    result = subprocess.run(cmd, env=subprocess_env, capture_output=True, text=True, timeout=240)
    assert result.returncode != 0
    assert time.time() - start < 200
    assert "toy failure on rank 1 at step 3" in result.stdout + result.stderr


def test_a_non_finite_loss_on_one_rank_is_skipped_by_every_rank(tmp_path, subprocess_env):
    """Rank 1's loss turns NaN (its gradients stay finite): both ranks must skip those steps together."""
    import json

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "vistrain",
           "train", str(Path(__file__).parent / "support" / "toy.yaml"), f"run.out_dir={out}", "run.loggers=[jsonl]",
           "train.max_steps=20", "train.batch_size=16", "train.log_every=1", "data.num_workers=0",
           "train.max_nonfinite_steps=3", "toy.nan_rank=1", "toy.nan_from_step=3", "run.dist_timeout_s=60"]
    result = subprocess.run(cmd, env=subprocess_env, capture_output=True, text=True, timeout=240)
    assert result.returncode != 0
    text = result.stdout + result.stderr
    for rank in (0, 1):
        assert f"[rank {rank}] vistrain: error: 3 optimizer steps in a row had a non-finite loss" in text, text
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    skipped = {e["step"]: e["skipped/main"] for e in events}
    assert skipped[3] == 0.0 and skipped[4] == skipped[5] == 1.0  # 1.0: every rank skipped, none stepped


def test_when_one_rank_runs_out_of_data_every_rank_stops_at_the_same_step(tmp_path, subprocess_env):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "vistrain",
           "train", str(Path(__file__).parent / "support" / "toy.yaml"), f"run.out_dir={out}", "run.loggers=[console]",
           "train.max_steps=50", "train.batch_size=16", "train.micro_batch_size=4", "train.ckpt_every=100",
           "data.num_workers=0", "toy.data_ends=[9,14]", "run.dist_timeout_s=60"]
    result = subprocess.run(cmd, env=subprocess_env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    # rank 0 has 9 micro-batches: 4 steps of 2, then it runs short in the fifth; rank 1 stops with it
    assert "the training data ran out after step 4" in result.stdout
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000004"
