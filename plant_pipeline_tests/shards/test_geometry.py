"""The direct PIL resize/crop and the pixel read-out against the processor they stand in for, byte for byte."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from transformers.models.clip import CLIPImageProcessorPil

from plant_pipeline.ml.images import PixelFormatError, to_rgb
from plant_pipeline.ml.shards import pixels
from plant_pipeline.ml.shards.geometry import direct_resize_and_crop, matches_processor, resizes_width_first
from plant_pipeline.ml.shards.pixels import resize_and_crop, rgb_to_channels_first

BICUBIC = Image.Resampling.BICUBIC
# Landscape, portrait, square, odd crop offsets, tall enough for Pillow 13 to resize the height first,
# smaller than the crop (upscaled), and exactly the crop size.
SIZES = [(500, 375), (375, 500), (500, 500), (471, 336), (337, 336), (336, 337), (336, 1000), (400, 1300),
         (1300, 400), (90, 61), (61, 90), (336, 336)]


def _noise(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8))


@pytest.mark.parametrize("size", [336, 64])
def test_direct_path_gives_the_processors_bytes(size):
    processor = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    direct = direct_resize_and_crop(processor)
    assert direct is not None
    for n, (width, height) in enumerate(SIZES):
        image = _noise(width, height, seed=n)
        got, expected = direct(image), resize_and_crop(processor, image)
        assert got.shape == expected.shape == (3, size, size) and got.dtype == np.uint8
        assert np.array_equal(got, expected), f"{width}x{height} -> {size}: {int((got != expected).sum())} bytes differ"


def _turned_jpeg(width: int, height: int, orientation: int) -> Image.Image:
    import io

    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    _noise(width, height, seed=orientation).save(buffer, format="JPEG", quality=90, exif=exif.tobytes())
    return Image.open(io.BytesIO(buffer.getvalue()))


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_direct_path_gives_the_processors_bytes_for_a_turned_photo(orientation):
    # build_shards hands both paths to_rgb's upright image; the processor's path converts it again, which
    # must not turn it a second time.
    processor = CLIPImageProcessorPil(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64})
    with _turned_jpeg(120, 80, orientation) as image:
        upright = to_rgb(image)
    assert upright.size == ((80, 120) if orientation in (6, 8) else (120, 80))
    assert np.array_equal(direct_resize_and_crop(processor)(upright), resize_and_crop(processor, upright))


@pytest.mark.parametrize("width,height", SIZES)
def test_width_first_two_passes_are_pils_one_call(width, height):
    # The direct path relies on this: where resizes_width_first says so, PIL's one-call resize is the
    # width pass followed by the height pass, so the two can be run apart with a crop in between.
    new_w, new_h = (336, int(336 * height / width)) if width <= height else (int(336 * width / height), 336)
    if not resizes_width_first(width, height, new_w, new_h):
        pytest.skip("Pillow resizes the height first here; the direct path makes the same single call")
    image = _noise(width, height)
    one_call = image.resize((new_w, new_h), BICUBIC, reducing_gap=None)
    two_passes = image.resize((new_w, height), BICUBIC, reducing_gap=None).resize((new_w, new_h), BICUBIC,
                                                                                     reducing_gap=None)
    assert np.array_equal(np.asarray(one_call), np.asarray(two_passes))


def test_tall_photos_are_resized_in_one_call():
    # 400x1300 -> 336x1092 shrinks the height by 208 and the width by 64: Pillow 13 does the height first.
    assert not resizes_width_first(400, 1300, 336, 1092)
    assert resizes_width_first(500, 667, 336, 448) and resizes_width_first(667, 500, 448, 336)


def test_direct_path_is_used_only_for_plain_pil_processors(tiny_processor):
    assert direct_resize_and_crop(tiny_processor.image_processor) is not None

    class Custom(CLIPImageProcessorPil):
        def resize(self, *args, **kwargs):  # a processor with its own resize must keep it
            return super().resize(*args, **kwargs)

    assert direct_resize_and_crop(Custom(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64})) is None
    assert direct_resize_and_crop(CLIPImageProcessorPil(size={"shortest_edge": 64, "longest_edge": 90})) is None
    fixed = CLIPImageProcessorPil(size={"height": 40, "width": 56}, do_center_crop=False)
    assert matches_processor(fixed, direct_resize_and_crop(fixed))


def test_probe_check_refuses_a_path_that_differs():
    processor = CLIPImageProcessorPil(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64})
    direct = direct_resize_and_crop(processor)
    assert matches_processor(processor, direct)
    assert not matches_processor(processor, lambda image: np.clip(direct(image).astype(int) + 1, 0, 255).astype(np.uint8))


@pytest.mark.parametrize("width,height", [(336, 336), (7, 13), (1, 1)])
def test_channels_first_reads_pillows_memory_in_place(width, height):
    image = _noise(width, height)
    assert pixels.packed_rgbx(image) is not None, "Pillow's Arrow export should cover a small RGB image"
    assert np.array_equal(rgb_to_channels_first(image), np.asarray(image).transpose(2, 0, 1))


def test_channels_first_without_the_arrow_export(monkeypatch):
    image = _noise(50, 30)
    monkeypatch.setattr(pixels, "packed_rgbx", lambda image: None)
    out = rgb_to_channels_first(image)
    assert out.flags.c_contiguous and np.array_equal(out, np.asarray(image).transpose(2, 0, 1))


def test_channels_first_refuses_other_modes():
    with pytest.raises(PixelFormatError, match="mode L"):
        rgb_to_channels_first(Image.new("L", (4, 4)))


@pytest.mark.parametrize("arrow", [True, False])
def test_channels_first_writes_into_a_given_array(arrow, monkeypatch):
    image = _noise(40, 30)
    if not arrow:
        monkeypatch.setattr(pixels, "packed_rgbx", lambda image: None)
    backing = bytearray(3 * 30 * 40 + 7)  # as in build_shards: a region of a larger buffer, at an offset
    out = np.frombuffer(backing, np.uint8, 3 * 30 * 40, 5).reshape(3, 30, 40)
    assert rgb_to_channels_first(image, out) is out
    assert np.array_equal(out, np.asarray(image).transpose(2, 0, 1))
    assert backing[:5] == bytes(5) and backing[-2:] == bytes(2)


def test_pixels_that_do_not_fit_the_given_array_are_refused():
    processor = CLIPImageProcessorPil(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64})
    direct = direct_resize_and_crop(processor)
    image = _noise(90, 70)
    out = np.zeros((3, 64, 64), np.uint8)
    assert direct(image, out=out) is out and np.array_equal(out, direct(image))
    with pytest.raises(PixelFormatError, match=r"shape \(3, 64, 64\) do not fit"):
        direct(image, out=np.zeros((3, 64, 63), np.uint8))
    with pytest.raises(PixelFormatError, match="do not fit"):
        rgb_to_channels_first(image, np.zeros((3, 70, 90), np.float32))


def test_a_crop_larger_than_the_resize_goes_through_the_processor_into_out():
    # The processor pads there; the direct path hands the image to it and copies the result into out.
    processor = CLIPImageProcessorPil(size={"shortest_edge": 48}, crop_size={"height": 64, "width": 64})
    direct = direct_resize_and_crop(processor)
    image = _noise(90, 70)
    out = np.zeros((3, 64, 64), np.uint8)
    assert direct(image, out=out) is out
    assert np.array_equal(out, resize_and_crop(processor, image))
    with pytest.raises(PixelFormatError, match="do not fit"):
        direct(image, out=np.zeros((3, 48, 48), np.uint8))
