"""The embedded default learns: a small digits GAN cuts the pixel Fréchet distance to a fraction."""

import json
from pathlib import Path

import torch

from vistrain.config import load_config
from vistrain.engine.dist import DistContext
from vistrain.tasks import make_trainer

DIGITS = Path(__file__).resolve().parents[1] / "configs" / "gan" / "digits.yaml"


def test_digits_gan_learns(tmp_path):
    cfg = load_config(DIGITS, [
        f"run.out_dir={tmp_path}", "run.loggers=[jsonl]", "train.max_steps=300", "train.eval_every=300",
        "train.ckpt_every=300", "data.resolution=16", "data.num_workers=0", "gan.fd_samples=256",
        "model.generator.base_channels=16", "model.discriminator.base_channels=16", "gan.ema_half_life_kimg=0.5",
    ])
    trainer = make_trainer(cfg, DistContext(0, 1, 0, torch.device("cpu")))
    untrained = trainer.task.evaluate(0).metrics["fd_pixels"]
    trainer.fit()
    events = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    trained = [e for e in events if e["split"] == "val"][-1]["fd_pixels"]
    assert trained < 0.3 * untrained, (untrained, trained)
    assert (tmp_path / "samples" / "step_00000300.png").exists()


def test_dis_step_gen_step_and_lazy_r1_take_the_expected_optimizer_steps(tmp_path):
    from vistrain.engine import checkpoint as ckpt_lib

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
