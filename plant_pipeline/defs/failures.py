"""How an asset fails on a setting to change: with the message alone.

A ``UsageError`` (plant_pipeline.ml.errors) already says what to do; the chain of causes under it (urllib,
sockets, huggingface_hub) is ~200 lines in the UI and the terminal that do not. Used as a context manager or as
a decorator on an asset function (under ``@asset``)."""

from contextlib import contextmanager
from typing import Iterator

from dagster import Failure

from plant_pipeline.ml.errors import UsageError


@contextmanager
def usage_errors_as_failures(asset_name: str) -> Iterator[None]:
    try:
        yield
    except UsageError as err:
        raise Failure(description=f"{asset_name}: {err}", metadata={"error": type(err).__name__}) from None
