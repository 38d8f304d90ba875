"""One writer per output: an exclusive lock file that a second run waits on, then fails on with who holds it.

Readers of an output (training streaming the shards) take the same lock shared: they read together, and a writer
waits for them, as they wait for it.

Locks are ``flock``s (POSIX: Linux, macOS), so the kernel drops them when the holding process dies: a killed
run never leaves a stale lock behind. The file's text (and a note per reader beside it) names the holder, for
the waiting run's message.
Where ``fcntl`` is missing (Windows) outputs are written unlocked, as before.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from plant_pipeline.ml.errors import PlantPipelineError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None


class OutputLockedError(PlantPipelineError, RuntimeError):
    """Another run is writing (or reading) the same output and did not finish within the wait."""


def _describe(info: dict) -> str:
    reading = ", reading" if info.get("mode") == "shared" else ""
    return f"{info['owner']} (pid {info['pid']} on {info['host']}{reading}, since {info['since']})"


def _alive_here(info: dict) -> bool:
    """False only for a note of a process on this host that is gone (a reader killed before it could clean up)."""
    if info.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(info["pid"]), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, TypeError):
        pass
    return True


def _readers_dir(lock_path: Path) -> Path:
    # One note per reader, created and unlinked by its owner alone: shared holders never edit a common file.
    return lock_path.with_name(lock_path.name + ".readers")


def _holders(handle, readers: Path) -> tuple[str, bool]:
    """Who holds the lock, and whether they are readers."""
    handle.seek(0)
    notes = []
    try:
        notes.append(json.loads(handle.read().strip()))
    except ValueError:
        pass
    for path in sorted(readers.glob("*.json")) if readers.is_dir() else ():
        try:
            notes.append(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError):
            continue  # unlinked or half-written right now
    described, reading = [], False
    for info in notes:
        try:
            if _alive_here(info):
                described.append(_describe(info))
                reading = reading or info.get("mode") == "shared"
        except (KeyError, TypeError, AttributeError):
            continue
    return " and ".join(described) or "another process", reading


def _note(owner: str, shared: bool) -> dict:
    return {"owner": owner, "pid": os.getpid(), "host": socket.gethostname(),
            "since": time.strftime("%Y-%m-%d %H:%M:%S"), "mode": "shared" if shared else "exclusive"}


@contextmanager
def output_lock(lock_path: str | os.PathLike, owner: str, *, wait_s: float = 60.0, poll_s: float = 0.5,
                what: str | None = None, on_wait: Callable[[str], None] | None = None,
                shared: bool = False) -> Iterator[IO[str]]:
    """Hold the lock ``lock_path`` for the block; wait up to ``wait_s`` seconds for it. Yields the open lock file.

    Exclusive (a writer) by default; ``shared=True`` takes it as a reader: readers hold it together, and a writer
    waits for all of them (and they for it). ``owner`` describes this holder (e.g. "run 1a2b... (flower_shards)");
    ``on_wait`` is told once, with the holder, when this one has to wait. Raises OutputLockedError naming the
    holder if the wait runs out. A child process that inherits the yielded file keeps the lock while it lives.
    """
    lock_path = Path(lock_path)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    readers = _readers_dir(lock_path)
    what = what or str(lock_path)
    with open(lock_path, "a+", encoding="utf-8") as handle:
        if fcntl is None:  # pragma: no cover - Windows
            yield handle
            return
        deadline = time.monotonic() + max(0.0, wait_s)
        told = False
        while True:
            try:
                fcntl.flock(handle, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder, reading = _holders(handle, readers)
                if time.monotonic() >= deadline:
                    verb = "read" if reading else "written"
                    raise OutputLockedError(
                        f"{what} is being {verb} by {holder}; waited {wait_s:g} s for it. Let that run finish "
                        "(or cancel it in the UI), then run this again; PLANT_PIPELINE_LOCK_WAIT_S sets the wait."
                    ) from None
                if on_wait is not None and not told:
                    on_wait(holder)
                    told = True
                time.sleep(poll_s)
        note = readers / f"{socket.gethostname()}-{os.getpid()}-{id(handle):x}.json"
        try:
            if shared:
                readers.mkdir(exist_ok=True)
                note.write_text(json.dumps(_note(owner, shared=True)), encoding="utf-8")
            else:
                # Sole holder: reader notes still there are of readers killed before they could unlink them.
                for stale in readers.glob("*.json") if readers.is_dir() else ():
                    stale.unlink(missing_ok=True)
                handle.seek(0)
                handle.truncate()
                handle.write(json.dumps(_note(owner, shared=False)))
                handle.flush()
            yield handle
        finally:
            if shared:
                note.unlink(missing_ok=True)
            else:
                handle.seek(0)
                handle.truncate()
                handle.flush()
            fcntl.flock(handle, fcntl.LOCK_UN)
