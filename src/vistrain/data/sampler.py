"""The order in which a training run visits its data: a pure function of (seed, position).

The training stream is endless: position p of the stream is item ``perm(seed, e)[p % N]`` of the data set,
where ``e = p // N`` is the epoch and ``perm(seed, e)`` one random permutation per epoch, the same on every
rank. A run's progress through its data is therefore one integer -- how many items of the stream all ranks
together have consumed -- and a resumed run sees exactly the items it would have seen had it never stopped,
whatever the number of loader workers, how far they had prefetched, or (with the same global batch) how many
ranks it now runs on. (VAR's infinite sampler ignores its saved position; this one has no other state.)

Each key is ``(dataset_index, sample_seed)``. The sample seed is a hash of (seed, position), so a random
augmentation of an item is reproducible and differs between epochs.
"""

from __future__ import annotations

import torch

_MASK64 = (1 << 64) - 1
# Distinct domain tags keep the permutation seeds and the per-sample seeds statistically independent.
_PERMUTATION_TAG = 0x5045524D  # "PERM"
_SAMPLE_TAG = 0x53414D50  # "SAMP"


def _splitmix64(x: int) -> int:
    """One round of the splitmix64 finaliser: a cheap, well-mixed 64-bit integer hash."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def hash_ints(*values: int) -> int:
    """Hash a tuple of (possibly negative) ints to a 64-bit non-negative int, identically on every machine.

    Python's built-in ``hash`` is salted per process for strings and not meant to be stable; this is.
    """
    h = 0
    for v in values:
        h = _splitmix64(h ^ (v & _MASK64))
    return h


class StreamOrder:
    """Stream position -> ``(dataset_index, sample_seed)`` for a data set of ``dataset_len`` items.

    ``shuffle=False`` keeps the data set's order (debugging, tests). ``stream`` tells apart two streams over
    the same data with the same seed (a task that draws two independent streams).
    """

    def __init__(self, dataset_len: int, seed: int, shuffle: bool = True, stream: int = 0) -> None:
        if dataset_len < 1:
            raise ValueError(f"a training stream needs a non-empty data set, got {dataset_len} items")
        self.dataset_len = dataset_len
        self.seed = seed
        self.shuffle = shuffle
        self.stream = stream
        # A cache of the latest epoch's permutation, not state: keys() stays a pure function of its
        # arguments; the cache only avoids a randperm(N) per batch (N is 1.28M for ImageNet).
        self._cached_epoch: int | None = None
        self._cached_perm: torch.Tensor | None = None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if self._cached_epoch != epoch:
            if self.shuffle:
                # Seeded from (seed, epoch) only -- never the rank -- so all ranks agree on the order.
                g = torch.Generator().manual_seed(hash_ints(_PERMUTATION_TAG, self.seed, self.stream, epoch) >> 1)
                self._cached_perm = torch.randperm(self.dataset_len, generator=g)
            else:
                self._cached_perm = torch.arange(self.dataset_len)
            self._cached_epoch = epoch
        assert self._cached_perm is not None
        return self._cached_perm

    def keys(self, start: int, count: int) -> list[tuple[int, int]]:
        """The keys of stream positions ``[start, start + count)``; may span an epoch boundary."""
        if start < 0 or count < 0:
            raise ValueError(f"stream positions must be >= 0, got start={start}, count={count}")
        keys = []
        for pos in range(start, start + count):
            epoch, offset = divmod(pos, self.dataset_len)
            index = int(self._permutation(epoch)[offset])
            # 31 bits: fits every RNG's seed type, including numpy's and a C int.
            keys.append((index, hash_ints(_SAMPLE_TAG, self.seed, self.stream, pos) >> 33))
        return keys


def split_key(key: int | tuple[int, int]) -> tuple[int, int | None]:
    """Split a dataset key into ``(index, sample_seed)``.

    Datasets accept either a plain index (evaluation, visualisation: no random augmentation, seed None) or
    the ``(index, sample_seed)`` pairs of a training stream (augmentation drawn from the seed).
    """
    if isinstance(key, tuple):
        index, sample_seed = key
        return int(index), int(sample_seed)
    return int(key), None
