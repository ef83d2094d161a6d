"""`vistrain eval` as a user runs it: image metrics of a GAN's samples, a tokenizer's reconstructions, sharded
over ranks, and the errors that must come before any image is generated."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from support.cli_runs import vistrain
from support.standin_detector import TwoHeaded, save_scripted
from test_var_task import TINY_VQVAE
from vistrain.cli.evaluate import eval_command
from vistrain.config import load_config
from vistrain.engine.dist import DistContext
from vistrain.registry import make_trainer

REPO = Path(__file__).resolve().parents[1]
CPU = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
TINY_GAN = ["data.resolution=16", "model.generator.base_channels=8", "model.discriminator.base_channels=8",
            "train.batch_size=16", "data.num_workers=0", "gan.num_samples=16", "gan.fd_samples=64",
            "run.loggers=[jsonl]"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def detector(tmp_path_factory):
    return save_scripted(TwoHeaded(), tmp_path_factory.mktemp("detector") / "standin.pt")


def ten_step_run(tmp_path_factory, family: str, tiny: list[str]) -> Path:
    """A run folder of configs/<family>/digits.yaml, tiny, trained 10 steps with one checkpoint."""
    run = tmp_path_factory.mktemp(family) / "run"
    cfg = load_config(REPO / f"configs/{family}/digits.yaml", [*tiny, f"run.out_dir={run}", "train.max_steps=10",
                                                               "train.eval_every=10", "train.ckpt_every=10"])
    make_trainer(cfg, CPU).fit()
    return run


@pytest.fixture(scope="module")
def gan_run(tmp_path_factory):
    return ten_step_run(tmp_path_factory, "gan", TINY_GAN)


@pytest.fixture(scope="module")
def vqvae_run(tmp_path_factory):
    return ten_step_run(tmp_path_factory, "vqvae", TINY_VQVAE)


@pytest.fixture(scope="module")
def digits_folder(tmp_path_factory):
    """Real digits as 16 x 16 PNGs: the reference images of a digits GAN."""
    from sklearn.datasets import load_digits

    folder = tmp_path_factory.mktemp("ref")
    for i, image in enumerate(load_digits().images[:120]):
        Image.fromarray((image * 255 / 16).astype(np.uint8)).resize((16, 16), Image.BILINEAR).save(folder / f"{i}.png")
    return folder


def test_gan_samples_get_every_image_metric_written_as_json(gan_run, digits_folder, detector, capsys):
    assert vistrain("eval", gan_run, "--metrics", "fid,kid,is,pr", "--ref", digits_folder, "--detector", detector,
                    "--num", 60, "--batch-size", 25) == 0
    result = json.loads((gan_run / "eval" / "step_00000010.json").read_text())  # the default place
    assert result["step"] == 10 and result["task"] == "gan" and result["num_images"] == 60
    metrics = result["metrics"]
    assert set(metrics) == {"fid", "kid_mean", "kid_std", "is_mean", "is_std", "precision", "recall"}
    assert metrics["fid"] > 0 and 1 <= metrics["is_mean"] <= 10 and 0 <= metrics["precision"] <= 1
    assert "fid" in capsys.readouterr().out
    # folder statistics are cached: a second run reads them back and scores the same samples the same
    out = gan_run / "again.json"
    assert vistrain("eval", gan_run, "--metrics", "fid", "--ref", digits_folder, "--detector", detector,
                    "--num", 60, "--batch-size", 25, "--out", out) == 0
    assert json.loads(out.read_text())["metrics"]["fid"] == pytest.approx(metrics["fid"], rel=1e-9)


@pytest.mark.parametrize("args, message", [
    (["--metrics", "fid"], "give --ref"),
    (["--metrics", "fid", "--ref", "nowhere/"], "nowhere/ is neither a folder of images nor an .npz"),
    (["--metrics", "fid", "--detector", "missing.pt"], "missing.pt does not exist"),
    (["--metrics", "fidd"], "choose from fid, kid, is, pr, judge"),
    ([], "nothing to score"),
])
def test_bad_requests_fail_before_sampling_and_write_nothing(gan_run, detector, args, message, capsys):
    if "--detector" not in args:
        args = [*args, "--detector", detector]
    out = gan_run / "bad.json"
    assert vistrain("eval", gan_run, *args, "--out", out) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.slow
def test_tokenizer_metrics_sharded_over_two_ranks_equal_one_rank(vqvae_run, detector, tmp_path, subprocess_env):
    args = ["eval", str(vqvae_run), "--metrics", "rfid,psnr,ssim", "--detector", detector, "--num-images", "40",
            "--batch-size", "8"]
    assert vistrain(*args, "--out", tmp_path / "one.json") == 0
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "vistrain", *args, "--out", str(tmp_path / "two.json")],
                         env=subprocess_env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-3000:]
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert one["num_images"] == two["num_images"] == 40
    assert one["metrics"]["psnr"] > 5 and 0 < one["metrics"]["ssim"] <= 1 and one["metrics"]["rfid"] > 0
    for name, value in one["metrics"].items():
        assert two["metrics"][name] == pytest.approx(value, rel=1e-6), name
    assert vistrain("eval", vqvae_run, "--metrics", "fid", "--detector", detector) == 2  # rfid, for a tokenizer


@pytest.mark.slow
def test_eval_jobs_beside_training_run_vistrain_eval_and_log_on_their_own_axis(tmp_path, digits_folder, detector):
    run = tmp_path / "run"
    cfg = load_config(REPO / "configs/gan/digits.yaml", [
        *TINY_GAN, f"run.out_dir={run}", "train.max_steps=10", "train.ckpt_every=5", "train.eval_every=10",
        "eval.mode=local", "eval.metrics=[fid,kid]", f"eval.ref={digits_folder}", f"eval.detector={detector}",
        "eval.num_samples=40", "eval.batch_size=20", "eval.device=cpu", "eval.best=fid"])
    make_trainer(cfg, CPU, eval_command=eval_command(cfg)).fit()  # a finished run waits for its last jobs
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = {r["step"]: r for r in records if r["split"] == "eval"}
    assert sorted(evals) == [5, 10] and all(r["fid"] > 0 and "kid_mean" in r for r in evals.values())
    best = min(evals, key=lambda step: evals[step]["fid"])
    assert (run / "checkpoints" / "best").read_text().strip() == f"step_{best:08d}"
    assert json.loads((run / "eval" / "step_00000005.json").read_text())["settings"]["num"] == 40


def _in_loop_eval_rank(rank: int, world: int, tmp: str, overrides: list[str]) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=world)
    try:
        ctx = DistContext(rank, world, 0, torch.device("cpu"), dist.group.WORLD)
        trainer = make_trainer(load_config(REPO / "configs/gan/digits.yaml", overrides), ctx)
        metrics = trainer.task.evaluate(0).metrics
        if rank == 0:
            Path(tmp, "two.json").write_text(json.dumps(metrics))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_in_loop_metrics_of_two_ranks_equal_one_rank(tmp_path, digits_folder, detector):
    """eval.mode=sync: each rank generates its slice of the same fixed-noise samples; the scores are those of
    one rank generating them all."""
    overrides = [*TINY_GAN, "eval.metrics=[judge,fid,kid]", f"eval.ref={digits_folder}", f"eval.detector={detector}",
                 "eval.num_samples=40", "eval.batch_size=16"]
    trainer = make_trainer(load_config(REPO / "configs/gan/digits.yaml",
                                       [*overrides, f"run.out_dir={tmp_path / 'one'}"]), CPU)
    assert trainer.task.best_metric == ("fid", "min")  # the first of fid, fd_judge, ... that the metrics give
    one = trainer.task.evaluate(0).metrics
    assert {"fd_judge", "class_acc", "is_judge", "fid", "kid_mean", "fd_pixels"} <= set(one)
    torch.multiprocessing.spawn(_in_loop_eval_rank,
                                args=(2, str(tmp_path), [*overrides, f"run.out_dir={tmp_path / 'two'}"]),
                                nprocs=2, join=True)
    two = json.loads((tmp_path / "two.json").read_text())
    assert two.keys() == one.keys()
    for name, value in one.items():
        assert two[name] == pytest.approx(value, rel=1e-5, abs=1e-9), name
