"""The scikit-learn digits data set: 1797 handwritten 8x8 digits that ship inside scikit-learn.

It is the embedded default of every task -- a run works with no download and no data path -- and small
enough that the whole split is precomputed once, so loading costs an index and never dominates a CPU test.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from vistrain.data.sampler import split_key

NUM_VAL_PER_CLASS = 18  # 10 classes x 18 = 180 validation images, the remaining 1617 train
_SPLIT_SEED = 20240601  # fixed: the split must not move with run.seed, or val metrics are incomparable
_MAX_PIXEL = 16.0  # load_digits() pixel values are integers 0..16


def _split_indices(labels_N: torch.Tensor, split: str) -> torch.Tensor:
    """Indices of ``split``: a stratified, fixed split so validation has every digit equally often."""
    g = torch.Generator().manual_seed(_SPLIT_SEED)
    val, train = [], []
    for c in range(int(labels_N.max()) + 1):
        members = torch.nonzero(labels_N == c).flatten()
        members = members[torch.randperm(len(members), generator=g)]
        val.append(members[:NUM_VAL_PER_CLASS])
        train.append(members[NUM_VAL_PER_CLASS:])
    chosen = torch.cat(val if split == "val" else train)
    return chosen.sort().values  # dataset order stays the original order; the sampler shuffles


class DigitsDataset(Dataset):
    """Digits upsampled to ``resolution``, in [-1, 1] (background -1), replicated to ``channels``.

    Items are ``{"image": float32 C x H x W, "label": int64 scalar}``. A key is an index (no augmentation)
    or an ``(index, sample_seed)`` pair; with ``hflip`` the seed decides the flip through a local generator,
    so the global RNG is never touched.
    """

    num_classes = 10

    def __init__(self, split: str, resolution: int, channels: int, hflip: bool = False) -> None:
        if split not in ("train", "val"):
            raise ValueError(f"DigitsDataset split must be 'train' or 'val', got {split!r}.")
        if channels not in (1, 3):
            raise ValueError(f"data.channels must be 1 (grayscale) or 3 (RGB), got {channels}.")
        if resolution < 1:
            raise ValueError(f"data.resolution must be a positive number of pixels, got {resolution}.")
        from sklearn.datasets import load_digits  # imported here: only digits runs need scikit-learn

        digits = load_digits()
        images_N88 = torch.as_tensor(digits.images, dtype=torch.float32)
        labels_N = torch.as_tensor(digits.target, dtype=torch.int64)
        keep_n = _split_indices(labels_N, split)
        # Bilinear upsampling is a convex combination of pixels, so values stay inside [0, 16].
        x_n1HW = F.interpolate(
            images_N88[keep_n, None], size=(resolution, resolution), mode="bilinear", align_corners=False
        )
        # One channel is stored; RGB copies are made per item, which keeps big resolutions affordable.
        self._images_n1HW = (x_n1HW / _MAX_PIXEL * 2.0 - 1.0).contiguous()
        self._labels_n = labels_N[keep_n]
        self.split = split
        self.resolution = resolution
        self.channels = channels
        self.hflip = hflip

    def __len__(self) -> int:
        return len(self._labels_n)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, torch.Tensor]:
        index, sample_seed = split_key(key)
        x_CHW = self._images_n1HW[index].repeat(self.channels, 1, 1)
        if self.hflip and sample_seed is not None:
            g = torch.Generator().manual_seed(sample_seed)
            if torch.rand((), generator=g) < 0.5:
                x_CHW = x_CHW.flip(-1)
        return {"image": x_CHW, "label": self._labels_n[index].clone()}
