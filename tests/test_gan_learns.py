"""The embedded default learns: a small digits GAN cuts the Fréchet distances (the digits judge's and the
pixels') to a fraction, and its samples start to be the digit they were asked for."""

import json
from pathlib import Path

import pytest
import torch

from vistrain.config import ConfigError, load_config
from vistrain.engine.dist import DistContext
from vistrain.registry import make_trainer

pytestmark = pytest.mark.slow  # end to end: whole runs, or processes of their own

DIGITS = Path(__file__).resolve().parents[1] / "configs" / "gan" / "digits.yaml"


def test_digits_gan_learns(tmp_path):
    # Tiny and fast (a few seconds): lr 2e-3 so that in 300 steps G already follows the labels about half the time.
    cfg = load_config(DIGITS, [
        f"run.out_dir={tmp_path}", "run.loggers=[jsonl]", "train.max_steps=300", "train.eval_every=300",
        "train.ckpt_every=300", "data.resolution=16", "data.num_workers=0", "gan.fd_samples=256",
        "model.generator.base_channels=16", "model.discriminator.base_channels=16", "gan.ema_half_life_kimg=0.5",
        "eval.num_samples=256", "optim.g.lr=2e-3", "optim.d.lr=2e-3",
    ])
    trainer = make_trainer(cfg, DistContext(0, 1, 0, torch.device("cpu")))
    assert trainer.task.best_metric == ("fd_judge", "min")  # digits have a judge
    untrained = trainer.task.evaluate(0).metrics
    assert untrained["class_acc"] < 20 and untrained["is_judge"] < 2  # chance level: 10%, 1
    trainer.fit()
    events = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    trained = [e for e in events if e["split"] == "val"][-1]
    assert trained["fd_pixels"] < 0.3 * untrained["fd_pixels"], (untrained, trained)
    assert trained["fd_judge"] < 0.1 * untrained["fd_judge"], (untrained, trained)
    assert trained["class_acc"] > 30 and trained["is_judge"] > 3, trained  # measured: about 52% and 6
    assert (tmp_path / "samples" / "step_00000300.png").exists()
    best = (tmp_path / "checkpoints" / "best").read_text().strip()
    assert json.loads((tmp_path / "checkpoints" / best / "metrics.json").read_text())["fd_judge"] == trained["fd_judge"]


def test_dis_step_gen_step_and_lazy_r1_take_the_expected_optimizer_steps(tmp_path):
    from vistrain.engine import checkpoint_files as ckpt_lib

    cfg = load_config(DIGITS, [
        f"run.out_dir={tmp_path}", "run.loggers=[]", "train.max_steps=4", "train.batch_size=8",
        "train.eval_every=4", "train.ckpt_every=4", "data.resolution=16", "data.num_workers=0",
        "model.generator.base_channels=8", "model.discriminator.base_channels=8", "gan.fd_samples=16",
        "gan.dis_step=2", "gan.gen_step=1", "gan.loss_weight.r1_gamma=0.1", "gan.r1_interval=2",
    ])
    trainer = make_trainer(cfg, DistContext(0, 1, 0, torch.device("cpu")))
    trainer.fit()
    # Each D update draws its own batch; G and R1 reuse D's: 2 batches of 8 per step, 4 steps.
    assert trainer.task.reals.position == 4 * 2 * 8
    _, _, state = ckpt_lib.load_checkpoint(tmp_path / "checkpoints" / "step_00000004")
    adam_steps = {name: int(next(iter(opt["state"].values()))["step"]) for name, opt in state["optimizers"].items()}
    assert adam_steps == {"d": 4 * 2 + 2, "g": 4}  # 2 D updates per step + R1 at steps 0 and 2


def test_the_judge_refuses_other_data_and_without_eval_metrics_best_is_fd_pixels(tmp_path):
    import numpy as np
    from PIL import Image

    folder = tmp_path / "images" / "blobs"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(24):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    overrides = [
        f"run.out_dir={tmp_path / 'run'}", "run.loggers=[]", "data.name=image_folder",
        f"data.root={tmp_path / 'images'}", "data.channels=3", "data.resolution=16", "data.num_workers=0",
        "train.batch_size=8", "model.generator.base_channels=8", "model.discriminator.base_channels=8",
        "gan.fd_samples=16",
    ]
    cpu = DistContext(0, 1, 0, torch.device("cpu"))
    with pytest.raises(ConfigError, match="only knows digits"):  # digits.yaml asks for the judge
        make_trainer(load_config(DIGITS, overrides), cpu)
    trainer = make_trainer(load_config(DIGITS, [*overrides, "eval.metrics=[]"]), cpu)
    assert trainer.task.best_metric == ("fd_pixels", "min")
    assert set(trainer.task.evaluate(0).metrics) == {"fd_pixels"}
