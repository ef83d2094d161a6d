"""scripts/slurm/train.sbatch, run by bash on this machine with SLURM's variables faked: the time-limit
signal makes it checkpoint and requeue, and the requeued job resumes and finishes.

`srun` and `scontrol` are stand-ins put first on PATH: srun drops its own options and runs the command
(so srun's pid is torchrun's, as far as the script can tell), scontrol answers `show hostnames` and logs
`requeue`. Everything else (the script's trap / wait / requeue logic, torchrun with 2 local ranks on gloo,
the trainer's checkpoint on SIGUSR1) is the real thing.
"""

import inspect
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "slurm" / "train.sbatch"
JOB_ID = "4242"
# Generous: on 2 busy CPU cores starting torchrun and two workers alone can take several seconds.
DEADLINE_S = 180


def _torchrun_handles_sigusr1() -> bool:
    import torch.distributed.run as torchrun

    return "signals-to-handle" in inspect.getsource(torchrun)


pytestmark = [
    pytest.mark.slow,  # end to end: torchrun under a fake SLURM
    pytest.mark.skipif(sys.platform == "win32", reason="bash, SIGUSR1"),
    pytest.mark.skipif(not _torchrun_handles_sigusr1(),
                       reason="needs torchrun --signals-to-handle (torch >= 2.9)"),
]

FAKE_SRUN = """#!/usr/bin/env bash
# srun on one machine: record the arguments, drop srun's own options (the script passes them as
# --opt=value), run the command in this very process.
printf '%s\\n' "$@" > "{log_dir}/srun_args.txt"
while [[ $# -gt 0 && $1 == -* ]]; do shift; done
exec "$@"
"""

FAKE_SCONTROL = """#!/usr/bin/env bash
if [[ $1 == show && $2 == hostnames ]]; then
    echo localhost
elif [[ $1 == requeue ]]; then
    echo "requeue $2" >> "{log_dir}/scontrol.log"
else
    echo "fake scontrol: unexpected arguments: $*" >&2
    exit 1
fi
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _latest_step(out_dir: Path):
    latest = out_dir / "checkpoints" / "latest"
    try:
        name = latest.read_text().strip()
    except FileNotFoundError:
        return None
    return int(name.removeprefix("step_")) if name else None


def _at_least(step, first):
    return step if step is not None and step >= first else None


def _wait_for(what, predicate, proc, log: Path):
    """Poll until predicate() is truthy; fail early if the script exits, late at the deadline."""
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc.poll() is not None:
            pytest.fail(f"the script exited ({proc.returncode}) before {what}:\n{log.read_text()}")
        time.sleep(0.05)
    pytest.fail(f"no {what} after {DEADLINE_S} s:\n{log.read_text()}")


def _stop(proc):
    """Failure path only: end the script and its torchrun (a TERM lets torchrun stop its workers)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _start(args, env, log: Path):
    with open(log, "wb") as out:  # a file, like SLURM's --output: no pipe to fill up
        return subprocess.Popen(["bash", str(SCRIPT), *args], env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


@pytest.fixture
def slurm_env(tmp_path, subprocess_env):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        path = bin_dir / name
        path.write_text(text.format(log_dir=tmp_path))
        path.chmod(0o755)
    env = {k: v for k, v in subprocess_env.items() if not k.startswith("SLURM_")}
    for knob in ("NPROC_PER_NODE", "MASTER_PORT", "REQUEUE_ON_TERM"):
        env.pop(knob, None)
    env.update(
        PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}",
        PYTHON=sys.executable,
        SLURM_JOB_ID=JOB_ID,
        SLURM_NNODES="1",
        SLURM_JOB_NUM_NODES="1",
        SLURM_JOB_NODELIST="localhost",
        SLURM_GPUS_ON_NODE="2",  # 2 local ranks; on CPU they are just processes
    )
    return env


def test_time_limit_signal_checkpoints_and_requeues_then_the_requeued_job_resumes(tmp_path, slurm_env):
    config = tmp_path / "toy.yaml"
    config.write_text("task: support.toy_task\n"
                      "train: {max_steps: 100000, batch_size: 16, ckpt_every: 20, log_every: 20}\n"
                      "data: {num_workers: 0}\nrun: {loggers: [console]}\n")
    out = tmp_path / "run"
    requeue_log = tmp_path / "scontrol.log"

    # --- first job: SLURM's USR1 (--signal=B:USR1@...) arrives with most of the steps still to go
    port = _free_port()
    log1 = tmp_path / "job1.log"
    proc = _start([str(config), f"run.out_dir={out}"], {**slurm_env, "MASTER_PORT": str(port)}, log1)
    try:
        waited = _wait_for("checkpoint at step >= 20", lambda: _at_least(_latest_step(out), 20), proc, log1)
        proc.send_signal(signal.SIGUSR1)  # to the batch shell only, as B: does
        status = proc.wait(timeout=DEADLINE_S)
    finally:
        _stop(proc)
    text1 = log1.read_text()
    assert status == 0, text1  # requeued: the job itself ends fine
    assert requeue_log.read_text() == f"requeue {JOB_ID}\n", text1
    srun_args = (tmp_path / "srun_args.txt").read_text().splitlines()
    assert "--ntasks-per-node=1" in srun_args
    for expected in ("--nnodes=1", "--nproc_per_node=2", "--rdzv_backend=c10d",
                     f"--rdzv_endpoint=localhost:{port}", f"--rdzv_id={JOB_ID}"):
        assert expected in srun_args, (expected, srun_args)
    stopped_at = _latest_step(out)
    assert waited <= stopped_at < 100000, text1
    assert (out / "checkpoints" / f"step_{stopped_at:08d}").is_dir()
    assert "preempted: saved" in text1, text1  # the workers stopped on the signal, not by crashing

    # --- the requeued job: the same command, here with an end in reach
    final = stopped_at + 40
    log2 = tmp_path / "job2.log"
    proc = _start([str(config), f"run.out_dir={out}", f"train.max_steps={final}"],
                  {**slurm_env, "MASTER_PORT": str(_free_port())}, log2)
    try:
        status = proc.wait(timeout=DEADLINE_S)
    finally:
        _stop(proc)
    text2 = log2.read_text()
    ckpts = out / "checkpoints"
    assert f"resumed from {ckpts / f'step_{stopped_at:08d}'} at step {stopped_at}" in text2, text2
    assert f"done: {ckpts / f'step_{final:08d}'}" in text2, text2
    assert _latest_step(out) == final
    assert requeue_log.read_text() == f"requeue {JOB_ID}\n", text2  # no second requeue
    assert status == 0, text2
