"""Data sets and loaders from a DataConfig, for training (infinite, resumable) and evaluation (one pass).

Reproducibility contract the trainer relies on:
- the training stream is fixed by (seed, batches consumed): resume rebuilds the loader with start_batch;
- augmentation draws only from the per-item sample seed, so num_workers and prefetching change nothing;
- creating or iterating a loader never draws from the global torch RNG (each loader has its own
  generator), so resuming does not shift the model's dropout / noise streams.
"""

from __future__ import annotations

import functools
import random

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from vistrain.data.config import DataConfig
from vistrain.data.digits import DigitsDataset
from vistrain.data.images import ImageFolderDataset, discover_classes
from vistrain.engine.sampler import InfiniteBatchSampler, hash_ints

DATASET_NAMES = ("digits", "image_folder")
_LOADER_TAG = 0x4C4F4144  # "LOAD"
_WORKER_TAG = 0x574F524B  # "WORK"


def build_dataset(cfg: DataConfig, split: str) -> Dataset:
    """The ``split`` ("train" | "val") of the data set that ``cfg`` names; flips only ever in training."""
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


def check_enough_data(
    dataset: Dataset, global_batch_size: int, what: str, source: str = "train.batch_size"
) -> None:
    """Refuse a data set smaller than one global batch, instead of failing later with an unrelated error.

    ``source`` names where ``global_batch_size`` comes from, printed as ``source=global_batch_size``:
    e.g. "train.batch_size x 2 (d and g phases)" when a task draws several batches per step.
    """
    n = len(dataset)  # type: ignore[arg-type]
    if n < global_batch_size:
        raise ValueError(
            f"{what} has {n} images, fewer than one global batch ({source}={global_batch_size}, summed over "
            f"all ranks). Lower train.batch_size so that one global batch fits in {n} images, or add images "
            f"to the data set."
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


def build_train_loader(
    dataset: Dataset,
    global_batch_size: int,
    rank: int,
    world_size: int,
    seed: int,
    start_batch: int,
    num_workers: int,
) -> DataLoader:
    """An endless loader of this rank's ``global_batch_size / world_size`` items per step.

    Call ``iter()`` on it once and keep the iterator: every new iterator restarts at ``start_batch``.
    """
    sampler = InfiniteBatchSampler(
        len(dataset),  # type: ignore[arg-type]
        global_batch_size,
        rank=rank,
        world_size=world_size,
        seed=seed,
        start_batch=start_batch,
    )
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        worker_init_fn=functools.partial(_seed_worker, seed=seed, rank=rank),
        generator=_private_generator(seed, rank),
        persistent_workers=num_workers > 0,
        pin_memory=False,  # the trainer moves batches to the device itself
    )


def build_eval_loader(
    dataset: Dataset, batch_size_per_rank: int, rank: int, world_size: int, num_workers: int
) -> DataLoader:
    """One deterministic pass over this rank's shard ``rank::world_size`` of the whole split.

    Shards are disjoint and together cover every item once; the last batch may be partial, and ranks may
    get different numbers of batches (sum metrics with their counts, and avoid per-batch collectives).
    """
    if batch_size_per_rank < 1:
        raise ValueError(f"evaluation batch size per rank must be >= 1, got {batch_size_per_rank}.")
    shard = Subset(dataset, range(rank, len(dataset), world_size))  # type: ignore[arg-type]
    return DataLoader(
        shard,
        batch_size=batch_size_per_rank,
        shuffle=False,
        drop_last=False,
        num_workers=num_workers,
        worker_init_fn=functools.partial(_seed_worker, seed=0, rank=rank),
        generator=_private_generator(0, rank),
        persistent_workers=num_workers > 0,
        pin_memory=False,
    )
