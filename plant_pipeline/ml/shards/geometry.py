"""The processor's resize and centre crop done by PIL directly, byte for byte, without its array round trips.

build_shards uses this for the uint8 pixels it stores when the processor is a plain PIL one; anything
else goes through pixels.resize_and_crop, the processor itself. PhotoPixels is that choice made once, shared by
the shard workers and whatever identifies a photo later, so both store and score the same bytes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
from PIL import Image

from plant_pipeline.ml.shards.pixels import copy_into, resize_and_crop, rgb_to_channels_first

logger = logging.getLogger(__name__)


def direct_resize_and_crop(image_processor) -> Callable[..., np.ndarray] | None:
    """pixels.resize_and_crop without transformers' numpy round trips, where that is provably the same.

    The function returned takes the image and, optionally, ``out``: a uint8 [3, H, W] array to write into.

    transformers' PIL backend turns the image into a numpy array, back into a PIL image, resizes it with
    PIL, and turns it into an array again before slicing the centre crop: copies that cost a good part of
    the work. For the plain PilBackend steps (shortest-edge or fixed-size resize, centre crop,
    no padding) the same PIL resize on the RGB image and the same crop offsets give the same bytes.
    Returns None where the processor does anything else; build_shards also compares both on probe images.
    """
    try:
        from transformers.image_processing_backends import PilBackend
    except ImportError:  # another transformers layout: keep the processor's own path
        return None
    kind = type(image_processor)
    steps = ("process_image", "_preprocess", "resize", "center_crop")
    if not isinstance(image_processor, PilBackend) or any(getattr(kind, m) is not getattr(PilBackend, m) for m in steps):
        return None
    size, crop = image_processor.size, image_processor.crop_size
    if (not image_processor.do_resize or getattr(image_processor, "do_pad", None) or size is None
            or getattr(size, "longest_edge", None) or getattr(size, "max_height", None)):
        return None
    shortest = getattr(size, "shortest_edge", None)
    fixed = (size.height, size.width) if getattr(size, "height", None) and getattr(size, "width", None) else None
    if not (shortest or fixed) or (image_processor.do_center_crop and not (crop and crop.height and crop.width)):
        return None
    resample = image_processor.resample if image_processor.resample is not None else Image.Resampling.BILINEAR
    crop_hw = (crop.height, crop.width) if image_processor.do_center_crop else None

    def resize_and_crop_pil(image: Image.Image, out: np.ndarray | None = None) -> np.ndarray:
        width, height = image.size
        if fixed:
            new_h, new_w = fixed
        else:  # transformers' get_resize_output_image_size(default_to_square=False)
            short, long = (width, height) if width <= height else (height, width)
            new_short, new_long = shortest, int(shortest * long / short)
            new_h, new_w = (new_long, new_short) if width <= height else (new_short, new_long)
        out_h, out_w = crop_hw or (new_h, new_w)
        top, left = (new_h - out_h) // 2, (new_w - out_w) // 2
        if top < 0 or left < 0:  # the processor pads here; let it
            pixels = resize_and_crop(image_processor, image)
            return pixels if out is None else copy_into(out, pixels)
        if resizes_width_first(width, height, new_w, new_h):
            # PIL resizes in two passes through a uint8 image: here the width, then the height. Running
            # them one at a time and cropping away the columns between them gives the same bytes with a
            # quarter less of the height pass on a 4:3 landscape photo. (PIL's box= would save more, but
            # it takes the box in float32, which moves the filter taps: not exact.)
            if new_w != width:
                image = image.resize((new_w, height), resample=resample, reducing_gap=None)
            if out_w != new_w:
                image = image.crop((left, 0, left + out_w, height))
            if new_h != height:
                image = image.resize((out_w, new_h), resample=resample, reducing_gap=None)
            if out_h != new_h:
                image = image.crop((0, top, out_w, top + out_h))
        else:
            image = image.resize((new_w, new_h), resample=resample, reducing_gap=None)
            if (out_h, out_w) != (new_h, new_w):
                image = image.crop((left, top, left + out_w, top + out_h))
        return rgb_to_channels_first(image, out)

    return resize_and_crop_pil


def resizes_width_first(width: int, height: int, new_w: int, new_h: int) -> bool:
    """Whether PIL's two-pass resize does the width before the height for this geometry.

    Pillow 13 does the height first when it shrinks more than twice as much as the width (very tall
    photos); earlier releases always do the width first. So True here means width first in both.
    """
    return not (height - new_h > 0 and height - new_h > (width - new_w) * 2)


def matches_processor(image_processor, fast: Callable[[Image.Image], np.ndarray]) -> bool:
    """Both paths on random-noise probes of awkward sizes must agree byte for byte.

    345x700 is tall enough for Pillow 13 to resize its height first at 336 px; 97x300 at 64 px.
    """
    rng = np.random.default_rng(0)
    for width, height in ((401, 300), (300, 401), (97, 61), (61, 97), (200, 53), (97, 300), (345, 700)):
        image = Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8))
        expected = resize_and_crop(image_processor, image)
        if not np.array_equal(fast(image), expected):
            logger.warning("the direct PIL resize/crop differs from %s on a %dx%d probe; using the processor's "
                           "own (slower) path", type(image_processor).__name__, width, height)
            return False
    return True


@dataclass(frozen=True, eq=False)
class PhotoPixels:
    """One upright RGB photo (images.to_rgb's) -> the uint8 [3, H, W] the shards store for it.

    ``direct`` is direct_resize_and_crop's function where it applies (and matched the processor), else None and
    the processor's own resize_and_crop runs. Called with ``out`` it writes there (PixelFormatError when the
    pixels do not have out's shape) and returns it.
    """

    image_processor: Any
    direct: Callable[..., np.ndarray] | None = None

    @classmethod
    def of(cls, image_processor, *, direct: bool | None = None) -> "PhotoPixels":
        """``direct=None`` probes as build_shards does (direct_resize_and_crop, then matches_processor); True takes
        the direct path where it applies without probing again (a build already did); False never takes it."""
        fast = direct_resize_and_crop(image_processor) if direct is not False else None
        if fast is not None and direct is None and not matches_processor(image_processor, fast):
            fast = None
        return cls(image_processor, fast)

    def __call__(self, image: Image.Image, out: np.ndarray | None = None) -> np.ndarray:
        if self.direct is not None:
            return self.direct(image, out=out)
        pixels = resize_and_crop(self.image_processor, image)
        return pixels if out is None else copy_into(out, pixels)
