"""Reading a photo someone wants identified: a path, the bytes of an upload, or a PIL image, checked against size
limits before its pixels are decoded, and turned into the upright RGB picture the shards' reader (images.to_rgb)
makes of the same file.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import Union

from PIL import Image, UnidentifiedImageError

from plant_pipeline.ml.errors import UsageError
from plant_pipeline.ml.images import DECODE_ERRORS, PixelFormatError, to_rgb

MAX_PHOTO_BYTES = 20 * 2**20
# Far above any camera's photo, far below what decodes into gigabytes (a 50 MP RGB image is 150 MB).
MAX_PIXELS = 50_000_000

PhotoSource = Union[str, os.PathLike, bytes, bytearray, memoryview, Image.Image]


class PhotoError(UsageError):
    """A photo that cannot be identified (missing, empty, not an image, damaged); the message starts with its name."""


class PhotoTooLarge(PhotoError):
    """A photo over the byte limit or the pixel-count limit (a decompression bomb is one)."""


def photo_name(source: PhotoSource, default: str = "photo") -> str:
    """What a photo is called in messages and answers: a path's file name, else ``default``."""
    if isinstance(source, (str, os.PathLike)):
        return Path(source).name or str(source)
    return default


def read_photo(source: PhotoSource, *, name: str | None = None, max_bytes: int = MAX_PHOTO_BYTES,
               max_pixels: int = MAX_PIXELS) -> Image.Image:
    """The upright 8-bit RGB picture of ``source``, exactly as the shards would read the same file.

    Raises PhotoTooLarge for more than ``max_bytes`` bytes (checked before a file is read) or more than
    ``max_pixels`` pixels (checked on the header, before the pixels are decoded), and PhotoError for a file that is
    missing, empty, not an image Pillow reads, truncated or damaged. ``name`` (default: the file name) starts
    every message.
    """
    name = name or photo_name(source)
    if isinstance(source, Image.Image):
        _check_pixels(name, source.width, source.height, max_pixels)
        return _upright(name, source)
    data = _read_bytes(name, source, max_bytes)
    try:
        # Image.open reads only the header; our pixel limit is checked before load() decodes anything. Pillow's
        # own bomb check (a warning, an error past twice its MAX_IMAGE_PIXELS) is a second guard, not the rule.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as err:
        raise PhotoTooLarge(f"{name}: {err}; send a photo of at most {max_pixels:,} pixels") from err
    except UnidentifiedImageError as err:
        raise PhotoError(f"{name}: not an image Pillow can read ({len(data):,} bytes); send a JPEG, PNG, WebP or "
                         "another common image format") from err
    except DECODE_ERRORS as err:
        raise PhotoError(f"{name}: cannot read the image header ({type(err).__name__}: {err}); the file is "
                         "damaged, send it again") from err
    with image:
        _check_pixels(name, image.width, image.height, max_pixels)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                image.load()
        except DECODE_ERRORS as err:
            raise PhotoError(f"{name}: cannot decode the image ({type(err).__name__}: {err}); the file is "
                             "truncated or damaged, send it again") from err
        return _upright(name, image)


def _read_bytes(name: str, source, max_bytes: int) -> bytes:
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        _check_bytes(name, len(data), max_bytes)
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        try:
            size = path.stat().st_size
            _check_bytes(name, size, max_bytes)  # before reading: a huge file is never read whole
            with path.open("rb") as file:
                data = file.read(max_bytes + 1)  # the file may have grown since stat
        except FileNotFoundError as err:
            raise PhotoError(f"{name}: no such file ({path}); check the path") from err
        except IsADirectoryError as err:
            raise PhotoError(f"{name}: is a folder, not a photo ({path}); pass the photo files in it") from err
        except OSError as err:
            raise PhotoError(f"{name}: cannot read {path} ({err.strerror or err}); check its permissions") from err
        _check_bytes(name, len(data), max_bytes)
    else:
        raise PhotoError(f"{name}: expected a file path, bytes or a PIL image; got {type(source).__name__}")
    if not data:
        raise PhotoError(f"{name}: the file is empty (0 bytes); send the photo again")
    return data


def _check_bytes(name: str, size: int, max_bytes: int) -> None:
    if size > max_bytes:
        raise PhotoTooLarge(f"{name}: {size / 2**20:.1f} MiB is over the limit of {max_bytes / 2**20:.1f} MiB; "
                            "send a smaller photo (e.g. a JPEG resized to a few megapixels)")


def _check_pixels(name: str, width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise PhotoTooLarge(f"{name}: {width}x{height} is {width * height:,} pixels, over the limit of "
                            f"{max_pixels:,}; resize the photo (a few megapixels is plenty)")


def _upright(name: str, image: Image.Image) -> Image.Image:
    try:
        return to_rgb(image)
    except PixelFormatError as err:
        raise PhotoError(f"{name}: {err}") from err
    except DECODE_ERRORS as err:  # a lazily decoded PIL image given by the caller
        raise PhotoError(f"{name}: cannot decode the image ({type(err).__name__}: {err})") from err
