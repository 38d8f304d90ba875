"""One writer per output: an exclusive lock file that a second run waits on, then fails on with who holds it.

Locks are ``flock``s (POSIX: Linux, macOS), so the kernel drops them when the holding process dies: a killed
run never leaves a stale lock behind. The file's text names the holder, for the waiting run's message.
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

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None


class OutputLockedError(RuntimeError):
    """Another run is writing the same output and did not finish within the wait."""


def _holder(handle) -> str:
    handle.seek(0)
    text = handle.read().strip()
    try:
        info = json.loads(text)
        return f"{info['owner']} (pid {info['pid']} on {info['host']}, since {info['since']})"
    except (ValueError, KeyError, TypeError):
        return "another process"


@contextmanager
def output_lock(lock_path: str | os.PathLike, owner: str, *, wait_s: float = 60.0, poll_s: float = 0.5,
                what: str | None = None, on_wait: Callable[[str], None] | None = None) -> Iterator[None]:
    """Hold the exclusive lock ``lock_path`` for the block; wait up to ``wait_s`` seconds for it.

    ``owner`` describes this writer (e.g. "run 1a2b... (flower_shards)"); ``on_wait`` is told once, with the
    holder, when this writer has to wait. Raises OutputLockedError naming the holder if the wait runs out.
    """
    lock_path = Path(lock_path)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    what = what or str(lock_path)
    with open(lock_path, "a+", encoding="utf-8") as handle:
        if fcntl is None:  # pragma: no cover - Windows
            yield
            return
        deadline = time.monotonic() + max(0.0, wait_s)
        told = False
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = _holder(handle)
                if time.monotonic() >= deadline:
                    raise OutputLockedError(
                        f"{what} is being written by {holder}; waited {wait_s:g} s for it. Let that run finish "
                        "(or cancel it in the UI), then run this again; PLANT_PIPELINE_LOCK_WAIT_S sets the wait."
                    ) from None
                if on_wait is not None and not told:
                    on_wait(holder)
                    told = True
                time.sleep(poll_s)
        try:
            handle.seek(0)
            handle.truncate()
            handle.write(json.dumps({"owner": owner, "pid": os.getpid(), "host": socket.gethostname(),
                                     "since": time.strftime("%Y-%m-%d %H:%M:%S")}))
            handle.flush()
            yield
        finally:
            handle.seek(0)
            handle.truncate()
            handle.flush()
            fcntl.flock(handle, fcntl.LOCK_UN)
