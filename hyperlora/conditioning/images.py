"""Reference photos enter here: any file a user hands us becomes an 8-bit RGB PIL image, or a clear error.

Everything downstream (face detection, masks, crops, CLIP) assumes an upright RGB image of bounded size,
so every oddity of real files is settled at this one boundary:

- EXIF orientation is applied (phone photos are stored sideways with a rotation tag);
- grayscale, palette, CMYK, 1-bit and YCbCr images are converted to RGB (no ICC colour management);
- 16-bit images (PIL modes I;16*, I) are scaled to 8 bits by value / 257, so 65535 becomes 255;
  32-bit float images (mode F) are read as values in [0, 1];
- transparency (RGBA, LA, PA, palette or grayscale with a transparent colour) is composited onto a
  flat `background`, white by default (cut-out portraits are usually shown on white);
- animated or multi-page files give their first frame (a PIL image passed in gives its current frame);
- large images are shrunk to at most `max_side` pixels on the long side, decoding JPEGs at reduced
  scale (PIL's draft mode) so memory stays bounded; images that would still decode to more than
  `max_pixels` pixels are refused instead of PIL's DecompressionBombWarning.
"""

from __future__ import annotations

import io
import os
import struct
import typing
import warnings
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

DEFAULT_MAX_SIDE = 2048          # long side after loading; SDXL works at 1024, face crops need far less
DEFAULT_MAX_PIXELS = 120_000_000  # decoded pixels (after JPEG draft scaling): ~360 MB as RGB
WHITE = (255, 255, 255)

# A path, a PIL image, a numpy array (H x W, H x W x 1/3/4; uint8, uint16, bool, or float in [0, 1]), encoded
# file bytes, or a binary file object.
ImageSource = str | os.PathLike | Image.Image | np.ndarray | bytes | typing.BinaryIO

# What PIL's decoders raise on corrupt or truncated data.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error, zlib.error)
_HIGH_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


class ConditioningError(Exception):
    """Base class of every error raised by hyperlora.conditioning."""


class ImageInputError(ConditioningError, ValueError):
    """A reference image cannot be used; the message names the image and what is wrong with it."""


def load_image(
    source: ImageSource,
    *,
    max_side: int = DEFAULT_MAX_SIDE,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    background: tuple[int, int, int] = WHITE,
) -> Image.Image:
    """Open any `ImageSource` as an upright 8-bit RGB image whose long side is at most `max_side`.

    A PIL image or array passed in is never modified; the result is always a new image.
    Raises ImageInputError for a missing, unreadable, corrupt, truncated or oversized file, an array that is
    not an image, or a source of another type.
    """
    if max_side < 1:
        raise ValueError(f"max_side must be positive, got {max_side}")
    if isinstance(source, Image.Image):
        return _normalise(source, describe(source), max_side, max_pixels, background, draft=False)
    if isinstance(source, np.ndarray):
        return _normalise(_from_array(source), describe(source), max_side, max_pixels, background, draft=False)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return _open(io.BytesIO(bytes(source)), describe(source), max_side, max_pixels, background)
    if hasattr(source, "read"):
        return _open(source, describe(source), max_side, max_pixels, background)
    if not isinstance(source, (str, os.PathLike)):
        raise ImageInputError(f"{describe(source)}: not an image source; pass a path, a PIL image, a numpy array, "
                              "file bytes or a binary file object")  # fmt: skip
    path = Path(source)
    return _open(path, str(path), max_side, max_pixels, background)


def _open(source, name: str, max_side: int, max_pixels: int, background: tuple[int, int, int]) -> Image.Image:
    """Image.open on a path or a binary buffer, every failure an ImageInputError naming `name`."""
    path = source if isinstance(source, Path) else None
    try:
        with warnings.catch_warnings():
            # We apply our own, configurable size limit below; PIL's hard limit still raises.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            opened = Image.open(source)
    except FileNotFoundError:
        raise ImageInputError(f"{name}: no such file") from None
    except IsADirectoryError:
        raise ImageInputError(f"{name}: is a directory, not an image file") from None
    except PermissionError:
        raise ImageInputError(f"{name}: permission denied") from None
    except UnidentifiedImageError:
        if path is None:
            raise ImageInputError(f"{name}: not an image file PIL can read (unknown or corrupt header)") from None
        raise ImageInputError(_not_an_image_message(path)) from None
    except Image.DecompressionBombError as error:
        raise ImageInputError(f"{name}: refused as a possible decompression bomb ({error})") from None
    except _DECODE_ERRORS as error:
        raise ImageInputError(f"{name}: cannot read the image header ({error})") from error
    with opened:
        return _normalise(opened, name, max_side, max_pixels, background, draft=True)


def describe(image) -> str:
    """A short name for an image source in messages: a path, a PIL image's file name or mode and size, an
    array's shape and dtype, the length of file bytes, a file object's name."""
    if isinstance(image, (str, os.PathLike)):
        return str(image)
    if isinstance(image, Image.Image):
        filename = getattr(image, "filename", "")
        return str(filename) if filename else f"<{image.mode} image {image.width}x{image.height}>"
    if isinstance(image, np.ndarray):
        return f"<array {'x'.join(map(str, image.shape))} {image.dtype}>"
    if isinstance(image, (bytes, bytearray, memoryview)):
        return f"<{len(bytes(image)):,} bytes>"
    name = getattr(image, "name", None)
    return str(name) if isinstance(name, str) else f"<{type(image).__name__}>"


def _from_array(array: np.ndarray) -> Image.Image:
    """H x W or H x W x 1/3/4 arrays: uint8 as is, uint16 / 257, bool x 255, floats read as [0, 1]."""
    name = describe(array)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in (3, 4))) or 0 in array.shape:
        raise ImageInputError(f"{name}: an image array is H x W or H x W x 1, 3 or 4 (channels last)")
    if array.dtype == np.bool_:
        array = array.astype(np.uint8) * 255
    elif array.dtype == np.uint16:
        array = np.rint(array / 257.0).astype(np.uint8)
    elif np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise ImageInputError(f"{name}: holds NaN or infinite values")
        if array.min() < 0 or array.max() > 1:
            raise ImageInputError(f"{name}: float arrays are read as values in [0, 1], this one spans "
                                  f"[{array.min():g}, {array.max():g}] (divide 0-255 values by 255)")  # fmt: skip
        array = np.rint(np.clip(array, 0.0, 1.0) * 255.0).astype(np.uint8)
    elif array.dtype != np.uint8:
        raise ImageInputError(f"{name}: dtype {array.dtype} is not an image's (uint8, uint16, bool or float in [0, 1])")
    return Image.fromarray(np.ascontiguousarray(array))


def to_rgb(image: Image.Image, *, background: tuple[int, int, int] = WHITE) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB: 16-bit scaled by 1/257, transparency composited on `background`."""
    if image.mode == "RGB":
        return image
    if image.mode in _HIGH_DEPTH_MODES or image.mode == "F":
        image = _high_depth_to_l(image)
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image.convert("RGB")


def _normalise(
    image: Image.Image, name: str, max_side: int, max_pixels: int, background: tuple[int, int, int], draft: bool
) -> Image.Image:
    """Decode (at reduced scale where the format allows), rotate upright, convert to RGB, bound the size.

    draft: let a JPEG decode at 1/2, 1/4 or 1/8 scale; only for files we opened, since it resizes the object.
    """
    try:
        if draft:
            _request_draft(image, max_side)
        if image.width * image.height > max_pixels:
            raise ImageInputError(
                f"{name}: {image.width}x{image.height} pixels is more than max_pixels={max_pixels:,} "
                "(a possible decompression bomb); shrink the file or pass a larger max_pixels"
            )
        image.load()
    except ImageInputError:
        raise
    except _DECODE_ERRORS as error:
        raise ImageInputError(f"{name}: corrupt or truncated image data ({error})") from error
    image = ImageOps.exif_transpose(image)  # always a new image, so the caller's object stays untouched
    try:
        image = to_rgb(image, background=background)
    except ValueError as error:
        raise ImageInputError(f"{name}: cannot convert PIL mode {image.mode!r} to RGB ({error})") from error
    return _shrink(image, max_side)


def _request_draft(image: Image.Image, max_side: int) -> None:
    """Ask JPEG decoding to skip detail we would throw away: scale 1/2, 1/4 or 1/8, never below max_side."""
    long_side = max(image.size)
    if long_side <= max_side or not hasattr(image, "draft") or not getattr(image, "tile", None):
        return
    scale = max_side / long_side
    image.draft(image.mode, (max(1, int(image.width * scale)), max(1, int(image.height * scale))))


def _shrink(image: Image.Image, max_side: int) -> Image.Image:
    """Resize (Lanczos) so that the long side is at most max_side; smaller images are returned as they are."""
    long_side = max(image.size)
    if long_side <= max_side:
        return image
    scale = max_side / long_side
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)


def _high_depth_to_l(image: Image.Image) -> Image.Image:
    """16-bit integer images (I;16*, and I as PNG/TIFF give it) scale by 1/257; float (F) images read [0, 1]."""
    values = np.asarray(image).astype(np.float64)
    values = values * 255.0 if image.mode == "F" else values / 257.0
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8))  # 2-D uint8 -> mode L


def _not_an_image_message(path: Path) -> str:
    size = path.stat().st_size
    if size == 0:
        return f"{path}: the file is empty"
    return f"{path}: not an image file PIL can read ({size:,} bytes, unknown or corrupt header)"
