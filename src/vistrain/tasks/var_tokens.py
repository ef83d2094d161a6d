"""`var.token_cache`: every training image's token maps, encoded once by the frozen tokenizer and kept on disk.

Teacher forcing then reads an image's targets from the cache and only rebuilds the transformer's inputs from
them (quantize.idx_to_var_input, no encoder). The price is the augmentation: each image is encoded once, in its
fixed view -- the centre crop for an image folder, the image itself for the digits -- so random crops stop and
`data.hflip` is refused. What it buys, and what building it costs, is measured in docs/benchmarks.md.

The cache is one file, `<cache dir>/var_tokens/<key>.npy`: an (N, 1 + L) integer array whose row i is training
item i's label followed by its L token indices (int16 when labels and codes fit, else int32), read memory-mapped.
The key hashes everything the tokens depend on: the tokenizer's weights and config, the encoder's precision, and
the data set (its name, folder, resolution, channels, classes and size). A data set whose images change but not
their number is not noticed: delete the file then.

Building is shared by the ranks (each encodes a contiguous slice into a part file, the main rank joins them);
every file is written through vistrain.durable, so a killed build leaves no file that a later run would trust.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from vistrain.cachedir import default_cache_dir
from vistrain.data.data_config import ImageDataConfig
from vistrain.data.sampler import split_key
from vistrain.durable import AtomicFile
from vistrain.engine.dist import DistContext, barrier, broadcast_object
from vistrain.errors import ConfigError

VERSION = 1  # part of every key: a change in how tokens are made must not reuse older files


def refuse_augmentation(data: ImageDataConfig) -> None:
    """The cache holds one encoding per image: random augmentation cannot go with it."""
    if data.hflip:
        raise ConfigError("var.token_cache=true keeps one encoding of each training image, so it cannot follow "
                          "data.hflip=true (a random flip per sample): set data.hflip=false to train on the cached "
                          "tokens, or var.token_cache=false to encode every batch on the fly")


def cache_key(tokenizer: torch.nn.Module, tokenizer_config: dict, encoder_bf16: bool, data: ImageDataConfig,
              dataset: Any) -> str:
    """What the tokens depend on, hashed: tokenizer weights and config, encoder precision, the data set."""
    h = hashlib.sha256(f"var_tokens-v{VERSION}".encode())
    for name, tensor in sorted(tokenizer.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())  # logical order, any layout
    described = {
        "tokenizer": tokenizer_config, "encoder_bf16": encoder_bf16, "data": data.name,
        "root": os.path.abspath(data.root) if data.root else None, "resolution": data.resolution,
        "channels": data.channels, "size": len(dataset), "classes": list(getattr(dataset, "classes", []) or []),
    }
    h.update(json.dumps(described, sort_keys=True).encode())
    return h.hexdigest()[:24]


def cache_path(key: str, cache_dir: Optional[str] = None) -> Path:
    return Path(cache_dir or default_cache_dir()) / "var_tokens" / f"{key}.npy"


class _Fixed(Dataset):
    """The items of a data set in their fixed view: integer keys, which take no random crop or flip."""

    def __init__(self, dataset: Dataset, indices: range):
        self.dataset, self.indices = dataset, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return self.dataset[self.indices[i]]


def _encode_rows(dataset: Dataset, indices: range, targets: Callable[[Tensor], Tensor], device: torch.device,
                 batch_size: int, num_workers: int, dtype: np.dtype, length: int) -> np.ndarray:
    rows = np.empty((len(indices), 1 + length), dtype=dtype)
    loader = DataLoader(_Fixed(dataset, indices), batch_size=batch_size, num_workers=num_workers)
    done = 0
    for batch in loader:
        gt_BL = targets(batch["image"].to(device))
        n = gt_BL.shape[0]
        rows[done:done + n, 0] = batch["label"].numpy()
        rows[done:done + n, 1:] = gt_BL.cpu().numpy()
        done += n
    return rows


def _save(path: Path, array: np.ndarray) -> None:
    with AtomicFile(path) as f:
        np.save(f.file, array)


def token_dtype(vocab_size: int, num_classes: int) -> np.dtype:
    return np.dtype(np.int16) if max(vocab_size, num_classes) <= np.iinfo(np.int16).max else np.dtype(np.int32)


def build(path: Path, dataset: Dataset, targets: Callable[[Tensor], Tensor], length: int, dtype: np.dtype,
          device: torch.device, batch_size: int, num_workers: int, dist_ctx: DistContext) -> Optional[float]:
    """Encode every item of `dataset` into the cache file `path`, unless it is there already. Every rank takes
    part. Returns the seconds the build took, None when the file was there."""
    exists = broadcast_object(path.is_file() if dist_ctx.is_main else None, dist_ctx)
    if exists:
        return None
    t0 = time.perf_counter()
    path.parent.mkdir(parents=True, exist_ok=True)
    n, world = len(dataset), dist_ctx.world_size
    mine = range(n * dist_ctx.rank // world, n * (dist_ctx.rank + 1) // world)
    rows = _encode_rows(dataset, mine, targets, device, batch_size, num_workers, dtype, length)
    part = path.with_name(f"{path.stem}.part{dist_ctx.rank}of{world}.npy")
    if world == 1:
        _save(path, rows)
        return time.perf_counter() - t0
    _save(part, rows)
    barrier(dist_ctx)
    if dist_ctx.is_main:
        parts = [path.with_name(f"{path.stem}.part{r}of{world}.npy") for r in range(world)]
        _check_shared(parts[-1])
        _save(path, np.concatenate([np.load(p) for p in parts]))
        for p in parts:
            p.unlink(missing_ok=True)
    barrier(dist_ctx)
    _check_shared(path)
    return time.perf_counter() - t0


def _check_shared(path: Path) -> None:
    if not path.is_file():
        raise RuntimeError(f"var.token_cache: {path}, written by another rank, is not visible from this one: the "
                           "ranks must share the cache folder (set VISTRAIN_CACHE_DIR to a folder on a file system "
                           "every node mounts)")


class TokenMaps(Dataset):
    """The cache file as a data set: items {"tokens": (L,) int64, "label": int64}, keyed as the image data set
    (an index, or an (index, sample seed) pair whose seed is not needed). Opened memory-mapped on first use in
    each process, so loader workers share the file's pages instead of copying the array."""

    def __init__(self, path: Path):
        self.path = path
        self.n = len(np.load(path, mmap_mode="r"))  # mapping reads the header only
        self._rows: Optional[np.ndarray] = None

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Tensor]:
        if self._rows is None:
            self._rows = np.load(self.path, mmap_mode="r")
        index, _ = split_key(key)
        row = torch.from_numpy(np.asarray(self._rows[index], dtype=np.int64))
        return {"tokens": row[1:], "label": row[0]}

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_rows": None}  # a worker maps the file itself
