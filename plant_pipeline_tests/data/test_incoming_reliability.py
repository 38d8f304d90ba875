"""The photo intake under stress: large drops, odd names, nested folders, symlinks, files still being written,
the same bytes under two categories, and huge non-images (issue 13)."""

from __future__ import annotations

import builtins
import hashlib
import io
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
from dagster import build_sensor_context, instance_for_test, materialize
from PIL import Image

from plant_pipeline.defs.assets import user_photos as user_photos_module
from plant_pipeline.defs.assets.user_photos import user_photos
from plant_pipeline.defs.resources import PipelineStorage
from plant_pipeline.defs.sensors import incoming_photos_sensor
from plant_pipeline.ml.data import incoming
from plant_pipeline.ml.data.incoming import ledger, reading, store


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _settled(path: Path | bytes, age_s: float = 60) -> None:
    """Give ``path`` an mtime ``age_s`` ago: a file nobody is writing any more."""
    then = time.time_ns() - int(age_s * 1e9)
    os.utime(path, ns=(then, then))


def _photo(path: Path, seed: int, size=(40, 30)) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format="JPEG")
    _settled(path)
    return path.read_bytes()


def _tick(root: Path, instance, cursor: str | None = None):
    with build_sensor_context(instance=instance, cursor=cursor,
                              resources={"storage": PipelineStorage(data_dir=str(root))}) as context:
        return incoming_photos_sensor(context)


def _metadata(result) -> dict:
    [event] = result.get_asset_materialization_events()
    return {k: v.value for k, v in event.materialization.metadata.items()}


class _Counted:
    """A file opened by the intake, counting the bytes read from it into ``tally[name]``."""

    def __init__(self, handle, tally: dict[str, int], name: str):
        self._handle, self._tally, self._name = handle, tally, name
        tally.setdefault(name, 0)

    def read(self, size=-1):
        data = self._handle.read(size)
        self._tally[self._name] += len(data)
        return data

    def __getattr__(self, attr):
        return getattr(self._handle, attr)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._handle.close()


class _ReadCounter:
    """Counts the bytes the intake reads from each file under incoming/ (every read goes through open_photo)."""

    def __init__(self, monkeypatch):
        self.read: dict[str, int] = {}
        opener = reading.open_photo
        monkeypatch.setattr(reading, "open_photo", lambda path: _Counted(opener(path), self.read, Path(path).name))


# --- 1. a large drop: the sensor lists, the run reads ---------------------------------------------


def test_a_tick_over_10000_new_files_reads_none_of_them(tmp_path, monkeypatch):
    folder = tmp_path / "incoming" / "rose"
    folder.mkdir(parents=True)
    first = folder / "IMG_00000.jpg"
    first.write_bytes(b"\xff\xd8\xff\xe0 a photo")
    _settled(first)
    for i in range(1, 10_000):  # hard links: 10,000 files to list, written in a fraction of the time
        os.link(first, folder / f"IMG_{i:05d}.jpg")
    inbox = str(tmp_path / "incoming")

    def refuse(*args, **kwargs):
        raise AssertionError(f"the sensor decoded or read a photo: {args[:1]}")

    real_open = builtins.open

    def open_outside_incoming(file, *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and os.fspath(file).startswith(inbox):
            raise AssertionError(f"the sensor opened {file}")
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(Image, "open", refuse)
    monkeypatch.setattr(reading, "open_photo", refuse)
    monkeypatch.setattr(builtins, "open", open_outside_incoming)
    monkeypatch.setattr(io, "open", open_outside_incoming)
    with instance_for_test() as instance:
        first = _tick(tmp_path, instance)
        again = _tick(tmp_path, instance, first.cursor)
    [request] = first.run_requests
    assert request.tags["plant_pipeline/new_photos"] == "10000"
    assert [r.run_key for r in again.run_requests] == [request.run_key], "one set of files, one run key"


def test_the_run_key_changes_when_a_file_changes_and_not_otherwise(tmp_path):
    _photo(tmp_path / "incoming" / "rose" / "a.jpg", 1)
    _photo(tmp_path / "incoming" / "rose" / "b.jpg", 2)
    with instance_for_test() as instance:
        [first] = _tick(tmp_path, instance).run_requests
        [same] = _tick(tmp_path, instance).run_requests
        _photo(tmp_path / "incoming" / "rose" / "b.jpg", 3)  # replaced by another photo
        [changed] = _tick(tmp_path, instance).run_requests
    assert first.run_key == same.run_key != changed.run_key


# --- 2. names that are not UTF-8; the ledger is written last ---------------------------------------


@pytest.fixture
def odd_name(tmp_path):
    data = _photo(tmp_path / "incoming" / "rose" / "plain.jpg", 1)
    odd = os.fsencode(tmp_path / "incoming" / "rose") + b"/bad\xffname.jpg"
    os.rename(tmp_path / "incoming" / "rose" / "plain.jpg", odd)
    return tmp_path, data


def test_a_name_that_is_not_utf8_is_taken_in_and_shown_with_escapes(odd_name):
    root, data = odd_name
    storage = PipelineStorage(data_dir=str(root))
    result = materialize([user_photos], resources={"storage": storage})
    metadata = _metadata(result)
    assert (metadata["new_photos"], metadata["rejected"]) == (1, 0)
    shown = "incoming/rose/bad\\xffname.jpg"
    assert [record.data["original"] for record in metadata["taken_in"].records] == [shown]
    [photo] = incoming.read_ledger(root)
    assert photo["original"] == shown and photo["sha256"] == _sha(data)
    json.dumps(photo, ensure_ascii=False).encode("utf-8")  # no lone surrogates left anywhere
    again = materialize([user_photos], resources={"storage": storage})
    assert (_metadata(again)["new_photos"], _metadata(again)["already_taken_in"]) == (0, 1)
    with instance_for_test() as instance:
        tick = _tick(root, instance)
    assert not tick.run_requests and "1 taken in earlier" in tick.skip_reason.skip_message


def test_a_step_that_fails_after_the_intake_leaves_the_ledger_untouched(odd_name, monkeypatch):
    root, _ = odd_name
    storage = PipelineStorage(data_dir=str(root))

    def broken_table(*args, **kwargs):
        raise RuntimeError("metadata could not be built")

    monkeypatch.setattr(user_photos_module, "table", broken_table)
    result = materialize([user_photos], resources={"storage": storage}, raise_on_error=False)
    assert not result.success
    assert incoming.read_ledger(root) == [], "the step failed: nothing is recorded as taken in"
    with instance_for_test() as instance:
        assert _tick(root, instance).run_requests, "so the sensor still sees the photo"
    monkeypatch.undo()
    assert _metadata(materialize([user_photos], resources={"storage": storage}))["new_photos"] == 1


def test_the_ledger_is_written_after_the_manifest(tmp_path, monkeypatch):
    _photo(tmp_path / "incoming" / "rose" / "a.jpg", 1)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed while writing the manifest")

    monkeypatch.setattr(store, "write_manifest", crash)
    with pytest.raises(KeyboardInterrupt):
        incoming.ingest(tmp_path)
    assert not incoming.ledger_path(tmp_path).exists()
    monkeypatch.undo()
    assert len(incoming.ingest(tmp_path).added) == 1


# --- 3. nested folders, symlinks, files being written, conflicts, huge files -------------------------


def test_photos_in_nested_folders_are_taken_in_under_the_top_level_category(tmp_path):
    data = _photo(tmp_path / "incoming" / "rose" / "trip" / "day 2" / "IMG.jpg", 1)
    result = incoming.ingest(tmp_path)
    [photo] = result.added
    assert (photo["original"], photo["label"], photo["sha256"]) == ("incoming/rose/trip/day 2/IMG.jpg", 73, _sha(data))


def test_symlinks_are_never_followed(tmp_path):
    outside = tmp_path / "elsewhere"
    secret = _photo(outside / "private.jpg", 1)
    _photo(outside / "album" / "holiday.jpg", 2)
    inside = _photo(tmp_path / "incoming" / "rose" / "real.jpg", 3)
    links = {
        "incoming/rose/private.jpg": outside / "private.jpg",
        "incoming/rose/passwd.jpg": Path("/etc/passwd"),
        "incoming/rose/again.jpg": tmp_path / "incoming" / "rose" / "real.jpg",
        "incoming/daffodil": outside / "album",
    }
    for name, target in links.items():
        (tmp_path / name).symlink_to(target)

    result = incoming.ingest(tmp_path)
    assert [p["sha256"] for p in result.added] == [_sha(inside)]
    assert _sha(secret) not in {p["sha256"] for p in incoming.read_ledger(tmp_path)}
    reasons = {s.original: s.reason for s in result.rejected}
    assert set(reasons) == set(links)
    assert all("symbolic link" in reason for reason in reasons.values())


def _animated_gif(path: Path) -> bytes:
    frames = [Image.fromarray(np.random.default_rng(i).integers(0, 256, (24, 32), dtype=np.uint8)).convert("P")
              for i in range(4)]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], duration=100)
    return buffer.getvalue()


def test_a_file_still_being_written_waits_for_a_later_tick(tmp_path):
    path = tmp_path / "incoming" / "rose" / "anim.gif"
    path.parent.mkdir(parents=True)
    whole = _animated_gif(path)
    path.write_bytes(whole[: len(whole) * 2 // 3])  # half-written, modified just now

    early = incoming.ingest(tmp_path)
    assert early.added == [] and [w.original for w in early.waiting] == ["incoming/rose/anim.gif"]
    with instance_for_test() as instance:
        tick = _tick(tmp_path, instance)
    assert not tick.run_requests and "still being written" in tick.skip_reason.skip_message

    path.write_bytes(whole)
    _settled(path)
    incoming.ingest(tmp_path)
    assert [p["sha256"] for p in incoming.read_ledger(tmp_path)] == [_sha(whole)], "taken in once, whole"


def test_the_same_bytes_under_two_categories_are_taken_in_under_neither(tmp_path):
    data = _photo(tmp_path / "incoming" / "rose" / "a.jpg", 1)
    (tmp_path / "incoming" / "daffodil").mkdir()
    (tmp_path / "incoming" / "daffodil" / "b.jpg").write_bytes(data)
    _settled(tmp_path / "incoming" / "daffodil" / "b.jpg")

    result = incoming.ingest(tmp_path)
    assert result.added == []
    reasons = {s.original: s.reason for s in result.rejected}
    assert set(reasons) == {"incoming/rose/a.jpg", "incoming/daffodil/b.jpg"}
    for reason in reasons.values():
        assert "incoming/rose/a.jpg" in reason and "incoming/daffodil/b.jpg" in reason
    with instance_for_test() as instance:
        tick = _tick(tmp_path, instance)
        assert not tick.run_requests and "incoming/daffodil/b.jpg" in tick.skip_reason.skip_message
        (tmp_path / "incoming" / "daffodil" / "b.jpg").unlink()  # a person resolves it
        assert _tick(tmp_path, instance).run_requests
    [photo] = incoming.ingest(tmp_path).added
    assert (photo["original"], photo["label"]) == ("incoming/rose/a.jpg", 73)


def test_files_over_the_size_cap_are_refused_without_being_read(tmp_path, monkeypatch):
    _photo(tmp_path / "incoming" / "rose" / "big.jpg", 1, size=(400, 300))
    huge = tmp_path / "incoming" / "rose" / "huge.bin"
    with open(huge, "wb") as handle:
        handle.truncate(2 * 2**30)  # 2 GiB, sparse
    _settled(huge)
    counter = _ReadCounter(monkeypatch)

    result = incoming.ingest(tmp_path, max_bytes=20_000)
    reasons = {s.original: s.reason for s in result.rejected}
    assert "larger than the 0.02 MB limit" in reasons["incoming/rose/big.jpg"]
    assert "2147.5 MB" in reasons["incoming/rose/huge.bin"]
    assert counter.read == {}, "a file over the cap is not opened"
    assert incoming.ingest(tmp_path).added[0]["original"] == "incoming/rose/big.jpg", "the cap is a setting"
    assert incoming.DEFAULT_MAX_BYTES == 50_000_000


def test_a_non_image_is_sniffed_by_its_header_and_remembered(tmp_path, monkeypatch):
    junk = tmp_path / "incoming" / "rose" / "archive.jpg"
    junk.parent.mkdir(parents=True)
    junk.write_bytes(np.random.default_rng(0).integers(0, 256, 4_000_000, dtype=np.uint8).tobytes())
    _settled(junk)
    counter = _ReadCounter(monkeypatch)

    first = incoming.ingest(tmp_path)
    assert "not an image" in {s.original: s.reason for s in first.rejected}["incoming/rose/archive.jpg"]
    assert 0 < counter.read["archive.jpg"] <= reading.HEAD_BYTES, "only the header is read"
    counter.read.clear()
    again = incoming.ingest(tmp_path)
    assert [s.original for s in again.rejected] == ["incoming/rose/archive.jpg"] and counter.read == {}
    with instance_for_test() as instance:
        tick = _tick(tmp_path, instance)
    assert not tick.run_requests and "archive.jpg: not an image" in tick.skip_reason.skip_message


def test_no_run_reads_an_unchanged_file_twice(tmp_path, monkeypatch):
    data = _photo(tmp_path / "incoming" / "rose" / "a.jpg", 1)
    copy = tmp_path / "incoming" / "daffodil" / "copy.jpg"
    copy.parent.mkdir(parents=True)
    copy.write_bytes(data)  # the same bytes under another category: refused, remembered by its hash
    _settled(copy)
    (tmp_path / "incoming" / "rose" / "again.jpg").write_bytes(data)  # a plain duplicate
    _settled(tmp_path / "incoming" / "rose" / "again.jpg")
    counter = _ReadCounter(monkeypatch)
    first = incoming.ingest(tmp_path)
    assert first.added == [] and set(counter.read) == {"a.jpg", "copy.jpg", "again.jpg"}

    counter.read.clear()
    second = incoming.ingest(tmp_path)
    assert counter.read == {} and len(second.rejected) == 3
    copy.unlink()  # resolved: a.jpg is taken in, again.jpg is its duplicate, from what the ledger remembers
    third = incoming.ingest(tmp_path)
    assert [p["original"] for p in third.added] == ["incoming/rose/a.jpg"]
    assert [d.original for d in third.scan.duplicates] == ["incoming/rose/again.jpg"]
    assert set(counter.read) == {"a.jpg"}, "read once more, to be copied"


def test_a_file_with_an_mtime_in_the_future_does_not_wait_forever(tmp_path):
    path = tmp_path / "incoming" / "rose" / "from-a-camera-with-a-wrong-clock.jpg"
    _photo(path, 1)
    later = time.time_ns() + 3600 * 10**9  # a timestamp an archive preserved
    os.utime(path, ns=(later, later))
    assert len(incoming.ingest(tmp_path).added) == 1


def test_a_ledger_of_format_1_is_read_and_extended(tmp_path):
    data = _photo(tmp_path / "incoming" / "rose" / "a.jpg", 1)
    stat = (tmp_path / "incoming" / "rose" / "a.jpg").stat()
    old = {"image_id": 1_000_001, "sha256": _sha(data), "label": 73, "name": "rose", "split": "train",
           "source": "user", "path": f"user_photos/{_sha(data)}.jpg", "original": "incoming/rose/a.jpg",
           "original_bytes": stat.st_size, "original_mtime_ns": stat.st_mtime_ns, "added_at": "2026-01-01T00:00:00"}
    incoming.ledger_path(tmp_path).parent.mkdir(parents=True)
    incoming.ledger_path(tmp_path).write_text(json.dumps({"format_version": 1, "photos": [old]}))
    _photo(tmp_path / "incoming" / "rose" / "b.jpg", 2)
    result = incoming.ingest(tmp_path)
    assert (result.scan.known, [p["image_id"] for p in result.added]) == (1, [1_000_002])
    assert json.loads(incoming.ledger_path(tmp_path).read_text())["format_version"] == ledger.LEDGER_FORMAT_VERSION


def test_new_files_wait_while_an_intake_run_is_in_flight(tmp_path):
    from dagster import DagsterRun, DagsterRunStatus

    _photo(tmp_path / "incoming" / "rose" / "a.jpg", 1)
    with instance_for_test() as instance:
        run = instance.add_run(DagsterRun(job_name="add_user_photos", run_id="intake-in-flight",
                                          status=DagsterRunStatus.STARTED))
        busy = _tick(tmp_path, instance)
        assert not busy.run_requests and run.run_id in busy.skip_reason.skip_message
        instance.report_run_failed(run)
        assert _tick(tmp_path, instance).run_requests, "launched once that run has ended"
