"""The training stream: what a resumed or distributed run sees must be exactly the reference stream."""

import itertools

import pytest
import torch

from vistrain.data.loader import MicroBatchStream
from vistrain.data.sampler import StreamOrder, split_key


class Keys(torch.utils.data.Dataset):
    """Items are their own keys, so a stream shows exactly which (index, seed) it visited."""

    def __len__(self):
        return 21

    def __getitem__(self, key):
        return key


def stream(micro, rank=0, world=1, seed=3, n=21, workers=0):
    ds = Keys() if n == 21 else torch.utils.data.Subset(Keys(), range(n))
    return MicroBatchStream(ds, StreamOrder(n, seed), micro, rank, world, workers, collate_fn=list)


def take(s, n):
    return list(itertools.islice(s, n))


def test_rank_slices_partition_each_global_micro_batch():
    single = take(stream(8), 7)  # 56 positions: crosses two epoch boundaries of 21 items
    ranks = [take(stream(2, rank=r, world=4), 7) for r in range(4)]
    for m in range(7):
        assert sum((ranks[r][m] for r in range(4)), []) == single[m]


def test_every_index_once_per_epoch_and_fresh_seeds():
    order = StreamOrder(21, seed=0)
    for epoch in range(3):
        keys = order.keys(epoch * 21, 21)
        assert sorted(i for i, _ in keys) == list(range(21))
    seeds = [s for _, s in order.keys(0, 63)]
    assert len(set(seeds)) == 63  # a repeated item still gets a fresh augmentation


def test_resume_from_a_saved_position_continues_the_stream_exactly():
    fresh = take(stream(3, rank=1, world=2, seed=7, workers=2), 12)
    for k in (1, 5, 8):
        s = stream(3, rank=1, world=2, seed=7)
        take(s, k)
        state = s.state_dict()
        assert state == {"position": k * 3 * 2}  # items consumed by all ranks together
        resumed = stream(3, rank=1, world=2, seed=7)
        resumed.load_state_dict(state)
        assert take(resumed, 12 - k) == fresh[k:]


def test_another_world_size_sees_the_same_items_per_global_batch():
    # Global batch 8: 2 ranks x 4 items, or 1 rank x 2 micro-batches of 4: the same 8 items per step.
    two = [take(stream(4, rank=r, world=2), 6) for r in range(2)]
    one = take(stream(4), 12)
    for step in range(6):
        assert two[0][step] + two[1][step] == one[2 * step] + one[2 * step + 1]
    # and a run that saved on 2 ranks continues on 1 rank where it stopped
    saved = stream(4, rank=0, world=2)
    take(saved, 3)
    resumed = stream(4)
    resumed.load_state_dict(saved.state_dict())
    assert take(resumed, 2) == one[6:8]


def test_epochs_and_seeds_and_streams_permute_differently():
    order = StreamOrder(100, seed=0)
    epoch0, epoch1 = order.keys(0, 100), order.keys(100, 100)
    assert [i for i, _ in epoch0] != [i for i, _ in epoch1]
    assert [i for i, _ in StreamOrder(100, seed=1).keys(0, 100)] != [i for i, _ in epoch0]
    assert [i for i, _ in StreamOrder(100, seed=0, stream=1).keys(0, 100)] != [i for i, _ in epoch0]
    seed_of = [dict(keys) for keys in (epoch0, epoch1)]
    assert sum(seed_of[0][i] != seed_of[1][i] for i in range(100)) == 100


def test_stream_does_not_depend_on_global_rng_or_instance():
    torch.manual_seed(1)
    a = take(stream(2, rank=2, world=4, seed=5), 12)
    torch.manual_seed(2)
    state = torch.get_rng_state()
    b = take(stream(2, rank=2, world=4, seed=5), 12)
    assert a == b
    assert torch.equal(state, torch.get_rng_state())
    order = StreamOrder(21, seed=5)  # keys() is a pure function: asked out of order, the same answer
    assert [order.keys(p, 1)[0] for p in (40, 3, 17)] == [StreamOrder(21, 5).keys(0, 41)[p] for p in (40, 3, 17)]


def test_sample_seeds_are_31_bit_non_negative():
    assert all(0 <= s < 2**31 for _, s in StreamOrder(30, seed=-4).keys(0, 90))


def test_no_shuffle_keeps_dataset_order():
    order = StreamOrder(5, seed=0, shuffle=False)
    assert [i for i, _ in order.keys(0, 12)] == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1]


def test_invalid_arguments_are_refused_with_reasons():
    with pytest.raises(ValueError, match="non-empty data set"):
        StreamOrder(0, seed=0)
    with pytest.raises(ValueError, match="data.num_workers=-1"):
        MicroBatchStream(Keys(), StreamOrder(21, 0), 4, 0, 1, num_workers=-1)
    with pytest.raises(ValueError, match="micro-batch size"):
        MicroBatchStream(Keys(), StreamOrder(21, 0), 0, 0, 1, num_workers=0)


def test_split_key_accepts_int_and_pair():
    assert split_key(3) == (3, None)
    assert split_key((3, 11)) == (3, 11)
