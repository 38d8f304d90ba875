"""build_shards on a small folder of awkward images, and the checks that guard its output."""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from plant_pipeline.ml.shards import build as S
from plant_pipeline.ml.shards.build import (
    QUARANTINE_FILE,
    ShardBuildError,
    ShardConfig,
    ShardInputError,
    build_shards,
    sample_key,
)
from plant_pipeline.ml.shards.checks import (
    CheckOutcome,
    _read_samples,
    check_class_coverage,
    check_exactness,
    check_integrity,
    check_no_leakage,
    check_quarantine_rate,
    preview_grid,
)
from plant_pipeline.ml.shards.format import FIELDS, INDEX_FILE, decode_sample, encode_sample, read_index

NAMES = ("pink primrose", "hard-leaved pocket orchid", "canterbury bells")
needs_fork = pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="needs fork")


def _noise(rng, height, width, channels=3):
    shape = (height, width) if channels == 1 else (height, width, channels)
    return rng.integers(0, 256, size=shape, dtype=np.uint8)


def _jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def make_flower_folder(root: Path, seed: int = 0) -> pd.DataFrame:
    """16 manifest rows over 3 classes: every image mode the pipeline converts, and 4 that it must quarantine."""
    rng = np.random.default_rng(seed)
    rgb = lambda h, w: Image.fromarray(_noise(rng, h, w))  # noqa: E731
    files = {
        1: ("train", 0, "jpg/a1.jpg", _jpeg(rgb(60, 80))),
        2: ("train", 0, "jpg/a2_grey.jpg", _jpeg(Image.fromarray(_noise(rng, 90, 50, 1), "L"))),
        3: ("train", 1, "jpg/a3_cmyk.jpg", _jpeg(Image.fromarray(_noise(rng, 70, 70, 4), "CMYK"))),
        4: ("train", 1, "png/a4_palette.png", _png(rgb(48, 64).convert("P", palette=Image.Palette.ADAPTIVE))),
        5: ("train", 2, "png/a5_alpha.png", _png(Image.fromarray(_noise(rng, 40, 40, 4), "RGBA"))),
        6: ("train", 2, "jpg/a6.jpg", _jpeg(rgb(64, 100))),
        7: ("train", 0, "jpg/a7_corrupt.jpg", rng.bytes(3000)),
        8: ("train", 1, "jpg/a8_missing.jpg", None),
        9: ("train", 2, "jpg/a9_truncated.jpg", _jpeg(rgb(80, 80))[:700]),
        10: ("validation", 0, "jpg/b10.jpg", _jpeg(rgb(70, 90))),
        11: ("validation", 1, "jpg/b11_grey.jpg", _jpeg(Image.fromarray(_noise(rng, 64, 64, 1), "L"))),
        12: ("validation", 2, "png/b12.png", _png(rgb(66, 66))),
        13: ("test", 0, "jpg/c13.jpg", _jpeg(rgb(72, 96))),
        14: ("test", 1, "jpg/c14.jpg", _jpeg(rgb(96, 72))),
        15: ("test", 2, "jpg/c15.jpg", _jpeg(rgb(64, 64))),
        16: ("test", 0, "png/c16_text.png", b"this is not an image\n" * 20),
    }
    rows = []
    for image_id, (split, label, path, data) in files.items():
        if data is not None:
            (root / path).parent.mkdir(parents=True, exist_ok=True)
            (root / path).write_bytes(data)
        rows.append({"image_id": image_id, "path": path, "label": label, "split": split, "source": "oxford_flowers"})
    # Shuffled on purpose: the build order must not depend on the manifest's row order.
    return pd.DataFrame(rows).sample(frac=1.0, random_state=seed).reset_index(drop=True)


EXPECTED_QUARANTINE = {
    "jpg/a7_corrupt.jpg": "not a recognised image format",
    "jpg/a8_missing.jpg": "missing file",
    "jpg/a9_truncated.jpg": "cannot decode image",
    "png/c16_text.png": "not a recognised image format",
}


@pytest.fixture(scope="module")
def flowers(tmp_path_factory):
    root = tmp_path_factory.mktemp("flowers")
    return root, make_flower_folder(root)


def _build(flowers, model_dir, out_dir, **config):
    root, manifest = flowers
    config = {"num_workers": 1, "batch_size": 3, **config}
    return build_shards(manifest, root, str(model_dir), out_dir, config=ShardConfig(**config), names=NAMES,
                        model_name="tiny")


@pytest.fixture(scope="module")
def built(flowers, tiny_model_dir, tmp_path_factory):
    """One build through a real process pool, shared by the read-only tests below."""
    out = tmp_path_factory.mktemp("shards")
    return _build(flowers, tiny_model_dir, out, num_workers=2, min_shards=2)


def _tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _read_all(shards_dir: Path, split: str):
    import webdataset as wds

    urls = [str(shards_dir / shard["file"]) for shard in read_index(shards_dir)["splits"][split]["shards"]]
    return list(wds.WebDataset(urls, shardshuffle=False, empty_check=False).map(decode_sample))


# --- configuration and inputs ------------------------------------------------------------------------


@pytest.mark.parametrize("field,value,message", [
    ("samples_per_shard", 0, "samples_per_shard must be an integer >= 1"),
    ("min_shards", -1, "min_shards must be an integer >= 1"),
    ("batch_size", 1.5, "batch_size must be an integer >= 1"),
    ("num_workers", -2, "num_workers must be an integer >= 0"),
    ("max_shard_bytes", 100, "max_shard_bytes must be an integer >= 10240"),
    ("start_method", "threads", "start_method must be one of"),
])
def test_config_rejects_bad_values(field, value, message):
    with pytest.raises(ShardInputError, match=message):
        ShardConfig(**{field: value})


def test_config_workers_default_to_the_cpus_available():
    assert ShardConfig(num_workers=3).workers() == 3
    assert 1 <= ShardConfig().workers() <= (os.cpu_count() or 1)


@pytest.mark.parametrize("change,message", [
    (lambda m: m.drop(columns=["path"]), "missing columns \\['path'\\]"),
    (lambda m: m.assign(split=m["split"].replace("validation", "val")), "unknown split values \\['val'\\]"),
    (lambda m: m.assign(label=m["label"] + 2), "labels outside 0..2"),
    (lambda m: pd.concat([m, m.iloc[:1]]), "both give sample key"),
    (lambda m: m.iloc[:0], "no rows"),
])
def test_bad_manifest_is_rejected_before_any_work(flowers, tiny_model_dir, tmp_path, change, message):
    root, manifest = flowers
    with pytest.raises(ShardInputError, match=message):
        build_shards(change(manifest), root, str(tiny_model_dir), tmp_path / "out", names=NAMES)
    assert not (tmp_path / "out").exists()


def test_sample_keys_are_unique_per_source_and_have_no_dots():
    assert sample_key(42) == "image_00042"
    assert sample_key(42, "oxford_flowers") == "image_00042"
    assert sample_key(42, "demo.release v1") == "demo-release-v1_image_00042"


@pytest.mark.parametrize("n,per_shard,min_shards,sizes", [
    (10, 2000, 4, [2, 3, 2, 3]),
    (2, 2000, 4, [1, 1]),
    (4500, 2000, 1, [1500, 1500, 1500]),
    (7, 3, 1, [2, 2, 3]),
    (1, 2000, 1, [1]),
])
def test_shard_bounds_are_balanced(n, per_shard, min_shards, sizes):
    bounds = S._shard_bounds(n, ShardConfig(samples_per_shard=per_shard, min_shards=min_shards))
    assert np.diff(bounds + [n]).tolist() == sizes


# --- what a build writes ---------------------------------------------------------------------------


def test_bad_images_are_quarantined_and_the_build_completes(built):
    reasons = {q["path"]: q["reason"] for q in built.quarantined}
    assert set(reasons) == set(EXPECTED_QUARANTINE)
    for path, reason in EXPECTED_QUARANTINE.items():
        assert reasons[path].startswith(reason), (path, reasons[path])
    assert json.loads((built.out_dir / QUARANTINE_FILE).read_text()) == built.quarantined
    index = read_index(built.out_dir)
    assert {q["path"] for q in index["splits"]["train"]["quarantined"]} == {
        "jpg/a7_corrupt.jpg", "jpg/a8_missing.jpg", "jpg/a9_truncated.jpg"}
    assert built.samples == {"train": 6, "validation": 3, "test": 3}


def test_greyscale_cmyk_palette_and_alpha_images_are_converted(built):
    samples = {s.meta["path"]: s for s in _read_all(built.out_dir, "train")}
    for path in ("jpg/a2_grey.jpg", "jpg/a3_cmyk.jpg", "png/a4_palette.png", "png/a5_alpha.png"):
        assert samples[path].pixels.shape == (3, 64, 64) and samples[path].pixels.dtype == np.uint8
    grey = samples["jpg/a2_grey.jpg"].pixels
    assert (grey[0] == grey[1]).all() and (grey[1] == grey[2]).all()


def test_index_and_shards_follow_the_format(built):
    index = read_index(built.out_dir)
    assert index["pixel_shape"] == [3, 64, 64] and index["num_image_tokens"] == 64
    assert index["model_name"] == "tiny"
    for split, info in index["splits"].items():
        assert [s["file"] for s in info["shards"]] == [f"{split}/{split}-{i:05d}.tar" for i in range(2)]
        for shard in info["shards"]:
            data = (built.out_dir / shard["file"]).read_bytes()
            assert len(data) == shard["bytes"] and len(data) % tarfile.RECORDSIZE == 0
            assert hashlib.sha256(data).hexdigest() == shard["sha256"]
            with tarfile.open(fileobj=io.BytesIO(data)) as archive:
                members = archive.getmembers()
            assert len(members) == shard["samples"] * len(FIELDS)
            assert {(m.mtime, m.uid, m.gid, m.mode, m.uname) for m in members} == {(0, 0, 0, 0o444, "")}
    assert not list(built.out_dir.glob(".tmp-*"))
    assert built.source_bytes > 0 and built.images_per_second > 0


def test_samples_read_back_in_manifest_order_with_meta(built, tiny_processor):
    samples = _read_all(built.out_dir, "train")
    assert [s.key for s in samples] == ["image_00001", "image_00002", "image_00003", "image_00004",
                                        "image_00005", "image_00006"]
    first = samples[0]
    assert first.meta["name"] == NAMES[0] and first.meta["label"] == 0 and first.meta["split"] == "train"
    assert set(first.meta) == {"image_id", "label", "name", "split", "source", "path", "sha256"}
    answer = tiny_processor.tokenizer.decode(first.input_ids[first.labels != -100], skip_special_tokens=True)
    assert NAMES[0] in answer


def test_stored_members_are_exactly_the_formats_encoding(built):
    # The writer streams pixels without encode_sample; its bytes must still be encode_sample's.
    sample = _read_all(built.out_dir, "validation")[1]
    with tarfile.open(fileobj=io.BytesIO(S.tar_sample(sample) + b"\0" * 1024)) as archive:
        members = {m.name: archive.extractfile(m).read() for m in archive}
    encoded = encode_sample(sample)
    assert members == {f"{sample.key}.{field}": encoded[field] for field in FIELDS}


def test_sample_size_is_known_before_its_pixels(built):
    # The shared-memory slots the workers write into are sized from this, before any image is decoded.
    for sample in _read_all(built.out_dir, "train"):
        expected = len(S.tar_sample(sample))
        assert S.sample_nbytes(sample.pixels.shape, sample.input_ids, sample.labels, sample.meta) == expected
        longer = {**sample.meta, "path": sample.meta["path"] + "x" * 600}
        assert S.sample_nbytes(sample.pixels.shape, sample.input_ids, sample.labels, longer) > expected


def test_tasks_cover_every_row_in_order_and_end_in_quarter_batches():
    rows = {"train": list(range(200)), "validation": list(range(30)), "test": list(range(70))}
    batches = S._batches(rows, 64, 2)
    assert [(split, row) for split, _, batch in batches for row in batch] == \
        [(split, row) for split, split_rows in rows.items() for row in split_rows]
    assert all(batch == rows[split][start:start + len(batch)] for split, start, batch in batches)
    assert max(len(batch) for _, _, batch in batches) == 64
    # At least two full batches' worth of rows at the end go out 16 at a time; earlier ones stay whole.
    tail = [len(batch) for _, _, batch in batches[-8:]]
    assert max(tail) <= 16 and sum(len(batch) for _, _, batch in batches if len(batch) <= 16) >= 128
    assert [len(batch) for _, _, batch in S._batches(rows, 64, 1)] == [64, 64, 64, 8, 30, 64, 6]


def test_same_inputs_give_byte_identical_shards(built, flowers, tiny_model_dir, tmp_path):
    # In-process with another batch size vs the pool: the bytes must not depend on either.
    _build(flowers, tiny_model_dir, tmp_path / "again", num_workers=1, batch_size=5, min_shards=2)
    assert (tmp_path / "again" / INDEX_FILE).read_bytes() == (built.out_dir / INDEX_FILE).read_bytes()
    assert _tree_digest(tmp_path / "again") == _tree_digest(built.out_dir)


def test_processor_path_gives_the_same_bytes_as_the_direct_pil_path(built, flowers, tiny_model_dir, tmp_path):
    slow = _build(flowers, tiny_model_dir, tmp_path / "slow", num_workers=2, min_shards=2, pil_geometry=False)
    assert _tree_digest(slow.out_dir) == _tree_digest(built.out_dir)


@pytest.mark.slow
def test_spawned_workers_give_the_same_bytes(built, flowers, tiny_model_dir, tmp_path):
    spawned = _build(flowers, tiny_model_dir, tmp_path / "spawn", num_workers=2, min_shards=2, start_method="spawn")
    assert _tree_digest(spawned.out_dir) == _tree_digest(built.out_dir)


@pytest.mark.parametrize("name,size", [("image_00001.pixels.npy", 338816), ("k.json", 0), ("a" * 99, 7),
                                       ("a" * 100, 1), ("é.json", 3)])
def test_fast_tar_headers_equal_tarfiles(name, size):
    assert S._tar_header(name, size) == S._tarfile_header(name, size)


def test_shards_are_cut_by_count_and_by_bytes(flowers, tiny_model_dir, tmp_path):
    by_count = _build(flowers, tiny_model_dir, tmp_path / "count", samples_per_shard=2)
    assert all(s["samples"] <= 2 for info in by_count.index["splits"].values() for s in info["shards"])
    # 9 train rows cut by position into 5 shards: [1, 2, 2, 2, 2] rows; the last holds rows 8 and 9, both
    # quarantined, so it is not written; the third loses row 7 (corrupt) and keeps one sample.
    assert [s["samples"] for s in by_count.index["splits"]["train"]["shards"]] == [1, 2, 2, 1]
    by_bytes = _build(flowers, tiny_model_dir, tmp_path / "bytes", max_shard_bytes=40 * 1024)
    shards = [s for info in by_bytes.index["splits"].values() for s in info["shards"]]
    assert all(s["bytes"] <= 40 * 1024 for s in shards) and max(s["samples"] for s in shards) == 2
    assert sum(s["samples"] for s in shards) == 12


def test_stale_temp_folders_of_dead_builds_are_removed(flowers, tiny_model_dir, tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    out = tmp_path / "out"
    stale = out / f".tmp-train-{int(dead.stdout)}-0123abcd"
    live = out / f".tmp-train-{os.getpid()}-0123abcd"  # looks like a concurrent build in this process: kept
    stale.mkdir(parents=True)
    live.mkdir()
    _build(flowers, tiny_model_dir, out)
    assert not stale.exists() and live.exists()


def test_preview_grid_is_a_png_with_one_tile_per_sample(built):
    image = Image.open(io.BytesIO(preview_grid(built.out_dir, "train", n=8)))
    assert image.format == "PNG" and image.size == (4 * 160, 2 * 190)
    assert Image.open(io.BytesIO(preview_grid(built.out_dir, "test", n=2))).size == (2 * 160, 190)
    with pytest.raises(ShardInputError, match="no split 'holdout'"):
        preview_grid(built.out_dir, "holdout")


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
    (root / "ramp16.png").write_bytes(_png(Image.fromarray(RAMP16)))
    (root / "phone.jpg").write_bytes(_jpeg_turned(Image.fromarray(sideways), 6))
    manifest = pd.DataFrame({"image_id": [1, 2], "path": ["ramp16.png", "phone.jpg"], "label": [0, 1],
                             "split": ["train", "train"], "source": "oxford_flowers"})
    out = tmp_path_factory.mktemp("odd_shards")
    result = build_shards(manifest, root, str(tiny_model_dir), out, config=ShardConfig(num_workers=1), names=NAMES)
    return root, manifest, result


def test_16_bit_png_is_stored_scaled_not_white(odd_photos):
    _, _, result = odd_photos
    assert result.quarantined == []
    pixels = {s.meta["path"]: s.pixels for s in _read_all(result.out_dir, "train")}["ramp16.png"]
    assert (pixels == 255).mean() < 0.01  # clipping stored 99.6% white
    expected = ((RAMP16.astype(np.int64) + 128) // 257).astype(np.uint8)  # value / 257, rounded
    assert all(np.array_equal(pixels[c], expected) for c in range(3))


def test_phone_photo_is_stored_upright(odd_photos):
    _, _, result = odd_photos
    pixels = {s.meta["path"]: s.pixels for s in _read_all(result.out_dir, "train")}["phone.jpg"].astype(int)
    # Upright 64x96, centre-cropped to 64x64: red in the top half, blue in the bottom half (sideways it
    # would be red on the left and blue on the right).
    assert pixels[0, :24].mean() > 200 and pixels[2, :24].mean() < 50
    assert pixels[2, -24:].mean() > 200 and pixels[0, -24:].mean() < 50


def test_odd_photos_match_the_processor_on_the_upright_image(odd_photos, tiny_model_dir, tmp_path):
    root, manifest, result = odd_photos
    outcome = check_exactness(result.out_dir, root, str(tiny_model_dir), sample_size=2)
    assert outcome.passed and outcome.metadata["samples_checked"] == 2, outcome.description
    slow = build_shards(manifest, root, str(tiny_model_dir), tmp_path / "slow", names=NAMES,
                        config=ShardConfig(num_workers=1, pil_geometry=False))
    assert _tree_digest(slow.out_dir) == _tree_digest(result.out_dir)


# --- failures midway leave the previous shards alone ---------------------------------------------------


@pytest.mark.parametrize("workers", [1, pytest.param(2, marks=needs_fork)])
def test_error_midway_leaves_previous_shards_untouched(flowers, tiny_model_dir, tmp_path, monkeypatch, workers):
    out = tmp_path / "out"
    _build(flowers, tiny_model_dir, out, num_workers=1)
    before = _tree_digest(out)
    original = S._Worker.write_sample

    def fail_on_validation(worker, row, slot):
        if row.split == "validation":
            raise RuntimeError("disk on fire")
        return original(worker, row, slot)

    # Patched before the pool forks, so the workers inherit it.
    monkeypatch.setattr(S._Worker, "write_sample", fail_on_validation)
    with pytest.raises(RuntimeError, match="disk on fire"):
        _build(flowers, tiny_model_dir, out, num_workers=workers, start_method="fork", min_shards=3)
    assert _tree_digest(out) == before
    assert not list(out.glob(".tmp-*"))


def test_interrupt_midway_leaves_previous_shards_untouched(flowers, tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    _build(flowers, tiny_model_dir, out)
    before = _tree_digest(out)

    def interrupt(split, done, total):
        if split == "validation":
            raise KeyboardInterrupt

    root, manifest = flowers
    with pytest.raises(KeyboardInterrupt):
        build_shards(manifest, root, str(tiny_model_dir), out, names=NAMES, model_name="tiny", progress=interrupt,
                     config=ShardConfig(num_workers=2, batch_size=2, min_shards=3))
    assert _tree_digest(out) == before
    assert not list(out.glob(".tmp-*"))


@needs_fork
def test_a_worker_that_dies_fails_the_build_cleanly(flowers, tiny_model_dir, tmp_path, monkeypatch):
    parent = os.getpid()
    original = S._Worker.write_sample

    def die(worker, row, slot):
        if os.getpid() != parent and row.key == "image_00004":
            os._exit(3)  # what the OOM killer looks like from the parent
        return original(worker, row, slot)

    monkeypatch.setattr(S._Worker, "write_sample", die)
    with pytest.raises(ShardBuildError, match="worker process died"):
        _build(flowers, tiny_model_dir, tmp_path / "out", num_workers=2, start_method="fork")
    assert not list((tmp_path / "out").glob(".tmp-*"))
    assert not (tmp_path / "out" / INDEX_FILE).exists()


@needs_fork
def test_forked_workers_run_torch_single_threaded(flowers, tiny_model_dir, tmp_path, monkeypatch):
    # With torchvision installed the processor runs torch ops in the workers; a forked child that enters
    # the OpenMP pool its parent already started hangs, so workers must be single-threaded.
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    (torch.rand(256, 256) @ torch.rand(256, 256)).sum()  # the parent's OpenMP pool is now live
    original = S._Worker.write_sample

    def torch_in_worker(worker, row, slot):
        if torch.get_num_threads() != 1:
            raise RuntimeError(f"worker runs torch with {torch.get_num_threads()} threads")
        torch.nn.functional.interpolate(torch.rand(1, 3, 40, 40), size=(20, 20), mode="bilinear")
        return original(worker, row, slot)

    monkeypatch.setattr(S._Worker, "write_sample", torch_in_worker)
    try:
        result = _build(flowers, tiny_model_dir, tmp_path / "out", num_workers=2, start_method="fork")
    finally:
        torch.set_num_threads(threads)
    assert sum(result.samples.values()) == 12


# --- checks ------------------------------------------------------------------------------------------


def test_checks_pass_on_a_good_build(built, flowers, tiny_model_dir):
    root, manifest = flowers
    outcomes = {
        "integrity": check_integrity(built.out_dir, manifest),
        "coverage": check_class_coverage(built.out_dir, len(NAMES)),
        "leakage": check_no_leakage(built.out_dir),
        "exactness": check_exactness(built.out_dir, root, str(tiny_model_dir), sample_size=100),
        "quarantine": check_quarantine_rate(built.out_dir, max_fraction=0.5),
    }
    assert all(isinstance(o, CheckOutcome) and o.passed for o in outcomes.values()), outcomes
    assert outcomes["exactness"].metadata["samples_checked"] == 12
    assert outcomes["exactness"].metadata["max_abs_diff"] == 0.0
    assert outcomes["integrity"].metadata["shards_checked"] == 6
    json.dumps([o.metadata for o in outcomes.values()])  # metadata must be plain JSON for the UI


def test_quarantine_rate_check_fails_above_the_threshold(built):
    outcome = check_quarantine_rate(built.out_dir, max_fraction=0.01)
    assert not outcome.passed and outcome.metadata["quarantined_fraction"]["train"] == pytest.approx(3 / 9)


def _rewrite_shard(path: Path, keep=lambda sample: True, change=lambda sample: sample) -> None:
    """Rewrite a shard through the writer's own tar layout, dropping or changing samples."""
    samples = [change(s) for s in _read_samples(path) if keep(s)]
    data = b"".join(S.tar_sample(s) for s in samples)
    path.write_bytes(data + b"\0" * (S._closed_size(len(data)) - len(data)))


def test_integrity_fails_when_a_shard_is_corrupted_or_missing(built, flowers, tmp_path):
    _, manifest = flowers
    copy = Path(shutil.copytree(built.out_dir, tmp_path / "copy"))
    shard = copy / "train" / "train-00000.tar"
    data = bytearray(shard.read_bytes())
    data[3000:3010] = bytes(255 - b for b in data[3000:3010])  # inside the first sample's pixels
    shard.write_bytes(bytes(data))
    outcome = check_integrity(copy, manifest)
    assert not outcome.passed
    assert any("train/train-00000.tar: sha256" in p for p in outcome.metadata["problems"])
    (copy / "test" / "test-00001.tar").unlink()
    outcome = check_integrity(copy, manifest)
    assert any("test/test-00001.tar: missing" in p for p in outcome.metadata["problems"])
    assert any(p.startswith("test: expected 3 samples") for p in outcome.metadata["problems"])


def test_integrity_fails_when_the_manifest_has_rows_the_shards_lack(built, flowers):
    _, manifest = flowers
    extra = pd.concat([manifest, pd.DataFrame([{"image_id": 99, "path": "jpg/new.jpg", "label": 0,
                                                "split": "validation", "source": "oxford_flowers"}])])
    outcome = check_integrity(built.out_dir, extra)
    assert not outcome.passed and "missing ['image_00099']" in outcome.metadata["problems"][0]


def test_coverage_fails_when_a_class_is_deleted(built, tmp_path):
    copy = Path(shutil.copytree(built.out_dir, tmp_path / "copy"))
    for shard in (copy / "test").glob("*.tar"):
        _rewrite_shard(shard, keep=lambda s: s.meta["label"] != 2)
    outcome = check_class_coverage(copy, len(NAMES))
    assert not outcome.passed and outcome.metadata["missing"] == {"test": [2]}
    assert "test: 1" in outcome.description


def test_leakage_fails_when_one_image_is_in_two_splits(flowers, tiny_model_dir, tmp_path):
    root, manifest = flowers
    leaky = manifest[manifest["image_id"].isin([1, 10, 13])].copy()
    leaky.loc[leaky["image_id"] == 13, "path"] = "jpg/a1.jpg"  # the train image again, under another id
    out = tmp_path / "leaky"
    build_shards(leaky, root, str(tiny_model_dir), out, names=NAMES, config=ShardConfig(num_workers=1))
    outcome = check_no_leakage(out)
    assert not outcome.passed and outcome.metadata["num_leaks"] == 1
    assert outcome.metadata["leaks"][0]["samples"] == {"train": "image_00001", "test": "image_00013"}


def test_exactness_fails_when_stored_pixels_drift(built, flowers, tiny_model_dir, tmp_path):
    root, _ = flowers
    copy = Path(shutil.copytree(built.out_dir, tmp_path / "copy"))

    def brighten(sample):
        sample.pixels = np.minimum(sample.pixels.astype(np.int16) + 1, 255).astype(np.uint8)
        return sample

    _rewrite_shard(copy / "validation" / "validation-00000.tar", change=brighten)
    outcome = check_exactness(copy, root, str(tiny_model_dir), sample_size=100)
    assert not outcome.passed and outcome.metadata["max_abs_diff"] > 0
    assert any("pixel_values differ" in p for p in outcome.metadata["problems"])


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
    wanted = {f"jpg/image_{i:05d}.jpg" for i in range(1, 19)}
    with tarfile.open(mini / "102flowers.tgz", "r:gz") as archive:
        for member in archive:
            if member.name in wanted:
                (root / member.name).parent.mkdir(parents=True, exist_ok=True)
                (root / member.name).write_bytes(archive.extractfile(member).read())
                wanted.discard(member.name)
                if not wanted:
                    break
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

    from plant_pipeline.ml.data.download import UnsafeArchiveError

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
    with pytest.raises(UnsafeArchiveError, match=r"jpg/\.\./escaped\.jpg"):
        bench.prepare(tmp_path / "data", work, None)
    assert not (work / "escaped.jpg").exists()
