"""Visual question answering data for small vision-language models: sources, lengths, the digits default.

the_cauldron-shaped samples: ``images`` (a list of PIL images), ``texts`` (a list of {"user", "assistant"}
turns) and optional per-turn rating lists (``relevance_ratings``, ...). The pieces, in the order a task
uses them:

    load_vqa_sources([VQASource(...), ...])   -> LoadedVQA: sources checked; map-style ones as VQARows, streams
    VQAEncoder(tokenizer, ImageProcessor(...), T)  sample -> input_ids, labels, tiles   (vqa_text.py)
    sample_lengths(dataset, encoder)          -> tokens and images per sample, cached on disk
    PackedOrder(lengths, images, ...)         -> bins of sample keys per stream position  (packing.py)
    PackedVQADataset + collate_packed         -> packed micro-batches for MicroBatchStream
    collate_padded                            -> one sample per row, for validation and generation
    ReadableRows(rows)                        -> validation data: a row that cannot be used gives way to the next
    StreamingPacker                           -> packed rows from a streaming source

This module re-exports all of them. ``digits_vqa`` builds the embedded default data (no download) and
``train_tokenizer`` a tokenizer for it.

Bad data never stops a run halfway: a source is checked when it loads (its schema, and a few rows spread over
it), and every row again when it is measured and encoded. A sample with an image that cannot be decoded is
skipped where it comes up, with a warning that names its source and row, and counted in the packed rows
(``num_skipped``); a sample without a usable turn is left out. Only a source that is wrong as a whole (no
usable turn, no readable image in the rows checked, a wrong schema) is refused, by name, at load.
"""

from __future__ import annotations

import bisect
import hashlib
import io
import itertools
import json
import os
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch

from vistrain.cachedir import default_cache_dir
from vistrain.data.data_config import VQASource
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
from vistrain.data.vqa_images import (
    ImageProcessor,
    UnreadableImage,
    as_pil,
    images_of,
    load_images,
    to_rgb,
)
from vistrain.data.vqa_text import (
    CHATML_TEMPLATE,
    DEFAULT_MIN_RATINGS,
    GLOBAL_IMAGE_TOKEN,
    IM_END,
    IM_START,
    IMAGE_TOKEN,
    PAD_TOKEN,
    RATING_COLUMNS,
    UNREADABLE,
    VQAEncoder,
    add_vqa_special_tokens,
    grid_token,
    image_token_length,
    kept_turns,
    train_tokenizer,
    turn_problem,
    vqa_special_tokens,
)
from vistrain.durable import AtomicFile

__all__ = [
    "CHATML_TEMPLATE", "DEFAULT_MIN_RATINGS", "DIGITS_QUESTIONS", "GLOBAL_IMAGE_TOKEN", "IGNORE_INDEX", "IM_END",
    "IM_START", "IMAGE_TOKEN", "PAD_TOKEN", "RATING_COLUMNS", "UNREADABLE", "ImageProcessor", "LoadedVQA",
    "PackedOrder", "PackedVQADataset", "ReadableRows", "StreamingPacker", "UnreadableImage", "VQAEncoder",
    "VQARows", "VQASource", "add_vqa_special_tokens", "as_pil", "collate_packed", "collate_padded",
    "default_cache_dir", "digits_vqa", "first_fit_decreasing", "grid_token", "image_token_length", "kept_turns",
    "load_vqa_sources", "pack_row", "sample_lengths", "to_rgb", "train_tokenizer", "turn_problem",
    "vqa_special_tokens", "vqa_texts",
]

# Columns a VQA source may have; anything else (ids, source names) is dropped at load.
REQUIRED_COLUMNS = ("images", "texts")
OPTIONAL_COLUMNS = RATING_COLUMNS + ("qtype",)
CHECKED_ROWS = 16  # rows of each source read at load, spread over it (every row is checked when encoded)
_TURN_HINT = "each row's texts must be a list of {user: text, assistant: non-empty text} turns"


# --- sources -----------------------------------------------------------------------------------------------


@dataclass
class LoadedVQA:
    """What ``load_vqa_sources`` loaded.

    ``rows``: the map-style sources, in order, as one VQARows (None if there were none); ``stream``: the
    streaming ones concatenated (None if none); ``loaded``: names, in order; ``failed``: name -> why it was
    skipped; ``sizes``: rows per map-style source.
    """

    rows: Optional[VQARows] = None
    stream: Any = None
    loaded: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)


class VQARows:
    """Map-style VQA sources read as one data set whose rows know where they come from.

    ``rows[i]``: sample i (``images`` a list of decoded PIL images, ``texts``, the ratings and ``qtype``,
    None where its source lacks the column); an image that cannot be decoded raises UnreadableImage naming
    the source, row and image. ``rows.raw(start, stop)``: samples with undecoded images ({bytes, path}
    dicts: the length pass reads only their headers). ``rows.where(i)``: "source 'a', row 12".

    Rows are read as Arrow, so ``datasets`` never decodes an image itself, and relative image paths are
    resolved against their source's folder. The sources are not concatenated: their columns, and the
    kinds of their image columns (Image features, bytes, paths), may differ.

    Args:
        parts: (name, map-style data set or list of row dicts, image folder or None) per source.
        index: the rows of the sources, counted through them in order, that this data set holds.
    """

    def __init__(self, parts: Sequence[tuple[str, Any, Optional[str]]], index: Optional[range] = None) -> None:
        self.parts = list(parts)
        self._tables = [ds.with_format("arrow") if hasattr(ds, "with_format") else ds for _, ds, _ in self.parts]
        self._starts = [0, *itertools.accumulate(len(ds) for _, ds, _ in self.parts)]
        self.index = range(self._starts[-1]) if index is None else index

    @classmethod
    def of(cls, dataset: Any, name: str = "data") -> VQARows:
        """One data set (a ``datasets.Dataset`` or a list of rows) as VQARows; relative paths from the cwd."""
        return dataset if isinstance(dataset, VQARows) else cls([(name, dataset, None)])

    def __len__(self) -> int:
        return len(self.index)

    def select(self, positions: range) -> VQARows:
        """The rows at these positions (a contiguous range), knowing their sources as before."""
        return VQARows(self.parts, self.index[positions.start : positions.stop])

    def _locate(self, i: int) -> tuple[int, int]:
        j = self.index[i]
        part = bisect.bisect_right(self._starts, j) - 1
        return part, j - self._starts[part]

    def where(self, i: int) -> str:
        part, row = self._locate(i)
        return f"source {self.parts[part][0]!r}, row {row}"

    def _read(self, part: int, start: int, stop: int) -> list[dict[str, Any]]:
        table = self._tables[part]
        found = table[start:stop]
        found = found.to_pylist() if hasattr(found, "to_pylist") else list(found)
        return [_as_sample(row, self.parts[part][2]) for row in found]

    def raw(self, start: int, stop: int) -> list[dict[str, Any]]:
        """Samples [start, stop) with their images undecoded, in order across sources."""
        samples: list[dict[str, Any]] = []
        position = start
        while position < stop:
            part, row = self._locate(position)
            count = min(stop - position, self._starts[part + 1] - self._starts[part] - row)
            samples += self._read(part, row, row + count)
            position += count
        return samples

    def __getitem__(self, i: int) -> dict[str, Any]:
        part, row = self._locate(i)
        sample = self._read(part, row, row + 1)[0]
        try:
            sample["images"] = load_images(sample["images"])
        except UnreadableImage as e:
            raise UnreadableImage(f"{self.where(i)}: {e}") from None
        return sample

    def texts(self) -> Iterator[Any]:
        """The ``texts`` value of every row, in order, read without touching an image."""
        for part, (_, ds, _) in enumerate(self.parts):
            first = max(self.index.start, self._starts[part]) - self._starts[part]
            end = min(self.index.stop, self._starts[part + 1]) - self._starts[part]
            if first >= end:
                continue
            if hasattr(ds, "with_format"):
                yield from ds.with_format("arrow", columns=["texts"])[first:end]["texts"].to_pylist()
            else:
                yield from (row.get("texts") for row in ds[first:end])

    @property
    def fingerprint(self) -> Optional[str]:
        """A hash of the rows' contents (the sources' ``datasets`` fingerprints, image folders and range);
        None if a source has no fingerprint."""
        prints = [getattr(ds, "_fingerprint", None) for _, ds, _ in self.parts]
        if None in prints:
            return None
        described = [prints, [root for _, _, root in self.parts], self.index.start, self.index.stop]
        return hashlib.sha256(json.dumps(described).encode()).hexdigest()[:20]


class ReadableRows:
    """``rows[i]``, or if it cannot be used (an image that cannot be decoded, no usable turn) the next row
    that can, with a warning naming the one passed over: what validation reads, so that no bad row of the
    val data stops a run (an image folder does the same with a bad file)."""

    def __init__(self, rows: VQARows) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        n = len(self.rows)
        for k in range(n):
            at = (i + k) % n
            try:
                sample = self.rows[at]
            except UnreadableImage as e:
                warnings.warn(f"validation data: {e}; the next row is used instead", stacklevel=2)
                continue
            if kept_turns(sample, {}):
                return sample
            why = turn_problem(sample.get("texts")) or "no usable turn"
            warnings.warn(f"validation data: {self.rows.where(at)}: {why}; the next row is used instead",
                          stacklevel=2)
        raise ValueError(f"no row of the validation data ({n} rows) can be used: see the warnings above")


def _as_sample(row: Mapping[str, Any], image_root: Optional[str]) -> dict[str, Any]:
    """A row as the encoder reads it: every VQA column (None where missing), images as a list with
    relative paths resolved against the source's folder."""
    sample = {c: row.get(c) for c in REQUIRED_COLUMNS + OPTIONAL_COLUMNS}
    sample["images"] = [_resolved(image, image_root) for image in images_of(row)]
    return sample


def _resolved(image: Any, root: Optional[str]) -> Any:
    """An image entry with a relative path made relative to ``root``, of the same kind (str or dict)."""
    if root is None:
        return image
    if isinstance(image, str) and image and not os.path.isabs(image):
        return os.path.join(root, image)
    path = image.get("path") if isinstance(image, dict) and image.get("bytes") is None else None
    if isinstance(path, str) and path and not os.path.isabs(path):
        return {**image, "path": os.path.join(root, path)}
    return image


def _image_root(source: VQASource) -> str:
    path = os.path.abspath(source.path)
    return path if os.path.isdir(path) else os.path.dirname(path)


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
        else:
            _single_split(source, "a saved Dataset (not a DatasetDict)")
        return ds.to_iterable_dataset() if source.streaming else ds
    if os.path.isdir(path):
        return datasets.load_dataset(
            "parquet", data_dir=path, split=source.split, streaming=source.streaming, cache_dir=cache_dir
        )
    # A file or a glob: the files are the split.
    ds = datasets.load_dataset(
        "parquet", data_files={"train": path}, split="train", streaming=source.streaming, cache_dir=cache_dir
    )
    _single_split(source, "a parquet file or glob")
    return ds


def _single_split(source: VQASource, what: str) -> None:
    if source.split != "train":
        raise ValueError(
            f"split={source.split!r}, but {source.path} is {what}, which has no splits: leave split out, or point "
            f"path at a DatasetDict folder or a folder of parquet files named by split"
        )


def _check_schema(ds: Any) -> list[str]:
    """The VQA columns of a source, after checking that ``images`` and ``texts`` hold what they must."""
    columns = list(ds.column_names or [])
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        raise ValueError(f"missing column(s) {missing}; a VQA source needs {list(REQUIRED_COLUMNS)}, has {columns}")
    features = ds.features  # a stream may not know them before it is read: then its rows tell
    if features:
        images = features["images"]
        item = _list_item(images)
        if not _is_image_feature(images if item is None else item):
            raise ValueError(
                f"column 'images' holds {images}; a VQA source needs a list of images per row: Image features, "
                f"image bytes, {{bytes, path}} dicts or paths (relative to the source's folder)"
            )
        texts = features["texts"]
        turn = _list_item(texts)
        if turn is None:
            raise ValueError(f"column 'texts' holds {texts}, not a list of turns per row; {_TURN_HINT}")
        if not isinstance(turn, dict) or not {"user", "assistant"} <= set(turn):
            keys = sorted(turn) if isinstance(turn, dict) else turn
            raise ValueError(
                f"column 'texts' holds turns of {keys}; {_TURN_HINT} (rename the keys, e.g. with datasets' map)"
            )
    return [c for c in REQUIRED_COLUMNS + OPTIONAL_COLUMNS if c in columns]


def _list_item(feature: Any) -> Any:
    """The item feature of a list feature (a Python list, Sequence, List, LargeList), else None."""
    if isinstance(feature, list):
        return feature[0] if feature else None
    return getattr(feature, "feature", None)


def _is_image_feature(feature: Any) -> bool:
    import datasets

    if isinstance(feature, datasets.Image):
        return True
    if isinstance(feature, datasets.Value):  # bytes, a path, or nothing at all (a text-only source)
        return feature.dtype in ("binary", "large_binary", "string", "large_string", "null")
    return isinstance(feature, dict) and bool(set(feature) & {"bytes", "path"}) and set(feature) <= {"bytes", "path"}


def _check_rows(samples: Sequence[Mapping[str, Any]], where: Sequence[str]) -> None:
    """Refuse a source whose rows read (``samples``, named by ``where``) are none usable: no row, no usable
    turn, or images none of which can be decoded."""
    if not samples:
        raise ValueError("it has no rows")
    if not any(kept_turns(s, {}) for s in samples):
        why = turn_problem(samples[0]["texts"])
        raise ValueError(f"none of the {len(samples)} rows read has a usable turn ({where[0]}: {why}); {_TURN_HINT}")
    problems = []
    for sample, name in zip(samples, where):
        if not sample["images"]:
            continue
        try:
            load_images(sample["images"])
            return
        except UnreadableImage as e:
            problems.append(f"{name}: {e}")
    if problems:
        raise ValueError(
            f"no image of the {len(samples)} rows read can be decoded ({problems[0]}); check the files (a relative "
            f"path is read from the source's folder)"
        )


def _checked_map_source(source: VQASource, ds: Any) -> VQARows:
    rows = VQARows([(source.name, ds, _image_root(source))])
    spread = sorted({int(i) for i in np.linspace(0, len(rows) - 1, min(len(rows), CHECKED_ROWS)).round()})
    _check_rows([rows.raw(i, i + 1)[0] for i in spread], [f"row {i}" for i in spread])
    return rows


def _checked_stream(source: VQASource, ds: Any) -> Any:
    """The stream with its images undecoded, so that a bad one cannot stop the iterator (the packer decodes
    and skips it), and relative paths resolved; its first rows checked."""
    if ds.features is not None:
        ds = ds.cast_column("images", _undecoded(ds.features["images"]))
    root = _image_root(source)
    ds = ds.map(lambda row: {"images": _resolved_images(row["images"], root)}, features=ds.features)
    first = [_as_sample(row, None) for row in itertools.islice(ds, CHECKED_ROWS)]
    _check_rows(first, [f"row {k}" for k in range(len(first))])
    return ds


def _undecoded(images: Any) -> Any:
    """An ``images`` feature as Image features that are not decoded (read as {bytes, path} dicts)."""
    import datasets

    undecoded = datasets.Image(decode=False)
    if _list_item(images) is None:
        return undecoded
    return [undecoded] if isinstance(images, list) else datasets.Sequence(undecoded)


def _resolved_images(images: Any, root: str) -> Any:
    if isinstance(images, (list, tuple)):
        return [_resolved(image, root) for image in images]
    return _resolved(images, root)


def _concatenate_streams(parts: list[tuple[str, Any]]) -> Any:
    """Concatenate streams whose optional columns differ: a missing column is added as all-None."""
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
            # a stream's features can be unknown until read: then let datasets infer them
            with_column = datasets.Features({**ds.features, column: features[column]}) if ds.features else None
            ds = ds.map(lambda _, c=column: {c: None}, features=with_column)
        aligned.append(ds.select_columns(list(features)))
    try:
        return datasets.concatenate_datasets(aligned)
    except Exception as e:  # features of the same column disagree (an int rating vs a float one, say)
        names = ", ".join(n for n, _ in parts)
        raise ValueError(f"VQA sources {names} cannot be concatenated: {e}") from e


def load_vqa_sources(
    sources: Sequence[VQASource], cache_dir: Optional[str] = None, key: str = "data.sources"
) -> LoadedVQA:
    """Load and check every source; one that fails is warned about by name and skipped; none loading is an
    error that names ``key`` (the config key the sources came from).

    A source fails if it cannot be read, if its ``images`` or ``texts`` column holds the wrong kind of
    values (checked on its features), or if the rows read from it (CHECKED_ROWS, spread over it) have no
    usable turn or no image that can be decoded. Each source keeps only the VQA columns (images, texts,
    ratings, qtype). Map-style sources become ``.rows``, streaming ones are concatenated into ``.stream``
    (images undecoded, paths resolved). ``cache_dir`` is where ``datasets`` converts parquet files (its
    default cache when None).
    """
    result = LoadedVQA()
    maps: list[tuple[str, Any, Optional[str]]] = []
    streams: list[tuple[str, Any]] = []
    for source in sources:
        try:
            ds = _load_one(source, cache_dir)
            ds = ds.select_columns(_check_schema(ds))
            if source.streaming:
                streams.append((source.name, _checked_stream(source, ds)))
            else:
                maps += _checked_map_source(source, ds).parts
                result.sizes[source.name] = len(ds)
        except Exception as e:  # a subset that fails should not end a run that has others
            result.failed[source.name] = f"{type(e).__name__}: {e}"
            warnings.warn(f"VQA source {source.name!r} ({source.path}) of {key} cannot be used, skipped: {e}",
                          stacklevel=2)
            continue
        result.loaded.append(source.name)
    if not result.loaded:
        paths = {source.name: source.path for source in sources}
        why = "; ".join(f"{name} ({paths[name]}): {err}" for name, err in result.failed.items())
        raise ValueError(f"no VQA source could be loaded ({key}): {why or 'no sources were given'}; fix the "
                         f"source or leave it out of {key}")
    if maps:
        result.rows = VQARows(maps)
    if streams:
        result.stream = _concatenate_streams(streams)
    return result


# --- token lengths, cached ---------------------------------------------------------------------------------



def sample_lengths(
    dataset: Any,
    encoder: VQAEncoder,
    cache_dir: Optional[str] = None,
    fingerprint: Optional[str] = None,
    batch_size: int = 256,
) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, images) per sample of ``dataset`` (VQARows, or a data set read as one) as int64 arrays: 0
    tokens for a sample the encoder gives None, UNREADABLE for one with an image whose header cannot be read.
    Samples of either kind are warned about, naming a few of them by source and row.

    Computed once and kept in ``<cache_dir>/vqa_lengths/<key>/`` (``lengths.npy``, ``num_images.npy``), the key
    hashing the data set's fingerprint (``fingerprint`` for data sets without one) and everything in the
    encoder that changes a length. Files are written under temporary names and renamed, so ranks computing
    at once never read a half-written file (better: rank 0 computes, the others wait at a barrier).
    """
    rows = VQARows.of(dataset)
    fingerprint = fingerprint or rows.fingerprint
    n = len(rows)
    folder = None
    if fingerprint:
        key = hashlib.sha256(f"{fingerprint}/{encoder.fingerprint()}/{n}".encode()).hexdigest()[:20]
        folder = os.path.join(cache_dir or default_cache_dir(), "vqa_lengths", key)
        tokens_path, images_path = os.path.join(folder, "lengths.npy"), os.path.join(folder, "num_images.npy")
    else:
        warnings.warn("the data set has no fingerprint: token lengths are computed without a cache", stacklevel=2)
    cached = folder is not None and os.path.exists(tokens_path)  # written last: then both files are complete
    if cached:
        tokens_n, images_n = np.load(tokens_path), np.load(images_path)
        cached = len(tokens_n) == n == len(images_n)
    if not cached:
        tokens_n, images_n = np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int64)
        for start in range(0, n, batch_size):
            stop = min(n, start + batch_size)
            tokens_n[start:stop], images_n[start:stop] = encoder.measure(rows.raw(start, stop))
        if folder:
            os.makedirs(folder, exist_ok=True)
            _save_atomic(images_path, images_n)
            _save_atomic(tokens_path, tokens_n)
    _warn_unusable(rows, tokens_n)
    return tokens_n, images_n


_EXAMPLES = 3  # samples a warning names
_TURNS_LOOKED_AT = 1000  # samples without a turn whose texts are looked at for an example of what is wrong


def _warn_unusable(rows: VQARows, tokens_n: np.ndarray) -> None:
    """Warn about samples skipped for bad data (not those the rating filters drop), naming a few."""
    unreadable = np.flatnonzero(tokens_n == UNREADABLE)
    if len(unreadable):
        examples = "; ".join(_unreadable_example(rows, int(i)) for i in unreadable[:_EXAMPLES])
        warnings.warn(
            f"{len(unreadable)} of {len(rows)} training samples have an image that cannot be read; each is skipped "
            f"where it comes up (unreadable_frac in the training log): {examples}"
            f"{' ...' if len(unreadable) > _EXAMPLES else ''}",
            stacklevel=3,
        )
    malformed = []
    for i in np.flatnonzero(tokens_n == 0)[:_TURNS_LOOKED_AT].tolist():
        why = turn_problem(rows.raw(i, i + 1)[0]["texts"])
        if why:
            malformed.append(f"{rows.where(i)}: {why}")
    if malformed:
        examples = "; ".join(malformed[:_EXAMPLES]) + (" ..." if len(malformed) > _EXAMPLES else "")
        warnings.warn(f"training samples without a usable turn are left out, e.g. {examples}; {_TURN_HINT}",
                      stacklevel=3)


def _unreadable_example(rows: VQARows, i: int) -> str:
    try:
        rows[i]
    except UnreadableImage as e:
        return str(e)
    return f"{rows.where(i)}: its image header cannot be read"


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
# Comparing two digits is the question a small model learns last. With one pair per image it saw 1617 fixed
# pairs ~26 times each by the end of training and learnt them by heart (62.5% on held-out pairs); four pairs per
# image, two thirds of the mix, make it compare. Val keeps one pair per image.
_TRAIN_PAIRS_PER_IMAGE = 4


def _digit_image(pixels_88: np.ndarray, size: int) -> Any:
    """An 8 x 8 digit (0..16 ink) as dark ink on white paper, upsampled to ``size`` and made RGB."""
    from PIL import Image

    grey = np.round(255.0 - pixels_88 * (255.0 / 16.0)).astype(np.uint8)
    bilinear = getattr(Image, "Resampling", Image).BILINEAR
    return Image.fromarray(grey).resize((size, size), bilinear).convert("RGB")


def _png(image: Any) -> dict[str, Any]:
    """An image as datasets.Image stores it, encoded once: each digit appears in up to 10 rows."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return {"bytes": buffer.getvalue(), "path": None}


def digits_vqa(split: str, image_size: int = 32) -> Any:
    """Questions about scikit-learn's digits as a ``datasets.Dataset`` (built in memory, no download).

    Uses the fixed train/val split of vistrain.data.digits, so val images are never trained on. For N
    images of the split it has one-turn samples grouped by question type (``qtype``), in this order:

        digit   "What digit is this?"                       -> "0" .. "9"          N
        parity  "Is this digit even or odd?"                -> "even" | "odd"      N
        same    "Do these two images show the same digit?"  -> "yes" | "no"       4N (train), N (val)

    Pair questions come in rounds of one per image, the image first (see ``_pair_rows``): four rounds in
    train (each image twice beside another image of its digit, twice beside another digit), one in val.
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
    images = [_png(_digit_image(digits.images[i], image_size)) for i in keep]

    rows = [_digits_row([images[i]], "digit", str(y)) for i, y in enumerate(labels)]
    rows += [_digits_row([images[i]], "parity", "even" if y % 2 == 0 else "odd") for i, y in enumerate(labels)]
    g = torch.Generator().manual_seed(_PAIR_SEED + (1 if split == "val" else 0))
    rows += _pair_rows(images, labels, _TRAIN_PAIRS_PER_IMAGE if split == "train" else 1, g)
    # Python lists declare list features in every datasets version (datasets.List is 4.0 and later).
    features = datasets.Features(
        {
            "images": [datasets.Image()],
            "texts": [{"user": datasets.Value("string"), "assistant": datasets.Value("string")}],
            "qtype": datasets.Value("string"),
        }
    )
    return datasets.Dataset.from_list(rows, features=features)


def _pair_rows(images: list[Any], labels: list[int], rounds: int, g: torch.Generator) -> list[dict[str, Any]]:
    """``rounds`` "same digit?" questions per image, the image first. In round r image i is paired with a
    different image of its own digit ("yes") when i + r is even, else with an image of another digit ("no"),
    partners drawn by ``g`` from the same images: each round is balanced for even N (one more "yes" for odd N),
    and every image is the first of a "yes" and a "no" pair once in any two rounds."""
    by_label = {c: [i for i, y in enumerate(labels) if y == c] for c in range(10)}
    others = {c: [j for d in range(10) if d != c for j in by_label[d]] for c in range(10)}
    rows = []
    for r in range(rounds):
        for i, y in enumerate(labels):
            same = (i + r) % 2 == 0
            candidates = [j for j in by_label[y] if j != i] if same else others[y]
            j = candidates[int(torch.randint(len(candidates), (), generator=g))]
            rows.append(_digits_row([images[i], images[j]], "same", "yes" if same else "no"))
    return rows


def _digits_row(images: list[Any], qtype: str, answer: str) -> dict[str, Any]:
    return {"images": images, "texts": [{"user": DIGITS_QUESTIONS[qtype], "assistant": answer}], "qtype": qtype}


def vqa_texts(dataset: Any) -> Iterable[str]:
    """Every user and assistant text of a VQA data set (VQARows, map-style or streaming): the corpus for
    ``train_tokenizer``. Turns that are not {user, assistant} dicts of texts give nothing."""
    if isinstance(dataset, VQARows):
        all_turns: Iterable[Any] = dataset.texts()
    elif hasattr(dataset, "__len__"):  # read the text column alone, without decoding any image
        all_turns = dataset.with_format("arrow", columns=["texts"])["texts"].to_pylist()
    else:
        all_turns = (row["texts"] for row in dataset.select_columns(["texts"]))
    for turns in all_turns:
        for user, assistant in kept_turns({"texts": turns}, {}, answered=False):
            yield user
            yield assistant
