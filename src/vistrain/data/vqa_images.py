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
* ``"smolvlm"``: what transformers' Idefics3ImageProcessor (SmolVLM's, `do_image_splitting` on) does: the long
  side becomes exactly ``max_image_size`` (its `size["longest_edge"]`, up or down; the short side keeps the
  aspect ratio, truncated, then made even), then each side is rounded UP to whole tiles (the short one from
  the aspect ratio again), each a Lanczos resize of 8-bit pixels. The tiles are cut from that, row-major, and
  the global view -- that image Lanczos-resized to one tile -- comes LAST; an image of one tile is that tile
  alone. The pixel values are transformers' to the bit. ``max_image_size`` need not be a whole number of tiles
  here.
* ``"smolvlm_unsplit"``: the same with `do_image_splitting` off: the resized image squeezed to one tile.
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
SMOLVLM_MAX_GRID_SIDE = 6  # Idefics3's processor knows <row_1_col_1> .. <row_6_col_6>
SMOLVLM_MAX_SIDE = 4096  # transformers' Idefics3 MAX_IMAGE_SIZE: no resized side is longer
_BICUBIC = getattr(Image, "Resampling", Image).BICUBIC  # PIL's bicubic is antialiased when it shrinks
_LANCZOS = getattr(Image, "Resampling", Image).LANCZOS  # SmolVLM's resampling (its processor's resample=1)
RESIZE_MODES = ("vistrain", "nanovlm", "nanovlm_tiles", "smolvlm", "smolvlm_unsplit")  # see the module docstring
SMOLVLM_MODES = ("smolvlm", "smolvlm_unsplit")


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
        if resize in SMOLVLM_MODES:
            _check_smolvlm_size(tile_size, max_image_size)
        else:
            _check_whole_tiles(tile_size, max_image_size)
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
        if self.resize in SMOLVLM_MODES:
            return self._smolvlm_grid(width, height)
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
        if self.resize in SMOLVLM_MODES:
            return self._smolvlm(as_pil(image))
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

    # --- SmolVLM / Idefics3 (transformers' Idefics3ImageProcessor, its PIL path) ------------------------

    def smolvlm_sizes(self, width: int, height: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """The two (width, height) an image is resized to: its long side to max_image_size, then whole tiles.

        transformers' arithmetic in the same float operations: aspect = width / height; the short side is
        int(long / aspect) (or int(long * aspect)), made even, at least 1, then both capped at 4096 px; for
        the tiles the long side is rounded up and the short side is int(long / aspect) rounded up.
        """
        w, h = _long_side_to(width, height, self.max_image_size)
        w, h = _capped(w, h, SMOLVLM_MAX_SIDE)
        t, aspect = self.tile_size, w / h
        if w >= h:
            tiled_w = math.ceil(w / t) * t
            tiled_h = math.ceil(int(tiled_w / aspect) / t) * t
        else:
            tiled_h = math.ceil(h / t) * t
            tiled_w = math.ceil(int(tiled_h * aspect) / t) * t
        return (w, h), (tiled_w, tiled_h)

    def _smolvlm_grid(self, width: int, height: int) -> tuple[int, int]:
        if self.resize == "smolvlm_unsplit":
            return 1, 1
        _, (tiled_w, tiled_h) = self.smolvlm_sizes(width, height)
        return tiled_h // self.tile_size, tiled_w // self.tile_size

    def _smolvlm(self, image: Image.Image) -> tuple[torch.Tensor, tuple[int, int]]:
        image = to_rgb(image)  # transformers composites transparency over white too
        (w, h), (tiled_w, tiled_h) = self.smolvlm_sizes(*image.size)
        t = self.tile_size
        resized = image.resize((w, h), _LANCZOS)  # PIL returns a copy when the size is already right
        if self.resize == "smolvlm_unsplit":
            return self._rescaled([resized.resize((t, t), _LANCZOS)]), (1, 1)
        tiled = resized.resize((tiled_w, tiled_h), _LANCZOS)
        rows, cols = tiled_h // t, tiled_w // t
        if rows * cols == 1:
            return self._rescaled([tiled]), (1, 1)
        # tiles row-major, then the global view: the order of their tokens in SmolVLM's prompt
        views = [tiled.crop((j * t, i * t, (j + 1) * t, (i + 1) * t)) for i in range(rows) for j in range(cols)]
        return self._rescaled(views + [tiled.resize((t, t), _LANCZOS)]), (rows, cols)

    def _rescaled(self, views: list[Image.Image]) -> torch.Tensor:
        # x / 255 in float32 is, for every 8-bit x, transformers' float64 x * (1/255) cast to float32: equal pixels
        return torch.stack([self._normalise(v) for v in views])


def _long_side_to(width: int, height: int, long: int) -> tuple[int, int]:
    """(width, height) with the long side set to `long` (width on ties), the short side int(...) and made even."""
    aspect = width / height
    if width >= height:
        width, height = long, int(long / aspect)
        if height % 2:
            height += 1
    else:
        width, height = int(long * aspect), long
        if width % 2:
            width += 1
    return max(width, 1), max(height, 1)


def _capped(width: int, height: int, cap: int) -> tuple[int, int]:
    """(width, height) with a long side beyond `cap` brought down to it, keeping the aspect ratio (truncated)."""
    aspect = width / height
    if width >= height and width > cap:
        width, height = cap, int(cap / aspect)
    elif height > width and height > cap:
        width, height = int(cap * aspect), cap
    return max(width, 1), max(height, 1)


def _check_whole_tiles(tile_size: int, max_image_size: int) -> None:
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


def _check_smolvlm_size(tile_size: int, max_image_size: int) -> None:
    if max_image_size < 1 or math.ceil(max_image_size / tile_size) > SMOLVLM_MAX_GRID_SIDE:
        raise ValueError(
            f"data.max_image_size={max_image_size} gives {math.ceil(max_image_size / tile_size)} tiles of "
            f"{tile_size} px per side; SmolVLM's row/column tokens name 1 to {SMOLVLM_MAX_GRID_SIDE}. Give at most "
            f"{SMOLVLM_MAX_GRID_SIDE * tile_size}."
        )
