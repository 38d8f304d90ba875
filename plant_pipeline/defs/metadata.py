"""Turning core results into metadata the Dagster UI shows: tables, pictures, progress logs."""

import base64
import math
from pathlib import Path

import pandas as pd
from dagster import MetadataValue, TableColumn, TableRecord, TableSchema

_TYPES = {"i": "int", "u": "int", "f": "float", "b": "bool"}


def _plain(value, digits: int | None = None):
    """A value TableRecord accepts: python scalars only, NaN as None, floats rounded to ``digits`` when given."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, float) and digits is not None:
        return round(value, digits)
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value)
    return value


def table(df: pd.DataFrame, limit: int | None = None, digits: int | None = None) -> MetadataValue:
    """A DataFrame as a UI table (first ``limit`` rows), floats rounded to ``digits`` decimals when given: the
    table is for reading, the exact values stay in the files it comes from."""
    rows = df if limit is None else df.head(limit)
    schema = TableSchema(columns=[TableColumn(str(c), _TYPES.get(df[c].dtype.kind, "string")) for c in df.columns])
    records = [TableRecord({str(c): _plain(v, digits) for c, v in row.items()}) for _, row in rows.iterrows()]
    return MetadataValue.table(records=records, schema=schema)


def rounded(value: float | None, digits: int = 4) -> float | None:
    """A float a person reads in the UI, to ``digits`` decimals (Dagster shows all 17 digits otherwise)."""
    return None if value is None else round(float(value), digits)


def image(png: bytes | Path, caption: str = "") -> MetadataValue:
    """A PNG embedded in Markdown, so it renders inline in the materialisation's metadata."""
    data = png.read_bytes() if isinstance(png, Path) else png
    encoded = base64.b64encode(data).decode("ascii")
    return MetadataValue.md(f"![{caption}](data:image/png;base64,{encoded})")


class ProgressLog:
    """Forwards byte-progress callbacks to the run's log at every ``step`` percent (or every 64 MiB when unsized)."""

    def __init__(self, log, step_percent: int = 10, unsized_step: int = 64 * 2**20):
        self.log = log
        self.step_percent = step_percent
        self.unsized_step = unsized_step
        self._last: dict[str, int] = {}

    def __call__(self, name: str, done: int, total: int | None) -> None:
        if total:
            mark = int(100 * done / total) // self.step_percent
            if self._last.get(name) != mark:
                self._last[name] = mark
                self.log.info(f"{name}: {done / 2**20:.1f} of {total / 2**20:.1f} MiB ({100 * done / total:.0f}%)")
        else:
            mark = done // self.unsized_step
            if self._last.get(name) != mark:
                self._last[name] = mark
                self.log.info(f"{name}: {done / 2**20:.1f} MiB")
