"""Split the model's image processor into a uint8 half (stored in shards) and a float half (the collator).

Resize and centre crop run once, at preprocessing, through the processor itself; rescale and normalise
are per-channel functions of one byte, so they become a 256-entry lookup table per channel that is read off
the same processor. The float ``pixel_values`` are therefore exactly the processor's, whatever its backend,
while shards hold one byte per channel instead of four.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from plant_pipeline.ml.images import PixelFormatError, to_rgb


def rgb_to_channels_first(image: Image.Image, out: np.ndarray | None = None) -> np.ndarray:
    """An RGB image's pixels as uint8 [3, H, W], in ``out`` where given (e.g. a view of shared memory).

    Pillow keeps RGB as four bytes per pixel (R, G, B, pad). Where it can export that memory in place
    (its Arrow interface), each channel is one shift and narrowing cast of the pixels read as
    little-endian uint32: faster than splitting the bands or a transposed ``np.asarray`` (which copies
    through ``tobytes``).
    """
    if image.mode != "RGB":
        raise PixelFormatError(f"expected an RGB image; got mode {image.mode}")
    shape = (3, image.height, image.width)
    if out is not None:
        _check_fits(shape, out)
    pixels = np.empty(shape, dtype=np.uint8) if out is None else out
    packed = packed_rgbx(image)
    if packed is None:
        pixels[...] = np.asarray(image).transpose(2, 0, 1)
        return pixels
    shifted = np.empty_like(packed)
    np.copyto(pixels[0], packed, casting="unsafe")  # uint32 -> uint8 keeps the low byte: R
    for channel in (1, 2):
        np.right_shift(packed, 8 * channel, out=shifted)
        np.copyto(pixels[channel], shifted, casting="unsafe")
    return pixels


def copy_into(out: np.ndarray, pixels: np.ndarray) -> np.ndarray:
    """``pixels`` written into ``out``, which must be a uint8 array of the same shape; returns ``out``."""
    _check_fits(pixels.shape, out)
    out[...] = pixels
    return out


def _check_fits(shape: tuple[int, ...], out: np.ndarray) -> None:
    if out.shape != tuple(shape) or out.dtype != np.uint8:
        raise PixelFormatError(f"pixels of shape {tuple(shape)} do not fit the {out.dtype} array of shape "
                               f"{out.shape} meant for them")


def packed_rgbx(image: Image.Image) -> np.ndarray | None:
    """Pillow's own RGBX memory as uint32 [H, W], or None where it cannot be exported without a copy.

    Pillow exports only images held in one memory block with unpadded rows, as four uint8 per pixel.
    """
    try:
        import pyarrow as pa

        array = pa.array(image)
    except (ImportError, ValueError, TypeError):
        return None
    count = image.width * image.height
    data = array.buffers()[-1]
    kind = array.type
    if not (pa.types.is_fixed_size_list(kind) and kind.list_size == 4 and kind.value_type == pa.uint8()):
        return None
    if array.offset or len(array) != count or data.size < 4 * count:
        return None
    return np.frombuffer(data, dtype="<u4", count=count).reshape(image.height, image.width)


def resize_and_crop(image_processor, image: Image.Image) -> np.ndarray:
    """Run only the geometric half of the processor: returns uint8 [3, H, W]."""
    out = image_processor(images=[to_rgb(image)], do_rescale=False, do_normalize=False, return_tensors="np")
    array = np.asarray(out["pixel_values"][0])
    if array.ndim != 3 or array.shape[0] != 3:
        raise PixelFormatError(f"processor returned pixels of shape {array.shape}; expected [3, H, W]")
    if array.dtype != np.uint8:
        # Some backends return floats holding integral values; anything else would not round-trip.
        rounded = np.rint(array)
        if np.abs(array - rounded).max() > 0 or rounded.min() < 0 or rounded.max() > 255:
            raise PixelFormatError("processor's resize/crop produced non-integral pixel values; cannot store as uint8")
        array = rounded.astype(np.uint8)
    return np.ascontiguousarray(array)


@dataclass
class PixelNormalizer:
    """uint8 [B, 3, H, W] -> the processor's float ``pixel_values``, bit for bit, via a lookup table."""

    table: torch.Tensor  # float32 [3, 256]: table[c, v] = processor's value for byte v in channel c

    @classmethod
    def from_processor(cls, image_processor) -> "PixelNormalizer":
        # Every byte value in every channel, laid out as a 16x16 image, through rescale + normalise only.
        ramp = np.arange(256, dtype=np.uint8).reshape(16, 16)
        probe = np.stack([ramp, ramp, ramp])  # [3, 16, 16]
        out = image_processor(
            images=[probe],
            do_resize=False,
            do_center_crop=False,
            input_data_format="channels_first",
            return_tensors="np",
        )
        values = np.asarray(out["pixel_values"][0], dtype=np.float32)
        if values.shape != (3, 16, 16):
            raise PixelFormatError(
                f"processor changed the probe's shape to {values.shape}; it must leave [3, 16, 16] alone "
                "when resize and crop are off"
            )
        return cls(table=torch.from_numpy(values.reshape(3, 256).copy()))

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        """Float pixel values on ``pixels``' own device (CPU in a collator, the GPU inside CustomTrainer)."""
        if pixels.dtype != torch.uint8 or pixels.ndim != 4 or pixels.shape[1] != 3:
            raise PixelFormatError(
                f"expected uint8 pixels of shape [B, 3, H, W]; got {tuple(pixels.shape)} {pixels.dtype}"
            )
        table = self._table_on(pixels.device)
        # Gather per channel: out[b, c, h, w] = table[c, pixels[b, c, h, w]].
        channel_offset = (torch.arange(3, device=pixels.device) * 256).view(1, 3, 1, 1)
        return table[pixels.long() + channel_offset]

    def _table_on(self, device: torch.device) -> torch.Tensor:
        """The flat table on ``device``, copied there once (a dataclass field would be compared and printed)."""
        cache = self.__dict__.setdefault("_tables", {})
        if device not in cache:
            cache[device] = self.table.reshape(-1).to(device)
        return cache[device]

    def __getstate__(self) -> dict:
        # Spawned DataLoader workers get the CPU table only, never a copy cached on a GPU.
        return {"table": self.table}
