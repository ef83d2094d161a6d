"""EMA: beta from a half-life in images, the update rule, buffers, wrapped models."""

import copy

import pytest
import torch
from torch import nn

from vistrain.engine.ema import ema_beta, update_ema


def test_beta_values():
    assert ema_beta(32, 10.0, None, 0) == pytest.approx(0.5 ** (32 / 10_000))
    assert ema_beta(32, 10.0, 0.05, 1000) == pytest.approx(0.5 ** (32 / 50))  # ramp-up caps the half-life
    assert ema_beta(32, 10.0, 0.05, 10_000_000) == pytest.approx(0.5 ** (32 / 10_000))
    assert ema_beta(32, 10.0, 0.05, 0) == 0.0  # first update copies the model


def test_half_life_means_half_after_that_many_images():
    beta = ema_beta(100, 1.0, None, 0)
    assert beta**10 == pytest.approx(0.5)  # 10 steps x 100 images = 1 kimg


def test_beta_argument_errors():
    with pytest.raises(ValueError, match="rampup"):
        ema_beta(32, 10.0, 0.0, 100)
    with pytest.raises(ValueError, match="batch_size"):
        ema_beta(0, 10.0, None, 100)


def tiny():
    return nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))


def test_update_math_and_buffers_copied():
    model = tiny()
    ema = copy.deepcopy(model)
    with torch.no_grad():
        for p in ema.parameters():
            p.fill_(0.0)
        for p in model.parameters():
            p.fill_(1.0)
    model[1].running_mean.fill_(3.0)
    model[1].num_batches_tracked.fill_(7)
    update_ema(ema, model, 0.9)
    for p in ema.parameters():
        torch.testing.assert_close(p, torch.full_like(p, 0.1))
    update_ema(ema, model, 0.9)
    for p in ema.parameters():
        torch.testing.assert_close(p, torch.full_like(p, 0.19))
    torch.testing.assert_close(ema[1].running_mean, torch.full((2,), 3.0))
    assert ema[1].num_batches_tracked.item() == 7
    assert all(not p.grad_fn for p in ema.parameters())


def test_beta_zero_copies_and_one_keeps():
    model, ema = tiny(), tiny()
    update_ema(ema, model, 1.0)
    assert not torch.equal(ema[0].weight, model[0].weight)
    update_ema(ema, model, 0.0)
    assert torch.equal(ema[0].weight, model[0].weight)


class CompiledLike(nn.Module):
    """Stands in for torch.compile's wrapper (same `_orig_mod` attribute) without importing dynamo."""

    def __init__(self, module):
        super().__init__()
        self._orig_mod = module


def test_wrapped_models_and_other_dtype():
    model = tiny()
    ema = copy.deepcopy(model).double()  # an fp64 EMA of an fp32 model
    w0 = ema[0].weight.detach().clone()
    with torch.no_grad():
        model[0].weight.fill_(2.0)
    update_ema(ema, CompiledLike(model), 0.5)
    assert ema[0].weight.dtype == torch.float64
    torch.testing.assert_close(ema[0].weight, 0.5 * w0 + 1.0)
    update_ema(ema, nn.DataParallel(model), 0.5)  # DDP-style `.module` wrapper
    torch.testing.assert_close(ema[0].weight, 0.25 * w0 + 1.5)


def test_mismatched_models_are_refused():
    with pytest.raises(ValueError, match="different parameters"):
        update_ema(tiny(), nn.Sequential(nn.Linear(2, 2)), 0.5)
    with pytest.raises(ValueError, match="shape"):
        update_ema(nn.Linear(2, 3), nn.Linear(2, 2), 0.5)
