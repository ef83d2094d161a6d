"""An infinite, resumable, distributed batch sampler.

Training is counted in global batches, not epochs: global batch ``b`` is a pure function of
``(seed, b)``. Resuming therefore needs one integer -- how many batches were consumed -- and a resumed run
sees exactly the data it would have seen had it never stopped, whatever the number of loader workers or
how far they had prefetched. (VAR's infinite sampler ignores its saved position; this one has no other.)

Layout of the stream, with N items and global batch G over W ranks:

    epoch e = b // ceil(N / G)           one permutation of range(N) per epoch, seeded by (seed, e) only,
                                         so every rank computes the same one without communicating
    positions [j*G, (j+1)*G) of epoch e  j = b % ceil(N / G); positions past N wrap to the start of the
                                         same permutation, so the last batch of an epoch is full too
    rank r takes [r*G/W, (r+1)*G/W)      contiguous slice: the ranks' slices partition the global batch

Each key is ``(dataset_index, sample_seed)``. The sample seed is a hash of (seed, epoch, position), so
random augmentation of an item is reproducible and differs between epochs and between a wrapped repeat and
the item's first appearance.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator

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


class InfiniteBatchSampler(torch.utils.data.Sampler):
    """Yields this rank's keys of global batch ``start_batch``, ``start_batch + 1``, ... forever.

    Args:
        dataset_len: number of items N in the dataset.
        global_batch_size: items per optimizer step over all ranks (``train.batch_size``).
        rank, world_size: this process's slice of every global batch.
        seed: the run seed; with it the whole stream is fixed.
        start_batch: number of global batches already consumed (0 for a fresh run).
        shuffle: False keeps the dataset order (useful for debugging and tests).
    """

    def __init__(
        self,
        dataset_len: int,
        global_batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        start_batch: int = 0,
        shuffle: bool = True,
    ) -> None:
        if dataset_len < 1:
            raise ValueError(f"InfiniteBatchSampler needs a non-empty dataset, got dataset_len={dataset_len}.")
        if global_batch_size < 1:
            raise ValueError(f"global batch size must be >= 1, got {global_batch_size}.")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size); got rank={rank}, world_size={world_size}.")
        if global_batch_size % world_size != 0:
            raise ValueError(
                f"global batch size {global_batch_size} is not divisible by the world size {world_size}: "
                f"every rank must get the same number of items. Set train.batch_size to a multiple of "
                f"{world_size}."
            )
        if start_batch < 0:
            raise ValueError(f"start_batch must be >= 0, got {start_batch}.")
        self.dataset_len = dataset_len
        self.global_batch_size = global_batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.start_batch = start_batch
        self.shuffle = shuffle
        self.local_batch_size = global_batch_size // world_size
        self.batches_per_epoch = math.ceil(dataset_len / global_batch_size)
        # A cache of the latest epoch's permutation, not state: batch_keys stays a pure function of its
        # argument, the cache only avoids a randperm(N) per batch (N is 1.28M for ImageNet).
        self._cached_epoch: int | None = None
        self._cached_perm: torch.Tensor | None = None

    def epoch_of(self, batch_number: int) -> int:
        """The epoch that global batch ``batch_number`` belongs to (for logging)."""
        return batch_number // self.batches_per_epoch

    def _permutation(self, epoch: int) -> torch.Tensor:
        if self._cached_epoch != epoch:
            if self.shuffle:
                # Seeded from (seed, epoch) only -- never the rank -- so all ranks agree on the order.
                g = torch.Generator().manual_seed(hash_ints(_PERMUTATION_TAG, self.seed, epoch) >> 1)
                self._cached_perm = torch.randperm(self.dataset_len, generator=g)
            else:
                self._cached_perm = torch.arange(self.dataset_len)
            self._cached_epoch = epoch
        assert self._cached_perm is not None
        return self._cached_perm

    def batch_keys(self, batch_number: int) -> list[tuple[int, int]]:
        """This rank's ``(dataset_index, sample_seed)`` keys of global batch ``batch_number``."""
        if batch_number < 0:
            raise ValueError(f"batch_number must be >= 0, got {batch_number}.")
        epoch, j = divmod(batch_number, self.batches_per_epoch)
        first = j * self.global_batch_size + self.rank * self.local_batch_size
        positions = range(first, first + self.local_batch_size)
        perm = self._permutation(epoch)
        indices = perm[torch.tensor(positions) % self.dataset_len].tolist()
        # 31 bits: fits every RNG's seed type, including numpy's and a C int.
        return [
            (index, hash_ints(_SAMPLE_TAG, self.seed, epoch, pos) >> 33)
            for index, pos in zip(indices, positions)
        ]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for b in itertools.count(self.start_batch):
            yield self.batch_keys(b)


def split_key(key: int | tuple[int, int]) -> tuple[int, int | None]:
    """Split a dataset key into ``(index, sample_seed)``.

    Datasets accept either a plain index (evaluation, visualisation: no random augmentation, seed None) or
    the ``(index, sample_seed)`` pairs this sampler yields (training: augmentation drawn from the seed).
    """
    if isinstance(key, tuple):
        index, sample_seed = key
        return int(index), int(sample_seed)
    return int(key), None
