"""Reference statistics: the real-image side of FID / KID / precision-recall, from a folder or an .npz.

A folder of images is read once per (folder contents, detector, resolution, number of images): its features are
cached as an .npz (mu, sigma, count and the features themselves, which KID and precision/recall need) under
`$VISTRAIN_CACHE_DIR/fid_stats` (default ~/.cache/vistrain/fid_stats), and later calls read the cache. An .npz
given directly may hold `mu`, `sigma` and `count` only (as published FID statistics do); it then supports FID
and nothing else.

sigma is the unbiased covariance (divided by count - 1), as `np.cov` computes it and as the FID statistics of the
TTUR / pytorch-fid / StyleGAN code are stored.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from PIL import Image

from vistrain.cachedir import default_cache_dir
from vistrain.durable import AtomicFile
from vistrain.errors import ConfigError
from vistrain.eval.detector import Detector

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


@dataclass
class RefStats:
    mu: np.ndarray  # D, float64
    sigma: np.ndarray  # D x D, float64, unbiased
    count: int  # images behind mu and sigma
    features: Optional[np.ndarray] = None  # count x D float64; None for an .npz of statistics only
    source: str = "<memory>"  # the folder or file, for error messages
    detector: str = ""  # identity of the detector that made them ("" when unknown)

    @classmethod
    def from_features(cls, features: np.ndarray, source: str = "<memory>", detector: str = "") -> "RefStats":
        features = np.asarray(features, dtype=np.float64)
        if features.ndim != 2 or features.shape[0] < 2:
            raise ValueError(f"{source}: reference statistics need at least 2 feature rows, got {features.shape}")
        return cls(features.mean(0), np.cov(features, rowvar=False), features.shape[0], features, source, detector)

    def save_stats(self, path: str, with_features: bool = True) -> None:
        """Write an .npz that `reference_features` reads back (atomically: no half-written file on a crash)."""
        arrays = {"mu": self.mu, "sigma": self.sigma, "count": np.int64(self.count), "detector": np.str_(self.detector)}
        if with_features and self.features is not None:
            arrays["features"] = self.features
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with AtomicFile(path) as out:
            np.savez(out.file, **arrays)


def load_stats(path: str, detector: Optional[Detector] = None) -> RefStats:
    """Statistics from an .npz with `mu`, `sigma`, `count` and optionally `features` (and `detector`)."""
    try:
        data = np.load(path, allow_pickle=False)
    except Exception as e:
        raise ConfigError(f"reference statistics {path}: cannot read it as an .npz ({type(e).__name__}: {e})") from e
    with data:
        missing = [key for key in ("mu", "sigma", "count") if key not in data]
        if missing:
            raise ConfigError(f"reference statistics {path}: no {', '.join(missing)} in it (found "
                              f"{', '.join(data.files)}); it needs mu, sigma and count (and features for kid, pr)")
        mu, sigma, count = data["mu"].astype(np.float64), data["sigma"].astype(np.float64), int(data["count"])
        features = data["features"].astype(np.float64) if "features" in data else None
        made_by = str(data["detector"]) if "detector" in data else ""
    for name, values in (("mu", mu), ("sigma", sigma), ("features", features)):
        if values is not None and not np.isfinite(values).all():
            raise ConfigError(f"reference statistics {path}: {name} holds non-finite values (nan or inf); compute "
                              "them again from the reference images (give --ref / eval.ref the image folder)")
    dim = mu.shape[0]
    if mu.ndim != 1 or sigma.shape != (dim, dim) or count < 2 or (features is not None and
                                                                  features.shape != (count, dim)):
        raise ConfigError(f"reference statistics {path}: inconsistent shapes (mu {mu.shape}, sigma {sigma.shape}, "
                          f"count {count}, features {None if features is None else features.shape})")
    if detector is not None:
        if dim != detector.num_features:
            raise ConfigError(f"reference statistics {path} have {dim} features but the detector gives "
                              f"{detector.num_features}: they were made with another detector (eval.detector)")
        if made_by and made_by != detector.identity:
            raise ConfigError(f"reference statistics {path} were made with detector {made_by}, not the current "
                              f"{detector.identity} (eval.detector); FIDs across detectors are not comparable")
    return RefStats(mu, sigma, count, features, path, made_by)


def _image_files(folder: str) -> list[str]:
    found = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        found += [os.path.join(root, name) for name in files if name.lower().endswith(IMAGE_SUFFIXES)]
    return sorted(found)


def _cache_path(folder: str, files: list[str], detector: Detector, resolution: Optional[int], cache_dir: str) -> str:
    """The key covers everything the features depend on: which files (names, sizes, mtimes), the detector and
    the resize. Editing, adding or removing an image, or changing the detector, makes a new cache entry."""
    key = hashlib.sha256()
    key.update(f"{os.path.abspath(folder)}\n{detector.identity}\n{resolution}\n".encode())
    for path in files:
        st = os.stat(path)
        key.update(f"{os.path.relpath(path, folder)}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    name = os.path.basename(os.path.normpath(folder)) or "images"
    return os.path.join(os.path.expanduser(cache_dir), f"{name}-{key.hexdigest()[:16]}.npz")


def _read_image(path: str, resolution: Optional[int]) -> np.ndarray:
    with Image.open(path) as img:
        img = img.convert("RGB")
        if resolution is not None and img.size != (resolution, resolution):
            img = img.resize((resolution, resolution), Image.Resampling.BICUBIC)
        return np.asarray(img, dtype=np.uint8)


def folder_features(folder: str, detector: Detector, batch_size: int, resolution: Optional[int] = None,
                    files: Optional[list[str]] = None) -> np.ndarray:
    """Detector features of the images under `folder`, in sorted path order, `batch_size` images at a time.

    Without `resolution` every image must have the size of the first (the detector needs equal-sized batches);
    with it, each is resized to resolution x resolution (bicubic).
    """
    files = _image_files(folder) if files is None else files
    chunks, size = [], None
    for start in range(0, len(files), batch_size):
        batch = []
        for path in files[start:start + batch_size]:
            arr = _read_image(path, resolution)
            if size is None:
                size, first = arr.shape, path
            elif arr.shape != size:
                raise ConfigError(f"reference images differ in size: {path} is {arr.shape[1]}x{arr.shape[0]}, "
                                  f"{first} is {size[1]}x{size[0]}; give a resolution to resize them all")
            batch.append(arr)
        images = torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2)  # N H W C -> N C H W
        chunks.append(detector.features(images).numpy())
    return np.concatenate(chunks)


def reference_features(ref: str, detector: Detector, batch_size: int, cache_dir: Optional[str] = None,
                       num: Optional[int] = None, resolution: Optional[int] = None) -> RefStats:
    """Reference statistics from an .npz file or a folder of images (searched recursively).

    For a folder: the first `num` images in sorted path order (all when None), cached under `cache_dir`
    (default $VISTRAIN_CACHE_DIR/fid_stats, ~/.cache/vistrain/fid_stats without it). For an .npz: its contents,
    checked against the detector.
    """
    if ref.endswith(".npz"):
        if not os.path.isfile(ref):
            raise ConfigError(f"reference statistics {ref} do not exist")
        return load_stats(ref, detector)
    if not os.path.isdir(ref):
        raise ConfigError(f"reference {ref} is neither a folder of images nor an .npz of statistics")
    files = _image_files(ref)
    if num is not None:
        if len(files) < num:
            raise ConfigError(f"reference folder {ref} has {len(files)} images, fewer than the {num} asked for")
        files = files[:num]
    if len(files) < 2:
        raise ConfigError(f"reference folder {ref} has {len(files)} images ({', '.join(IMAGE_SUFFIXES)}); "
                          "statistics need at least 2")
    cached = _cache_path(ref, files, detector, resolution, cache_dir or os.path.join(default_cache_dir(), "fid_stats"))
    if os.path.isfile(cached):
        stats = load_stats(cached, detector)
        if stats.features is not None:
            return RefStats(stats.mu, stats.sigma, stats.count, stats.features, ref, stats.detector)
    features = folder_features(ref, detector, batch_size, resolution, files)
    stats = RefStats.from_features(features, ref, detector.identity)
    stats.save_stats(cached)
    return stats
