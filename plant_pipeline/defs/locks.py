"""``@locked_output``: one run at a time writes an asset's outputs; a second run waits, then fails naming the first.

Every asset already writes atomically (temporary files or folders swapped into place), so a reader never sees
half an output; the lock keeps two writers from interleaving their swaps and from redoing the same work.
An asset that streams another's output for a long time (training reads the shards) holds that output's lock
shared with ``asset_lock(..., shared=True)``, so the writer cannot swap it mid-read.
The wait is ``PLANT_PIPELINE_LOCK_WAIT_S`` seconds (default 60). Training also runs in the "gpu" pool.
"""

import functools
import inspect
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO

from plant_pipeline.ml.locking import output_lock

LOCK_WAIT_ENV = "PLANT_PIPELINE_LOCK_WAIT_S"


def lock_wait_s() -> float:
    value = os.environ.get(LOCK_WAIT_ENV, "60")
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"{LOCK_WAIT_ENV} must be a number of seconds; got {value!r}") from None


@contextmanager
def asset_lock(context, storage, name: str | None = None, *, shared: bool = False) -> Iterator[IO[str]]:
    """Hold the lock of asset ``name``'s output (default: the running asset's own); ``shared`` to read it."""
    this = context.asset_key.to_user_string()
    name = name or this
    with output_lock(
        storage.path("locks", f"{name}.lock"),
        owner=f"run {context.run_id} ({this})",
        wait_s=lock_wait_s(),
        what=f"asset {name} (data dir {storage.path()})",
        on_wait=lambda holder: context.log.info(
            f"waiting for {holder} to finish {'writing' if shared else 'with'} {name}"),
        shared=shared,
    ) as handle:
        yield handle


def locked_output(fn):
    """Wrap an asset function taking ``context`` and ``storage`` (a PipelineStorage) in its output's lock."""
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        with asset_lock(bound.arguments["context"], bound.arguments["storage"]):
            return fn(*args, **kwargs)

    return wrapper
