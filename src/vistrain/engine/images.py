"""Image batches in the model range [-1, 1] -> uint8 arrays, grids and PNG files."""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from vistrain.durable import AtomicFile

__all__ = ["NpzImageWriter", "make_grid", "save_png", "to_uint8_hwc"]


def to_uint8_hwc(images_BCHW: Tensor) -> np.ndarray:
    """[-1, 1] images -> N x H x W x 3 uint8 (the .npz format FID suites read); 1-channel images become grey RGB.

    Values outside [-1, 1] are clipped; -1 maps to 0 and 1 to 255.
    """
    if images_BCHW.ndim != 4 or images_BCHW.shape[1] not in (1, 3):
        raise ValueError(
            f"expected images shaped B x C x H x W with C = 1 or 3, got {tuple(images_BCHW.shape)}"
        )
    x_BCHW = images_BCHW.detach().to(device="cpu", dtype=torch.float32)
    x_BCHW = ((x_BCHW.clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)
    if x_BCHW.shape[1] == 1:
        x_BCHW = x_BCHW.expand(-1, 3, -1, -1)
    return x_BCHW.permute(0, 2, 3, 1).contiguous().numpy()


def make_grid(images_BCHW: Tensor, nrow: int | None = None, padding: int = 2) -> np.ndarray:
    """Tile a batch of [-1, 1] images into one uint8 H x W x 3 grid, `nrow` images per row.

    `nrow` defaults to ceil(sqrt(B)) (a near-square grid). Images are separated, and the grid framed, by
    `padding` black pixels, so the grid is rows*(H+padding)+padding by nrow*(W+padding)+padding.
    """
    if images_BCHW.ndim != 4 or images_BCHW.shape[0] == 0:
        raise ValueError(f"make_grid needs a non-empty B x C x H x W batch, got {tuple(images_BCHW.shape)}")
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    images_BHWC = to_uint8_hwc(images_BCHW)
    B, H, W, _ = images_BHWC.shape
    ncol = nrow if nrow is not None else math.ceil(math.sqrt(B))
    if ncol < 1:
        raise ValueError(f"nrow must be >= 1, got {nrow}")
    ncol = min(ncol, B)
    nrows = math.ceil(B / ncol)
    grid_HWC = np.zeros((nrows * (H + padding) + padding, ncol * (W + padding) + padding, 3), dtype=np.uint8)
    for i in range(B):
        row, col = divmod(i, ncol)
        top, left = padding + row * (H + padding), padding + col * (W + padding)
        grid_HWC[top : top + H, left : left + W] = images_BHWC[i]
    return grid_HWC


def save_png(path: Path, array_HWC: np.ndarray) -> None:
    """Write a uint8 H x W (x 1 or 3) array as PNG; parent folders are created.

    The file is replaced whole (vistrain.durable), so a reader (or a run killed mid-write) never sees a truncated
    PNG.
    """
    path = Path(path)
    array = np.asarray(array_HWC)
    if array.dtype != np.uint8:
        raise ValueError(f"save_png expects a uint8 array, got {array.dtype}; convert with to_uint8_hwc/make_grid")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))):
        raise ValueError(f"save_png expects H x W, H x W x 1, 3 or 4, got shape {array.shape}")
    path.parent.mkdir(parents=True, exist_ok=True)
    with AtomicFile(path) as out:
        Image.fromarray(array).save(out.file, format="PNG")


class NpzImageWriter:
    """Writes `arr_0` (N x H x W x 3 uint8, the format FID suites read) into an .npz as chunks arrive.

    Memory stays bounded by one chunk whatever N is: the .npy inside the zip is streamed (stored, not
    compressed), its header written first from the known N. The file appears under its name only when all
    N images are in (vistrain.durable: a temporary file beside it, renamed); an exception, or fewer images,
    removes the temporary file and leaves `path` as it was.
    """

    def __init__(self, path: Path, num: int) -> None:
        import zipfile

        self.path, self.num, self.written = Path(path), num, 0
        self._out = AtomicFile(self.path)
        try:
            self._zip = zipfile.ZipFile(self._out.file, "w", compression=zipfile.ZIP_STORED, allowZip64=True)
        except BaseException:
            self._out.discard()
            raise
        self._member = None

    def write(self, images_BCHW: Tensor) -> None:
        chunk_BHWC = to_uint8_hwc(images_BCHW)
        if self._member is None:
            _, H, W, C = chunk_BHWC.shape
            self._member = self._zip.open("arr_0.npy", mode="w", force_zip64=True)
            header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
                      "shape": (self.num, H, W, C)}
            np.lib.format.write_array_header_1_0(self._member, header)
        if self.written + len(chunk_BHWC) > self.num:
            raise ValueError(f"more than the {self.num} images announced for {self.path}")
        self._member.write(chunk_BHWC.tobytes())
        self.written += len(chunk_BHWC)

    def close(self) -> None:
        """Finish the file; it is put in place only if all `num` images were written."""
        try:
            self._close_zip()
        except BaseException:
            self.discard()
            raise
        if self.written == self.num:
            self._out.commit()
        else:
            self._out.discard()

    def discard(self) -> None:
        """Drop what was written; `path` is left as it was."""
        # The zip is closed all the same: left open, it would try to finish itself on a closed file when collected.
        with contextlib.suppress(OSError, ValueError):
            self._close_zip()
        self._out.discard()

    def _close_zip(self) -> None:
        if self._member is not None:
            self._member.close()
        self._zip.close()

    def __enter__(self) -> NpzImageWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.discard()
