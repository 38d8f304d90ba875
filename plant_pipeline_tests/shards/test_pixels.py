"""images.to_rgb: every mode and orientation a photo arrives in becomes the 8-bit RGB picture a person sees."""

from __future__ import annotations

import io
import struct
import sys
import zlib

import numpy as np
import pytest
from PIL import Image, ImageOps

from plant_pipeline.ml.data import incoming
from plant_pipeline.ml.images import PixelFormatError, to_rgb

# A 16-bit ramp over the whole range: clipping would turn everything above 255 (99.6% of it) white.
RAMP16 = (np.arange(64 * 64, dtype=np.int64).reshape(64, 64) * 65535 // (64 * 64 - 1)).astype(np.uint16)
RAMP8 = ((RAMP16.astype(np.int64) + 128) // 257).astype(np.uint8)  # round(value / 257)


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _png16_rgb(values: np.ndarray) -> bytes:
    """A 16-bit-per-channel RGB PNG, written by hand (Pillow cannot save one)."""
    height, width, _ = values.shape
    raw = b"".join(b"\0" + values[y].astype(">u2").tobytes() for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def _high_depth(mode: str) -> Image.Image:
    if mode == "I;16":  # what Pillow opens a 16-bit greyscale PNG as
        return Image.open(io.BytesIO(_png(Image.fromarray(RAMP16))))
    if mode in ("I;16B", "I;16L"):
        return Image.frombytes(mode, (64, 64), RAMP16.astype(">u2" if mode == "I;16B" else "<u2").tobytes())
    if mode == "I":
        return Image.fromarray(RAMP16.astype(np.int32))
    if mode == "F":  # float images hold 0..1
        return Image.fromarray((RAMP16 / 65535).astype(np.float32))
    raise AssertionError(mode)


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I;16L", "I", "F"])
def test_high_depth_greyscale_is_scaled_not_clipped(mode):
    image = _high_depth(mode)
    assert image.mode == mode
    rgb = np.asarray(to_rgb(image))
    assert rgb.shape == (64, 64, 3) and rgb.dtype == np.uint8
    assert (rgb == 255).mean() < 0.01  # clipping gave 99.6%
    for channel in range(3):
        assert np.abs(rgb[..., channel].astype(int) - RAMP8).max() <= (1 if mode == "F" else 0)


def test_16_bit_rgb_png_tracks_value_over_257():
    # Pillow opens it as 8-bit RGB (the high byte of each sample): within 1 of value / 257.
    values = np.random.default_rng(0).integers(0, 65536, size=(16, 24, 3)).astype(np.uint16)
    with Image.open(io.BytesIO(_png16_rgb(values))) as image:
        rgb = np.asarray(to_rgb(image)).astype(int)
    assert np.abs(rgb - np.rint(values / 257)).max() <= 1


@pytest.mark.parametrize("image,message", [
    (Image.fromarray(np.array([[0.0, 1.5]], dtype=np.float32)), r"float image values span \[0, 1.5\]; expected 0..1"),
    (Image.fromarray(np.array([[0.0, np.nan]], dtype=np.float32)), "not finite"),
    (Image.fromarray(np.array([[-3, 70000]], dtype=np.int32)), r"values span \[-3, 70000\]; expected 0..65535"),
])
def test_high_depth_values_outside_their_range_are_refused(image, message):
    with pytest.raises(PixelFormatError, match=message):
        to_rgb(image)


def _jpeg_with_orientation(image: Image.Image, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95, exif=exif.tobytes())
    return buffer.getvalue()


def _left_red_right_blue(width: int = 48, height: int = 32) -> Image.Image:
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    pixels[:, : width // 2, 0] = 255
    pixels[:, width // 2:, 2] = 255
    return Image.fromarray(pixels)


def test_exif_orientation_6_turns_the_photo_upright():
    # Orientation 6: the camera was turned; the stored left edge is the picture's top.
    with Image.open(io.BytesIO(_jpeg_with_orientation(_left_red_right_blue(), 6))) as image:
        rgb = np.asarray(to_rgb(image)).astype(int)
    assert rgb.shape == (48, 32, 3)  # portrait now
    assert rgb[:20, :, 0].mean() > 200 and rgb[:20, :, 2].mean() < 50  # red on top
    assert rgb[-20:, :, 2].mean() > 200 and rgb[-20:, :, 0].mean() < 50  # blue at the bottom


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_matches_pillows_exif_transpose(orientation):
    noise = np.random.default_rng(orientation).integers(0, 256, size=(24, 40, 3), dtype=np.uint8)
    data = _jpeg_with_orientation(Image.fromarray(noise), orientation)
    with Image.open(io.BytesIO(data)) as image:
        expected = np.asarray(ImageOps.exif_transpose(image).convert("RGB"))
    with Image.open(io.BytesIO(data)) as image:
        assert np.array_equal(np.asarray(to_rgb(image)), expected)


@pytest.mark.parametrize("orientation", [3, 6])
def test_an_upright_image_is_not_turned_again(orientation):
    # resize_and_crop calls to_rgb on what to_rgb returned; the EXIF copied along must not turn it twice.
    with Image.open(io.BytesIO(_jpeg_with_orientation(_left_red_right_blue(), orientation))) as image:
        once = to_rgb(image)
        assert np.array_equal(np.asarray(to_rgb(once)), np.asarray(once))
        assert np.array_equal(np.asarray(to_rgb(once.copy())), np.asarray(once))
        assert np.array_equal(np.asarray(ImageOps.exif_transpose(once.convert("RGB"))), np.asarray(once))


def test_orientation_applies_to_converted_modes_too():
    grey = Image.fromarray(np.asarray(_left_red_right_blue())[..., 0])  # L: white left, black right
    buffer = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 8  # rotate 90 anticlockwise: the stored left edge goes to the bottom
    grey.save(buffer, format="PNG", exif=exif.tobytes())
    with Image.open(io.BytesIO(buffer.getvalue())) as image:
        rgb = np.asarray(to_rgb(image)).astype(int)
    assert rgb.shape == (48, 32, 3)
    assert rgb[-20:].mean() > 200 and rgb[:20].mean() < 50


def test_an_upright_rgb_image_is_returned_as_it_is():
    # The common case costs nothing and stores the same bytes as before orientation was read.
    image = _left_red_right_blue()
    assert to_rgb(image) is image
    with Image.open(io.BytesIO(_jpeg_with_orientation(image, 1))) as opened:
        assert to_rgb(opened) is opened


# --- the intake (incoming.check_image) runs the same conversion ------------------------------------


@pytest.fixture
def intake_rgb(monkeypatch):
    """The RGB images incoming.check_image made, recorded as it makes them."""
    seen: list[np.ndarray] = []

    def recording(image):
        rgb = to_rgb(image)
        seen.append(np.asarray(rgb))
        return rgb

    # Patched where check_image looks it up, whichever module of the intake defines it.
    monkeypatch.setattr(sys.modules[incoming.check_image.__module__], "to_rgb", recording)
    return seen


def test_intake_scales_a_16_bit_png(intake_rgb):
    assert incoming.check_image(_png(Image.fromarray(RAMP16))) == ".png"
    [rgb] = intake_rgb
    assert np.array_equal(rgb[..., 1], RAMP8)


def test_intake_turns_a_phone_photo_upright(intake_rgb):
    assert incoming.check_image(_jpeg_with_orientation(_left_red_right_blue(), 6)) == ".jpg"
    [rgb] = intake_rgb
    assert rgb.shape == (48, 32, 3) and rgb[:20, :, 0].mean() > 200


def test_intake_refuses_a_float_image_outside_0_to_1():
    buffer = io.BytesIO()
    Image.fromarray(np.full((8, 8), 300.0, dtype=np.float32)).save(buffer, format="TIFF")
    with pytest.raises(ValueError, match=r"float image values span \[300, 300\]; expected 0..1"):
        incoming.check_image(buffer.getvalue())
