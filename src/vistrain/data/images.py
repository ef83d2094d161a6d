"""A folder of images as a training set: ImageNet layout (one sub-folder per class) or a flat folder.

    root/                                   root/
      n01440764/  a.JPEG  sub/b.png           0001.png
      n01443537/  c.jpg                       0002.jpg
    -> labels by sorted class name          -> unconditional: every label 0, num_classes 0

Scanning is cheap (names only); a file that fails to decode is found in __getitem__, reported with a warning
and replaced by the next readable image, so one corrupt JPEG in a million does not end a run.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from vistrain.data.sampler import split_key

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")
MAX_DECODE_TRIES = 16  # consecutive unreadable files before we stop and blame the folder
_BICUBIC = getattr(Image, "Resampling", Image).BICUBIC  # PIL's bicubic widens its kernel when shrinking:
# it is antialiased, unlike a plain bicubic interpolation.


def _is_image_name(name: str) -> bool:
    # Hidden files are skipped: "._x.jpg" files left by macOS are metadata, not images.
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _scan_images(folder: str, root: str) -> list[str]:
    """Image paths under ``folder`` (recursive, sorted, relative to ``root``), deterministic on every OS."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))  # sorted walk order
        rel_dir = os.path.relpath(dirpath, root)
        found.extend(os.path.normpath(os.path.join(rel_dir, f)) for f in sorted(filenames) if _is_image_name(f))
    return found


def discover_classes(root: str) -> list[str]:
    """Class names of an ImageNet-layout folder: its sorted sub-folders ([] for a flat folder)."""
    if not os.path.isdir(root):
        wanted = " ".join(e[1:] for e in IMAGE_EXTENSIONS)
        raise ValueError(f"image folder {root!r} does not exist or is not a folder (looking for {wanted}).")
    with os.scandir(root) as it:
        return sorted(e.name for e in it if e.is_dir() and not e.name.startswith("."))


class _StringTable:
    """Many strings held in two numpy buffers instead of a Python list.

    Why: loader workers are forked, and merely reading a Python string from a list writes its reference
    count, copying the memory page into every worker. With ImageNet's 1.28M paths that grows each worker
    by hundreds of MB over an epoch; numpy buffers are read without being written.
    """

    def __init__(self, strings: list[str]) -> None:
        encoded = [os.fsencode(s) for s in strings]
        self._ends = np.cumsum([len(b) for b in encoded], dtype=np.int64)
        self._bytes = np.frombuffer(b"".join(encoded), dtype=np.uint8)

    def __len__(self) -> int:
        return len(self._ends)

    def __getitem__(self, i: int) -> str:
        start = int(self._ends[i - 1]) if i > 0 else 0
        return os.fsdecode(self._bytes[start : int(self._ends[i])].tobytes())


class ImageFolderDataset(Dataset):
    """Images resized (shorter side) and cropped to ``resolution`` squares, in [-1, 1].

    Items are ``{"image": float32 C x H x W, "label": int64 scalar}``. Training with an ``(index,
    sample_seed)`` key takes a random crop (and flip, if ``hflip``) drawn from the seed; a plain int key or
    ``train=False`` takes the centre crop without flip.

    Args:
        classes: class names to use instead of discovering them -- a validation folder passes the training
            folder's classes so that labels agree; ``[]`` reads every image under root as unlabelled.
    """

    def __init__(
        self,
        root: str,
        resolution: int,
        channels: int = 3,
        train: bool = True,
        hflip: bool = False,
        classes: list[str] | None = None,
    ) -> None:
        if channels not in (1, 3):
            raise ValueError(f"data.channels must be 1 (grayscale) or 3 (RGB), got {channels}.")
        if resolution < 1:
            raise ValueError(f"data.resolution must be a positive number of pixels, got {resolution}.")
        subdirs = discover_classes(root)  # also checks that root is a folder
        self.root = root
        self.resolution = resolution
        self.channels = channels
        self.train = train
        self.hflip = hflip
        self.num_skipped = 0  # unreadable files met by THIS process (each loader worker has its own count)

        self.classes, paths, labels = self._scan(root, subdirs, classes)
        if not paths:
            wanted = " ".join(e[1:] for e in IMAGE_EXTENSIONS)
            raise ValueError(
                f"image folder {root!r} has no images (looked for {wanted}, case-insensitive, in the folder"
                f"{' and its class sub-folders' if self.classes else ''}). Point data.root at the folder that"
                f" holds the images or their class sub-folders."
            )
        self.num_classes = len(self.classes)
        self._paths = _StringTable(paths)
        self._labels = np.asarray(labels, dtype=np.int64)

    @staticmethod
    def _scan(
        root: str, subdirs: list[str], classes: list[str] | None
    ) -> tuple[list[str], list[str], list[int]]:
        discovered = classes is None
        if classes is None:
            classes = subdirs
        if not classes:  # flat folder: everything under root, unlabelled
            paths = _scan_images(root, root)
            return [], paths, [0] * len(paths)

        unknown = sorted(set(subdirs) - set(classes))
        if unknown:
            raise ValueError(
                f"image folder {root!r} has class sub-folders {unknown[:5]} that the training folder does not"
                f" have; train and validation folders must use the same class names."
            )
        loose = sorted(f for f in os.listdir(root) if _is_image_name(f) and os.path.isfile(os.path.join(root, f)))
        if loose:
            warnings.warn(
                f"image folder {root!r} has class sub-folders, so the {len(loose)} image(s) directly in it "
                f"(e.g. {loose[0]!r}) are ignored; move them into a class folder.",
                stacklevel=3,
            )
        paths, labels = [], []
        for label, name in enumerate(classes):
            folder = os.path.join(root, name)
            found = _scan_images(folder, root) if os.path.isdir(folder) else []
            if not found and discovered:  # a missing val class is fine; an empty train class is odd
                warnings.warn(f"class folder {folder!r} has no images; label {label} is kept.", stacklevel=3)
            paths.extend(found)
            labels.extend([label] * len(found))
        return list(classes), paths, labels

    def __len__(self) -> int:
        return len(self._labels)

    def _decode(self, path: str) -> Image.Image:
        """Open and fully decode ``path`` as RGB or L; every decoding error surfaces here."""
        mode = "RGB" if self.channels == 3 else "L"
        with Image.open(path) as img:
            # JPEG only: decode at 1/2, 1/4 or 1/8 scale when that still covers the output -- much faster.
            w, h = img.size
            scale = self.resolution / min(w, h)
            img.draft(mode, (int(np.ceil(w * scale)), int(np.ceil(h * scale))))
            if img.mode == "P" and "transparency" in img.info:
                img = img.convert("RGBA")  # PIL asks for this before dropping palette transparency
            return img.convert(mode)  # convert() reads the pixels, so truncated files fail here

    def _transform(self, img: Image.Image, sample_seed: int | None) -> torch.Tensor:
        res = self.resolution
        w, h = img.size
        scale = res / min(w, h)
        size = (max(res, round(w * scale)), max(res, round(h * scale)))
        if size != (w, h):
            img = img.resize(size, _BICUBIC)
        g = torch.Generator().manual_seed(sample_seed) if self.train and sample_seed is not None else None
        if g is not None:  # random crop: only the longer side has room to move
            left = int(torch.randint(0, size[0] - res + 1, (), generator=g))
            top = int(torch.randint(0, size[1] - res + 1, (), generator=g))
        else:
            left, top = (size[0] - res) // 2, (size[1] - res) // 2
        img = img.crop((left, top, left + res, top + res))
        x_HWC = torch.from_numpy(np.array(img, dtype=np.uint8)).reshape(res, res, self.channels)
        x_CHW = x_HWC.permute(2, 0, 1).float().div(127.5).sub(1.0).contiguous()
        if g is not None and self.hflip and torch.rand((), generator=g) < 0.5:
            x_CHW = x_CHW.flip(-1)
        return x_CHW

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, torch.Tensor]:
        index, sample_seed = split_key(key)
        n = len(self)
        tries = min(MAX_DECODE_TRIES, n)
        # A bad file is replaced by the next readable one: deterministic, so resume and worker count
        # still see the same data.
        for attempt in range(tries):
            i = (index + attempt) % n
            path = os.path.join(self.root, self._paths[i])
            try:
                img = self._decode(path)
            except Exception as err:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
                self.num_skipped += 1
                warnings.warn(f"skipping unreadable image {path!r}: {type(err).__name__}: {err}", stacklevel=2)
                continue
            return {"image": self._transform(img, sample_seed), "label": torch.tensor(self._labels[i])}
        raise RuntimeError(
            f"{tries} consecutive images of {self.root!r} from {self._paths[index % n]!r} on could not be read"
            f" (see the warnings above). Check or re-extract the data set."
        )
