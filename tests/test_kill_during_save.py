"""SIGKILL at every durable step of a checkpoint save: the previous checkpoint stays loadable, and a rerun
continues bit-identically. The kill comes from inside the saving process, at the n-th fsync / rename of the
save, so every point of the sequence is hit by construction -- no timing involved."""

import multiprocessing
import os
import shutil
import signal

import pytest
import torch

import vistrain.engine.checkpoint_files as ckpt_mod
from vistrain import durable
from vistrain.config import load_config
from vistrain.engine import checkpoint_files as ckpt_lib
from vistrain.engine.dist import DistContext
from vistrain.registry import make_trainer

pytestmark = pytest.mark.slow  # end to end: whole runs, or processes of their own

CPU = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
DURABLE = ("replace", "fsync")  # the operations that order what a reader can see on disk


class KillingOs:
    """`os` as checkpoint_files.py and vistrain.durable (its `latest` and `best`) see it, except that the n-th durable
    operation of a save kills the process first. Counting starts with the save: the run's earlier durable writes
    (config.yaml) are tests/test_durable.py's business."""

    def __init__(self, kill_at: int):
        self.kill_at, self.calls, self.saving = kill_at, 0, False

    def __getattr__(self, name):
        attr = getattr(os, name)
        if name not in DURABLE:
            return attr

        def durable_operation(*args, **kwargs):
            if self.saving:
                self.calls += 1
                if self.calls == self.kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)
            return attr(*args, **kwargs)

        return durable_operation


def config(out_dir, max_steps, async_save):
    return load_config(None, [
        "task=support.toy_task", f"run.out_dir={out_dir}", "run.loggers=[jsonl]", f"train.max_steps={max_steps}",
        "train.batch_size=16", "train.log_every=2", "train.eval_every=100", "train.ckpt_every=2",
        "train.keep_last=1", "data.num_workers=0", f"train.async_checkpoint={str(async_save).lower()}",
    ])


def resume_and_kill(out_dir, kill_at, async_save):
    """In a child process: continue the run to step 4, dying at the kill_at-th durable operation of its saves."""
    killer = KillingOs(kill_at)
    ckpt_mod.os = durable.os = killer
    begin = ckpt_mod.begin_checkpoint

    def begin_counting(*args, **kwargs):
        killer.saving = True
        return begin(*args, **kwargs)

    ckpt_mod.begin_checkpoint = begin_counting
    make_trainer(config(out_dir, 4, async_save), CPU).fit()
    os._exit(0)


def final_weights(out_dir):
    return ckpt_lib.load_weights(out_dir)


@pytest.mark.parametrize("async_save", [False, True])
def test_sigkill_at_every_point_of_a_save_leaves_a_loadable_checkpoint(tmp_path, async_save):
    make_trainer(config(tmp_path / "ref", 6, async_save), CPU).fit()
    pristine = tmp_path / "pristine"
    make_trainer(config(pristine, 2, async_save), CPU).fit()

    # Children come from a fork server, not from this process: pytest has run other tests here, and a fork of a
    # process whose OpenMP pool has started hangs in the child's first parallel region (libgomp is not fork-safe).
    server = multiprocessing.get_context("forkserver")
    server.set_forkserver_preload([__name__])
    run = tmp_path / "run"
    outcomes = []
    for kill_at in range(1, 40):
        shutil.rmtree(run, ignore_errors=True)
        shutil.copytree(pristine, run)
        child = server.Process(target=resume_and_kill, args=(run, kill_at, async_save))
        child.start()
        child.join(timeout=120)
        if child.exitcode is None:  # never leave a hung child behind: pytest would wait for it at exit
            child.kill()
            child.join()
            pytest.fail(f"the run killed at operation {kill_at} hung")
        killed = child.exitcode == -signal.SIGKILL
        assert killed or child.exitcode == 0, child.exitcode
        latest = ckpt_lib.latest_checkpoint(run / "checkpoints")  # never a dangling or half-written one
        _, _, state = ckpt_lib.load_checkpoint(latest)  # every file matches its checksum
        outcomes.append((kill_at, state["step"]))
        # and the rerun of the same command finishes exactly like the run that was never killed
        make_trainer(config(run, 6, async_save), CPU).fit()
        ref, got = final_weights(tmp_path / "ref"), final_weights(run)
        assert all(torch.equal(ref[k], got[k]) for k in ref), f"killed at operation {kill_at}"
        if not killed:  # past the last durable operation of the save: every point has been tried
            break
    else:
        pytest.fail("the save did more than 40 durable operations")
    steps = [step for _, step in outcomes]
    assert steps[0] == 2 and steps[-1] == 4 and len(outcomes) > 8, outcomes


def test_async_save_lets_training_go_on_while_the_files_are_written(tmp_path, monkeypatch):
    """The writer of step 2's checkpoint is held until training has finished step 3: only a save that runs
    beside training can get past that point (a synchronous one would wait for itself)."""
    import threading

    step_after_save_done = threading.Event()
    write = ckpt_lib.write_checkpoint_files
    seen = []

    def held_write(tmp, *args, **kwargs):
        seen.append(step_after_save_done.wait(timeout=60))
        return write(tmp, *args, **kwargs)

    monkeypatch.setattr(ckpt_lib, "write_checkpoint_files", held_write)
    trainer = make_trainer(config(tmp_path, 4, async_save=True), CPU)
    on_step_end = trainer.task.on_step_end

    def mark(step):
        on_step_end(step)
        if step == 3:
            step_after_save_done.set()

    trainer.task.on_step_end = mark
    trainer.fit()
    assert seen[0] is True  # step 3 ran while step 2's checkpoint was being written
    assert ckpt_lib.latest_checkpoint(tmp_path / "checkpoints").name == "step_00000004"


def test_a_failed_background_save_stops_the_run_with_its_message(tmp_path, monkeypatch):
    import errno

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt_mod, "save_file", no_space)
    with pytest.raises(ckpt_lib.CheckpointError, match="no space left"):
        make_trainer(config(tmp_path, 6, async_save=True), CPU).fit()
    assert not any(p.name.startswith("step_") for p in (tmp_path / "checkpoints").iterdir())
