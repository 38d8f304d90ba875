"""read_photo: the same upright RGB picture the shards read, and a clear PhotoError for every photo it cannot use,
size limits checked before any pixel is decoded."""

from __future__ import annotations

import io
import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image

from plant_pipeline.ml.errors import UsageError
from plant_pipeline.ml.images import to_rgb
from plant_pipeline.ml.serving.photos import MAX_PHOTO_BYTES, PhotoError, PhotoTooLarge, read_photo


def _encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _turned_jpeg() -> bytes:
    """96x64 as stored, left red and right blue, EXIF orientation 6: upright it is 64x96, red on top."""
    sideways = np.zeros((64, 96, 3), dtype=np.uint8)
    sideways[:, :48, 0] = 255
    sideways[:, 48:, 2] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    return _encoded(Image.fromarray(sideways), "JPEG", quality=95, exif=exif.tobytes())


def _png_header_only(width: int, height: int) -> bytes:
    """A greyscale PNG claiming ``width`` x ``height`` whose pixel data is a few bytes: decoding it would fail."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    pixels = zlib.compress(b"\0" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


@pytest.mark.parametrize("kind", ["path", "bytes", "pil"])
def test_exif_turned_photo_comes_back_upright(tmp_path, kind):
    data = _turned_jpeg()
    path = tmp_path / "phone.jpg"
    path.write_bytes(data)
    source = {"path": path, "bytes": data, "pil": Image.open(io.BytesIO(data))}[kind]
    image = read_photo(source)
    assert image.mode == "RGB" and image.size == (64, 96)
    pixels = np.asarray(image).astype(int)
    assert pixels[:40, :, 0].mean() > 200 and pixels[:40, :, 2].mean() < 50  # red on top
    assert pixels[-40:, :, 2].mean() > 200 and pixels[-40:, :, 0].mean() < 50


def test_png_with_alpha_is_on_white_like_the_shards(tmp_path):
    rgba = np.zeros((20, 30, 4), dtype=np.uint8)
    rgba[..., 1] = 200
    rgba[:, :15, 3] = 255  # left half opaque green, right half fully transparent
    data = _encoded(Image.fromarray(rgba, "RGBA"), "PNG")
    (tmp_path / "leaf.png").write_bytes(data)
    image = read_photo(tmp_path / "leaf.png")
    pixels = np.asarray(image)
    assert image.mode == "RGB"
    assert (pixels[:, 15:] == 255).all()  # transparent -> white, not black
    assert (pixels[:, :15] == (0, 200, 0)).all()
    assert np.array_equal(pixels, np.asarray(to_rgb(Image.open(io.BytesIO(data)))))


def test_reads_what_the_shards_read_for_every_mode():
    rng = np.random.default_rng(0)
    for image in (Image.fromarray(rng.integers(0, 256, (30, 40), dtype=np.uint8), "L"),
                  Image.fromarray(rng.integers(0, 256, (30, 40, 4), dtype=np.uint8), "CMYK"),
                  Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).convert("P")):
        data = _encoded(image, "TIFF")
        assert np.array_equal(np.asarray(read_photo(data)), np.asarray(to_rgb(Image.open(io.BytesIO(data)))))


@pytest.mark.parametrize("data,match", [
    (b"", r"^leaf\.jpg: the file is empty"),
    (b"this is not an image\n" * 20, r"^leaf\.jpg: not an image"),
    (np.random.default_rng(1).bytes(3000), r"^leaf\.jpg: not an image"),
])
def test_unusable_bytes_are_a_photo_error_naming_the_photo(tmp_path, data, match):
    path = tmp_path / "leaf.jpg"
    path.write_bytes(data)
    for source in (path, data):
        with pytest.raises(PhotoError, match=match):
            read_photo(source, name=None if source is path else "leaf.jpg")


def test_truncated_jpeg_is_a_photo_error():
    image = Image.fromarray(np.random.default_rng(2).integers(0, 256, (80, 80, 3), dtype=np.uint8))
    with pytest.raises(PhotoError, match=r"^cut\.jpg: cannot decode the image .*truncated"):
        read_photo(_encoded(image, "JPEG")[:700], name="cut.jpg")


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(PhotoError, match=r"^gone\.jpg: no such file"):
        read_photo(tmp_path / "gone.jpg")
    with pytest.raises(PhotoError, match="is a folder"):
        read_photo(tmp_path)
    assert issubclass(PhotoError, UsageError) and issubclass(PhotoTooLarge, PhotoError)


def test_huge_dimensions_are_refused_from_the_header_without_decoding():
    # 8000 x 8000 = 64 MP: over our 50 MP limit, under Pillow's own bomb warning (89 MP). The pixel data is a few
    # bytes, so decoding would fail with a truncation error: PhotoTooLarge shows the header alone was read.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(PhotoTooLarge, match=r"^bomb\.png: 8000x8000 is 64,000,000 pixels, over the limit"):
            read_photo(_png_header_only(8000, 8000), name="bomb.png")
    with pytest.raises(PhotoTooLarge, match=r"^bomb\.png: "):  # past Pillow's error threshold too
        read_photo(_png_header_only(20000, 20000), name="bomb.png")
    with pytest.raises(PhotoTooLarge, match="2,500 pixels"):  # the limit is the caller's
        read_photo(Image.new("RGB", (50, 50)), name="small.png", max_pixels=2000)


def test_byte_limit_is_checked_before_a_file_is_read(tmp_path):
    path = tmp_path / "big.jpg"
    with path.open("wb") as file:
        file.truncate(MAX_PHOTO_BYTES + 1)  # sparse: costs no disk, and reading it whole would be slow
    with pytest.raises(PhotoTooLarge, match=r"^big\.jpg: 20\.0 MiB is over the limit of 20\.0 MiB"):
        read_photo(path)
    with pytest.raises(PhotoTooLarge, match=r"^upload: "):
        read_photo(b"x" * 101, name="upload", max_bytes=100)
