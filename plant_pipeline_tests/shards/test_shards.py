"""build_shards on a small folder of awkward images: its inputs, what it writes, and failures midway."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from plant_pipeline.ml.shards.build import QUARANTINE_FILE, ShardBuildError, ShardConfig, ShardInputError, build_shards
from plant_pipeline.ml.shards.format import FIELDS, INDEX_FILE, read_index, validate_index
from plant_pipeline.ml.shards.preview import preview_grid
from plant_pipeline.ml.shards.rows import plan_batches, sample_key, shard_bounds
from plant_pipeline.ml.shards.tar import sample_nbytes, tar_header, tarfile_header
from plant_pipeline.ml.shards.workers import Worker
from plant_pipeline.ml.testing import encode_sample, tar_sample
from plant_pipeline_tests.shards.flower_folder import (
    CATEGORIES,
    EXPECTED_QUARANTINE,
    NAMES,
    build_flowers,
    needs_fork,
    read_all,
    tree_digest,
)

# --- configuration and inputs ------------------------------------------------------------------------


@pytest.mark.parametrize("field,value,message", [
    ("samples_per_shard", 0, "samples_per_shard must be an integer >= 1"),
    ("min_shards", -1, "min_shards must be an integer >= 1"),
    ("batch_size", 1.5, "batch_size must be an integer >= 1"),
    ("num_workers", -2, "num_workers must be an integer >= 0"),
    ("max_shard_mb", 0.001, "max_shard_mb must be a number >= 0.009765625"),
    ("max_shard_mb", "big", "max_shard_mb must be a number"),
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
        build_shards(change(manifest), root, str(tiny_model_dir), tmp_path / "out", categories=CATEGORIES)
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
    bounds = shard_bounds(n, per_shard, min_shards)
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
    samples = {s.meta["path"]: s for s in read_all(built.out_dir, "train")}
    for path in ("jpg/a2_grey.jpg", "jpg/a3_cmyk.jpg", "png/a4_palette.png", "png/a5_alpha.png"):
        assert samples[path].pixels.shape == (3, 64, 64) and samples[path].pixels.dtype == np.uint8
    grey = samples["jpg/a2_grey.jpg"].pixels
    assert (grey[0] == grey[1]).all() and (grey[1] == grey[2]).all()


def test_index_and_shards_follow_the_format(built):
    index = read_index(built.out_dir)  # checked against the schema as it is read
    assert index == built.index and validate_index(built.index)["model_name"] == "tiny"
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
    samples = read_all(built.out_dir, "train")
    assert [s.key for s in samples] == ["image_00001", "image_00002", "image_00003", "image_00004",
                                        "image_00005", "image_00006"]
    first = samples[0]
    assert first.meta["name"] == NAMES[0] and first.meta["label"] == 0 and first.meta["split"] == "train"
    assert set(first.meta) == {"image_id", "label", "name", "split", "source", "path", "sha256"}
    answer = tiny_processor.tokenizer.decode(first.input_ids[first.labels != -100], skip_special_tokens=True)
    assert NAMES[0] in answer


def test_stored_members_are_exactly_the_formats_encoding(built):
    # The writer streams pixels without encode_sample; its bytes must still be encode_sample's.
    sample = read_all(built.out_dir, "validation")[1]
    with tarfile.open(fileobj=io.BytesIO(tar_sample(sample) + b"\0" * 1024)) as archive:
        members = {m.name: archive.extractfile(m).read() for m in archive}
    encoded = encode_sample(sample)
    assert members == {f"{sample.key}.{field}": encoded[field] for field in FIELDS}


def test_sample_size_is_known_before_its_pixels(built):
    # The shared-memory slots the workers write into are sized from this, before any image is decoded.
    for sample in read_all(built.out_dir, "train"):
        expected = len(tar_sample(sample))
        assert sample_nbytes(sample.pixels.shape, sample.input_ids, sample.labels, sample.meta) == expected
        longer = {**sample.meta, "path": sample.meta["path"] + "x" * 600}
        assert sample_nbytes(sample.pixels.shape, sample.input_ids, sample.labels, longer) > expected


def test_tasks_cover_every_row_in_order_and_end_in_quarter_batches():
    rows = {"train": list(range(200)), "validation": list(range(30)), "test": list(range(70))}
    batches = plan_batches(rows, 64, 2)
    assert [(split, row) for split, _, batch in batches for row in batch] == \
        [(split, row) for split, split_rows in rows.items() for row in split_rows]
    assert all(batch == rows[split][start:start + len(batch)] for split, start, batch in batches)
    assert max(len(batch) for _, _, batch in batches) == 64
    # At least two full batches' worth of rows at the end go out 16 at a time; earlier ones stay whole.
    tail = [len(batch) for _, _, batch in batches[-8:]]
    assert max(tail) <= 16 and sum(len(batch) for _, _, batch in batches if len(batch) <= 16) >= 128
    assert [len(batch) for _, _, batch in plan_batches(rows, 64, 1)] == [64, 64, 64, 8, 30, 64, 6]


def test_same_inputs_give_byte_identical_shards(built, flowers, tiny_model_dir, tmp_path):
    # In-process with another batch size vs the pool: the bytes must not depend on either.
    build_flowers(flowers, tiny_model_dir, tmp_path / "again", num_workers=1, batch_size=5, min_shards=2)
    assert (tmp_path / "again" / INDEX_FILE).read_bytes() == (built.out_dir / INDEX_FILE).read_bytes()
    assert tree_digest(tmp_path / "again") == tree_digest(built.out_dir)


def test_processor_path_gives_the_same_bytes_as_the_direct_pil_path(built, flowers, tiny_model_dir, tmp_path):
    slow = build_flowers(flowers, tiny_model_dir, tmp_path / "slow", num_workers=2, min_shards=2, pil_geometry=False)
    assert tree_digest(slow.out_dir) == tree_digest(built.out_dir)


@pytest.mark.slow
def test_spawned_workers_give_the_same_bytes(built, flowers, tiny_model_dir, tmp_path):
    spawned = build_flowers(flowers, tiny_model_dir, tmp_path / "spawn", num_workers=2, min_shards=2, start_method="spawn")
    assert tree_digest(spawned.out_dir) == tree_digest(built.out_dir)


@pytest.mark.parametrize("name,size", [("image_00001.pixels.npy", 338816), ("k.json", 0), ("a" * 99, 7),
                                       ("a" * 100, 1), ("é.json", 3)])
def test_fast_tar_headers_equal_tarfiles(name, size):
    assert tar_header(name, size) == tarfile_header(name, size)


def test_shards_are_cut_by_count_and_by_bytes(flowers, tiny_model_dir, tmp_path):
    by_count = build_flowers(flowers, tiny_model_dir, tmp_path / "count", samples_per_shard=2)
    assert all(s["samples"] <= 2 for info in by_count.index["splits"].values() for s in info["shards"])
    # 9 train rows cut by position into 5 shards: [1, 2, 2, 2, 2] rows; the last holds rows 8 and 9, both
    # quarantined, so it is not written; the third loses row 7 (corrupt) and keeps one sample.
    assert [s["samples"] for s in by_count.index["splits"]["train"]["shards"]] == [1, 2, 2, 1]
    by_bytes = build_flowers(flowers, tiny_model_dir, tmp_path / "bytes", max_shard_mb=40 / 1024)
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
    build_flowers(flowers, tiny_model_dir, out)
    assert not stale.exists() and live.exists()


def test_preview_grid_is_a_png_with_one_tile_per_sample(built):
    image = Image.open(io.BytesIO(preview_grid(built.out_dir, "train", n=8)))
    assert image.format == "PNG" and image.size == (4 * 160, 2 * 190)
    assert Image.open(io.BytesIO(preview_grid(built.out_dir, "test", n=2))).size == (2 * 160, 190)
    with pytest.raises(ShardInputError, match="no split 'holdout'"):
        preview_grid(built.out_dir, "holdout")



# --- failures midway leave the previous shards alone ---------------------------------------------------


@pytest.mark.parametrize("workers", [1, pytest.param(2, marks=needs_fork)])
def test_error_midway_leaves_previous_shards_untouched(flowers, tiny_model_dir, tmp_path, monkeypatch, workers):
    out = tmp_path / "out"
    build_flowers(flowers, tiny_model_dir, out, num_workers=1)
    before = tree_digest(out)
    original = Worker.write_sample

    def fail_on_validation(worker, row, slot):
        if row.split == "validation":
            raise RuntimeError("disk on fire")
        return original(worker, row, slot)

    # Patched before the pool forks, so the workers inherit it.
    monkeypatch.setattr(Worker, "write_sample", fail_on_validation)
    with pytest.raises(RuntimeError, match="disk on fire"):
        build_flowers(flowers, tiny_model_dir, out, num_workers=workers, start_method="fork", min_shards=3,
                      incremental=False)
    assert tree_digest(out) == before
    assert not list(out.glob(".tmp-*"))


def test_interrupt_midway_leaves_previous_shards_untouched(flowers, tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    build_flowers(flowers, tiny_model_dir, out)
    before = tree_digest(out)

    def interrupt(split, done, total):
        if split == "validation":
            raise KeyboardInterrupt

    root, manifest = flowers
    with pytest.raises(KeyboardInterrupt):
        build_shards(manifest, root, str(tiny_model_dir), out, categories=CATEGORIES, model_name="tiny",
                     progress=interrupt, incremental=False,
                     config=ShardConfig(num_workers=2, batch_size=2, min_shards=3))
    assert tree_digest(out) == before
    assert not list(out.glob(".tmp-*"))


@needs_fork
def test_a_worker_that_dies_fails_the_build_cleanly(flowers, tiny_model_dir, tmp_path, monkeypatch):
    parent = os.getpid()
    original = Worker.write_sample

    def die(worker, row, slot):
        if os.getpid() != parent and row.key == "image_00004":
            os._exit(3)  # what the OOM killer looks like from the parent
        return original(worker, row, slot)

    monkeypatch.setattr(Worker, "write_sample", die)
    with pytest.raises(ShardBuildError, match="worker process died"):
        build_flowers(flowers, tiny_model_dir, tmp_path / "out", num_workers=2, start_method="fork")
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
    original = Worker.write_sample

    def torch_in_worker(worker, row, slot):
        if torch.get_num_threads() != 1:
            raise RuntimeError(f"worker runs torch with {torch.get_num_threads()} threads")
        torch.nn.functional.interpolate(torch.rand(1, 3, 40, 40), size=(20, 20), mode="bilinear")
        return original(worker, row, slot)

    monkeypatch.setattr(Worker, "write_sample", torch_in_worker)
    try:
        result = build_flowers(flowers, tiny_model_dir, tmp_path / "out", num_workers=2, start_method="fork")
    finally:
        torch.set_num_threads(threads)
    assert sum(result.samples.values()) == 12

