"""Reading a photo: how any file Pillow opens becomes the upright 8-bit RGB picture a person sees.

Every reader of a source image (the shards, their exactness check, the user-photo intake, and whatever
identifies a photo later) goes through ``to_rgb``, so they all see the same pixels.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from plant_pipeline.ml.errors import UsageError

# What Pillow raises for a file it cannot decode (truncated, not an image, a decompression bomb): caught as one.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


class PixelFormatError(UsageError):
    """An image or pixel array does not have the shape or dtype the model's processor expects."""


# EXIF orientation -> the transpose that shows the picture upright (the table of ImageOps.exif_transpose).
_EXIF_ORIENTATION = 0x0112
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
# Where Image.getexif finds an orientation (EXIF for JPEG/WebP, PNG's text chunk, XMP).
_ORIENTATION_SOURCES = ("exif", "Raw profile type exif", "xmp", "XML:com.adobe.xmp")
# One band of more than 8 bits. Pillow's own convert("RGB") clips these at 255 instead of scaling them.
_HIGH_DEPTH = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def to_rgb(image: Image.Image) -> Image.Image:
    """The 8-bit RGB picture a person sees: upright, whatever the file's mode.

    Greyscale, CMYK, palette, alpha and 16-bit images are converted, not quarantined; a photo whose EXIF
    says the camera was turned is turned back. Every reader of a source image (the shards, their exactness
    check, the user-photo intake) goes through here, so they all see the same pixels. An upright RGB image
    is returned as it is. Raises PixelFormatError for a 32-bit or float image whose values are outside the
    range its mode is read in (see _high_depth_to_l).
    """
    orientation = image.getexif().get(_EXIF_ORIENTATION)
    upright = _UPRIGHT.get(orientation) if isinstance(orientation, int) else None
    rgb = _convert_to_rgb(image)
    if upright is None:
        return rgb
    turned = rgb.transpose(upright)
    # transpose copies the file's metadata, orientation included: drop it, so that neither to_rgb again
    # (resize_and_crop calls it) nor anything reading a copy of this image turns it a second time.
    for key in _ORIENTATION_SOURCES:
        turned.info.pop(key, None)
    return turned


def _convert_to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode in _HIGH_DEPTH:
        return _high_depth_to_l(image).convert("RGB")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # Composite transparent pixels on white instead of letting them turn black.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _high_depth_to_l(image: Image.Image) -> Image.Image:
    """A one-band image of more than 8 bits scaled to 8 bits: value / 257 for 16 bits, value * 255 for floats.

    Modes I;16* hold 0..65535. Mode I (32-bit) is read as 16-bit too: Pillow uses it for 16-bit PNGs and
    TIFFs. Mode F is read as 0..1, the float convention. Values outside those ranges have no agreed scale,
    so they are refused rather than guessed at (a guess would store a washed-out or black picture).
    """
    values = np.asarray(image)
    if image.mode == "F":
        if not np.isfinite(values).all():
            raise PixelFormatError("float image has values that are not finite (NaN or inf); expected 0..1. "
                                   "Convert it to an 8-bit image")
        low, high = float(values.min()), float(values.max())
        if low < 0 or high > 1:
            raise PixelFormatError(f"float image values span [{low:g}, {high:g}]; expected 0..1. "
                                   "Convert it to an 8-bit image")
        grey = np.rint(values.astype(np.float64) * 255)
    else:
        wide = values.astype(np.int64)
        low, high = int(wide.min()), int(wide.max())
        if low < 0 or high > 65535:
            raise PixelFormatError(f"{image.mode} image values span [{low}, {high}]; expected 0..65535 "
                                   "(a 16-bit image). Convert it to an 8-bit image")
        grey = (wide + 128) // 257  # round(value / 257): 65535 -> 255; never a tie, 257 being odd
    return Image.fromarray(grey.astype(np.uint8))
