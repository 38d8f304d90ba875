"""One writer per output: the core lock across processes, and two runs of the same asset through Dagster."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
from dagster import DagsterInstance, materialize

from plant_pipeline.defs.assets.flowers import category_map
from plant_pipeline.defs.assets.shards import flower_shards
from plant_pipeline.defs.assets.training import trained_model
from plant_pipeline.defs.locks import LOCK_WAIT_ENV
from plant_pipeline.defs.resources import ModelResource, PipelineStorage, TrackingResource
from plant_pipeline.ml.data import write_manifest
from plant_pipeline.ml.locking import OutputLockedError, output_lock

REPO = Path(__file__).resolve().parents[1]
# A child that takes the lock, says so, and holds it until killed (or for the given seconds).
HOLDER = """
import sys, time
sys.path.insert(0, {repo!r})
from plant_pipeline.ml.locking import output_lock
with output_lock({path!r}, owner={owner!r}, shared={shared}):
    print("held", flush=True)
    time.sleep({hold})
"""


def _start_holder(path: Path, hold: float, shared: bool = False, owner: str = "the holder run") -> subprocess.Popen:
    script = HOLDER.format(repo=str(REPO), path=str(path), hold=hold, shared=shared, owner=owner)
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "held"
    return child


def test_a_second_writer_fails_after_its_wait_naming_the_holder(tmp_path):
    lock = tmp_path / "locks" / "x.lock"
    child = _start_holder(lock, hold=60)
    try:
        started = time.monotonic()
        with pytest.raises(OutputLockedError, match=r"asset x is being written by the holder run \(pid \d+"):
            with output_lock(lock, owner="second", wait_s=0.6, poll_s=0.1, what="asset x"):
                pytest.fail("the lock was taken twice")
        assert time.monotonic() - started >= 0.6
    finally:
        child.kill()
        child.wait()


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    lock = tmp_path / "x.lock"
    child = _start_holder(lock, hold=60)
    child.send_signal(signal.SIGKILL)
    child.wait()
    with output_lock(lock, owner="next", wait_s=0):
        assert json.loads(lock.read_text())["owner"] == "next"
    assert lock.read_text() == "", "the holder's note is cleared on release"


def test_a_waiting_writer_proceeds_when_the_holder_finishes(tmp_path):
    lock = tmp_path / "x.lock"
    child = _start_holder(lock, hold=1.0)
    waits: list[str] = []
    started = time.monotonic()
    try:
        with output_lock(lock, owner="second", wait_s=30, poll_s=0.05, on_wait=waits.append):
            # Entered only once the holder let go, about a second after it said "held".
            assert time.monotonic() - started > 0.5
            assert json.loads(lock.read_text())["owner"] == "second"
    finally:
        child.wait()
    assert len(waits) == 1 and "the holder run" in waits[0]


def test_a_second_run_of_an_asset_waits_for_the_first_then_fails_with_a_clear_message(tmp_path, monkeypatch):
    storage = PipelineStorage(data_dir=str(tmp_path))
    lock = storage.path("locks", "category_map.lock")
    instance = DagsterInstance.ephemeral()
    # What category_map reads: the Oxford source's manifest (two categories, a train and a test photo each).
    write_manifest(pd.DataFrame({"image_id": [1, 2, 3, 4], "path": [f"{i}.jpg" for i in range(4)],
                                 "label": [0, 0, 1, 1], "split": ["train", "test"] * 2, "source": ["oxford"] * 4}),
                   storage.manifest_path)

    # Held for longer than the wait: the run fails, names the holder, and leaves no output behind.
    monkeypatch.setenv(LOCK_WAIT_ENV, "0.3")
    with output_lock(lock, owner="run 1234 (category_map)"):
        failed = materialize([category_map], resources={"storage": storage}, instance=instance, raise_on_error=False)
    assert not failed.success
    [error] = [e.event_specific_data.error for e in failed.all_events if e.event_type_value == "STEP_FAILURE"]
    text = str(error.message) + "".join(str(c.message) for c in (error.cause, error.context) if c)
    assert "asset category_map" in text and "being written by run 1234 (category_map)" in text, text
    assert not (tmp_path / "category_map.json").exists()

    # Released while the second run waits: it goes ahead, and its log says what it waited for.
    monkeypatch.setenv(LOCK_WAIT_ENV, "30")
    holder = output_lock(lock, owner="run 5678 (category_map)")
    holder.__enter__()
    threading.Timer(1.0, holder.__exit__, args=(None, None, None)).start()
    done = materialize([category_map], resources={"storage": storage}, instance=instance)
    assert done.success and (tmp_path / "category_map.json").is_file()
    logs = [r.user_message for r in instance.all_logs(done.run_id)]
    assert any("waiting for run 5678 (category_map)" in m for m in logs), logs


def test_readers_share_the_lock_and_a_writer_waits_for_them_then_fails_naming_them(tmp_path):
    lock = tmp_path / "shards.lock"
    reader = _start_holder(lock, hold=60, shared=True, owner="run 42 (trained_model)")
    try:
        with output_lock(lock, owner="another reader", wait_s=0, shared=True):
            pass  # readers do not exclude each other
        named = r"shards is being read by run 42 \(trained_model\) \(pid \d+ on .*, reading, since"
        with pytest.raises(OutputLockedError, match=named):
            with output_lock(lock, owner="run 7 (flower_shards)", wait_s=0.3, poll_s=0.1, what="shards"):
                pytest.fail("written while being read")
    finally:
        reader.kill()
        reader.wait()
    # The reader was killed before it could remove its note: the next writer proceeds and clears it.
    with output_lock(lock, owner="run 7 (flower_shards)", wait_s=0):
        assert not list(tmp_path.glob("shards.lock.readers/*.json"))


def test_a_reader_waits_for_the_writer_then_fails_naming_it(tmp_path):
    lock = tmp_path / "shards.lock"
    writer = _start_holder(lock, hold=60, owner="run 7 (flower_shards)")
    try:
        with pytest.raises(OutputLockedError, match=r"shards is being written by run 7 \(flower_shards\)"):
            with output_lock(lock, owner="run 42 (trained_model)", wait_s=0.3, poll_s=0.1, what="shards",
                             shared=True):
                pytest.fail("read while being written")
    finally:
        writer.kill()
        writer.wait()
    with output_lock(lock, owner="run 42 (trained_model)", wait_s=0, shared=True):
        pass


def _step_error(result) -> str:
    [error] = [e.event_specific_data.error for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    return str(error.message) + "".join(str(c.message) for c in (error.cause, error.context) if c)


def test_flower_shards_and_trained_model_exclude_each_other(tmp_path, monkeypatch):
    """Neither asset's body runs while the other holds the shards: both fail before touching a file."""
    storage = PipelineStorage(data_dir=str(tmp_path))
    model = ModelResource(model_name="tiny-random-llava", local_files_only=True, device="cpu")
    resources = {"storage": storage, "model": model, "tracking": TrackingResource()}
    lock = storage.path("locks", "flower_shards.lock")
    monkeypatch.setenv(LOCK_WAIT_ENV, "0.3")
    instance = DagsterInstance.ephemeral()

    with output_lock(lock, owner="run 42 (trained_model)", shared=True):
        rebuild = materialize([flower_shards], resources=resources, instance=instance, raise_on_error=False)
    assert not rebuild.success
    error = _step_error(rebuild)
    assert "asset flower_shards" in error and "being read by run 42 (trained_model)" in error, error

    with output_lock(lock, owner="run 7 (flower_shards)"):
        training = materialize([trained_model], resources=resources, instance=instance, raise_on_error=False)
    assert not training.success
    assert "being written by run 7 (flower_shards)" in _step_error(training)
    assert not storage.path("checkpoints").exists() and not storage.path("models").exists()
    # Waiting for flower_shards, training held its own lock: released with the failure, nothing left behind.
    with output_lock(storage.path("locks", "trained_model.lock"), owner="next", wait_s=0):
        pass
