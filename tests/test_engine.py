"""The engine on a toy task, in-process: exact resume, accumulation, non-finite skipping, preemption."""

import json
import os
import signal

import pytest
import torch

from vistrain.config import load_config
from vistrain.engine import checkpoint_files as ckpt_lib
from vistrain.engine.dist import DistContext
from vistrain.engine.trainer import Preempted, TrainingDiverged
from vistrain.registry import make_trainer

CPU = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def toy_config(out_dir, *overrides):
    base = [
        "task=support.toy_task", f"run.out_dir={out_dir}", "run.loggers=[jsonl]", "train.max_steps=20",
        "train.batch_size=32", "train.log_every=5", "train.eval_every=100", "train.ckpt_every=5",
        "train.keep_last=0", "data.num_workers=0", "optim.schedule.name=cosine", "optim.schedule.warmup_steps=3",
    ]
    return load_config(None, base + list(overrides))


def final_weights(out_dir):
    return ckpt_lib.load_weights(ckpt_lib.latest_checkpoint(out_dir / "checkpoints"))


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_resume_from_middle_checkpoint_is_bit_identical(tmp_path):
    make_trainer(toy_config(tmp_path / "a"), CPU).fit()
    middle = tmp_path / "a" / "checkpoints" / "step_00000010"
    make_trainer(toy_config(tmp_path / "b", f"run.resume={middle}"), CPU).fit()
    assert_same_weights(final_weights(tmp_path / "a"), final_weights(tmp_path / "b"))
    # and a run that skipped nothing differs from one that resumed with the wrong state
    make_trainer(toy_config(tmp_path / "c", "run.seed=1"), CPU).fit()
    assert not torch.equal(final_weights(tmp_path / "a")["net.inp.weight"],
                           final_weights(tmp_path / "c")["net.inp.weight"])


def test_a_parameter_that_never_had_a_gradient_resumes_exactly(tmp_path):
    """It has no optimizer state (Adam creates it at the first gradient): the resume must not demand one."""
    make_trainer(toy_config(tmp_path / "a", "toy.unused_param=true"), CPU).fit()
    middle = tmp_path / "a" / "checkpoints" / "step_00000010"
    make_trainer(toy_config(tmp_path / "b", "toy.unused_param=true", f"run.resume={middle}"), CPU).fit()
    assert_same_weights(final_weights(tmp_path / "a"), final_weights(tmp_path / "b"))


def test_a_crash_in_eval_loses_no_training(tmp_path):
    """The step's checkpoint is written before its eval runs: a rerun continues from it."""
    with pytest.raises(RuntimeError, match="toy eval failure at step 10"):
        make_trainer(toy_config(tmp_path, "toy.eval_fails_at_step=10", "train.eval_every=10"), CPU).fit()
    assert ckpt_lib.latest_checkpoint(tmp_path / "checkpoints").name == "step_00000010"


@pytest.mark.parametrize("async_save", [False, True])
def test_in_loop_eval_metrics_reach_the_checkpoint_and_best(tmp_path, async_save):
    make_trainer(toy_config(tmp_path, "toy.score=true", "train.eval_every=5",
                            f"train.async_checkpoint={async_save}"), CPU).fit()
    root = tmp_path / "checkpoints"
    for step in (5, 10, 15, 20):
        assert json.loads((root / f"step_{step:08d}" / "metrics.json").read_text()) == {"score": 1.0 / step}
    assert (root / "best").read_text().strip() == "step_00000020"


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    make_trainer(toy_config(tmp_path / "big", "toy.dropout=0.0"), CPU).fit()
    make_trainer(toy_config(tmp_path / "acc", "toy.dropout=0.0", "train.micro_batch_size=8"), CPU).fit()
    a, b = final_weights(tmp_path / "big"), final_weights(tmp_path / "acc")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


def test_non_finite_steps_are_skipped_then_training_stops_with_last_good_checkpoint(tmp_path):
    trainer = make_trainer(toy_config(tmp_path, "toy.nan_from_step=7", "train.max_nonfinite_steps=3"), CPU)
    before = None
    with pytest.raises(TrainingDiverged) as e:
        trainer.fit()
    assert "3 optimizer steps in a row" in str(e.value) and "step_00000005" in str(e.value)
    latest = ckpt_lib.latest_checkpoint(tmp_path / "checkpoints")
    assert latest.name == "step_00000005"
    weights, _, state = ckpt_lib.load_checkpoint(latest)
    assert state["step"] == 5 and all(torch.isfinite(v).all() for v in weights.values())
    # the skipped steps left the weights untouched: they are still those of the last good step
    live = {f"net.{k}": v for k, v in trainer.task.nets["net"].state_dict().items()}
    assert all(torch.isfinite(v).all() for v in live.values())
    del before


def test_sigterm_checkpoints_the_current_step_and_resume_continues_exactly(tmp_path, monkeypatch):
    make_trainer(toy_config(tmp_path / "full"), CPU).fit()

    trainer = make_trainer(toy_config(tmp_path / "pre"), CPU)
    original = trainer.task.on_step_end

    def on_step_end(step):
        original(step)
        if step == 7:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(trainer.task, "on_step_end", on_step_end)
    with pytest.raises(Preempted) as e:
        trainer.fit()
    assert e.value.checkpoint.name == "step_00000007"
    make_trainer(toy_config(tmp_path / "pre"), CPU).fit()  # run.resume=auto
    assert_same_weights(final_weights(tmp_path / "full"), final_weights(tmp_path / "pre"))


def test_schedule_reaches_the_optimizer_and_metrics_are_logged(tmp_path):
    import json

    make_trainer(toy_config(tmp_path), CPU).fit()
    events = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [e for e in events if e["split"] == "train"]
    assert [e["step"] for e in train] == [5, 10, 15, 20]
    lrs = [e["lr/main"] for e in train]
    assert lrs == sorted(lrs, reverse=True) and lrs[0] < 1e-2  # cosine decay below the peak
    for key in ("loss", "grad_norm/main", "time/step_s", "time/data_s", "samples_per_s", "wd/main"):
        assert key in train[-1]
    assert train[-1]["loss"] < train[0]["loss"]


def test_keep_last_prunes_but_keeps_latest(tmp_path):
    make_trainer(toy_config(tmp_path, "train.keep_last=2"), CPU).fit()
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert names == ["step_00000015", "step_00000020"]
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_00000020"


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_and_resumes_exactly(tmp_path, precision):
    make_trainer(toy_config(tmp_path / "a", f"train.precision={precision}"), CPU).fit()
    middle = tmp_path / "a" / "checkpoints" / "step_00000010"
    _, _, state = ckpt_lib.load_checkpoint(middle)
    if precision == "fp16":  # the GradScaler's scale and growth tracker are part of the checkpoint
        assert state["scalers"]["main"]["scale"] > 0
    else:
        assert state["scalers"]["main"] == {}
    make_trainer(toy_config(tmp_path / "b", f"train.precision={precision}", f"run.resume={middle}"), CPU).fit()
    assert_same_weights(final_weights(tmp_path / "a"), final_weights(tmp_path / "b"))


def test_random_seed_is_drawn_recorded_and_kept_on_resume(tmp_path):
    from omegaconf import OmegaConf

    make_trainer(toy_config(tmp_path, "run.seed=random", "train.max_steps=5"), CPU).fit()
    seed = OmegaConf.load(tmp_path / "config.yaml").run.seed
    assert isinstance(seed, int)
    _, _, state = ckpt_lib.load_checkpoint(tmp_path / "checkpoints" / "step_00000005")
    assert state["seed"] == seed
    resumed = make_trainer(toy_config(tmp_path, "run.seed=random", "train.max_steps=10"), CPU)
    assert resumed.seed == seed


def test_profile_writes_a_trace_of_the_requested_steps(tmp_path):
    make_trainer(toy_config(tmp_path, "train.profile=true", "train.profile_start=2", "train.profile_steps=3"),
                 CPU).fit()
    traces = list((tmp_path / "profile").glob("*.json"))
    assert [t.name for t in traces] == ["trace_rank0_steps2-5.json"]
    assert traces[0].stat().st_size > 1000


def test_an_external_frozen_network_is_neither_saved_nor_loaded(tmp_path):
    make_trainer(toy_config(tmp_path / "a", "toy.teacher=true"), CPU).fit()
    weights = final_weights(tmp_path / "a")
    assert weights and not any(k.startswith("teacher.") for k in weights)
    # A resume rebuilds the teacher as the task loads it, and the run continues exactly.
    middle = tmp_path / "a" / "checkpoints" / "step_00000010"
    make_trainer(toy_config(tmp_path / "b", "toy.teacher=true", f"run.resume={middle}"), CPU).fit()
    assert_same_weights(weights, final_weights(tmp_path / "b"))


def test_tokens_per_second_and_mfu_come_from_what_the_task_reports(tmp_path):
    import json

    make_trainer(toy_config(tmp_path, "toy.flops_per_token=1e6", "train.peak_tflops=0.5"), CPU).fit()
    train = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    last = train[-1]
    assert last["tokens_per_s"] == pytest.approx(4 * last["samples_per_s"])
    assert last["mfu"] == pytest.approx(1e6 * last["tokens_per_s"] / 0.5e12)
