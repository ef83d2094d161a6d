"""GAN generators / discriminators and differentiable augmentation."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file, save_file

from vistrain.models.diffaugment import diff_augment
from vistrain.models.gan import (
    DISCRIMINATORS,
    GENERATORS,
    DiscriminatorConfig,
    GeneratorConfig,
    build_discriminator,
    build_generator,
)
from vistrain.models.layers import ConditionalBatchNorm2d
from vistrain.tasks.gan_losses import discriminator_loss

PAIRS = ("dcgan", "resnet")
NUM_CLASSES = 10


def _pair(name: str, res: int, channels: int = 1, num_classes: int = 0, base: int = 8, g_sn: bool = False):
    G = build_generator(GeneratorConfig(name=name, z_dim=16, base_channels=base, spectral_norm=g_sn),
                        res, channels, num_classes)
    D = build_discriminator(DiscriminatorConfig(name=name, base_channels=base), res, channels, num_classes)
    return G, D


# --------------------------------------------------------------------------- shapes, ranges, labels


@pytest.mark.parametrize("name", PAIRS)
@pytest.mark.parametrize("res", (16, 32, 64))
@pytest.mark.parametrize("num_classes", (0, NUM_CLASSES))
def test_generator_and_discriminator_shapes_and_ranges(name: str, res: int, num_classes: int) -> None:
    torch.manual_seed(0)
    G, D = _pair(name, res, channels=3, num_classes=num_classes)
    z = torch.randn(4, G.z_dim)
    labels = torch.tensor([0, 3, 9, 3]) if num_classes else None
    img = G(z, labels)
    assert img.shape == (4, 3, res, res)
    assert img.abs().max() <= 1.0 and img.std() > 1e-3  # tanh range, and not a constant image
    logits = D(img, labels)
    assert logits.shape == (4,) and torch.isfinite(logits).all()
    assert (logits[0] != logits[1:]).all()  # each image gets its own score


@pytest.mark.parametrize("name", PAIRS)
def test_unconditional_models_ignore_labels(name: str) -> None:
    torch.manual_seed(0)
    G, D = _pair(name, 16)
    G.eval(), D.eval()  # eval: BN statistics and spectral-norm vectors stay put between the two calls
    z = torch.randn(3, G.z_dim)
    torch.testing.assert_close(G(z, torch.tensor([1, 2, 3])), G(z))
    x = torch.rand(3, 1, 16, 16) * 2 - 1
    torch.testing.assert_close(D(x, torch.tensor([1, 2, 3])), D(x))


@pytest.mark.parametrize("name", PAIRS)
def test_conditional_models_demand_labels(name: str) -> None:
    G, D = _pair(name, 16, num_classes=NUM_CLASSES)
    with pytest.raises(ValueError, match="class-conditional.*labels"):
        G(torch.randn(2, G.z_dim))
    with pytest.raises(ValueError, match="class-conditional.*labels"):
        D(torch.zeros(2, 1, 16, 16))
    with pytest.raises(ValueError, match=r"shape \[2\]"):
        G(torch.randn(2, G.z_dim), torch.tensor([1, 2, 3]))


@pytest.mark.parametrize("name", PAIRS)
def test_conditional_generator_makes_class_dependent_images(name: str) -> None:
    torch.manual_seed(0)
    G, _ = _pair(name, 16, num_classes=NUM_CLASSES)
    G.eval()
    z = torch.randn(1, G.z_dim).repeat(2, 1)
    labels = torch.tensor([2, 7])
    # Gains start at 1 and biases at 0: at initialisation the class has no effect yet ...
    img = G(z, labels)
    torch.testing.assert_close(img[0], img[1])
    # ... and once the per-class affine parameters move (as training does), the same z differs by class.
    with torch.no_grad():
        for m in G.modules():
            if isinstance(m, ConditionalBatchNorm2d) and m.num_classes:
                m.gain.weight.normal_(1.0, 0.3)
                m.bias.weight.normal_(0.0, 0.3)
    img = G(z, labels)
    assert (img[0] - img[1]).abs().mean() > 1e-2


@pytest.mark.parametrize("name", PAIRS)
def test_projection_discriminator_scores_depend_on_labels(name: str) -> None:
    torch.manual_seed(0)
    _, D = _pair(name, 16, num_classes=NUM_CLASSES)
    D.eval()
    x = torch.rand(1, 1, 16, 16).repeat(NUM_CLASSES, 1, 1, 1) * 2 - 1
    logits = D(x, torch.arange(NUM_CLASSES))
    # Same image, ten labels: ten different scores (the projection term differs per class).
    assert len(set(logits.tolist())) == NUM_CLASSES


def test_unknown_names_and_bad_resolutions_explain_themselves() -> None:
    with pytest.raises(ValueError, match="dcgan, resnet"):
        build_generator(GeneratorConfig(name="stylegan9"), 32, 1, 0)
    with pytest.raises(ValueError, match="dcgan, resnet"):
        build_discriminator(DiscriminatorConfig(name="patch"), 32, 1, 0)
    for res in (8, 24, 512):
        with pytest.raises(ValueError, match="power of two between 16 and 256"):
            build_generator(GeneratorConfig(), res, 1, 0)
        with pytest.raises(ValueError, match="power of two between 16 and 256"):
            build_discriminator(DiscriminatorConfig(), res, 1, 0)
    assert set(GENERATORS) == set(DISCRIMINATORS) == set(PAIRS)


def test_wrong_input_shapes_are_reported() -> None:
    G, D = _pair("dcgan", 32, channels=3)
    with pytest.raises(ValueError, match=r"\[B, 16\]"):
        G(torch.randn(2, 8))
    with pytest.raises(ValueError, match=r"\[B, 3, 32, 32\]"):
        D(torch.zeros(2, 1, 32, 32))


# --------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("name", PAIRS)
def test_state_dict_round_trip_through_safetensors_is_exact(name: str, tmp_path) -> None:
    torch.manual_seed(0)
    G, D = _pair(name, 16, num_classes=NUM_CLASSES, g_sn=True)  # spectral norm in both networks
    z, labels = torch.randn(4, G.z_dim), torch.tensor([0, 1, 2, 3])
    for _ in range(3):  # training-mode forwards move BN statistics and the spectral-norm u/v vectors
        D(G(z, labels), labels)
    for net_name, net in (("G", G), ("D", D)):
        state = net.state_dict()
        assert all(type(v) is torch.Tensor for v in state.values())
        assert any(k.endswith("._u") for k in state)  # power-iteration state is checkpointed
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / f"{net_name}.safetensors"))
    torch.manual_seed(123)  # a fresh model with different random weights
    G2, D2 = _pair(name, 16, num_classes=NUM_CLASSES, g_sn=True)
    G2.load_state_dict(load_file(str(tmp_path / "G.safetensors")))
    D2.load_state_dict(load_file(str(tmp_path / "D.safetensors")))
    for net in (G, D, G2, D2):
        net.eval()
    assert torch.equal(G2(z, labels), G(z, labels))
    img = G(z, labels)
    assert torch.equal(D2(img, labels), D(img, labels))


def test_generator_deepcopies_for_ema() -> None:
    G, _ = _pair("resnet", 16, g_sn=True)
    G_ema = copy.deepcopy(G).eval()
    G.eval()
    z = torch.randn(2, G.z_dim)
    assert torch.equal(G_ema(z), G(z))


# --------------------------------------------------------------------------- training sanity


def test_dcgan_discriminator_learns_to_separate_two_constant_images() -> None:
    torch.manual_seed(0)
    _, D = _pair("dcgan", 16)
    real = torch.full((8, 1, 16, 16), 0.5)
    fake = torch.full((8, 1, 16, 16), -0.5)
    opt = torch.optim.Adam(D.parameters(), lr=2e-3, betas=(0.5, 0.999))
    losses = []
    for _ in range(30):
        loss = discriminator_loss("hinge", D(real), D(fake))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    D.eval()
    assert (D(real) > D(fake)).all()


# --------------------------------------------------------------------------- DiffAugment


POLICIES = ("color", "translation", "cutout", "color,translation,cutout")


@pytest.mark.parametrize("policy", POLICIES)
def test_diff_augment_keeps_shape_passes_gradients_and_is_seeded(policy: str) -> None:
    x = torch.rand(4, 3, 16, 16, requires_grad=True)
    torch.manual_seed(5)
    y = diff_augment(x, policy)
    assert y.shape == x.shape
    y.square().sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    torch.manual_seed(5)
    assert torch.equal(diff_augment(x, policy), y)
    torch.manual_seed(6)
    assert not torch.equal(diff_augment(x, policy), y)


def test_diff_augment_empty_policy_is_identity() -> None:
    x = torch.rand(2, 3, 8, 8)
    assert torch.equal(diff_augment(x, ""), x)
    assert torch.equal(diff_augment(x, " , "), x)


def test_diff_augment_unknown_item_lists_valid_ones() -> None:
    with pytest.raises(ValueError, match="color, translation, cutout"):
        diff_augment(torch.zeros(1, 1, 8, 8), "color,flip")


def test_color_on_flat_grey_images_only_shifts_brightness() -> None:
    # A constant one-channel image has no saturation or contrast to change: only +U(-0.5, 0.5) remains.
    torch.manual_seed(0)
    x = torch.zeros(64, 1, 8, 8)
    shift = diff_augment(x, "color") - x
    per_image = shift[:, 0, 0, 0]
    torch.testing.assert_close(shift, per_image[:, None, None, None].expand_as(shift))
    assert per_image.abs().max() <= 0.5 and per_image.std() > 0.1


def test_translation_is_a_zero_padded_shift_of_at_most_an_eighth() -> None:
    torch.manual_seed(0)
    x = torch.arange(1.0, 1.0 + 32 * 32).view(1, 1, 32, 32).repeat(16, 1, 1, 1)
    y = diff_augment(x, "translation")
    for b in range(16):
        matches = []
        for dy in range(-4, 5):
            for dx in range(-4, 5):
                shifted = torch.zeros_like(x[b])
                src = x[b][:, max(0, -dy) : 32 - max(0, dy), max(0, -dx) : 32 - max(0, dx)]
                shifted[:, max(0, dy) : 32 - max(0, -dy), max(0, dx) : 32 - max(0, -dx)] = src
                matches.append(torch.equal(shifted, y[b]))
        assert sum(matches) == 1


def test_cutout_zeroes_one_square_of_half_size() -> None:
    torch.manual_seed(0)
    x = torch.ones(32, 2, 16, 16)
    y = diff_augment(x, "cutout")
    assert torch.equal(y[:, 0], y[:, 1])  # same square on every channel
    zero_B = (y[:, 0] == 0).flatten(1).sum(dim=1)
    # An 8x8 square whose centre lies in the image: at least a 4x4 corner of it, at most all of it.
    assert (zero_B >= 16).all() and (zero_B <= 64).all() and (zero_B == 64).any()
    for b in range(32):
        rows = (y[b, 0] == 0).any(dim=1).nonzero().flatten()
        cols = (y[b, 0] == 0).any(dim=0).nonzero().flatten()
        assert zero_B[b] == len(rows) * len(cols)  # the zeros form one axis-aligned rectangle
