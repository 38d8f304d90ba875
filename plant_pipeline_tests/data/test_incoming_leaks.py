"""Photos already in the data, dropped into incoming/: refused by content hash (a test photo never reaches the train
split), from a cache of the data's hashes that is rebuilt only when a manifest changes (issue 20)."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from dagster import build_sensor_context, instance_for_test, materialize
from PIL import Image

from plant_pipeline.defs.assets.user_photos import user_photos
from plant_pipeline.defs.resources import PipelineStorage
from plant_pipeline.defs.sensors import incoming_photos_sensor
from plant_pipeline.ml.data import incoming
from plant_pipeline.ml.data.incoming import in_data
from plant_pipeline.ml.data.manifest import write_manifest

RELEASE_DIR = "oxford_flowers/extracted/jpg"
SPLITS = {1: "train", 2: "validation", 3: "test"}


def _photo(path: Path, seed: int) -> bytes:
    """A small random JPEG at ``path``, dated a minute back (done with: the intake does not wait for it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, size=(30, 40, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format="JPEG")
    then = time.time_ns() - 60 * 10**9
    os.utime(path, ns=(then, then))
    return path.read_bytes()


def _drop(root: Path, name: str, data: bytes) -> Path:
    """``data`` copied into incoming/ as a user would, a minute ago."""
    path = root / "incoming" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    then = time.time_ns() - 60 * 10**9
    os.utime(path, ns=(then, then))
    return path


def _manifest(root: Path, splits: dict[int, str], where: str = "oxford_flowers/manifest.parquet") -> Path:
    ids = sorted(splits)
    frame = pd.DataFrame({
        "image_id": np.array(ids, dtype=np.int64),
        "path": pd.Series([f"{RELEASE_DIR}/image_{i:05d}.jpg" for i in ids], dtype=str),
        "label": np.array([0] * len(ids), dtype=np.int64),
        "split": pd.Series([splits[i] for i in ids], dtype=str),
        "source": pd.Series(["oxford_flowers"] * len(ids), dtype=str),
    })
    return write_manifest(frame, root / where)


@pytest.fixture
def release(tmp_path) -> tuple[Path, dict[int, bytes]]:
    """A data root holding a three-photo release (image 1 train, 2 validation, 3 test) and its manifest."""
    photos = {i: _photo(tmp_path / RELEASE_DIR / f"image_{i:05d}.jpg", i) for i in SPLITS}
    _manifest(tmp_path, SPLITS)
    return tmp_path, photos


def test_a_test_photo_dropped_into_incoming_is_refused_and_a_new_photo_is_taken(release):
    root, photos = release
    leaked = _drop(root, "rose/holiday.jpg", photos[3])
    new = _photo(root / "incoming" / "rose" / "garden.jpg", 99)

    result = incoming.ingest(root)

    assert [p["original"] for p in result.added] == ["incoming/rose/garden.jpg"]
    assert result.added[0]["sha256"] == hashlib.sha256(new).hexdigest()
    [refused] = result.rejected
    assert refused.original == "incoming/rose/holiday.jpg"
    assert refused.reason.startswith("already in the data as image 3 (test split, "
                                     f"{RELEASE_DIR}/image_00003.jpg)")
    assert result.scan.in_data == 1 and leaked.read_bytes() == photos[3], "left in place, unchanged"
    assert [p["original"] for p in incoming.read_ledger(root)] == ["incoming/rose/garden.jpg"]
    # Another split asked for: still refused, so it cannot reach the validation split either.
    assert incoming.ingest(root, "validation").rejected[0].reason == refused.reason


def test_every_split_and_the_chosen_sources_manifest_are_checked(release):
    root, photos = release
    folder_photo = _photo(root / "sources" / "folder_photos" / "tulip.jpg", 7)
    pd.testing.assert_frame_equal(pd.read_parquet(_manifest(root, {1: "train"}, "manifest.parquet")),
                                  pd.read_parquet(root / "manifest.parquet"))
    for name, data in [("rose/a.jpg", photos[1]), ("rose/b.jpg", photos[2]), ("rose/c.jpg", folder_photo)]:
        _drop(root, name, data)

    result = incoming.ingest(root)

    reasons = {s.original: s.reason for s in result.rejected}
    assert reasons.keys() == {"incoming/rose/a.jpg", "incoming/rose/b.jpg"}
    assert "image 1 (train split" in reasons["incoming/rose/a.jpg"]
    assert "image 2 (validation split" in reasons["incoming/rose/b.jpg"]
    assert [p["original"] for p in result.added] == ["incoming/rose/c.jpg"], "not in any manifest: a new photo"


class _HashCounter:
    """Counts the files in_data hashes, by name (manifests included)."""

    def __init__(self, monkeypatch):
        self.names: list[str] = []
        hasher = in_data.sha256_file
        monkeypatch.setattr(in_data, "sha256_file", lambda path: self.names.append(Path(path).name) or hasher(path))

    def photos(self) -> list[str]:
        return sorted(n for n in self.names if n.endswith(".jpg"))


def test_the_hashes_are_cached_and_rebuilt_when_the_manifest_changes(release, monkeypatch):
    root, photos = release
    _drop(root, "rose/first.jpg", photos[3])
    counter = _HashCounter(monkeypatch)
    assert incoming.ingest(root).scan.in_data == 1
    assert counter.photos() == ["image_00001.jpg", "image_00002.jpg", "image_00003.jpg"]
    cache = json.loads(in_data.cache_path(root).read_text())
    assert len(cache["photos"]) == 3 and cache["missing"] == []

    counter.names.clear()
    _drop(root, "rose/second.jpg", photos[3])
    assert incoming.ingest(root).scan.in_data == 2
    assert counter.photos() == [], "an unchanged manifest: no photo of the release read again"

    _manifest(root, {**SPLITS, 3: "validation"})  # the release re-split: image 3 is a validation photo now
    counter.names.clear()
    result = incoming.ingest(root)
    assert len(counter.photos()) == 3, "rebuilt from the new manifest"
    assert {s.reason.split(",")[0] for s in result.rejected} == {"already in the data as image 3 (validation split"}


def test_a_file_the_manifest_names_but_the_disk_lacks_is_hashed_once_it_appears(release):
    root, photos = release
    (root / RELEASE_DIR / "image_00003.jpg").unlink()  # not extracted yet
    _drop(root, "rose/x.jpg", photos[1])
    assert incoming.ingest(root).scan.in_data == 1
    missing = json.loads(in_data.cache_path(root).read_text())["missing"]
    assert missing == [[3, "test", f"{RELEASE_DIR}/image_00003.jpg"]]

    (root / RELEASE_DIR / "image_00003.jpg").write_bytes(photos[3])
    _drop(root, "rose/y.jpg", photos[3])
    result = incoming.ingest(root)
    assert [s.original for s in result.rejected] == ["incoming/rose/x.jpg", "incoming/rose/y.jpg"]
    assert json.loads(in_data.cache_path(root).read_text())["missing"] == []


def test_an_unreadable_cache_is_rebuilt_not_trusted(release):
    root, photos = release
    in_data.cache_path(root).parent.mkdir(parents=True)
    in_data.cache_path(root).write_text('{"format_version": 1, "manifests": [')
    _drop(root, "rose/x.jpg", photos[2])
    assert incoming.ingest(root).scan.in_data == 1
    assert json.loads(in_data.cache_path(root).read_text())["format_version"] == in_data.CACHE_FORMAT_VERSION


def test_without_a_manifest_nothing_is_in_the_data(tmp_path):
    data = _photo(tmp_path / "incoming" / "rose" / "a.jpg", 1)
    assert incoming.ingest(tmp_path).added[0]["sha256"] == hashlib.sha256(data).hexdigest()
    assert not in_data.cache_path(tmp_path).exists()


def test_the_asset_and_the_sensor_report_the_refusal(release, monkeypatch):
    root, photos = release
    _drop(root, "rose/holiday.jpg", photos[3])
    storage = PipelineStorage(data_dir=str(root))
    result = materialize([user_photos], resources={"storage": storage})
    [event] = result.get_asset_materialization_events()
    metadata = {k: v.value for k, v in event.materialization.metadata.items()}
    assert (metadata["new_photos"], metadata["rejected"], metadata["already_in_data"]) == (0, 1, 1)
    assert "already in the data as image 3 (test split" in str(metadata["left_in_place"].records)

    counter = _HashCounter(monkeypatch)
    with instance_for_test() as instance:
        with build_sensor_context(instance=instance, resources={"storage": storage}) as context:
            tick = incoming_photos_sensor(context)
    assert not tick.run_requests, "nothing to take in: no run"
    assert "holiday.jpg: already in the data as image 3 (test split" in tick.skip_reason.skip_message
    assert counter.photos() == [], "the sensor reads no photo"


def test_a_sensor_tick_never_builds_the_cache(release, monkeypatch):
    root, photos = release
    _drop(root, "rose/holiday.jpg", photos[3])
    incoming.scan_incoming(root, read=True)  # hashes the drop (remembered), and builds the cache
    in_data.cache_path(root).unlink()
    counter = _HashCounter(monkeypatch)
    assert in_data.load_data_photos(root, build=False) is None
    assert counter.photos() == []
