"""Eval jobs beside training (eval.mode local | slurm), with a stand-in job whose timing the test controls."""

import json
import sys
import time
from pathlib import Path

import pytest

from test_engine import CPU, toy_config
from vistrain.engine import checkpoint_files as ckpt_lib
from vistrain.engine.trainer import Trainer
from vistrain.registry import get_spec

FAKE_JOB = Path(__file__).parent / "support" / "fake_eval_job.py"


def trainer_with_fake_jobs(out_dir, gate, *overrides):
    cfg = toy_config(out_dir, "eval.mode=local", "eval.metrics=[score]", "eval.best=score", "eval.best_mode=max",
                     *overrides)
    spec = get_spec(cfg.task)

    def command(checkpoint: Path, result: Path) -> list[str]:
        return [sys.executable, str(FAKE_JOB), str(checkpoint), str(result), str(gate)]

    return Trainer(cfg, lambda env: spec.build(cfg, env), CPU, eval_command=command)


def eval_records(out_dir):
    lines = (out_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == "eval"]


def wait_for(paths, timeout_s=60.0):
    """The jobs were released by the test; this only guards against a hang."""
    deadline = time.monotonic() + timeout_s
    while not all(p.exists() for p in paths):
        assert time.monotonic() < deadline, f"eval jobs did not write {paths}"
        time.sleep(0.05)


def test_training_never_waits_for_eval_and_a_resumed_run_logs_what_arrived(tmp_path, capsys):
    out, gate = tmp_path / "run", tmp_path / "gate"
    gate.mkdir()
    # The gate stays shut for the whole first run: if any step waited for an eval job, it would never end.
    trainer = trainer_with_fake_jobs(out, gate, "eval.max_jobs=2", "eval.wait_at_end=false", "train.keep_last=1")
    trainer.fit()
    said = capsys.readouterr().out
    assert "eval of step 5 is still running" in said and "eval of step 10 is still running" in said
    assert "eval of step 15 is still queued (not started yet)" in said  # max_jobs=2
    assert not eval_records(out)
    # keep_last=1, yet the checkpoints the pending jobs will read are all still there
    kept = sorted(p.name for p in (out / "checkpoints").glob("step_*"))
    assert kept == ["step_00000005", "step_00000010", "step_00000015", "step_00000020"]

    (gate / "open").touch()
    wait_for([out / "eval" / "step_00000005.json", out / "eval" / "step_00000010.json"])
    # The next run in the folder logs what arrived while none ran, starts the queued jobs, and waits at its end.
    trainer_with_fake_jobs(out, gate, "eval.max_jobs=2", "train.max_steps=25", "train.keep_last=1").fit()
    records = eval_records(out)
    assert sorted(r["step"] for r in records) == [5, 10, 15, 20, 25]  # each once, at its checkpoint's step
    assert {r["step"]: r["score"] for r in records}[10] == 100
    assert ckpt_lib.find_checkpoint(out, "best").name == "step_00000010"


def test_a_killed_eval_job_is_reported_and_training_goes_on(tmp_path, capsys):
    out, gate = tmp_path / "run", tmp_path / "gate"
    gate.mkdir()
    (gate / "open").touch()
    (gate / "die_10").touch()  # the job of step 10 SIGKILLs itself
    final = trainer_with_fake_jobs(out, gate).fit()
    assert final.name == "step_00000020"
    said = capsys.readouterr().out
    assert "the eval job of step 10 failed (killed by signal 9); training goes on" in said
    assert str(out / "eval" / "step_00000010.log") in said
    assert sorted(r["step"] for r in eval_records(out)) == [5, 15, 20]
    assert json.loads((out / "eval" / "step_00000010.job").read_text())["status"] == "failed"


def test_slurm_mode_goes_through_submitit(tmp_path):
    pytest.importorskip("submitit")
    out, gate = tmp_path / "run", tmp_path / "gate"
    gate.mkdir()
    (gate / "open").touch()
    # submitit's "local" cluster runs each job as a local process through the same submit / state API
    trainer_with_fake_jobs(out, gate, "eval.mode=slurm", "eval.slurm.cluster=local", "train.max_steps=10").fit()
    assert sorted(r["step"] for r in eval_records(out)) == [5, 10]
    assert ckpt_lib.find_checkpoint(out, "best").name == "step_00000010"


def test_a_local_job_yields_the_cpu_to_training_and_outlives_its_ctrl_c(tmp_path):
    """Lower priority, one thread, a process group of its own (the terminal's Ctrl-C goes to the trainer's)
    but the trainer's session (Linux shares the CPU evenly between sessions, whatever the nice values)."""
    import os

    from vistrain.engine.evaljobs import LocalLauncher

    report = tmp_path / "job.json"
    # the job waits until its priority has been lowered: the launcher does that right after starting it
    probe = ("import json, os, sys, time\n"
             "deadline = time.monotonic() + 30\n"
             "while os.nice(0) < 10 and time.monotonic() < deadline: time.sleep(0.01)\n"
             "json.dump({'nice': os.nice(0), 'threads': os.environ.get('OMP_NUM_THREADS'),"
             " 'pgid': os.getpgid(0), 'pid': os.getpid(), 'sid': os.getsid(0)}, open(sys.argv[1], 'w'))\n")
    launcher = LocalLauncher(threads=1)
    handle, _ = launcher.start([sys.executable, "-c", probe, str(report)], tmp_path / "job.log")
    deadline = time.monotonic() + 60
    while launcher.state(handle) is None:
        assert time.monotonic() < deadline, "the probe job did not end"
        time.sleep(0.05)
    seen = json.loads(report.read_text())
    assert seen["nice"] >= 10 and seen["threads"] == "1"
    assert seen["pgid"] == seen["pid"] != os.getpgid(0)  # its own process group
    if sys.version_info >= (3, 11):
        assert seen["sid"] == os.getsid(0)  # in the trainer's session, so its priority counts
