"""Metric accumulation, console smoothing, ETA and image grids."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from vistrain.engine.images import make_grid, save_png, to_uint8_hwc
from vistrain.engine.meters import ETA, MetricAccumulator, format_duration, peak_memory_mb


def test_accumulator_means_since_last_reduce_then_clears():
    acc = MetricAccumulator()
    for v in (1.0, 2.0, 6.0):
        acc.add("loss", torch.tensor(v))
    acc.add("lr", 0.5)
    acc.add("lr", 1.5)
    assert acc.reduce() == pytest.approx({"loss": 3.0, "lr": 1.0})
    assert acc.reduce() == {}  # cleared
    acc.add("loss", torch.tensor(10.0))
    assert acc.reduce() == pytest.approx({"loss": 10.0})


def test_accumulator_does_not_touch_callers_tensor_or_keep_graph():
    w = torch.tensor(2.0, requires_grad=True)
    loss = w * 1.0
    acc = MetricAccumulator()
    acc.add("loss", loss)
    acc.add("loss", torch.tensor(4.0))  # summed in place into the running total
    assert loss.item() == 2.0 and loss.requires_grad
    assert acc.reduce()["loss"] == pytest.approx(3.0)


def test_accumulator_mixes_floats_and_tensors_and_low_precision():
    acc = MetricAccumulator()
    acc.add("x", 1.0)
    acc.add("x", torch.tensor(3.0, dtype=torch.bfloat16))
    acc.add("x", torch.tensor([5.0]))  # one element, any shape
    assert acc.reduce()["x"] == pytest.approx(3.0)


def test_accumulator_rejects_non_scalar_with_a_hint():
    with pytest.raises(ValueError, match="'acc'.*sum"):
        MetricAccumulator().add("acc", torch.ones(3))


def test_accumulator_weighted_means_and_totals():
    acc = MetricAccumulator()
    # Two micro-batches of 3 and 5 tokens with loss sums 3.0 and 25.0: the token mean is 28 / 8, not (1 + 5) / 2.
    acc.add("loss", torch.tensor(3.0), weight=3)
    acc.add("loss", torch.tensor(25.0), weight=torch.tensor(5.0))
    acc.add_total("tokens", 3)
    acc.add_total("tokens", torch.tensor(5))
    assert acc.reduce() == pytest.approx({"loss": 3.5, "tokens": 8.0})
    assert acc.reduce() == {}


def test_format_duration():
    assert format_duration(3723) == "1:02:03"
    assert format_duration(605.4) == "0:10:05"
    assert format_duration(None) == "--:--"
    assert format_duration(float("inf")) == "--:--"


def test_eta_ignores_warmup_and_estimates_from_recent_steps():
    eta = ETA(total_steps=1000, warmup_steps=2)
    assert eta.format() == "--:--"
    eta.update(1, now=0.0)
    eta.update(2, now=60.0)  # first steps: compile; this update only starts the clock
    assert eta.seconds_left() is None
    eta.update(12, now=65.0)  # 0.5 s / step
    assert eta.seconds_per_step == pytest.approx(0.5)
    assert eta.steps_per_second == pytest.approx(2.0)
    assert eta.seconds_left() == pytest.approx(988 * 0.5)
    assert eta.format() == "0:08:14"
    eta.update(1000, now=600.0)
    assert eta.seconds_left() == 0.0


def test_eta_after_resume_starts_clock_late():
    eta = ETA(total_steps=200, start_step=100, warmup_steps=1)
    eta.update(100, now=0.0)  # below start_step + warmup: ignored
    eta.update(101, now=50.0)
    eta.update(111, now=60.0)
    assert eta.seconds_left() == pytest.approx(89 * 1.0)


def test_peak_memory_is_none_on_cpu():
    assert peak_memory_mb(torch.device("cpu")) is None


def test_to_uint8_maps_range_and_replicates_grey():
    x = torch.tensor([-1.0, 0.0, 1.0, 3.0]).reshape(1, 1, 2, 2)
    out = to_uint8_hwc(x)
    assert out.dtype == np.uint8 and out.shape == (1, 2, 2, 3)
    assert out[0, :, :, 0].tolist() == [[0, 128], [255, 255]]  # clipped above 1
    assert (out[..., 0] == out[..., 2]).all()


def test_make_grid_layout_and_values():
    # 5 images of 2x3 pixels, image i filled with its own value; default nrow = ceil(sqrt(5)) = 3.
    values = [-1.0, -0.5, 0.0, 0.5, 1.0]
    x = torch.stack([torch.full((3, 2, 3), v) for v in values])
    grid = make_grid(x, padding=1)
    assert grid.shape == (2 * (2 + 1) + 1, 3 * (3 + 1) + 1, 3)
    assert grid.dtype == np.uint8
    expected = [round((v + 1) * 127.5) for v in values]
    for i, want in enumerate(expected):
        row, col = divmod(i, 3)
        top, left = 1 + row * 3, 1 + col * 4
        assert (grid[top : top + 2, left : left + 3] == want).all(), i
    # padding and the empty sixth cell are black
    assert (grid[0] == 0).all() and (grid[:, 0] == 0).all()
    assert (grid[4:6, 9:12] == 0).all()


def test_make_grid_nrow_and_bad_input():
    x = torch.zeros(4, 1, 2, 2)
    assert make_grid(x, nrow=4, padding=0).shape == (2, 8, 3)
    assert make_grid(x, nrow=10, padding=0).shape == (2, 8, 3)  # never wider than the batch
    with pytest.raises(ValueError, match="C = 1 or 3"):
        make_grid(torch.zeros(2, 2, 4, 4))


def test_save_png_roundtrip_creates_folders(tmp_path):
    arr = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)
    path = tmp_path / "samples" / "step_00000010.png"
    save_png(path, arr)
    assert np.array_equal(np.asarray(Image.open(path)), arr)
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left behind
    with pytest.raises(ValueError, match="uint8"):
        save_png(path, arr.astype(np.float32))


def _reduce_worker(rank: int, init_file: str, results) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    acc = MetricAccumulator()
    if rank == 0:  # two steps, names added in another order than on rank 1
        acc.add("loss", torch.tensor(1.0))
        acc.add("acc", 0.0)
        acc.add("loss", torch.tensor(3.0))
        acc.add_total("tokens", 7)
    else:
        acc.add("acc", 1.0)
        acc.add("loss", torch.tensor(5.0))
        acc.add_total("tokens", 29)
    results.put((rank, acc.reduce()))
    dist.destroy_process_group()


def test_accumulator_reduce_averages_over_ranks(tmp_path):
    """Two gloo ranks: every rank gets the mean over all steps of all ranks."""
    import torch.multiprocessing as mp

    results = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_reduce_worker, args=(str(tmp_path / "init"), results), nprocs=2)
    got = dict(results.get() for _ in range(2))
    assert got[0] == got[1] == pytest.approx({"acc": 0.5, "loss": 3.0, "tokens": 36.0})
