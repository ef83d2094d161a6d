"""Data sets and the resumable training stream of micro-batches.

Reproducibility contract the trainer relies on:
- the training stream is fixed by (seed, items consumed): a resumed run restores the position and the
  stream continues with exactly the next micro-batch;
- augmentation draws only from the per-item sample seed, so num_workers and prefetching change nothing;
- creating or iterating a loader never draws from the global torch RNG (each loader has its own
  generator), so resuming does not shift the model's dropout / noise streams.
"""

from __future__ import annotations

import functools
import itertools
import random
from collections.abc import Callable, Iterator
from typing import Any, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from vistrain.data.data_config import ImageDataConfig
from vistrain.data.digits import DigitsDataset
from vistrain.data.images import ImageFolderDataset, discover_classes
from vistrain.data.sampler import StreamOrder, hash_ints

DATASET_NAMES = ("digits", "image_folder")
_LOADER_TAG = 0x4C4F4144  # "LOAD"
_WORKER_TAG = 0x574F524B  # "WORK"


def build_image_dataset(cfg: ImageDataConfig, split: str) -> Dataset:
    """The ``split`` ("train" | "val") of the image data set that ``cfg`` names; flips only in training."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}.")
    train = split == "train"
    if cfg.name == "digits":
        return DigitsDataset(split, cfg.resolution, cfg.channels, hflip=cfg.hflip and train)
    if cfg.name == "image_folder":
        if not cfg.root:
            raise ValueError(
                "data.name=image_folder needs data.root: a folder of class sub-folders (ImageNet layout) or "
                "of images. Set data.root=/path/to/images."
            )
        if train or not cfg.val_root:
            return ImageFolderDataset(cfg.root, cfg.resolution, cfg.channels, train=train, hflip=cfg.hflip and train)
        # A separate validation folder must label classes exactly as the training folder does.
        return ImageFolderDataset(
            cfg.val_root, cfg.resolution, cfg.channels, train=False, classes=discover_classes(cfg.root)
        )
    raise ValueError(f"unknown data.name={cfg.name!r}; valid names: {', '.join(DATASET_NAMES)}.")


def check_enough_data(dataset: Dataset, global_batch_size: int, what: str) -> None:
    """Refuse a data set smaller than one global batch, instead of training on a batch of repeats."""
    n = len(dataset)  # type: ignore[arg-type]
    if n < global_batch_size:
        raise ValueError(
            f"{what} has {n} items, fewer than one global batch (train.batch_size={global_batch_size}, summed "
            f"over all ranks). Lower train.batch_size so that one global batch fits in {n} items, or add data."
        )


def _seed_worker(worker_id: int, seed: int, rank: int) -> None:
    """Seed python, numpy and torch in a loader worker from (seed, rank, worker_id).

    Our data sets draw augmentation from the sample seed only; this makes any other randomness (a user's
    transform calling np.random, say) reproducible too, and distinct across ranks and workers.
    """
    s = hash_ints(_WORKER_TAG, seed, rank, worker_id)
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s >> 1)


def _private_generator(*values: int) -> torch.Generator:
    # The DataLoader draws its workers' base seed at every iter(); from this generator, not the global one.
    return torch.Generator().manual_seed(hash_ints(_LOADER_TAG, *values) >> 1)


class _RankSlices:
    """Batch sampler: this rank's keys of global micro-batch m = 0, 1, ... from stream position ``start``."""

    def __init__(self, order: StreamOrder, start: int, micro_batch_size: int, rank: int, world_size: int):
        self.order, self.start = order, start
        self.micro, self.rank, self.world = micro_batch_size, rank, world_size

    def __iter__(self) -> Iterator[list[Any]]:
        global_micro = self.micro * self.world
        for m in itertools.count():
            yield self.order.keys(self.start + m * global_micro + self.rank * self.micro, self.micro)


class MicroBatchStream:
    """This rank's micro-batches of an endless training stream, resumable by position.

    Global micro-batch m covers stream positions ``[p + m*M*W, p + (m+1)*M*W)`` for a start position p,
    micro-batch size M and W ranks; rank r loads the slice ``[r*M, (r+1)*M)`` of it. ``position`` counts
    the items all ranks together have consumed, so a run saved on W ranks resumes on W' ranks at the same
    place in the data (with the same global batch, every optimizer step then sees the same items).

    The loader and its workers start at the first ``next()``: ``load_state_dict`` before that costs nothing.
    """

    def __init__(
        self,
        dataset: Dataset,
        order: StreamOrder,
        micro_batch_size: int,
        rank: int,
        world_size: int,
        num_workers: int,
        collate_fn: Optional[Callable[[list[Any]], Any]] = None,
    ) -> None:
        if micro_batch_size < 1:
            raise ValueError(f"micro-batch size must be >= 1, got {micro_batch_size}")
        if num_workers < 0:
            raise ValueError(f"data.num_workers={num_workers}: must be >= 0 (0 loads in the training process)")
        self.dataset, self.order = dataset, order
        self.micro_batch_size, self.rank, self.world_size = micro_batch_size, rank, world_size
        self.num_workers, self.collate_fn = num_workers, collate_fn
        self.position = 0
        self._batches: Optional[Iterator[Any]] = None

    def __iter__(self) -> MicroBatchStream:
        return self

    def __next__(self) -> Any:
        if self._batches is None:
            self._batches = iter(self._loader(self.position))
        batch = next(self._batches)
        self.position += self.micro_batch_size * self.world_size
        return batch

    def _loader(self, start: int) -> DataLoader:
        seed = self.order.seed
        return DataLoader(
            self.dataset,
            batch_sampler=_RankSlices(self.order, start, self.micro_batch_size, self.rank, self.world_size),
            num_workers=self.num_workers,
            collate_fn=self.collate_fn,
            worker_init_fn=functools.partial(_seed_worker, seed=seed, rank=self.rank),
            generator=_private_generator(seed, self.rank, start),
            pin_memory=False,  # the trainer moves batches to the device itself
        )

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.position = int(state["position"])
        self._batches = None  # the next next() starts a loader at the restored position
