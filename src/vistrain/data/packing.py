"""Packing VQA samples into fixed-length rows, resumably.

A packed row holds several whole samples back to back, then padding:

    input_ids     [ s0 s0 s0 s0 | s1 s1 s1 | s2 s2 | pad pad ]
    doc_ids       [ 0  0  0  0  | 1  1  1  | 2  2  | 3   3   ]   pads are a document of their own
    position_ids  [ 0  1  2  3  | 0  1  2  | 0  1  | 0   1   ]   positions restart with every sample
    labels        answers and their end-of-turn tokens; -100 elsewhere, pads included

The model must attend only within a document (token i sees j iff doc_ids agree and j <= i) and use the
position ids: otherwise a sample attends to the unrelated ones before it and sees its own tokens at shifted
positions (nanoVLM issue 201). Every sample starts with an unlabelled token (<|im_start|>), so with labels
shifted inside the model no token is ever trained to predict the first token of the next sample.

Map-style data: ``PackedOrder`` gives each stream position a *bin* -- a list of (index, sample_seed) keys --
as a pure function of (seed, position), like ``StreamOrder`` does for single items, so a run resumes exactly
by its position in bins. ``PackedVQADataset[bin]`` encodes the bin into one row. Streaming data:
``StreamingPacker`` packs on the fly and resumes by skipping samples (see its docstring for what is exact).

A sample with an image that cannot be decoded is skipped where it comes up, with a warning, and counted in
its row's ``num_skipped``: one whose image header could not be read when it was measured rides along in a
bin of its window without taking room, one that fails only when its pixels are decoded leaves its room
empty. Whether a sample decodes is a property of the data, so the rows are the same on a resumed run and
with any number of loader workers.
"""

from __future__ import annotations

import bisect
import functools
import itertools
import math
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Optional

import numpy as np
import torch
from torch.utils.data import Dataset

from vistrain.data.sampler import StreamOrder, hash_ints, split_key
from vistrain.data.vqa_images import UnreadableImage
from vistrain.errors import ConfigError

IGNORE_INDEX = -100
_BINS_TAG = 0x42494E53  # "BINS": the per-window bin shuffle, independent of StreamOrder's permutations
_KEPT_WINDOWS = 4  # packed windows kept in memory: consecutive micro-batches rarely span more than two


def first_fit_decreasing(
    lengths: Sequence[int], num_images: Sequence[int], seq_length: int, max_images: int
) -> list[list[int]]:
    """Pack items into bins of at most ``seq_length`` tokens and ``max_images`` images: each item, longest
    first (ties by position), goes into the first bin it fits, else a new bin. Returns item positions per
    bin, in placement order. Deterministic; items must fit an empty bin on their own.
    """
    lengths_n = np.asarray(lengths, dtype=np.int64)
    images_n = np.asarray(num_images, dtype=np.int64)
    n = len(lengths_n)
    if n and (lengths_n.max() > seq_length or images_n.max() > max_images):
        raise ValueError("first_fit_decreasing: an item does not fit an empty bin; drop it before packing")
    room_tokens = np.empty(n, dtype=np.int64)  # at most one bin per item
    room_images = np.empty(n, dtype=np.int64)
    bins: list[list[int]] = []
    for i in np.argsort(-lengths_n, kind="stable").tolist():
        length, images = lengths_n[i], images_n[i]
        nb = len(bins)
        fits = (room_tokens[:nb] >= length) & (room_images[:nb] >= images)
        b = int(fits.argmax()) if nb else 0
        if nb == 0 or not fits[b]:
            b = nb
            bins.append([])
            room_tokens[b], room_images[b] = seq_length, max_images
        bins[b].append(i)
        room_tokens[b] -= length
        room_images[b] -= images
    return bins


class PackedOrder:
    """Stream position -> bin of ``(sample_index, sample_seed)`` keys, a pure function of (seed, position).

    The samples that fit a row (1..seq_length tokens, at most max_images_per_pack images) and those known to
    be unreadable are visited in a ``StreamOrder``; each epoch of it is cut into equal windows of at most
    ``window`` samples, so a window never straddles an epoch and holds each sample at most once. Each window
    is packed by first-fit decreasing and its bins shuffled with a generator seeded by (seed, window); its
    unreadable samples then ride along in its bins (``_ride_along``), to be skipped and counted when encoded.
    Bins are numbered through the windows in order.

    Finding bin p needs the bin counts of every window before it: they are memoised, and a resumed run
    recomputes them from the cached lengths: about 20 ms per window of 4096 samples on one CPU core, so
    resuming after a million rows takes some 25 s. Larger windows pack tighter and mix more, at a higher
    cost per window.

    Args:
        lengths, num_images: tokens and images per sample of the data set (``sample_lengths``); 0 tokens
            marks a sample the encoder skips, a negative count (UNREADABLE) one with an unreadable image.
        seq_length: tokens per row. Longer samples are dropped and counted (``num_too_long``).
        max_images_per_pack: images per row. Samples with more are dropped and counted.
        window: samples per packing window (capped at the number of samples that fit).
    """

    def __init__(
        self,
        lengths: Sequence[int],
        num_images: Sequence[int],
        seq_length: int,
        max_images_per_pack: int,
        seed: int,
        window: int = 4096,
        shuffle: bool = True,
        stream: int = 0,
    ) -> None:
        lengths_N = np.asarray(lengths, dtype=np.int64)
        images_N = np.asarray(num_images, dtype=np.int64)
        if lengths_N.shape != images_N.shape or lengths_N.ndim != 1:
            raise ValueError(f"lengths {lengths_N.shape} and num_images {images_N.shape} must be equal 1-D arrays")
        if seq_length < 1 or max_images_per_pack < 0 or window < 1:
            raise ValueError(
                f"data.seq_length ({seq_length}) and data.pack_window ({window}) must be >= 1, "
                f"data.max_images_per_pack ({max_images_per_pack}) >= 0."
            )
        self.seq_length, self.max_images_per_pack, self.seed = seq_length, max_images_per_pack, seed
        unreadable = lengths_N < 0
        nonempty = lengths_N > 0
        short = nonempty & (lengths_N <= seq_length)
        fits = short & (images_N <= max_images_per_pack)
        self.num_unreadable = int(unreadable.sum())
        self.num_empty = int((lengths_N == 0).sum())
        self.num_too_long = int((nonempty & ~short).sum())
        self.num_too_many_images = int((short & ~fits).sum())
        dropped = (
            f"{self.num_too_long} of {len(lengths_N)} samples are longer than data.seq_length={seq_length}, "
            f"{self.num_too_many_images} have more than data.max_images_per_pack={max_images_per_pack} images, "
            f"{self.num_empty} have no usable turn (none, or all below data.min_ratings), "
            f"{self.num_unreadable} have an image that cannot be read"
        )
        self._index_n = np.flatnonzero(fits | unreadable)
        if not fits.any():
            raise ValueError(f"no sample fits a packed row: {dropped}.")
        if self.num_too_long or self.num_too_many_images:
            warnings.warn(f"packing drops samples: {dropped}.", stacklevel=2)
        self._lengths_N, self._images_N = lengths_N, images_N
        self.num_samples = len(self._index_n)
        self.windows_per_epoch = math.ceil(self.num_samples / window)
        self.window = math.ceil(self.num_samples / self.windows_per_epoch)  # the largest window's size
        self.shuffle = shuffle
        self._order = StreamOrder(self.num_samples, seed, shuffle=shuffle, stream=stream)
        self._bin_tag = (seed, stream)
        # Memo, not state: _starts[w] is the first bin of window w for every window packed so far.
        self._starts = [0]
        self._windows: OrderedDict[int, list[list[tuple[int, int]]]] = OrderedDict()

    def _window_bounds(self, chunk: int) -> tuple[int, int]:
        """Epoch offsets [first, end) of a window: the epoch is cut into equal windows (within one sample)."""
        n, k = self.num_samples, self.windows_per_epoch
        return chunk * n // k, (chunk + 1) * n // k

    def _pack(self, w: int) -> list[list[tuple[int, int]]]:
        if w in self._windows:
            self._windows.move_to_end(w)
            return self._windows[w]
        epoch, chunk = divmod(w, self.windows_per_epoch)
        first, end = self._window_bounds(chunk)
        keys = self._order.keys(epoch * self.num_samples + first, end - first)
        keys = [(int(self._index_n[k]), seed) for k, seed in keys]
        readable = [key for key in keys if self._lengths_N[key[0]] >= 0]
        readable_n = np.asarray([index for index, _ in readable], dtype=np.int64)
        packed = first_fit_decreasing(
            self._lengths_N[readable_n], self._images_N[readable_n], self.seq_length, self.max_images_per_pack
        )
        bins = [[readable[i] for i in b] for b in packed]
        if self.shuffle:  # FFD puts the big samples first: mix long and short rows through the window
            g = torch.Generator().manual_seed(hash_ints(_BINS_TAG, *self._bin_tag, w) >> 1)
            bins = [bins[i] for i in torch.randperm(len(bins), generator=g).tolist()]
        bins = _ride_along(bins, [key for key in keys if self._lengths_N[key[0]] < 0])
        self._windows[w] = bins
        if len(self._windows) > _KEPT_WINDOWS:
            self._windows.popitem(last=False)
        return bins

    def _window_of(self, position: int) -> int:
        while self._starts[-1] <= position:  # count the bins of windows not yet seen
            self._starts.append(self._starts[-1] + len(self._pack(len(self._starts) - 1)))
        return bisect.bisect_right(self._starts, position) - 1

    def keys(self, start: int, count: int) -> list[list[tuple[int, int]]]:
        """The bins at stream positions ``[start, start + count)``."""
        if start < 0 or count < 0:
            raise ValueError(f"stream positions must be >= 0, got start={start}, count={count}")
        out = []
        for position in range(start, start + count):
            w = self._window_of(position)
            out.append(list(self._pack(w)[position - self._starts[w]]))  # a copy: the memo stays intact
        return out


def _ride_along(bins: list[list[Any]], unreadable: list[Any]) -> list[list[Any]]:
    """Samples known to be unreadable, added to the bins in turn (a bin of their own if there is none): they
    take no room, and are tried, skipped and counted where they come up, as a bad file of an image folder is.
    """
    if unreadable and not bins:
        return [list(unreadable)]
    for k, key in enumerate(unreadable):
        bins[k % len(bins)].append(key)
    return bins


def pack_row(
    samples: Sequence[Mapping[str, Any]], seq_length: int, pad_id: int, tile_size: Optional[int] = None
) -> dict[str, Any]:
    """Encoded samples (``VQAEncoder.encode`` outputs) -> one packed row of ``seq_length`` tokens.

    No samples (every one of a bin skipped) gives a row of padding, whose empty ``pixel_values`` need the
    ``tile_size``."""
    if not samples and tile_size is None:
        raise ValueError("pack_row needs at least one sample, or the tile size for a row of padding")
    total = sum(len(s["input_ids"]) for s in samples)
    if total > seq_length:
        raise ValueError(
            f"a bin of {len(samples)} samples has {total} tokens, more than data.seq_length={seq_length}: the "
            f"cached lengths disagree with the encoder (delete the length cache if the encoding changed)."
        )
    pad = seq_length - total
    no_pixels = torch.zeros(0, 3, tile_size or 0, tile_size or 0)
    pixel_values = torch.cat([s["pixel_values"] for s in samples]) if samples else no_pixels
    pieces = [(s["input_ids"], s["labels"]) for s in samples]
    if pad:
        pieces.append((torch.full((pad,), pad_id, dtype=torch.long), torch.full((pad,), IGNORE_INDEX)))
    docs = [torch.full((len(ids),), d, dtype=torch.long) for d, (ids, _) in enumerate(pieces)]
    labels = torch.cat([lab for _, lab in pieces])
    return {
        "input_ids": torch.cat([ids for ids, _ in pieces]),
        "labels": labels,
        "doc_ids": torch.cat(docs),
        "position_ids": torch.cat([torch.arange(len(ids)) for ids, _ in pieces]),
        "pixel_values": pixel_values,
        "num_samples": len(samples),
        "num_images": sum(int(s["num_images"]) for s in samples),
        "num_tokens": total,
        "num_loss_tokens": int((labels != IGNORE_INDEX).sum()),
        "num_skipped": 0,  # samples of the bin skipped for an unreadable image: the caller counts them
    }


class PackedVQADataset(Dataset):
    """``dataset[bin]`` -> one packed row (``pack_row``); a bin is a list of (index, sample_seed) keys, as
    ``PackedOrder.keys`` gives them (a plain index packs that sample alone). A sample whose image cannot be
    decoded (UnreadableImage from VQARows or the encoder) is skipped with a warning naming it, and counted in
    the row's ``num_skipped``."""

    def __init__(self, base_dataset: Any, encoder: Any, seq_length: int, pad_id: int) -> None:
        self.base, self.encoder = base_dataset, encoder
        self.seq_length, self.pad_id = seq_length, pad_id

    def _encode(self, index: int) -> dict[str, Any]:
        row = self.base[index]  # VQARows decodes the images, and its UnreadableImage names source and row
        try:
            sample = self.encoder.encode(row)
        except UnreadableImage as e:
            raise UnreadableImage(f"row {index}: {e}") from None
        if sample is None:
            raise ValueError(
                f"sample {index} has no usable turn left after the rating filters, yet it was packed: the length "
                f"cache does not match data.min_ratings (delete the cache)."
            )
        return sample

    def __getitem__(self, bin_keys: Any) -> dict[str, Any]:
        keys = [bin_keys] if isinstance(bin_keys, int) else bin_keys
        # VQA has no random augmentation: the sample seed is unused
        encodes = [functools.partial(self._encode, index) for index, _ in map(split_key, keys)]
        return _packed_readable(encodes, self.seq_length, self.pad_id, self.encoder.image_processor.tile_size)


def _packed_readable(
    encodes: Sequence[Callable[[], dict[str, Any]]], seq_length: int, pad_id: int, tile_size: int
) -> dict[str, Any]:
    """One row of the samples that ``encodes`` give; one whose UnreadableImage (naming the sample) is raised
    is skipped with a warning and counted."""
    encoded, skipped = [], 0
    for encode in encodes:
        try:
            encoded.append(encode())
        except UnreadableImage as e:
            skipped += 1
            warnings.warn(f"skipping a training sample: {e}", stacklevel=3)
    row = pack_row(encoded, seq_length, pad_id, tile_size)
    row["num_skipped"] = skipped
    return row


_ROW_TENSORS = ("input_ids", "labels", "doc_ids", "position_ids")
_COUNTS = ("num_samples", "num_images", "num_tokens", "num_loss_tokens", "num_skipped")


def collate_packed(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Packed rows -> micro-batch: (B, T) ``input_ids``, ``labels``, ``doc_ids``, ``position_ids``; all
    rows' tiles concatenated in row order (``pixel_values``, (V, 3, tile, tile)); counts summed (ints).

    Tile v fills the v-th run of image tokens of ``input_ids`` read row-major: the model can scatter the
    projected tiles into ``input_ids == image_token_id`` in one go.
    """
    batch: dict[str, Any] = {k: torch.stack([r[k] for r in rows]) for k in _ROW_TENSORS}
    batch["pixel_values"] = torch.cat([r["pixel_values"] for r in rows])
    batch.update({k: sum(int(r[k]) for r in rows) for k in _COUNTS})
    return batch


def collate_padded(samples: Sequence[Mapping[str, Any]], pad_id: int) -> dict[str, Any]:
    """One sample per row, right-padded to the longest: for validation loss and generation.

    Takes ``VQAEncoder.encode`` outputs (with labels) or ``encode_prompt`` outputs (answers, no labels).
    Gives ``input_ids``, ``labels`` (when the samples have them), ``attention_mask`` (True on tokens),
    ``position_ids``, ``doc_ids`` (0 for the sample, 1 for its pads: the packed rows' attention mask works
    unchanged), ``lengths`` (B,), ``images_per_row`` (B,), ``pixel_values`` in row order, the counts, and
    ``answer`` / ``qtype`` lists when the samples carry them.
    """
    lengths = torch.tensor([len(s["input_ids"]) for s in samples], dtype=torch.long)
    B, T = len(samples), int(lengths.max()) if len(samples) else 0
    is_token = torch.arange(T)[None, :] < lengths[:, None]
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    for b, s in enumerate(samples):
        input_ids[b, : lengths[b]] = s["input_ids"]
    batch: dict[str, Any] = {
        "input_ids": input_ids,
        "attention_mask": is_token,
        "position_ids": torch.arange(T).expand(B, T) * is_token,
        "doc_ids": (~is_token).long(),
        "lengths": lengths,
        "images_per_row": torch.tensor([int(s["num_images"]) for s in samples], dtype=torch.long),
        "pixel_values": torch.cat([s["pixel_values"] for s in samples]),
        "num_samples": B,
        "num_images": sum(int(s["num_images"]) for s in samples),
        "num_tokens": int(lengths.sum()),
    }
    if all("labels" in s for s in samples):
        labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
        for b, s in enumerate(samples):
            labels[b, : lengths[b]] = s["labels"]
        batch["labels"] = labels
        batch["num_loss_tokens"] = int((labels != IGNORE_INDEX).sum())
    for extra in ("answer", "qtype"):
        if all(extra in s for s in samples):
            batch[extra] = [s[extra] for s in samples]
    return batch


class StreamingPacker:
    """Packed rows from a streaming source (an iterable of samples), packed on the fly; ends with the stream.

    The stream is read in chunks of ``buffer_size`` samples. Each chunk is measured (no pixel work), its
    samples that fit are packed by first-fit decreasing, the bins are shuffled with a generator seeded by
    (seed, the chunk's first sample) and encoded into rows one by one. ``next()`` raises StopIteration once
    the stream is exhausted and the last chunk's rows are out. Samples whose image header cannot be read
    ride along in the bins, and those and samples whose pixels cannot be decoded are skipped and counted in
    their row's ``num_skipped``, with a warning naming their place in the stream.

    Resume: the state is ``{"samples": samples before the current chunk, "bins": rows of that chunk already
    returned}``. Loading it skips that many samples of a new iterator over the stream (``.skip()`` where the
    stream has one), re-reads and re-packs the chunk and skips the rows already returned.

    Exact on resume: the same rows, in the same order, provided the stream yields the same samples in the
    same order (same files and, for a shuffled stream, the same shuffle seed and buffer) and buffer_size,
    seq_length, max_images_per_pack, seed and the encoder are unchanged. Not exact: a stream whose order
    changes between runs, or changed settings (rows then restart from the chunk boundary with the new
    packing: no sample is lost but some may repeat). Skipping still reads the skipped samples, so a resume
    deep into a stream costs time. The drop counters count this process's chunks only (a resumed chunk
    counts again). Each rank should pack its own shard (``datasets.distributed.split_dataset_by_node``) and
    keep its own state; loading happens in the calling process (no loader workers).
    """

    def __init__(
        self,
        stream: Iterable[Mapping[str, Any]],
        encoder: Any,
        seq_length: int,
        max_images_per_pack: int,
        pad_id: int,
        buffer_size: int = 1024,
        seed: int = 0,
    ) -> None:
        if buffer_size < 1:
            raise ValueError(f"data.pack_buffer_size must be >= 1, got {buffer_size}")
        self.stream, self.encoder = stream, encoder
        self.seq_length, self.max_images_per_pack, self.pad_id = seq_length, max_images_per_pack, pad_id
        self.buffer_size, self.seed = buffer_size, seed
        self.num_too_long = self.num_too_many_images = self.num_empty = self.num_unreadable = 0
        self._chunk_start, self._emitted = 0, 0
        self._samples: Optional[list[Mapping[str, Any]]] = None  # the current chunk
        self._bins: list[list[int]] = []
        self._iterator: Optional[Iterator[Mapping[str, Any]]] = None
        self._exhausted = False

    def __iter__(self) -> StreamingPacker:
        return self

    def __next__(self) -> dict[str, Any]:
        while True:
            if self._samples is None:
                self._read_chunk()  # raises StopIteration at the end of the stream
            assert self._samples is not None
            if self._emitted < len(self._bins):
                encodes = [functools.partial(self._encode, i) for i in self._bins[self._emitted]]
                self._emitted += 1
                return _packed_readable(encodes, self.seq_length, self.pad_id, self.encoder.image_processor.tile_size)
            self._chunk_start += len(self._samples)
            self._samples, self._bins, self._emitted = None, [], 0

    def _encode(self, i: int) -> dict[str, Any]:
        assert self._samples is not None
        try:
            return self.encoder.encode(self._samples[i])
        except UnreadableImage as e:
            raise UnreadableImage(f"sample {self._chunk_start + i} of the stream: {e}") from None

    def _read_chunk(self) -> None:
        if self._exhausted:
            raise StopIteration
        if self._iterator is None:
            self._iterator = _skip(self.stream, self._chunk_start)
        samples = list(itertools.islice(self._iterator, self.buffer_size))
        if not samples:
            self._exhausted = True
            raise StopIteration
        tokens_n, images_n = self.encoder.measure(samples)
        nonempty, short = tokens_n > 0, (tokens_n > 0) & (tokens_n <= self.seq_length)
        fits = short & (images_n <= self.max_images_per_pack)
        self.num_unreadable += int((tokens_n < 0).sum())
        self.num_empty += int((tokens_n == 0).sum())
        self.num_too_long += int((nonempty & ~short).sum())
        self.num_too_many_images += int((short & ~fits).sum())
        keep_k = np.flatnonzero(fits)
        packed = first_fit_decreasing(tokens_n[keep_k], images_n[keep_k], self.seq_length, self.max_images_per_pack)
        bins = [[int(keep_k[i]) for i in b] for b in packed]
        g = torch.Generator().manual_seed(hash_ints(_BINS_TAG, self.seed, self._chunk_start) >> 1)
        bins = [bins[i] for i in torch.randperm(len(bins), generator=g).tolist()]
        self._bins = _ride_along(bins, np.flatnonzero(tokens_n < 0).tolist())
        self._samples = samples

    @property
    def samples_consumed(self) -> int:
        """Samples before the chunk being emitted (all their rows are out)."""
        return self._chunk_start

    def state_dict(self) -> dict[str, int]:
        return {"samples": self._chunk_start, "bins": self._emitted}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self._chunk_start, self._emitted = int(state["samples"]), int(state["bins"])
        self._samples, self._bins, self._iterator, self._exhausted = None, [], None, False


class StreamingMicroBatches:
    """Micro-batches of packed rows from a streaming source; ends with the stream (the engine then stops every
    rank together). Each rank packs its own shard, so the data position is per rank: state_dict gathers every
    rank's with `gather` (a collective: every rank saves), and a resume on the same number of ranks takes back
    its own."""

    def __init__(self, packer: StreamingPacker, micro_batch_size: int, rank: int, world_size: int,
                 gather: Callable[[Any], list[Any]]):
        self.packer, self.micro_batch_size = packer, micro_batch_size
        self.rank, self.world_size, self.gather = rank, world_size, gather

    def __iter__(self) -> StreamingMicroBatches:
        return self

    def __next__(self) -> dict:
        return collate_packed([next(self.packer) for _ in range(self.micro_batch_size)])

    def state_dict(self) -> dict:
        return {"ranks": self.gather(self.packer.state_dict())}

    def load_state_dict(self, state: dict) -> None:
        ranks = state["ranks"]
        if len(ranks) != self.world_size:
            raise ConfigError(f"this streaming run was saved on {len(ranks)} ranks; each rank streams its own shard, "
                              f"so it resumes on {len(ranks)} ranks only (now {self.world_size})")
        self.packer.load_state_dict(ranks[self.rank])


def _skip(stream: Iterable[Any], count: int) -> Iterator[Any]:
    """An iterator over ``stream`` from its ``count``-th item on."""
    if count and hasattr(stream, "skip"):  # datasets.IterableDataset has its own
        return iter(stream.skip(count))
    return itertools.islice(iter(stream), count, None)
