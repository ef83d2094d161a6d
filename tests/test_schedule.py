"""lr / wd schedules: values pinned at warmup start, end of warmup, middle, end and past the end."""

import math

import pytest

from vistrain.engine.schedule import SCHEDULES, ScheduleConfig, lr_factor, validate, weight_decay_at


def f(step, max_steps=110, **kw):
    return lr_factor(ScheduleConfig(**kw), step, max_steps)


def test_cosine_warmup_then_cosine_to_floor():
    kw = dict(name="cosine", warmup_steps=10, end_ratio=0.1)
    assert f(0, **kw) == pytest.approx(0.1)  # nanoVLM: (step+1)/warmup, never exactly 0
    assert f(4, **kw) == pytest.approx(0.5)
    assert f(9, **kw) == pytest.approx(1.0)
    assert f(10, **kw) == pytest.approx(1.0)
    assert f(35, **kw) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert f(60, **kw) == pytest.approx(0.55)
    assert f(110, **kw) == pytest.approx(0.1)
    assert f(5000, **kw) == pytest.approx(0.1)  # held at the floor past the end


def test_cos_is_cosine():
    for step in (0, 7, 33, 80, 109, 200):
        assert f(step, name="cos", warmup_steps=10, end_ratio=0.01) == f(
            step, name="cosine", warmup_steps=10, end_ratio=0.01
        )


def test_warmup_start_ratio_and_never_zero():
    kw = dict(name="constant", warmup_steps=100, warmup_start_ratio=0.005)
    assert f(0, 1000, **kw) == pytest.approx(0.005 + 0.995 / 100)
    assert f(49, 1000, **kw) == pytest.approx(0.005 + 0.995 * 0.5)
    assert f(99, 1000, **kw) == pytest.approx(1.0)
    values = [f(s, 1000, **kw) for s in range(101)]
    assert values == sorted(values)
    for name in SCHEDULES:
        extra = dict(step_size=5) if name == "step" else {}
        assert f(0, 1000, name=name, warmup_steps=50, **extra) > 0.0


def test_warmup_frac_and_warmup_steps_wins():
    assert f(0, 1000, name="constant", warmup_frac=0.03) == pytest.approx(1 / 30)
    assert f(29, 1000, name="constant", warmup_frac=0.03) == pytest.approx(1.0)
    assert f(0, 1000, name="constant", warmup_frac=0.5, warmup_steps=5) == pytest.approx(0.2)
    assert f(0, 1000, name="constant") == 1.0  # no warmup at all


@pytest.mark.parametrize(
    "name,extra,hold_end",
    [("lin0", {}, 50), ("lin", {}, 150), ("linT", {"hold_frac": 0.5}, 500)],
)
def test_hold_then_linear(name, extra, hold_end):
    kw = dict(name=name, end_ratio=0.01, **extra)
    assert f(0, 1000, **kw) == 1.0
    assert f(hold_end - 1, 1000, **kw) == 1.0
    assert f(hold_end, 1000, **kw) == pytest.approx(1.0)
    mid = (hold_end + 1000) // 2  # halfway along the decay
    assert f(mid, 1000, **kw) == pytest.approx(0.505)
    assert f(1000, 1000, **kw) == pytest.approx(0.01)
    assert f(4000, 1000, **kw) == pytest.approx(0.01)


def test_lin0_with_warmup_counts_hold_after_warmup():
    kw = dict(name="lin0", warmup_steps=100, end_ratio=0.1, warmup_start_ratio=0.005)
    assert f(100, 1100, **kw) == 1.0
    assert f(149, 1100, **kw) == 1.0  # 5% of the 1000 post-warmup steps
    assert f(1100, 1100, **kw) == pytest.approx(0.1)


def test_linear_and_constant():
    assert f(25, 100, name="linear", end_ratio=0.0) == pytest.approx(0.75)
    assert f(100, 100, name="linear", end_ratio=0.0) == pytest.approx(0.0)
    assert f(70, 120, name="linear", warmup_steps=20, end_ratio=0.2) == pytest.approx(0.6)
    kw = dict(name="constant", warmup_steps=4)
    assert [f(s, 100, **kw) for s in (0, 1, 2, 3, 50, 1000)] == pytest.approx([0.25, 0.5, 0.75, 1, 1, 1])


def test_step_schedule():
    kw = dict(name="step", step_size=10, gamma=0.5)
    assert [f(s, 100, **kw) for s in (0, 9, 10, 25, 99)] == pytest.approx([1, 1, 0.5, 0.25, 0.5**9])
    with pytest.raises(ValueError, match="step_size"):
        f(3, 100, name="step")


def test_weight_decay_cosine_from_base_to_end():
    cfg = ScheduleConfig(wd_end=0.2)
    assert weight_decay_at(cfg, 0.05, 0, 100) == pytest.approx(0.05)
    assert weight_decay_at(cfg, 0.05, 50, 100) == pytest.approx(0.125)
    assert weight_decay_at(cfg, 0.05, 100, 100) == pytest.approx(0.2)
    assert weight_decay_at(cfg, 0.05, 300, 100) == pytest.approx(0.2)
    assert weight_decay_at(ScheduleConfig(), 0.05, 70, 100) == 0.05


def test_validate_errors_name_the_problem():
    with pytest.raises(ValueError, match="'cosin'.*cosine, cos, linear, lin0"):
        validate(ScheduleConfig(name="cosin"))
    with pytest.raises(ValueError, match="'cosin'"):
        f(0, name="cosin")
    with pytest.raises(ValueError, match="warmup_steps"):
        validate(ScheduleConfig(warmup_steps=-1))
    with pytest.raises(ValueError, match="end_ratio"):
        validate(ScheduleConfig(end_ratio=1.5))
    with pytest.raises(ValueError, match="step_size"):
        validate(ScheduleConfig(name="step"))
    with pytest.raises(ValueError, match="max_steps"):
        f(0, 0)
    validate(ScheduleConfig(name="linT", hold_frac=0.3, warmup_frac=0.03, wd_end=0.1))
