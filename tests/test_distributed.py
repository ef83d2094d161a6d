"""torchrun with the gloo backend on CPU: a failing rank ends the job with a message, not a hang."""

import subprocess
import sys
import time


def test_a_failing_rank_stops_the_job_with_a_clear_error(tmp_path, subprocess_env):
    config = tmp_path / "toy.yaml"
    config.write_text("task: toy_task\ntrain: {max_steps: 50, batch_size: 16}\ndata: {num_workers: 0}\n")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "vistrain",
           "train", str(config), f"run.out_dir={tmp_path / 'run'}", "run.loggers=[console]",
           "run.dist_timeout_s=30", "toy.fail_rank=1", "toy.fail_at_step=3"]
    start = time.time()
    result = subprocess.run(cmd, env=subprocess_env, capture_output=True, text=True, timeout=240)
    assert result.returncode != 0
    assert time.time() - start < 200
    assert "toy failure on rank 1 at step 3" in result.stdout + result.stderr
