"""Logging sinks: console line, metrics.jsonl, TensorBoard events, W&B offline runs."""

from __future__ import annotations

import json

import numpy as np
import pytest

from vistrain.engine.loggers import (
    ConsoleLogger,
    JsonlLogger,
    LoggerGroup,
    TensorBoardLogger,
    build_loggers,
    format_number,
)
from vistrain.engine.meters import ETA


def test_console_line_has_step_metrics_speed_and_eta(capsys):
    clock = iter([0.0, 10.0])

    class FakeClockETA(ETA):
        def update(self, step, now=None):
            super().update(step, now=next(clock))

    log = ConsoleLogger(max_steps=2000, eta=FakeClockETA(2000, warmup_steps=0))
    log.log_metrics(100, "train", {"d_loss": 1.23456, "g_loss": 0.98})
    log.log_metrics(120, "train", {"d_loss": 1.2, "g_loss": 0.5})  # 20 steps in 10 s
    log.log_metrics(120, "val", {"fid": 12.3456})
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "step 100/2000 (5%) | d_loss 1.235 g_loss 0.98 | ETA --:--"
    assert lines[1] == "step 120/2000 (6%) | d_loss 1.2 g_loss 0.5 | 2 steps/s | ETA 0:15:40"
    assert lines[2] == "[val] step 120/2000 | fid 12.35"


def test_format_number_is_compact():
    assert format_number(0.0001234567) == "0.0001235"
    assert format_number(123456.0) == "1.235e+05"
    assert format_number(float("nan")) == "nan"
    assert format_number(7) == "7"


def test_jsonl_lines_parse_append_on_reopen_and_nan_is_null(tmp_path):
    log = JsonlLogger(tmp_path)
    log.log_metrics(10, "train", {"loss": 0.5, "bad": float("nan"), "big": float("inf")})
    # flushed at each write: readable before close
    first = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert first["step"] == 10 and first["split"] == "train" and first["loss"] == 0.5
    assert first["bad"] is None and first["big"] is None and isinstance(first["time"], float)
    log.close()

    resumed = JsonlLogger(tmp_path)  # a resumed run appends
    resumed.log_metrics(20, "val", {"fid": 3.0})
    resumed.close()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["split"]) for r in records] == [(10, "train"), (20, "val")]


def test_jsonl_recovers_from_a_half_written_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "split": "train"}\n{"step": 2, "spl')
    log = JsonlLogger(tmp_path)
    log.log_metrics(3, "train", {"loss": 1.0})
    log.close()
    last = (tmp_path / "metrics.jsonl").read_text().splitlines()[-1]
    assert json.loads(last)["step"] == 3


def test_jsonl_refuses_reserved_metric_names(tmp_path):
    log = JsonlLogger(tmp_path)
    with pytest.raises(ValueError, match="step"):
        log.log_metrics(1, "train", {"step": 1.0})
    log.close()


def test_tensorboard_writes_scalars_and_images(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = TensorBoardLogger(tmp_path)
    log.log_metrics(5, "train", {"loss": 0.25})
    log.log_images(5, "samples", np.zeros((4, 6, 3), dtype=np.uint8))
    log.close()
    events = list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert events
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    scalars = acc.Scalars("train/loss")
    assert [(s.step, s.value) for s in scalars] == [(5, 0.25)]
    assert acc.Images("samples")[0].width == 6


def test_unknown_logger_lists_valid_names(tmp_path):
    with pytest.raises(ValueError, match="console, jsonl, tensorboard, wandb"):
        build_loggers(["console", "mlflow"], tmp_path, {}, 10)
    assert not (tmp_path / "metrics.jsonl").exists()  # nothing built before the check


def test_empty_names_give_a_silent_group(tmp_path, capsys):
    group = build_loggers([], tmp_path, {}, 10)  # what ranks other than 0 get
    group.log_metrics(1, "train", {"loss": 1.0})
    group.close()
    assert capsys.readouterr().out == ""
    assert list(tmp_path.iterdir()) == []


def test_group_fans_out_and_closes_all(tmp_path, capsys):
    with build_loggers(["console", "jsonl", "jsonl"], tmp_path, {}, 10) as group:
        assert len(group.sinks) == 2
        group.log_metrics(1, "train", {"loss": 2.0})
        group.log_images(1, "samples", np.zeros((2, 2, 3), dtype=np.uint8))  # no-op for these sinks
    assert "loss 2" in capsys.readouterr().out
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["loss"] == 2.0
    assert group.sinks == []


def test_group_close_continues_after_a_failing_sink():
    closed = []

    class Broken(ConsoleLogger):
        def close(self):
            raise RuntimeError("boom")

    class Tracker(ConsoleLogger):
        def close(self):
            closed.append(True)

    group = LoggerGroup([Broken(1), Tracker(1)])
    with pytest.raises(RuntimeError, match="boom"):
        group.close()
    assert closed == [True]


def test_wandb_offline_run_and_id_reused_on_resume(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    config = {"task": "gan", "train": {"max_steps": 10}}
    group = build_loggers(["wandb"], tmp_path, config, 10, run_name="test")
    group.log_metrics(1, "train", {"loss": 0.5})
    group.log_images(1, "samples", np.zeros((4, 4, 3), dtype=np.uint8))
    group.close()
    run_id = (tmp_path / "wandb_run_id.txt").read_text().strip()
    assert run_id
    run_dirs = list((tmp_path / "wandb").glob(f"offline-run-*-{run_id}"))
    assert run_dirs and any(run_dirs[0].rglob("*.wandb"))

    group = build_loggers(["wandb"], tmp_path, config, 10)  # resumed run
    assert group.sinks[0].run_id == run_id
    group.close()
