"""A task of your own, written as README's "Your own task" shows (tests/support/toy_task.py is one), works with
every verb its capabilities allow -- train, sample, eval -- without a change anywhere in vistrain; a verb it
lacks, or an attribute its class forgot, is named."""

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from support.cli_runs import vistrain
from support.standin_detector import TwoHeaded, save_scripted
from vistrain.config import ExperimentConfig, load_config
from vistrain.engine.dist import DistContext
from vistrain.engine.task import Task
from vistrain.errors import ConfigError
from vistrain.registry import TaskSpec, make_trainer, register

TOY = Path(__file__).resolve().parent / "support" / "toy.yaml"
TOY_RUN = ["train.batch_size=16", "train.max_steps=4", "train.ckpt_every=2", "train.log_every=2",
           "train.eval_every=100", "data.num_workers=0", "run.loggers=[jsonl]"]


def test_your_own_task_trains_samples_and_is_scored(tmp_path, capsys):
    run = tmp_path / "run"
    assert vistrain("train", TOY, f"run.out_dir={run}", *TOY_RUN) == 0
    assert vistrain("sample", run, "--out", tmp_path / "grid.png", "--num", 16, "--batch-size", 5) == 0
    grid = np.asarray(Image.open(tmp_path / "grid.png"))
    assert grid.shape[0] >= 4 * 8 and grid.std() > 0  # 16 images of 8 x 8 pixels, not blank
    ref = tmp_path / "ref"
    ref.mkdir()
    for i in range(12):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(ref / f"{i}.png")
    detector = save_scripted(TwoHeaded(), tmp_path / "detector.pt")
    assert vistrain("eval", run, "--metrics", "fid,kid", "--ref", ref, "--detector", detector, "--num-images", 20,
                    "--out", tmp_path / "eval.json") == 0
    metrics = json.loads((tmp_path / "eval.json").read_text())["metrics"]
    assert np.isfinite(metrics["fid"]) and metrics["fid"] > 0
    capsys.readouterr()
    assert vistrain("generate", run, "--prompt", "?") == 2  # a capability the toy task does not have
    assert "'support.toy_task' model, which does not generate text" in capsys.readouterr().err


class Forgetful(Task):
    """A task whose __init__ forgot its phases."""

    def __init__(self, cfg, env):
        self.nets = {"net": torch.nn.Linear(2, 2)}
        self.trainable = ("net",)
        self.optimizers = {}


@dataclass
class ForgetfulConfig(ExperimentConfig):
    task: str = __name__


register(TaskSpec(name=__name__, config=ForgetfulConfig, build=Forgetful))


def test_a_task_that_forgot_an_attribute_is_named_at_start(tmp_path):
    cfg = load_config(None, [f"task={__name__}", f"run.out_dir={tmp_path}"])
    with pytest.raises(ConfigError, match=r"task 'test_own_task' \(Forgetful\) has no `phases`"):
        make_trainer(cfg, DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")))
    assert not any(tmp_path.iterdir())  # nothing written
