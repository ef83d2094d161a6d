"""GAN losses and the R1 penalty, checked against values worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from vistrain.tasks.gan_losses import LOSSES, discriminator_loss, generator_loss, r1_penalty

REAL = torch.tensor([2.0, 0.5, -1.0])
FAKE = torch.tensor([-2.0, 0.0, 1.5])


def _softplus(v: float) -> float:
    return math.log1p(math.exp(v))


EXPECTED_D = {
    # relu(1 - real) = [0, .5, 2]; relu(1 + fake) = [0, 1, 2.5]
    "hinge": 2.5 / 3 + 3.5 / 3,
    "non_saturating": (sum(_softplus(-r) for r in (2.0, 0.5, -1.0)) / 3
                       + sum(_softplus(f) for f in (-2.0, 0.0, 1.5)) / 3),
    # (real - 1)^2 = [1, .25, 4]; fake^2 = [4, 0, 2.25]
    "least_squares": 0.5 * (5.25 / 3 + 6.25 / 3),
    "wasserstein": (-0.5 / 3) - (1.5 / 3),
}
EXPECTED_G = {
    "hinge": 0.5 / 3,
    "non_saturating": sum(_softplus(-f) for f in (-2.0, 0.0, 1.5)) / 3,
    # (fake - 1)^2 = [9, 1, .25]
    "least_squares": 0.5 * 10.25 / 3,
    "wasserstein": 0.5 / 3,
}


@pytest.mark.parametrize("kind", LOSSES)
def test_losses_match_hand_computed_values(kind: str) -> None:
    d = discriminator_loss(kind, REAL, FAKE)
    g = generator_loss(kind, FAKE)
    assert d.shape == () and g.shape == ()
    assert d.item() == pytest.approx(EXPECTED_D[kind], rel=1e-6)
    assert g.item() == pytest.approx(EXPECTED_G[kind], rel=1e-6)


@pytest.mark.parametrize("kind", LOSSES)
def test_losses_push_logits_the_right_way(kind: str) -> None:
    # D lowers its loss by raising real logits and lowering fake ones; G by raising fake logits.
    # Logits in (0, 1) are on the "wrong side" of every loss's targets and margins.
    real = torch.tensor([0.2, 0.7], requires_grad=True)
    fake = torch.tensor([0.1, 0.6], requires_grad=True)
    discriminator_loss(kind, real, fake).backward()
    assert (real.grad < 0).all()
    assert (fake.grad > 0).all()
    fake_g = torch.tensor([0.1, 0.6], requires_grad=True)
    generator_loss(kind, fake_g).backward()
    assert (fake_g.grad < 0).all()


def test_losses_accept_low_precision_logits_and_return_float32() -> None:
    d = discriminator_loss("non_saturating", REAL.bfloat16(), FAKE.bfloat16())
    assert d.dtype == torch.float32
    assert d.item() == pytest.approx(EXPECTED_D["non_saturating"], rel=1e-2)


def test_unknown_loss_kind_lists_valid_kinds() -> None:
    with pytest.raises(ValueError, match="hinge.*non_saturating.*least_squares.*wasserstein"):
        discriminator_loss("vanilla", REAL, FAKE)
    with pytest.raises(ValueError, match="valid kinds"):
        generator_loss("vanilla", FAKE)


def test_r1_of_linear_discriminator_is_squared_weight_norm() -> None:
    # D(x) = sum(w * x) has dD/dx = w for every image, so the penalty is |w|^2 whatever x is.
    torch.manual_seed(0)
    w = torch.randn(1, 2, 4, 4, requires_grad=True)
    x = torch.randn(5, 2, 4, 4, requires_grad=True)
    logits_B = (w * x).flatten(1).sum(dim=1)
    penalty = r1_penalty(logits_B, x)
    assert penalty.item() == pytest.approx(w.detach().square().sum().item(), rel=1e-6)
    # create_graph=True: the penalty back-propagates into D's parameters, d|w|^2/dw = 2w.
    penalty.backward()
    torch.testing.assert_close(w.grad, 2 * w.detach())


def test_r1_is_a_mean_over_images_of_each_images_gradient() -> None:
    # D(x) = sum(x^2) per image: gradient 2x, so the penalty is mean_i 4 |x_i|^2.
    x = torch.stack([torch.full((1, 2, 2), 1.0), torch.full((1, 2, 2), 3.0)]).requires_grad_()
    logits_B = x.square().flatten(1).sum(dim=1)
    expected = (4 * 4 * 1.0 + 4 * 4 * 9.0) / 2  # 4 pixels each: |2x|^2 = 4 * 4x^2
    assert r1_penalty(logits_B, x).item() == pytest.approx(expected)


def test_r1_explains_missing_requires_grad() -> None:
    x = torch.randn(2, 1, 4, 4)
    w = torch.randn(1, 1, 4, 4, requires_grad=True)
    with pytest.raises(ValueError, match="requires_grad_"):
        r1_penalty((w * x).flatten(1).sum(1), x)
