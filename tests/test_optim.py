"""Parameter groups (who decays, lr multipliers, freezing) and the optimizer built from them."""

import math

import pytest
import torch
from torch import nn

from vistrain.engine import optim as optim_mod
from vistrain.engine.optim import OptimConfig, apply_schedule, build_optimizer, build_param_groups
from vistrain.engine.schedule import ScheduleConfig


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.vision = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8))
        self.vision_proj = nn.Linear(8, 8, bias=False)
        self.head = nn.Linear(8, 4)
        self.gain = nn.Parameter(torch.ones(8))
        self.pos_1LC = nn.Parameter(torch.zeros(1, 3, 8))


def names_by_group(model, groups):
    name_of = {id(p): n for n, p in model.named_parameters()}
    return {g["name"]: {name_of[id(p)] for p in g["params"]} for g in groups}


DECAY = {"vision.0.weight", "vision_proj.weight", "head.weight", "pos_1LC"}
NO_DECAY = {"embed.weight", "vision.0.bias", "vision.1.weight", "vision.1.bias", "head.bias", "gain"}


def test_decay_membership():
    model = Net()
    groups = build_param_groups(model, OptimConfig(weight_decay=0.1))
    assert names_by_group(model, groups) == {"decay": DECAY, "no_decay": NO_DECAY}
    wd = {g["name"]: (g["weight_decay"], g["wd_mult"]) for g in groups}
    assert wd == {"decay": (0.1, 1.0), "no_decay": (0.0, 0.0)}


def test_no_decay_substring():
    model = Net()
    groups = build_param_groups(model, OptimConfig(weight_decay=0.1, no_decay=["pos_"]))
    assert names_by_group(model, groups) == {"decay": DECAY - {"pos_1LC"}, "no_decay": NO_DECAY | {"pos_1LC"}}


def test_lr_mult_longest_whole_component_prefix():
    model = Net()
    cfg = OptimConfig(lr=1e-3, lr_mult={"vision": 0.1, "vision.0": 0.5})
    groups = build_param_groups(model, cfg)
    by_name = names_by_group(model, groups)
    assert by_name["decay@lr_x0.5"] == {"vision.0.weight"}
    assert by_name["no_decay@lr_x0.5"] == {"vision.0.bias"}
    assert by_name["no_decay@lr_x0.1"] == {"vision.1.weight", "vision.1.bias"}
    assert "vision_proj.weight" in by_name["decay"]  # 'vision' must not match 'vision_proj'
    lrs = {g["name"]: (g["lr"], g["lr_mult"]) for g in groups}
    assert lrs["decay@lr_x0.5"] == pytest.approx((5e-4, 0.5))
    assert lrs["decay"] == pytest.approx((1e-3, 1.0))


def test_lr_mult_zero_freezes_and_frozen_params_left_out():
    model = Net()
    model.head.bias.requires_grad_(False)
    opt = build_optimizer(model, OptimConfig(lr_mult={"embed": 0.0, "vision": 0.0}))
    assert not model.embed.weight.requires_grad
    assert not any(p.requires_grad for p in model.vision.parameters())
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    frozen = [model.embed.weight, model.head.bias, *model.vision.parameters()]
    assert not any(id(p) in in_opt for p in frozen)
    assert len(in_opt) == sum(p.requires_grad for p in model.parameters()) == 4


def test_unknown_prefix_is_refused_with_top_level_names():
    with pytest.raises(ValueError, match=r"'visio'.*embed, vision, vision_proj, head, gain, pos_1LC"):
        build_param_groups(Net(), OptimConfig(lr_mult={"visio": 2.0}))
    with pytest.raises(ValueError, match="'vision.7'"):
        build_param_groups(Net(), OptimConfig(lr_mult={"vision.7": 2.0}))


def test_tied_parameter_appears_once_and_must_agree():
    model = Net()
    model.out = nn.Linear(8, 10, bias=False)
    model.out.weight = model.embed.weight  # tied, as in nanoVLM's LM head
    groups = build_param_groups(model, OptimConfig())
    all_params = [p for g in groups for p in g["params"]]
    assert len(all_params) == len({id(p) for p in all_params})
    assert any(p is model.embed.weight for p in next(g for g in groups if g["name"] == "no_decay")["params"])
    with pytest.raises(ValueError, match="shared"):
        build_param_groups(model, OptimConfig(lr_mult={"out": 0.5}))


def test_apply_schedule_sets_lr_and_wd_per_group():
    sched = ScheduleConfig(name="cosine", warmup_steps=10, end_ratio=0.1, wd_end=0.0)
    cfg = OptimConfig(lr=1e-3, weight_decay=0.1, lr_mult={"vision": 0.1}, schedule=sched)
    opt = build_optimizer(Net(), cfg)
    lr, wd = apply_schedule(opt, cfg, 60, 110)
    assert lr == pytest.approx(1e-3 * 0.55)
    assert wd == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 60 / 110)))
    got = {g["name"]: (g["lr"], g["weight_decay"]) for g in opt.param_groups}
    assert got["decay"] == pytest.approx((lr, wd))
    assert got["no_decay"] == pytest.approx((lr, 0.0))
    assert got["decay@lr_x0.1"] == pytest.approx((lr * 0.1, wd))
    assert got["no_decay@lr_x0.1"] == pytest.approx((lr * 0.1, 0.0))


def test_adamw_step_decays_only_the_decay_group():
    model = Net()
    cfg = OptimConfig(lr=0.1, weight_decay=0.5)
    opt = build_optimizer(model, cfg)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # zero gradient: only decoupled weight decay moves weights
    opt.step()
    for n, p in model.named_parameters():
        factor = 1 - 0.1 * 0.5 if n in DECAY else 1.0
        torch.testing.assert_close(p.detach(), before[n] * factor)


def test_group_keys_survive_state_dict_round_trip():
    cfg = OptimConfig(lr_mult={"head": 2.0})
    sd = build_optimizer(Net(), cfg).state_dict()
    opt = build_optimizer(Net(), cfg)
    opt.load_state_dict(sd)
    assert [(g["name"], g["lr_mult"], g["wd_mult"]) for g in opt.param_groups] == [
        (g["name"], g["lr_mult"], g["wd_mult"]) for g in sd["param_groups"]
    ]
    assert any(g["lr_mult"] == 2.0 for g in opt.param_groups)


def test_fused_choice_on_cpu(monkeypatch):
    assert not build_optimizer(Net(), OptimConfig()).param_groups[0]["fused"]  # auto: off on CPU
    model = Net()
    opt = build_optimizer(model, OptimConfig(fused=True))  # this torch has a CPU fused kernel
    assert opt.param_groups[0]["fused"]
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    monkeypatch.setattr(optim_mod, "_fused_capable_devices", lambda: {"cuda"})
    with pytest.raises(ValueError, match="optim.fused=true.*cpu"):
        build_optimizer(Net(), OptimConfig(fused=True))


def test_config_errors():
    with pytest.raises(ValueError, match="two numbers"):
        build_optimizer(Net(), OptimConfig(betas=[0.9, 0.99, 0.9]))
    with pytest.raises(ValueError, match="adamw, adam"):
        build_optimizer(Net(), OptimConfig(name="sgd"))
    with pytest.raises(ValueError, match="no trainable"):
        build_optimizer(nn.Linear(2, 2), OptimConfig(lr_mult={"": 0.0}))
    opt = build_optimizer(Net(), OptimConfig(name="adam", betas=[0.0, 0.99]))
    assert type(opt) is torch.optim.Adam and opt.param_groups[0]["betas"] == (0.0, 0.99)
