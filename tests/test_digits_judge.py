"""The digits judge: deterministic, cached (a damaged cache is retrained), accurate, and its metrics mean
what they say on real digits and on noise, at any resolution and channel count.

The judge is trained once per session (conftest's $VISTRAIN_CACHE_DIR); only the determinism test trains
a second one, and the cache tests stand a copy of the session's weights in for retraining.
"""

import os
import shutil

import pytest
import torch

from vistrain.data.digits import DigitsDataset
from vistrain.eval import digits_judge
from vistrain.eval.digits_judge import DigitsJudge, cache_path, judge_metrics


@pytest.fixture(scope="module")
def judge():
    return DigitsJudge.load()  # the session's cached judge (trained here if this test runs first)


def real(split, resolution, channels):
    ds = DigitsDataset(split, resolution, channels)
    items = [ds[i] for i in range(len(ds))]
    return torch.stack([it["image"] for it in items]), torch.stack([it["label"] for it in items])


def test_training_is_deterministic_and_leaves_the_global_rng_and_threads_alone(judge):
    torch.manual_seed(123)
    expected_draw = torch.rand(3)
    torch.manual_seed(123)
    threads = torch.get_num_threads()
    fresh = digits_judge.train_weights()
    assert torch.equal(torch.rand(3), expected_draw)
    assert torch.get_num_threads() == threads
    cached = judge.state_dict()  # trained by another call (maybe another process) with the same recipe
    assert set(fresh) == set(cached)
    assert all(torch.equal(fresh[k], cached[k]) for k in fresh)


@pytest.fixture
def counted_training(judge, monkeypatch):
    """Stand the session judge's weights in for a (seconds-long) training, counting the calls."""
    calls = []
    weights = {k: v.clone() for k, v in judge.state_dict().items()}

    def fake_train(seed=0):
        calls.append(seed)
        return {k: v.clone() for k, v in weights.items()}

    monkeypatch.setattr(digits_judge, "train_weights", fake_train)
    return calls


def test_the_judge_is_cached_atomically_and_read_back(tmp_path, judge, counted_training):
    first = DigitsJudge.load(tmp_path)
    assert counted_training == [0] and first.train_seconds is not None
    assert os.listdir(tmp_path) == [cache_path(tmp_path).name]  # no temporary file left behind
    second = DigitsJudge.load(tmp_path)
    assert counted_training == [0] and second.train_seconds is None  # read from the file
    assert all(torch.equal(v, second.state_dict()[k]) for k, v in judge.state_dict().items())
    assert not second.training and not any(p.requires_grad for p in second.parameters())


@pytest.mark.parametrize("damage", ["garbage", "truncated", "flipped_byte"])
def test_a_damaged_cache_is_retrained_and_replaced(tmp_path, judge, counted_training, damage):
    path = cache_path(tmp_path)
    tmp_path.mkdir(exist_ok=True)
    shutil.copy(cache_path(), path)
    data = bytearray(path.read_bytes())
    if damage == "garbage":
        data = bytearray(b"not a safetensors file")
    elif damage == "truncated":
        data = data[: len(data) // 2]
    else:
        data[-100] ^= 0xFF  # a weight, not the header: only the checksum notices
    path.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="retraining"):
        retrained = DigitsJudge.load(tmp_path)
    assert counted_training == [0]
    assert all(torch.equal(v, retrained.state_dict()[k]) for k, v in judge.state_dict().items())
    rewritten = digits_judge._read_weights(path)  # the good weights replaced the damaged file (checksum and all)
    assert all(torch.equal(v, rewritten[k]) for k, v in judge.state_dict().items())
    DigitsJudge.load(tmp_path)
    assert counted_training == [0]


@pytest.mark.parametrize("resolution", [8, 16, 32])
def test_val_accuracy(judge, resolution):
    assert judge.accuracy_on_val(resolution) >= 0.97


@pytest.mark.parametrize("resolution,channels", [(8, 1), (16, 1), (16, 3), (32, 1), (32, 3)])
def test_metrics_of_real_digits_against_themselves_and_of_noise(judge, resolution, channels):
    images, labels = real("val", resolution, channels)
    m = judge_metrics(judge, images, labels)
    assert abs(m["fd_judge"]) < 1e-6
    assert m["class_acc"] == pytest.approx(100 * judge.accuracy_on_val(resolution))
    assert m["is_judge"] > 8  # confident and spread over the ten classes (10 at most)
    assert set(judge_metrics(judge, images)) == {"fd_judge", "is_judge"}  # no labels, no class_acc

    g = torch.Generator().manual_seed(0)
    noise = torch.rand(500, channels, resolution, resolution, generator=g) * 2 - 1
    m_noise = judge_metrics(judge, noise, torch.arange(500) % 10)
    assert m_noise["fd_judge"] > 100
    assert 2 <= m_noise["class_acc"] <= 20
    assert m_noise["is_judge"] < 5


def test_real_train_digits_are_close_to_val_and_features_are_shaped_and_cached(judge):
    images, labels = real("train", 32, 3)
    m = judge_metrics(judge, images[:500], labels[:500])
    assert m["fd_judge"] < 10 and m["class_acc"] > 97
    assert judge.features(images[:7]).shape == (7, digits_judge.FEATURE_DIM)
    assert judge.logits(images[:7]).shape == (7, 10)
    assert judge.real_features(32) is judge.real_features(32)  # computed once per resolution
    explicit = judge_metrics(judge, images[:500], labels[:500], real_BCHW=real("val", 32, 1)[0])
    assert explicit["fd_judge"] == pytest.approx(m["fd_judge"])
