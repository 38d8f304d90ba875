"""New categories through data/incoming/: a category map of made-up names, folders that create categories (or
wait, or are refused), content-hash splits for them, relabelling by name, old ledgers, and the sensor's tag."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
from dagster import build_sensor_context, instance_for_test, materialize
from PIL import Image

from plant_pipeline.defs.assets.user_photos import user_photos
from plant_pipeline.defs.resources import PipelineStorage
from plant_pipeline.defs.sensors import NEW_CATEGORIES_TAG, incoming_photos_sensor, new_categories_text
from plant_pipeline.ml.data import incoming
from plant_pipeline.ml.data.categories import CategoryMap, oxford_map, read_category_map, write_category_map
from plant_pipeline.ml.data.incoming import ledger
from plant_pipeline.ml.data.splits import content_split

GARDEN = CategoryMap(("rosa canina", "löwenzahn", "fern"), source="image_folder", allow_new=True)


def _photo(path: Path, seed: int) -> bytes:
    """A tiny random PNG at ``path``, dated a minute back (settled); its bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format="PNG")
    then = time.time_ns() - 60 * 10**9
    os.utime(path, ns=(then, then))
    return path.read_bytes()


def _drop(root: Path, folder: str, count: int, first_seed: int) -> None:
    for i in range(count):
        _photo(root / "incoming" / folder / f"p{i}.png", first_seed + i)


def test_a_new_folder_creates_the_next_category_split_by_content(tmp_path):
    _drop(tmp_path, "Löwenzahn", 2, 0)  # a known category, non-ASCII, another case
    _drop(tmp_path, "Red_Clover", 6, 100)
    result = incoming.ingest(tmp_path, "train", categories=GARDEN)
    assert result.new_categories == ["Red Clover"]
    assert result.categories.names == GARDEN.names + ("Red Clover",), "old ids are kept, the new one is next"
    by_name = {}
    for photo in result.added:
        by_name.setdefault(photo["name"], []).append(photo)
    assert {p["label"] for p in by_name["löwenzahn"]} == {1}
    assert {p["split"] for p in by_name["löwenzahn"]} == {"train"}, "known categories join the configured split"
    assert {p["label"] for p in by_name["Red Clover"]} == {3}
    assert [p["split"] for p in by_name["Red Clover"]] == [content_split(p["sha256"]) for p in by_name["Red Clover"]]
    assert not result.waiting and not result.rejected
    # A second run with the extended map: the folder is a category now, nothing new, no category created twice.
    again = incoming.ingest(tmp_path, categories=result.categories)
    assert again.added == [] and again.new_categories == [] and again.categories == result.categories


@pytest.mark.parametrize("folder", ["__", "7"])
def test_a_folder_that_names_nothing_or_a_missing_id_creates_no_category(tmp_path, folder):
    _drop(tmp_path, folder, 1, 0)
    result = incoming.ingest(tmp_path, categories=GARDEN, min_new_photos=1)
    assert result.new_categories == [] and result.added == []
    [reason] = {r.reason for r in result.rejected}
    assert ("a new category needs a name with letters" if folder == "__" else "outside 0..2") in reason


def test_a_new_category_below_the_minimum_waits_in_place(tmp_path):
    _drop(tmp_path, "clover", 2, 0)
    result = incoming.ingest(tmp_path, categories=GARDEN, min_new_photos=3)
    assert result.added == [] and result.new_categories == [] and result.categories == GARDEN
    assert {w.original: w.reason for w in result.waiting} == {
        f"incoming/clover/p{i}.png": "new category 'clover' needs at least 3 photos, has 2: add more, or lower "
        "min_new_photos" for i in range(2)}
    assert sorted(p.name for p in (tmp_path / "incoming" / "clover").iterdir()) == ["p0.png", "p1.png"]
    _drop(tmp_path, "clover", 3, 0)  # one more photo: p0 and p1 unchanged, p2 new
    assert incoming.ingest(tmp_path, categories=GARDEN, min_new_photos=3).new_categories == ["clover"]


def test_with_oxford_a_new_folder_is_rejected_with_what_to_do(tmp_path):
    _drop(tmp_path, "clover", 6, 0)
    result = incoming.ingest(tmp_path, categories=oxford_map())
    assert result.added == [] and result.new_categories == []
    [reason] = {r.reason for r in result.rejected}
    assert "not one of the 102 categories of source 'oxford_flowers'" in reason
    assert "rename the folder, or use a source that allows new categories" in reason


def test_the_same_bytes_under_a_known_and_a_new_category_is_a_conflict(tmp_path):
    shared = _photo(tmp_path / "incoming" / "clover" / "same.png", 0)
    (tmp_path / "incoming" / "fern").mkdir(parents=True)
    (tmp_path / "incoming" / "fern" / "same.png").write_bytes(shared)
    then = time.time_ns() - 60 * 10**9
    os.utime(tmp_path / "incoming" / "fern" / "same.png", ns=(then, then))
    result = incoming.ingest(tmp_path, categories=GARDEN, min_new_photos=1)  # one photo would create clover
    conflicts = {r.original for r in result.rejected if "two categories" in r.reason}
    assert conflicts == {"incoming/clover/same.png", "incoming/fern/same.png"}
    assert result.added == [] and result.new_categories == [] and result.categories == GARDEN
    assert not (tmp_path / "user_photos" / "ledger.json").is_file() or ledger.read_ledger(tmp_path) == []


def test_read_user_manifest_relabels_by_name_and_reports_the_missing(tmp_path):
    _drop(tmp_path, "fern", 1, 0)
    _drop(tmp_path, "clover", 5, 10)
    result = incoming.ingest(tmp_path, categories=GARDEN)
    # Another source's map with fern at another id and no clover.
    other = CategoryMap(("moss", "FERN"), source="datasets", allow_new=True)
    manifest, left_out = incoming.read_user_manifest(tmp_path, other)
    assert left_out == ["clover"]
    assert manifest["label"].tolist() == [1]
    plain = incoming.read_user_manifest(tmp_path)  # without a map: the stored manifest, as written
    assert sorted(plain["label"].tolist()) == sorted(p["label"] for p in result.photos)


def test_an_old_ledger_still_reads(tmp_path):
    record = {"image_id": 1_000_001, "sha256": "ab" * 32, "label": 73, "split": "train", "source": "user",
              "path": "user_photos/x.jpg", "original": "incoming/rose/x.jpg", "original_bytes": 3,
              "original_mtime_ns": 1, "added_at": "2026-01-01T00:00:00+00:00"}
    for version, photo in ((1, record), (2, {**record, "name": "rose"})):
        ledger.ledger_path(tmp_path).parent.mkdir(parents=True, exist_ok=True)
        ledger.ledger_path(tmp_path).write_text(json.dumps({"format_version": version, "photos": [photo]}))
        manifest, left_out = incoming.read_user_manifest(tmp_path, oxford_map().extended(["clover"]))
        assert (manifest["label"].tolist(), left_out) == ([73], []), version
        manifest, left_out = incoming.read_user_manifest(tmp_path, GARDEN)
        assert (len(manifest), left_out) == (0, ["rose"]), version


def test_user_photos_writes_the_extended_map_and_names_the_new_categories(tmp_path):
    storage = PipelineStorage(data_dir=str(tmp_path))
    write_category_map(storage.category_map_path, GARDEN)
    _drop(tmp_path, "clover", 5, 0)
    result = materialize([user_photos], resources={"storage": storage})
    metadata = result.asset_materializations_for_node("user_photos")[0].metadata
    assert metadata["new_categories"].value == ["clover"]
    assert read_category_map(storage.category_map_path).names == GARDEN.names + ("clover",)


def test_the_sensor_names_the_new_categories(tmp_path):
    storage = PipelineStorage(data_dir=str(tmp_path))
    write_category_map(storage.category_map_path, GARDEN)
    _drop(tmp_path, "clover", 1, 0)
    _drop(tmp_path, "fern", 1, 5)
    with instance_for_test() as instance:
        with build_sensor_context(instance=instance, resources={"storage": storage}) as context:
            [request] = incoming_photos_sensor(context).run_requests
    assert request.tags[NEW_CATEGORIES_TAG] == "clover"


@pytest.mark.parametrize("names, limit, expected", [
    (["a", "b"], 200, "a, b"),
    (["x" * 30] * 10, 60, "x" * 30 + ", " + "x" * 13 + "... (10 in all)"),
])
def test_the_new_categories_tag_stays_short(names, limit, expected):
    text = new_categories_text(names, limit)
    assert len(text) <= limit and text == expected
