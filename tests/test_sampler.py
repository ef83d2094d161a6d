"""The infinite batch sampler: what a resumed or distributed run sees must be exactly the reference stream."""

import itertools

import pytest
import torch

from vistrain.engine.sampler import InfiniteBatchSampler, split_key


def take(sampler, n):
    return list(itertools.islice(iter(sampler), n))


def test_rank_slices_partition_each_global_batch():
    n, g, w = 21, 8, 4
    single = InfiniteBatchSampler(n, g, seed=3)
    ranks = [InfiniteBatchSampler(n, g, rank=r, world_size=w, seed=3) for r in range(w)]
    for b in range(7):  # crosses two epoch boundaries (3 batches per epoch)
        slices = [s.batch_keys(b) for s in ranks]
        assert all(len(s) == g // w for s in slices)
        assert sum(slices, []) == single.batch_keys(b)


def test_every_index_once_per_epoch_and_last_batch_filled_from_the_start():
    n, g = 21, 8  # 3 batches per epoch = 24 positions: 21 unique items + 3 wrapped
    sampler = InfiniteBatchSampler(n, g, seed=0)
    assert sampler.batches_per_epoch == 3
    for epoch in range(3):
        keys = sum((sampler.batch_keys(epoch * 3 + j) for j in range(3)), [])
        indices = [i for i, _ in keys]
        assert sorted(indices[:n]) == list(range(n))
        assert indices[n:] == indices[: g * 3 - n]  # the fill repeats the start of the same permutation
        seeds = [s for _, s in keys]
        assert len(set(seeds)) == len(seeds)  # a repeated item still gets a fresh augmentation


def test_start_batch_resumes_exactly_the_tail_of_the_stream():
    fresh = take(InfiniteBatchSampler(50, 6, rank=1, world_size=2, seed=7), 30)
    for k in (1, 8, 9, 17):
        resumed = take(InfiniteBatchSampler(50, 6, rank=1, world_size=2, seed=7, start_batch=k), 30 - k)
        assert resumed == fresh[k:]


def test_epochs_and_seeds_permute_differently():
    sampler = InfiniteBatchSampler(100, 100, seed=0)
    epoch0, epoch1 = sampler.batch_keys(0), sampler.batch_keys(1)
    assert [i for i, _ in epoch0] != [i for i, _ in epoch1]
    assert sorted(i for i, _ in epoch1) == list(range(100))
    other_seed = InfiniteBatchSampler(100, 100, seed=1).batch_keys(0)
    assert [i for i, _ in other_seed] != [i for i, _ in epoch0]
    # The same image in two epochs is augmented differently.
    seed_of = [dict(keys) for keys in (epoch0, epoch1)]
    assert sum(seed_of[0][i] != seed_of[1][i] for i in range(100)) == 100


def test_stream_does_not_depend_on_global_rng_or_instance():
    torch.manual_seed(1)
    a = take(InfiniteBatchSampler(40, 8, rank=2, world_size=4, seed=5), 12)
    torch.manual_seed(2)
    state = torch.get_rng_state()
    b = take(InfiniteBatchSampler(40, 8, rank=2, world_size=4, seed=5), 12)
    assert a == b
    assert torch.equal(state, torch.get_rng_state())
    # batch_keys is a pure function: asking out of order gives the same answer.
    s = InfiniteBatchSampler(40, 8, rank=2, world_size=4, seed=5)
    assert [s.batch_keys(b) for b in (11, 0, 6)] == [a[11], a[0], a[6]]


def test_sample_seeds_are_31_bit_non_negative():
    keys = sum(take(InfiniteBatchSampler(30, 10, seed=-4), 9), [])
    assert all(0 <= s < 2**31 for _, s in keys)


def test_no_shuffle_keeps_dataset_order():
    sampler = InfiniteBatchSampler(5, 4, shuffle=False)
    assert [i for i, _ in sampler.batch_keys(0)] == [0, 1, 2, 3]
    assert [i for i, _ in sampler.batch_keys(1)] == [4, 0, 1, 2]
    assert [i for i, _ in sampler.batch_keys(2)] == [0, 1, 2, 3]


def test_dataset_smaller_than_batch_still_gives_full_batches():
    assert len(InfiniteBatchSampler(3, 8).batch_keys(0)) == 8


def test_invalid_arguments_are_refused_with_reasons():
    with pytest.raises(ValueError, match="not divisible by the world size 4"):
        InfiniteBatchSampler(100, 10, rank=0, world_size=4)
    with pytest.raises(ValueError, match="non-empty dataset"):
        InfiniteBatchSampler(0, 4)
    with pytest.raises(ValueError, match="rank"):
        InfiniteBatchSampler(10, 4, rank=2, world_size=2)


def test_split_key_accepts_int_and_pair():
    assert split_key(3) == (3, None)
    assert split_key((3, 11)) == (3, 11)
