"""Photos that need care (16-bit, turned by EXIF), real photographs, and the preprocessing benchmark's input."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from plant_pipeline.ml.shards.build import ShardConfig, build_shards
from plant_pipeline.ml.shards.checks import check_exactness, check_integrity
from plant_pipeline_tests.mini_release import extract_photos
from plant_pipeline_tests.shards.flower_folder import CATEGORIES, png_bytes, read_all, tree_digest

# --- 16-bit and turned photos ---------------------------------------------------------------------------


def _jpeg_turned(image: Image.Image, orientation: int) -> bytes:
    """A JPEG whose EXIF says the camera was turned (a phone photo), pixels stored as the sensor saw them."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95, exif=exif.tobytes())
    return buffer.getvalue()


RAMP16 = (np.arange(64 * 64, dtype=np.int64).reshape(64, 64) * 65535 // (64 * 64 - 1)).astype(np.uint16)


@pytest.fixture(scope="module")
def odd_photos(tmp_path_factory, tiny_model_dir):
    """A 16-bit greyscale PNG ramp (64x64: no resize) and a 96x64 JPEG, left red and right blue, tagged
    orientation 6 (upright it is 64x96, red on top)."""
    root = tmp_path_factory.mktemp("odd")
    sideways = np.zeros((64, 96, 3), dtype=np.uint8)
    sideways[:, :48, 0] = 255
    sideways[:, 48:, 2] = 255
    (root / "ramp16.png").write_bytes(png_bytes(Image.fromarray(RAMP16)))
    (root / "phone.jpg").write_bytes(_jpeg_turned(Image.fromarray(sideways), 6))
    manifest = pd.DataFrame({"image_id": [1, 2], "path": ["ramp16.png", "phone.jpg"], "label": [0, 1],
                             "split": ["train", "train"], "source": "oxford_flowers"})
    out = tmp_path_factory.mktemp("odd_shards")
    result = build_shards(manifest, root, str(tiny_model_dir), out, config=ShardConfig(num_workers=1), categories=CATEGORIES)
    return root, manifest, result


def test_16_bit_png_is_stored_scaled_not_white(odd_photos):
    _, _, result = odd_photos
    assert result.quarantined == []
    pixels = {s.meta["path"]: s.pixels for s in read_all(result.out_dir, "train")}["ramp16.png"]
    assert (pixels == 255).mean() < 0.01  # clipping stored 99.6% white
    expected = ((RAMP16.astype(np.int64) + 128) // 257).astype(np.uint8)  # value / 257, rounded
    assert all(np.array_equal(pixels[c], expected) for c in range(3))


def test_phone_photo_is_stored_upright(odd_photos):
    _, _, result = odd_photos
    pixels = {s.meta["path"]: s.pixels for s in read_all(result.out_dir, "train")}["phone.jpg"].astype(int)
    # Upright 64x96, centre-cropped to 64x64: red in the top half, blue in the bottom half (sideways it
    # would be red on the left and blue on the right).
    assert pixels[0, :24].mean() > 200 and pixels[2, :24].mean() < 50
    assert pixels[2, -24:].mean() > 200 and pixels[0, -24:].mean() < 50


def test_odd_photos_match_the_processor_on_the_upright_image(odd_photos, tiny_model_dir, tmp_path):
    root, manifest, result = odd_photos
    outcome = check_exactness(result.out_dir, root, str(tiny_model_dir), sample_size=2)
    assert outcome.passed and outcome.metadata["samples_checked"] == 2, outcome.description
    slow = build_shards(manifest, root, str(tiny_model_dir), tmp_path / "slow", categories=CATEGORIES,
                        config=ShardConfig(num_workers=1, pil_geometry=False))
    assert tree_digest(slow.out_dir) == tree_digest(result.out_dir)



# --- real photographs ----------------------------------------------------------------------------------


def _processor_at(tiny_processor, size: int, patch: int, out_dir: Path) -> Path:
    """The tiny tokenizer with a CLIP image processor at ``size`` px: a real LLaVA-1.5 processor shape."""
    from transformers import LlavaProcessor
    from transformers.models.clip import CLIPImageProcessorPil

    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size}),
        tokenizer=tiny_processor.tokenizer, patch_size=patch, vision_feature_select_strategy="default",
        num_additional_image_tokens=1, chat_template=tiny_processor.chat_template,
    )
    processor.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="module")
def real_photos(shared_datasets, tmp_path_factory):
    """The first 18 photos of the mini release, extracted from its tgz, with their real labels."""
    from plant_pipeline.ml.data.oxford import read_labels

    mini = shared_datasets / "oxford-flowers-102-mini"
    root = tmp_path_factory.mktemp("real")
    extract_photos(shared_datasets, root, range(1, 19))
    labels = read_labels(mini / "imagelabels.mat")
    ids = range(1, 19)
    manifest = pd.DataFrame({"image_id": list(ids), "path": [f"jpg/image_{i:05d}.jpg" for i in ids],
                             "label": [int(labels[i - 1]) for i in ids],
                             "split": [("train", "validation", "test")[i % 3] for i in ids], "source": "oxford_flowers"})
    return root, manifest


@pytest.mark.parametrize("size,patch", [(64, 8), (336, 14)])
def test_real_photos_match_the_processor_exactly(real_photos, tiny_processor, tmp_path, size, patch):
    root, manifest = real_photos
    source = _processor_at(tiny_processor, size, patch, tmp_path / "processor")
    result = build_shards(manifest, root, str(source), tmp_path / "shards", config=ShardConfig(num_workers=2))
    assert result.quarantined == [] and sum(result.samples.values()) == 18
    assert result.index["pixel_shape"] == [3, size, size]
    assert result.index["num_image_tokens"] == (size // patch) ** 2
    outcome = check_exactness(tmp_path / "shards", root, str(source), sample_size=18)
    assert outcome.passed, outcome.description
    assert outcome.metadata == {"samples_checked": 18, "max_abs_diff": 0.0, "problems": []}
    assert check_integrity(tmp_path / "shards", manifest).passed



# --- bench/preprocess.py ---------------------------------------------------------------------------------


def test_preprocess_bench_refuses_archive_members_that_escape_its_folder(tmp_path):
    import importlib.util

    from plant_pipeline.ml.errors import UsageError  # the data stage's UnsafeArchiveError is one

    spec = importlib.util.spec_from_file_location(
        "bench_preprocess", Path(__file__).resolve().parents[2] / "bench" / "preprocess.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    mini = tmp_path / "data" / bench.MINI
    mini.mkdir(parents=True)
    with tarfile.open(mini / "102flowers.tgz", "w:gz") as archive:
        for name in ("jpg/image_00001.jpg", "jpg/../escaped.jpg"):  # the second lands beside jpg/'s parent
            info = tarfile.TarInfo(name)
            info.size = 3
            archive.addfile(info, io.BytesIO(b"jpg"))
    work = tmp_path / "work"
    with pytest.raises(UsageError, match=r"jpg/\.\./escaped\.jpg"):
        bench.prepare(tmp_path / "data", work, None)
    assert not (work / "escaped.jpg").exists()
