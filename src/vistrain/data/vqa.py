"""Visual question answering data for small vision-language models: sources, lengths, the digits default.

the_cauldron-shaped samples: ``images`` (a list of PIL images), ``texts`` (a list of {"user", "assistant"}
turns) and optional per-turn rating lists (``relevance_ratings``, ...). The pieces, in the order a task
uses them:

    load_vqa_sources([VQASource(...), ...])   -> LoadedVQA: map-style sources concatenated, streams apart
    VQAEncoder(tokenizer, ImageProcessor(...), T)  sample -> input_ids, labels, tiles   (vqa_text.py)
    sample_lengths(dataset, encoder)          -> tokens and images per sample, cached on disk
    PackedOrder(lengths, images, ...)         -> bins of sample keys per stream position  (packing.py)
    PackedVQADataset + collate_packed         -> packed micro-batches for MicroBatchStream
    collate_padded                            -> one sample per row, for validation and generation
    StreamingPacker                           -> packed rows from a streaming source

This module re-exports all of them. ``digits_vqa`` builds the embedded default data (no download) and
``train_tokenizer`` a tokenizer for it.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch

from vistrain.cachedir import default_cache_dir
from vistrain.data.digits import _split_indices
from vistrain.data.packing import (
    IGNORE_INDEX,
    PackedOrder,
    PackedVQADataset,
    StreamingPacker,
    collate_packed,
    collate_padded,
    first_fit_decreasing,
    pack_row,
)
from vistrain.data.vqa_images import ImageProcessor, as_pil, to_rgb
from vistrain.data.vqa_text import (
    CHATML_TEMPLATE,
    DEFAULT_MIN_RATINGS,
    GLOBAL_IMAGE_TOKEN,
    IM_END,
    IM_START,
    IMAGE_TOKEN,
    PAD_TOKEN,
    RATING_COLUMNS,
    VQAEncoder,
    add_vqa_special_tokens,
    grid_token,
    image_token_length,
    kept_turns,
    train_tokenizer,
    vqa_special_tokens,
)
from vistrain.durable import AtomicFile

__all__ = [
    "CHATML_TEMPLATE", "DEFAULT_MIN_RATINGS", "DIGITS_QUESTIONS", "GLOBAL_IMAGE_TOKEN", "IGNORE_INDEX", "IM_END",
    "IM_START", "IMAGE_TOKEN", "PAD_TOKEN", "RATING_COLUMNS", "ImageProcessor", "LoadedVQA", "PackedOrder",
    "PackedVQADataset", "StreamingPacker", "VQAEncoder", "VQASource", "add_vqa_special_tokens", "as_pil",
    "collate_packed", "collate_padded", "default_cache_dir", "digits_vqa", "first_fit_decreasing", "grid_token",
    "image_token_length", "kept_turns", "load_vqa_sources", "pack_row", "sample_lengths", "to_rgb",
    "train_tokenizer", "vqa_special_tokens", "vqa_texts",
]

# Columns a VQA source may have; anything else (ids, source names) is dropped before concatenation.
REQUIRED_COLUMNS = ("images", "texts")
OPTIONAL_COLUMNS = RATING_COLUMNS + ("qtype",)


# --- sources -----------------------------------------------------------------------------------------------


@dataclass
class VQASource:
    """One subset: ``path`` is a folder written by ``save_to_disk`` (a Dataset, or a DatasetDict whose
    ``split`` is taken), a folder of parquet files (split by file name, as on the Hub), or a parquet file or
    glob. ``streaming`` reads it as an IterableDataset instead of memory-mapping it."""

    name: str
    path: str
    split: str = "train"
    streaming: bool = False


@dataclass
class LoadedVQA:
    """What ``load_vqa_sources`` loaded.

    ``dataset``: the map-style sources concatenated (None if there were none); ``stream``: the streaming
    ones concatenated (None if none); ``loaded``: names, in order; ``failed``: name -> why it was skipped;
    ``sizes``: rows per map-style source.
    """

    dataset: Any = None
    stream: Any = None
    loaded: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)


def _load_one(source: VQASource, cache_dir: Optional[str]) -> Any:
    import datasets

    path = source.path
    saved = os.path.isdir(path) and any(
        os.path.exists(os.path.join(path, f)) for f in ("dataset_info.json", "dataset_dict.json", "state.json")
    )
    if saved:
        ds = datasets.load_from_disk(path)
        if isinstance(ds, datasets.DatasetDict):
            if source.split not in ds:
                raise ValueError(f"no split {source.split!r} in {path} (it has {', '.join(ds)})")
            ds = ds[source.split]
        return ds.to_iterable_dataset() if source.streaming else ds
    if os.path.isdir(path):
        return datasets.load_dataset(
            "parquet", data_dir=path, split=source.split, streaming=source.streaming, cache_dir=cache_dir
        )
    # A file or a glob: the files are the split.
    return datasets.load_dataset(
        "parquet", data_files={"train": path}, split="train", streaming=source.streaming, cache_dir=cache_dir
    )


def _check_columns(ds: Any) -> list[str]:
    columns = list(ds.column_names or [])
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        raise ValueError(f"missing column(s) {missing}; a VQA source needs {list(REQUIRED_COLUMNS)}, has {columns}")
    return [c for c in REQUIRED_COLUMNS + OPTIONAL_COLUMNS if c in columns]


def _concatenate(parts: list[tuple[str, Any]], streaming: bool) -> Any:
    """Concatenate sources whose optional columns differ: a missing column is added as all-None."""
    import datasets

    if len(parts) == 1:
        return parts[0][1]
    features: dict[str, Any] = {}
    for _, ds in parts:
        for name, feature in (ds.features or {}).items():
            features.setdefault(name, feature)
    aligned = []
    for name, ds in parts:
        for column in [c for c in features if c not in ds.column_names]:
            if streaming:  # a stream's features can be unknown until read: then let datasets infer them
                with_column = datasets.Features({**ds.features, column: features[column]}) if ds.features else None
                ds = ds.map(lambda _, c=column: {c: None}, features=with_column)
            else:
                ds = ds.add_column(column, [None] * len(ds), feature=features[column])
        aligned.append(ds.select_columns(list(features)))
    try:
        return datasets.concatenate_datasets(aligned)
    except Exception as e:  # features of the same column disagree (an int rating vs a float one, say)
        names = ", ".join(n for n, _ in parts)
        raise ValueError(f"VQA sources {names} cannot be concatenated: {e}") from e


def load_vqa_sources(sources: Sequence[VQASource], cache_dir: Optional[str] = None) -> LoadedVQA:
    """Load every source; one that fails is warned about by name and skipped; none loading is an error.

    Each source keeps only the VQA columns (images, texts, ratings, qtype). Map-style sources are
    concatenated in the given order into ``.dataset``, streaming ones into ``.stream``. ``cache_dir`` is
    where ``datasets`` converts parquet files (its default cache when None).
    """
    result = LoadedVQA()
    parts: dict[bool, list[tuple[str, Any]]] = {False: [], True: []}
    for source in sources:
        try:
            ds = _load_one(source, cache_dir)
            ds = ds.select_columns(_check_columns(ds))
        except Exception as e:  # a subset that fails should not end a run that has others
            result.failed[source.name] = f"{type(e).__name__}: {e}"
            warnings.warn(f"VQA source {source.name!r} ({source.path}) failed to load, skipped: {e}", stacklevel=2)
            continue
        parts[source.streaming].append((source.name, ds))
        result.loaded.append(source.name)
        if not source.streaming:
            result.sizes[source.name] = len(ds)
    if not result.loaded:
        why = "; ".join(f"{name}: {err}" for name, err in result.failed.items()) or "no sources were given"
        raise ValueError(f"no VQA source could be loaded (data.sources): {why}")
    if parts[False]:
        result.dataset = _concatenate(parts[False], streaming=False)
    if parts[True]:
        result.stream = _concatenate(parts[True], streaming=True)
    return result


# --- token lengths, cached ---------------------------------------------------------------------------------



def _rows(dataset: Any, start: int, stop: int) -> list[Mapping[str, Any]]:
    """Rows [start, stop) with images as undecoded {"bytes", "path"} dicts when the data set allows it."""
    if hasattr(dataset, "with_format") and hasattr(dataset, "features"):
        columns = [c for c in REQUIRED_COLUMNS + RATING_COLUMNS if c in dataset.column_names]
        # Arrow format reads the raw columns: no image is decoded (PIL later reads just the header for the
        # size), and unlike cast_column nothing is rewritten on disk.
        return dataset.with_format("arrow", columns=columns)[start:stop].to_pylist()
    return [dataset[i] for i in range(start, stop)]


def sample_lengths(
    dataset: Any,
    encoder: VQAEncoder,
    cache_dir: Optional[str] = None,
    fingerprint: Optional[str] = None,
    batch_size: int = 256,
) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, images) per sample of ``dataset`` as int64 arrays; 0 tokens for a sample the encoder skips.

    Computed once and kept in ``<cache_dir>/vqa_lengths/<key>/`` (``lengths.npy``, ``num_images.npy``), the key
    hashing the data set's fingerprint (``fingerprint`` for data sets without one) and everything in the
    encoder that changes a length. Files are written under temporary names and renamed, so ranks computing
    at once never read a half-written file (better: rank 0 computes, the others wait at a barrier).
    """
    fingerprint = fingerprint or getattr(dataset, "_fingerprint", None)
    n = len(dataset)
    folder = None
    if fingerprint:
        key = hashlib.sha256(f"{fingerprint}/{encoder.fingerprint()}/{n}".encode()).hexdigest()[:20]
        folder = os.path.join(cache_dir or default_cache_dir(), "vqa_lengths", key)
        tokens_path, images_path = os.path.join(folder, "lengths.npy"), os.path.join(folder, "num_images.npy")
        if os.path.exists(tokens_path):  # written last: its presence means both files are complete
            tokens_n, images_n = np.load(tokens_path), np.load(images_path)
            if len(tokens_n) == n == len(images_n):
                return tokens_n, images_n
    else:
        warnings.warn("the data set has no fingerprint: token lengths are computed without a cache", stacklevel=2)
    tokens_n, images_n = np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int64)
    for start in range(0, n, batch_size):
        stop = min(n, start + batch_size)
        tokens_n[start:stop], images_n[start:stop] = encoder.measure(_rows(dataset, start, stop))
    if folder:
        os.makedirs(folder, exist_ok=True)
        _save_atomic(images_path, images_n)
        _save_atomic(tokens_path, tokens_n)
    return tokens_n, images_n


def _save_atomic(path: str, array: np.ndarray) -> None:
    with AtomicFile(path) as out:
        np.save(out.file, array)


# --- the embedded default: questions about scikit-learn's digits ------------------------------------------

DIGITS_QUESTIONS = {
    "digit": "What digit is this?",
    "parity": "Is this digit even or odd?",
    "same": "Do these two images show the same digit?",
}
_PAIR_SEED = 20240917  # fixed, like the split: val questions must not move with run.seed


def _digit_image(pixels_88: np.ndarray, size: int) -> Any:
    """An 8 x 8 digit (0..16 ink) as dark ink on white paper, upsampled to ``size`` and made RGB."""
    from PIL import Image

    grey = np.round(255.0 - pixels_88 * (255.0 / 16.0)).astype(np.uint8)
    bilinear = getattr(Image, "Resampling", Image).BILINEAR
    return Image.fromarray(grey).resize((size, size), bilinear).convert("RGB")


def digits_vqa(split: str, image_size: int = 32) -> Any:
    """Questions about scikit-learn's digits as a ``datasets.Dataset`` (built in memory, no download).

    Uses the fixed train/val split of vistrain.data.digits, so val images are never trained on. For N
    images of the split it has 3N one-turn samples, grouped by question type (``qtype``):

        digit   "What digit is this?"                       -> "0" .. "9"
        parity  "Is this digit even or odd?"                -> "even" | "odd"
        same    "Do these two images show the same digit?"  -> "yes" | "no"   (two images)

    Pair i is a "yes" pair for even i (a different image of the same digit) and a "no" pair for odd i (an
    image of another digit), partners drawn by a fixed generator from the same split: exactly balanced
    for even N, one more "yes" for odd N.
    """
    import datasets
    from sklearn.datasets import load_digits

    if split not in ("train", "val"):
        raise ValueError(f"digits_vqa split must be 'train' or 'val', got {split!r}.")
    if image_size < 8:
        raise ValueError(f"data.image_size must be at least the digits' 8 pixels, got {image_size}.")
    digits = load_digits()
    keep = _split_indices(torch.as_tensor(digits.target), split).numpy()
    labels = digits.target[keep].astype(int).tolist()
    images = [_digit_image(digits.images[i], image_size) for i in keep]

    g = torch.Generator().manual_seed(_PAIR_SEED + (1 if split == "val" else 0))
    by_label = {c: [i for i, y in enumerate(labels) if y == c] for c in range(10)}
    rows: list[dict[str, Any]] = []
    for i, y in enumerate(labels):
        rows.append(_digits_row([images[i]], "digit", str(y)))
    for i, y in enumerate(labels):
        rows.append(_digits_row([images[i]], "parity", "even" if y % 2 == 0 else "odd"))
    for i, y in enumerate(labels):
        if i % 2 == 0:
            candidates = [j for j in by_label[y] if j != i]
        else:
            candidates = [j for c in range(10) if c != y for j in by_label[c]]
        j = candidates[int(torch.randint(len(candidates), (), generator=g))]
        rows.append(_digits_row([images[i], images[j]], "same", "yes" if i % 2 == 0 else "no"))
    # Python lists declare list features in every datasets version (datasets.List is 4.0 and later).
    features = datasets.Features(
        {
            "images": [datasets.Image()],
            "texts": [{"user": datasets.Value("string"), "assistant": datasets.Value("string")}],
            "qtype": datasets.Value("string"),
        }
    )
    return datasets.Dataset.from_list(rows, features=features)


def _digits_row(images: list[Any], qtype: str, answer: str) -> dict[str, Any]:
    return {"images": images, "texts": [{"user": DIGITS_QUESTIONS[qtype], "assistant": answer}], "qtype": qtype}


def vqa_texts(dataset: Any) -> Iterable[str]:
    """Every user and assistant text of a VQA data set (map-style or streaming): the corpus for
    ``train_tokenizer``."""
    if hasattr(dataset, "__len__"):  # read the text column alone, without decoding any image
        all_turns = dataset.with_format("arrow", columns=["texts"])["texts"].to_pylist()
    else:
        all_turns = (row["texts"] for row in dataset.select_columns(["texts"]))
    for turns in all_turns:
        for turn in turns or []:
            yield turn.get("user") or ""
            yield turn.get("assistant") or ""
