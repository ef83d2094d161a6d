"""Images of a VQA sample -> normalised tiles for the vision encoder, plus the grid that names them.

An image is resized so that its long side is at most ``max_image_size`` and each side is a whole number of
tiles, then cut into a rows x cols grid of ``tile_size`` squares. A global view -- the whole image squeezed
into one tile -- comes first, so the language model sees the overview before the detail:

    tiles[0]            global view
    tiles[1 + i*cols + j]  tile at row i, column j (0-based here; the row/column tokens count from 1)

A 1 x 1 grid has no separate tile: its one tile would be the global view again, pixel for pixel, and would
cost a second pass of the encoder and a second run of image tokens for nothing. Such an image is just the
global view (the token layout in vqa_text.py agrees).

``resize`` picks how the grid and the pixels are made (RESIZE_MODES):

* ``"vistrain"`` (the default): scale down only, each side to the NEAREST whole number of tiles; the
  global view is a bicubic resize of the original pixels.
* ``"nanovlm"``: what huggingface/nanoVLM does (``resize_to_max_side_len`` true, its default since
  2025-08): the long side becomes exactly ``max_image_size`` (up- or down-scaled), the short side keeps the
  aspect ratio rounded UP to a whole number of tiles (at least one), one bicubic resize of the whole image;
  the tiles are cut from that, and the global view is the resized image squeezed to one tile by an
  antialiased bilinear interpolation (a second resampling, of the resized pixels). A 1 x 1 grid is that one
  tile. Models imported from nanoVLM use it, with mean 0 and std 1: nanoVLM feeds [0, 1] pixels unnormalised.
* ``"nanovlm_tiles"``: nanoVLM with ``resize_to_max_side_len`` false: the long side is rounded up to a whole
  number of tiles, at most ``max_image_size``; the rest as ``"nanovlm"``.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

MAX_GRID_SIDE = 8  # the row/column special tokens go up to <row_8_col_8>
_BICUBIC = getattr(Image, "Resampling", Image).BICUBIC  # PIL's bicubic is antialiased when it shrinks
RESIZE_MODES = ("vistrain", "nanovlm", "nanovlm_tiles")  # see the module docstring


class UnreadableImage(ValueError):
    """An image of a sample that cannot be decoded (not an image, truncated, missing file): the sample is
    skipped by whoever knows which source and row it is, never the run."""


def as_pil(image: Any) -> Image.Image:
    """A PIL image from what a data set row holds: a PIL image, a {"bytes", "path"} dict or a path.

    The dict form is what ``datasets`` returns when image decoding is off (the length pass reads only the
    image header that way) or when a parquet column was never declared an Image feature. Only the header
    is read here; pixels are decoded when used (``load_image`` decodes them at once).
    """
    if isinstance(image, Image.Image):
        return image
    try:
        if isinstance(image, dict) and image.get("bytes") is not None:
            return Image.open(io.BytesIO(image["bytes"]))
        path = image.get("path") if isinstance(image, dict) else image
        if isinstance(path, str) and path:
            return Image.open(path)
    except Exception as e:  # PIL raises many types (UnidentifiedImageError, OSError, SyntaxError, ...)
        raise UnreadableImage(f"cannot be read ({_why(image, e)})") from None
    what = "a dict with neither bytes nor a path" if isinstance(image, dict) else f"a {type(image).__name__}"
    raise UnreadableImage(f"is {what}, not an image: expected a PIL image, a {{bytes, path}} dict or a path")


def load_image(image: Any) -> Image.Image:
    """``as_pil`` with every pixel decoded now, so that a truncated file fails here and not mid-resize."""
    picture = as_pil(image)
    try:
        picture.load()
    except Exception as e:
        raise UnreadableImage(f"cannot be read ({_why(image, e)})") from None
    return picture


def images_of(sample: Mapping[str, Any]) -> list[Any]:
    """A sample's images as a list: none (None), the list itself, or a lone image as a list of one."""
    images = sample.get("images")
    if images is None:
        return []
    return list(images) if isinstance(images, (list, tuple)) else [images]


def load_images(images: Sequence[Any]) -> list[Image.Image]:
    """``load_image`` of each; the error names the one that failed (``images[1] cannot be read (...)``)."""
    loaded = []
    for k, image in enumerate(images):
        try:
            loaded.append(load_image(image))
        except UnreadableImage as e:
            raise UnreadableImage(f"images[{k}] {e}") from None
    return loaded


def _why(image: Any, error: Exception) -> str:
    if isinstance(error, UnidentifiedImageError) and isinstance(image, dict) and image.get("bytes") is not None:
        return "UnidentifiedImageError: its bytes are not in an image format PIL reads"  # PIL's text names a BytesIO
    return f"{type(error).__name__}: {error}"


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB, with transparent pixels over white: a plain convert() would show them in their hidden colour."""
    if image.mode == "RGB":
        return image
    has_alpha = image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info)
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


class ImageProcessor:
    """PIL image -> (tiles float32 (V, 3, tile, tile), (rows, cols)), normalised with the encoder's mean/std.

    V = 1 + rows*cols, or 1 for a single-tile image (see the module docstring). ``grid`` alone needs only
    the image size, which PIL reads from the header: the length pass never decodes pixels.
    """

    def __init__(
        self,
        tile_size: int,
        max_image_size: int,
        mean: Sequence[float] = (0.5, 0.5, 0.5),
        std: Sequence[float] = (0.5, 0.5, 0.5),
        resize: str = "vistrain",
    ) -> None:
        if resize not in RESIZE_MODES:
            raise ValueError(f"image resize mode {resize!r}: expected one of {', '.join(RESIZE_MODES)}.")
        if tile_size < 1:
            raise ValueError(f"data.tile_size must be a positive number of pixels, got {tile_size}.")
        if max_image_size < tile_size or max_image_size % tile_size:
            raise ValueError(
                f"data.max_image_size={max_image_size} must be a multiple of data.tile_size={tile_size} (and at "
                f"least one tile): rounding sides to whole tiles must not push the long side past it."
            )
        if max_image_size // tile_size > MAX_GRID_SIDE:
            raise ValueError(
                f"data.max_image_size={max_image_size} allows {max_image_size // tile_size} tiles per side; the "
                f"row/column tokens name at most {MAX_GRID_SIDE}. Lower it to {MAX_GRID_SIDE * tile_size} or less."
            )
        if len(mean) != 3 or len(std) != 3 or any(s <= 0 for s in std):
            raise ValueError(f"image mean/std need 3 values each and std > 0, got mean={mean}, std={std}.")
        self.tile_size = tile_size
        self.max_image_size = max_image_size
        self.resize = resize
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self._mean_3 = torch.tensor(self.mean, dtype=torch.float32).view(3, 1, 1)
        self._std_3 = torch.tensor(self.std, dtype=torch.float32).view(3, 1, 1)

    def grid(self, width: int, height: int) -> tuple[int, int]:
        """(rows, cols) of an image of this size.

        resize="vistrain": scale down (never up) so the long side fits ``max_image_size``, then round each
        side to the NEAREST multiple of the tile, at least one tile. Nearest rather than up: a 520 px side
        becomes one 512 tile, not two tiles of mostly stretched pixels. Since max_image_size is a multiple of
        the tile, rounding never takes the long side past it. resize="nanovlm*": nanovlm_size() in tiles.
        """
        if width < 1 or height < 1:
            raise ValueError(f"image has an empty side: {width} x {height} pixels")
        if self.resize != "vistrain":
            new_w, new_h = self.nanovlm_size(width, height)
            return new_h // self.tile_size, new_w // self.tile_size
        scale = min(1.0, self.max_image_size / max(width, height))
        rows = max(1, math.floor(height * scale / self.tile_size + 0.5))
        cols = max(1, math.floor(width * scale / self.tile_size + 0.5))
        return rows, cols

    def nanovlm_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) nanoVLM resizes an image to: whole tiles, the long side (width on ties) set first.

        The arithmetic is nanoVLM's, in the same float operations: long side L, short side S, tile t, maximum
        M; target long side M ("nanovlm") or min(M, ceil(L / t) t) ("nanovlm_tiles"); scale = target / L;
        short side max(t, ceil(S * scale / t) t).
        """
        t, m = self.tile_size, self.max_image_size
        landscape = width >= height
        long, short = (width, height) if landscape else (height, width)
        target_long = m if self.resize == "nanovlm" else min(m, math.ceil(long / t) * t)
        scale = target_long / long
        target_short = max(t, math.ceil(short * scale / t) * t)
        return (target_long, target_short) if landscape else (target_short, target_long)

    @staticmethod
    def num_views(rows: int, cols: int) -> int:
        """Tiles an image of this grid sends to the encoder: the global view, plus the grid if it has 2+ tiles."""
        return 1 if rows * cols == 1 else 1 + rows * cols

    def _normalise(self, image: Image.Image) -> torch.Tensor:
        x_HW3 = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy())
        x_3HW = x_HW3.permute(2, 0, 1).to(torch.float32) / 255.0
        return (x_3HW - self._mean_3) / self._std_3

    def __call__(self, image: Any) -> tuple[torch.Tensor, tuple[int, int]]:
        if self.resize != "vistrain":
            return self._nanovlm(as_pil(image))
        image = to_rgb(as_pil(image))
        rows, cols = self.grid(*image.size)
        t = self.tile_size
        # The global view comes from the original pixels, not from the tiled resize: one resampling only.
        views = [self._normalise(image.resize((t, t), _BICUBIC))]
        if rows * cols > 1:
            big_3HW = self._normalise(image.resize((cols * t, rows * t), _BICUBIC))
            # (3, rows*t, cols*t) -> (rows*cols, 3, t, t), row-major: the order of the row/column tokens.
            tiles = big_3HW.view(3, rows, t, cols, t).permute(1, 3, 0, 2, 4).reshape(rows * cols, 3, t, t)
            views.append(tiles)
        return torch.cat([v.view(-1, 3, t, t) for v in views]), (rows, cols)

    def _nanovlm(self, image: Image.Image) -> tuple[torch.Tensor, tuple[int, int]]:
        # nanoVLM converts with a plain convert("RGB") (transparent pixels keep their hidden colour)
        image = image if image.mode == "RGB" else image.convert("RGB")
        new_w, new_h = self.nanovlm_size(*image.size)
        rows, cols, t = new_h // self.tile_size, new_w // self.tile_size, self.tile_size
        x_HW3 = torch.from_numpy(np.asarray(image.resize((new_w, new_h), _BICUBIC), dtype=np.uint8).copy())
        big_3HW = x_HW3.permute(2, 0, 1).to(torch.float32) / 255.0
        # (3, rows*t, cols*t) -> (rows*cols, 3, t, t), row-major: the order of the row/column tokens.
        tiles = big_3HW.view(3, rows, t, cols, t).permute(1, 3, 0, 2, 4).reshape(rows * cols, 3, t, t)
        if rows * cols > 1:
            glob = F.interpolate(big_3HW[None], size=(t, t), mode="bilinear", align_corners=False, antialias=True)
            tiles = torch.cat([glob, tiles])
        return (tiles - self._mean_3) / self._std_3, (rows, cols)
