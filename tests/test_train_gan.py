"""End to end through the CLI, as a user runs it: kill and resume, torchrun, bad inputs, sampling."""

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
DIGITS = REPO / "configs" / "gan" / "digits.yaml"

# Small but complete: R1 (lazy, every 4 steps), DiffAugment, EMA, 2 data workers, accumulation.
TINY = [
    "data.resolution=16", "model.generator.base_channels=8", "model.discriminator.base_channels=8",
    "train.batch_size=16", "train.micro_batch_size=8", "data.num_workers=2",
    "gan.loss_weight.r1_gamma=0.1", "gan.r1_interval=4", "gan.augment=color,translation,cutout",
    "gan.num_samples=16", "gan.fd_samples=64", "run.loggers=[jsonl]",
]


def train_cmd(vistrain_cmd, out_dir, *extra):
    return vistrain_cmd + ["train", str(DIGITS), f"run.out_dir={out_dir}", *TINY, *extra]


def final_model(out_dir: Path) -> Path:
    latest = (out_dir / "checkpoints" / "latest").read_text().strip()
    return out_dir / "checkpoints" / latest / "model.safetensors"


@pytest.mark.slow
def test_sigkill_then_rerun_gives_bit_identical_model(tmp_path, kill_rng, subprocess_env, vistrain_cmd):
    steps = ["train.max_steps=120", "train.ckpt_every=10", "train.eval_every=40", "train.log_every=10"]
    ref = tmp_path / "ref"
    subprocess.run(train_cmd(vistrain_cmd, ref, *steps), env=subprocess_env, check=True, timeout=300,
                   capture_output=True)

    run = tmp_path / "killed"
    cmd = train_cmd(vistrain_cmd, run, *steps)
    # The kill lands a random moment after a random early checkpoint: 90 or more steps are still to go then,
    # so the run cannot have finished, and where in a step (or in a save) it lands is left to chance.
    after = run / "checkpoints" / f"step_{kill_rng.choice((10, 20, 30)):08d}"
    delay = kill_rng.uniform(0.0, 0.3)
    proc = subprocess.Popen(cmd, env=subprocess_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not after.exists():
        assert proc.poll() is None, "the run ended before the checkpoint the kill waits for"
        assert time.time() < deadline
        time.sleep(0.02)
    time.sleep(delay)
    proc.kill()  # SIGKILL: no handler, no cleanup
    proc.wait()
    killed_at = (run / "checkpoints" / "latest").read_text().strip()
    assert killed_at != "step_00000120", f"the run finished within {delay:.2f}s of {after.name}"

    resumed = subprocess.run(cmd, env=subprocess_env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout
    assert final_model(run).read_bytes() == final_model(ref).read_bytes(), f"killed {delay:.2f}s after {after.name}"


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_torchrun_two_ranks_trains_resumes_on_one_and_samples(tmp_path, subprocess_env, vistrain_cmd, parallel):
    out = tmp_path / parallel
    args = ["train", str(DIGITS), f"run.out_dir={out}", *TINY, "train.ckpt_every=6", "train.eval_every=6",
            "train.log_every=3", "train.batch_size=32", "train.micro_batch_size=8", "data.num_workers=1",
            f"train.parallel={parallel}"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "vistrain",
           *args, "train.max_steps=6"]
    result = subprocess.run(cmd, env=subprocess_env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    one_rank = subprocess.run(vistrain_cmd + args + ["train.max_steps=12"], env=subprocess_env,
                              capture_output=True, text=True, timeout=300)
    assert one_rank.returncode == 0, one_rank.stdout[-2000:] + one_rank.stderr[-3000:]
    assert "saved with 2 ranks, now 1" in one_rank.stdout
    weights = load_file(final_model(out))
    assert {k.split(".")[0] for k in weights} == {"G", "D", "G_ema"}
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())
    assert (out / "samples" / "step_00000012.png").exists()

    png, npz = tmp_path / "grid.png", tmp_path / "samples.npz"
    for target in (png, npz):
        done = subprocess.run(vistrain_cmd + ["sample", str(out), "--out", str(target), "--num", "10",
                                              "--labels", "3,7", "--seed", "1"],
                              env=subprocess_env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
    arr = np.load(npz)["arr_0"]
    assert arr.shape == (10, 16, 16, 3) and arr.dtype == np.uint8
    assert Image.open(png).size[0] > 16


def test_empty_image_folder_is_a_clear_error(tmp_path, subprocess_env, vistrain_cmd):
    empty = tmp_path / "no_images"
    (empty / "cats").mkdir(parents=True)
    out = tmp_path / "run"  # an earlier run lives here: pointing it at a bad folder must not harm it
    out.mkdir()
    (out / "config.yaml").write_text("earlier: run\n")
    result = subprocess.run(train_cmd(vistrain_cmd, out, "data.name=image_folder", f"data.root={empty}",
                                      "data.channels=3"),
                            env=subprocess_env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert str(empty) in result.stderr and "no images" in result.stderr.lower()
    assert "Traceback" not in result.stderr
    assert (out / "config.yaml").read_text() == "earlier: run\n"
    assert [p.name for p in out.iterdir()] == ["config.yaml"]


def test_too_few_images_for_one_batch_is_a_clear_error(tmp_path, subprocess_env, vistrain_cmd):
    folder = tmp_path / "few"
    folder.mkdir()
    for i in range(5):
        Image.fromarray(np.full((20, 20, 3), i * 40, np.uint8)).save(folder / f"{i}.png")
    result = subprocess.run(train_cmd(vistrain_cmd, tmp_path / "run", "data.name=image_folder", f"data.root={folder}",
                                      "data.channels=3", "model.conditional=false"),
                            env=subprocess_env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "fewer than one global batch" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_truncated_checkpoint_is_a_clear_error_and_nothing_is_lost(tmp_path, subprocess_env, vistrain_cmd):
    out = tmp_path / "run"
    first = subprocess.run(train_cmd(vistrain_cmd, out, "train.max_steps=4", "train.ckpt_every=2",
                                     "data.num_workers=0", "train.keep_last=0"),
                           env=subprocess_env, capture_output=True, text=True, timeout=180)
    assert first.returncode == 0, first.stderr
    broken = final_model(out)
    data = broken.read_bytes()
    broken.write_bytes(data[: len(data) // 2])
    snapshot = {p: p.read_bytes() for p in (out / "checkpoints").rglob("*") if p.is_file()}

    again = subprocess.run(train_cmd(vistrain_cmd, out, "train.max_steps=8", "train.ckpt_every=2",
                                     "data.num_workers=0"),
                           env=subprocess_env, capture_output=True, text=True, timeout=180)
    assert again.returncode == 1
    assert str(broken) in again.stderr and "run.resume=" in again.stderr and "Traceback" not in again.stderr
    after = {p: p.read_bytes() for p in (out / "checkpoints").rglob("*") if p.is_file()}
    assert after == snapshot
