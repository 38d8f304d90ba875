"""Whether a build can reuse the current shards: what each row's file and the build's facts were, recorded in the
index (``inputs``), compared with the manifest now. Only new rows, all else unchanged, gives an incremental build.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

from plant_pipeline.ml.shards.rows import Row


def row_facts(rows: Mapping[str, list[Row]], dataset_root: Path) -> dict[str, list]:
    """key -> [split, path, label, size, mtime_ns] of every row; size and mtime -1 for a file that is absent."""
    facts = {}
    for split, split_rows in rows.items():
        for row in split_rows:
            try:
                stat = os.stat(Path(dataset_root) / row.path)
                size, mtime = stat.st_size, stat.st_mtime_ns
            except OSError:
                size, mtime = -1, -1
            facts[row.key] = [split, row.path, row.label, size, mtime]
    return facts


def plan_update(previous: Mapping[str, Any] | None, build: Mapping[str, Any], rows: Mapping[str, list],
                categories: Mapping[str, Any]) -> tuple[str, str, set[str]]:
    """(mode, why, keys to build): "unchanged" (nothing), "incremental" (the new rows) or "full" (every row)."""
    everything = set(rows)
    if previous is None:
        return "full", "no current shards to reuse", everything
    inputs = previous.get("inputs")
    if not isinstance(inputs, dict) or not isinstance(inputs.get("rows"), dict):
        return "full", "the current shards do not record their rows (built before incremental builds)", everything
    changed = sorted(k for k in build if inputs.get("build", {}).get(k) != build[k])
    if changed:
        return "full", f"the build's {', '.join(changed)} changed", everything
    old = previous.get("categories", {})
    if old.get("question") != categories.get("question"):
        return "full", "the question changed", everything
    old_names = old.get("id_to_name", {})
    new_names = categories.get("id_to_name", {})
    renamed = sorted((k for k in old_names if new_names.get(k) != old_names[k]), key=int)
    if renamed:
        return "full", f"categories renamed or removed (ids {renamed[:5]})", everything
    previous_rows = inputs["rows"]
    removed = [k for k in previous_rows if k not in rows]
    if removed:
        return "full", f"{len(removed)} rows removed (e.g. {removed[0]})", everything
    altered = [k for k in previous_rows if list(previous_rows[k]) != list(rows[k])]
    if altered:
        return "full", f"{len(altered)} rows changed (file, label or split; e.g. {altered[0]})", everything
    new = everything - set(previous_rows)
    if not new:
        return "unchanged", "the manifest holds the rows of the current shards, unchanged", set()
    return "incremental", f"{len(new)} new rows, the {len(previous_rows)} others unchanged", new
