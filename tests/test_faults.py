"""Bad input and faults, tried as a new user would: each stops with a message that names the key, flag or file,
and every byte of an existing run folder is left as it was."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from support import cli_runs
from support.cli_runs import snapshot, vistrain

REPO = Path(__file__).resolve().parents[1]
TOY = REPO / "tests" / "support" / "toy.yaml"
GAN = REPO / "configs" / "gan" / "digits.yaml"
TOY_RUN = ["train.batch_size=16", "train.max_steps=4", "train.ckpt_every=2", "train.log_every=2",
           "train.eval_every=100", "data.num_workers=0", "run.loggers=[jsonl]"]
TINY_GAN = [*cli_runs.TINY_GAN, "train.max_steps=2", "train.ckpt_every=2", "train.eval_every=2"]


@pytest.fixture
def toy_run(tmp_path):
    run = tmp_path / "run"
    assert vistrain("train", TOY, f"run.out_dir={run}", *TOY_RUN) == 0
    return run


@pytest.mark.parametrize("overrides, status, needle", [
    (["run.resume=never"], 2, "holds a run"),
    (["data.num_workers=-1"], 2, "data.num_workers=-1"),
    (["train.keep_last=-1"], 2, "train.keep_last=-1"),
    (["optim.betas=[0.9]"], 2, "optim.betas"),
    (["train=5"], 2, "'train' in the command line is a section"),
    (["run.device=cuda"], 2, "no CUDA device"),
    (["run.seed=3", "train.max_steps=8"], 2, "run.seed=3"),
    (["toy.width=32", "train.max_steps=8"], 1, "inp.weight: checkpoint (16, 8) vs model (32, 8)"),
    (["optim.lr=1e30", "train.max_steps=30", "train.ckpt_every=1000", "train.log_every=1000"], 1, "non-finite"),
    (["train.max_steps=4"], 0, "already there, nothing was changed"),
    (["train.max_steps=3"], 0, "already there, nothing was changed"),
])
def test_a_start_that_fails_names_the_problem_and_touches_nothing(toy_run, capsys, overrides, status, needle):
    if "run.device=cuda" in overrides and __import__("torch").cuda.is_available():
        pytest.skip("this machine has a GPU")
    before = snapshot(toy_run)
    assert vistrain("train", TOY, f"run.out_dir={toy_run}", *TOY_RUN, *overrides) == status
    out = capsys.readouterr()
    assert needle in out.out + out.err
    assert "Traceback" not in out.err
    assert snapshot(toy_run) == before


def test_a_checkpoint_of_another_task_is_named_as_such(toy_run, tmp_path, capsys):
    assert vistrain("train", GAN, f"run.out_dir={tmp_path / 'gan'}", *TINY_GAN, f"run.resume={toy_run}") == 1
    assert "is a checkpoint of task 'support.toy_task', and this config trains task 'gan'" in capsys.readouterr().err
    assert not (tmp_path / "gan").exists()  # the folder this failed start created is gone again


def test_bad_config_paths_and_out_dirs_are_named(tmp_path, toy_run, capsys):
    assert vistrain("train", REPO / "configs") == 2
    assert "is a folder" in capsys.readouterr().err
    assert vistrain("train", "/dev/null") == 2
    assert "not a regular file" in capsys.readouterr().err
    assert vistrain("train", TOY, f"run.out_dir={toy_run / 'config.yaml'}", *TOY_RUN) == 1
    assert "is a file, not a folder" in capsys.readouterr().err


def test_a_second_run_on_a_folder_in_use_is_refused_and_a_killed_holder_does_not_block(toy_run, subprocess_env,
                                                                                       capsys):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from vistrain.engine.rundir import RunDir; "
         f"RunDir({str(toy_run)!r}).acquire(); print('locked', flush=True); sys.stdin.read()"],
        env=subprocess_env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = snapshot(toy_run)
        assert vistrain("train", TOY, f"run.out_dir={toy_run}", *TOY_RUN, "train.max_steps=6") == 1
        err = capsys.readouterr().err
        assert f"in use by another vistrain run (pid {holder.pid} on host" in err
        assert snapshot(toy_run) == before
    finally:
        holder.kill()  # SIGKILL: the holder cannot clean up; its lock must still go with it
        holder.wait()
    assert vistrain("train", TOY, f"run.out_dir={toy_run}", *TOY_RUN, "train.max_steps=6") == 0
    assert not (toy_run / ".lock").exists()


def test_flags_may_stand_anywhere(tmp_path, capsys):
    assert vistrain("train", TOY, "--smoke", "train.max_steps=2", f"run.out_dir={tmp_path / 'x'}") == 0
    assert "smoke run in" in capsys.readouterr().out
    assert not (tmp_path / "x").exists()  # a smoke run never writes where the real run lives


@pytest.mark.slow
def test_a_second_sigterm_during_the_preemption_save_still_exits_75(tmp_path, subprocess_env):
    cmd = [sys.executable, "-m", "vistrain", "train", str(TOY), f"run.out_dir={tmp_path}", *TOY_RUN,
           "train.max_steps=20", "toy.sigterm_at_step=5"]
    first = subprocess.run(cmd, env=subprocess_env, capture_output=True, text=True, timeout=120)
    assert first.returncode == 75, first.stderr
    assert "preempted: saved" in first.stderr and "step_00000005" in first.stderr
    second = subprocess.run(cmd[:-1], env=subprocess_env, capture_output=True, text=True, timeout=120)
    assert second.returncode == 0 and "resumed from" in second.stdout


# ------------------------------------------------------------------------------------------------ sampling


@pytest.fixture(scope="module")
def gan_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("gan") / "run"
    assert vistrain("train", GAN, f"run.out_dir={run}", *TINY_GAN) == 0
    return run


@pytest.mark.parametrize("args, needle", [
    (["--num", "0"], "--num 0: must be at least 1"),
    (["--num", "-3"], "--num -3: must be at least 1"),
    (["--labels", "a,b"], "--labels a,b: expected comma-separated class ids"),
    (["--labels", "12"], "--labels [12] out of range"),
    (["--device", "foo"], "--device foo"),
    (["--batch-size", "0"], "--batch-size 0"),
    (["--num", "5000"], "at most 4096; write .npz"),
])
def test_sample_refuses_bad_flags_naming_them(gan_run, tmp_path, capsys, args, needle):
    assert vistrain("sample", gan_run, "--out", tmp_path / "x.png", *args) != 0
    err = capsys.readouterr().err
    assert needle in err and "run.resume" not in err and "Traceback" not in err
    assert not (tmp_path / "x.png").exists()


def test_sample_errors_about_the_source_and_output(gan_run, toy_run, tmp_path, capsys):
    assert vistrain("sample", gan_run, "--out", tmp_path) == 2
    assert "is a folder" in capsys.readouterr().err
    assert vistrain("sample", toy_run, "--out", tmp_path / "x.png", "--which", "best") == 1
    assert "has no `best` checkpoint" in capsys.readouterr().err
    assert vistrain("sample", tmp_path / "nowhere", "--out", tmp_path / "x.png") == 1
    assert "does not exist" in capsys.readouterr().err


def test_sample_refuses_a_damaged_weights_file_naming_it(gan_run, tmp_path, capsys):
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(gan_run, run)
    weights = run / "checkpoints" / "step_00000002" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0x01
    weights.write_bytes(bytes(data))
    assert vistrain("sample", run, "--out", tmp_path / "x.png") == 1
    assert f"{weights} is corrupt" in capsys.readouterr().err


def test_sample_streams_many_images_to_npz_in_chunks(gan_run, tmp_path, capsys):
    out = tmp_path / "many.npz"
    assert vistrain("sample", gan_run, "--out", out, "--num", 3000, "--batch-size", 256, "--labels", "3,7") == 0
    arr = np.load(out)["arr_0"]
    assert arr.shape == (3000, 16, 16, 3) and arr.dtype == np.uint8
    first = tmp_path / "first.npz"  # the first images do not depend on how many are asked for
    assert vistrain("sample", gan_run, "--out", first, "--num", 300, "--batch-size", 256, "--labels", "3,7") == 0
    assert np.array_equal(np.load(first)["arr_0"], arr[:300])
    assert [p.name for p in tmp_path.iterdir()] and not list(tmp_path.glob(".tmp-*"))
