"""Promotion: whether a newly evaluated model replaces the production one (``decide``), and putting it there
(``promote``): a complete copy under ``<data_dir>/production/models/<model_id>/`` first, the pointer last, so a
reader (the Identifier, the web service) sees the old model or the new one, never half of one.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd

from plant_pipeline.ml.data.categories import CategoryMap
from plant_pipeline.ml.errors import UsageError
from plant_pipeline.ml.files import atomic_write_json, atomic_write_text, sha256_file, staging_folder
from plant_pipeline.ml.serving.model_card import model_card
from plant_pipeline.ml.serving.registry import (
    CATEGORIES_FILE,
    MODEL_CARD_FILE,
    MODEL_INFO_FILE,
    ModelInfo,
    production_dir,
    read_pointer,
    write_pointer,
)
from plant_pipeline.ml.training.results import read_result_meta

logger = logging.getLogger(__name__)

METRIC = "top1_accuracy"  # the number promotion compares
DEFAULT_MARGIN = 0.02
DEFAULT_KEEP = 3
MODELS_DIR = "models"
WEIGHT_SUFFIXES = (".safetensors", ".bin")
# Staging folders of a promotion killed mid-copy; older than this they cannot belong to a running promotion.
STALE_STAGING_S = 24 * 3600
# Comparisons of accuracies tolerate float noise (0.5 - 0.02 is not exactly 0.48).
EPS = 1e-9


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str  # names the numbers, for the asset's metadata and the log


def _top1(metrics: Mapping[str, Any], where: str) -> float:
    value = metrics.get(METRIC)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise UsageError(f"{where}: expected a number {METRIC}; got {value!r}. Materialise model_evaluation again")
    return float(value)


def decide(candidate: Mapping[str, Any], current: ModelInfo | None, *, margin: float = DEFAULT_MARGIN,
           checks_passed: bool, failed_checks: Sequence[str] = ()) -> Decision:
    """Promote ``candidate`` (an evaluation's metrics) only when its checks passed and its top-1 is not below
    ``current``'s by more than ``margin``; the first model is promoted when its checks pass."""
    if not 0 <= margin <= 1:
        raise UsageError(f"margin must be an accuracy difference in [0, 1]; got {margin!r}")
    top1 = _top1(candidate, "the evaluated model's metrics")
    production = "no production model" if current is None else f"production stays {current.model_id}"
    if not checks_passed:
        failed = ", ".join(failed_checks) or "(not named)"
        return Decision(False, f"checks failed: {failed}; the model with top-1 {top1:.3f} is kept out ({production})")
    if current is None:
        return Decision(True, f"first production model: checks passed, top-1 {top1:.3f}")
    if not isinstance(current.metrics.get(METRIC), (int, float)):
        return Decision(True, f"checks passed, top-1 {top1:.3f}; production {current.model_id} records no {METRIC} "
                        "to compare with")
    now = float(current.metrics[METRIC])
    if top1 < now - margin - EPS:
        return Decision(False, f"top-1 {top1:.3f} is {now - top1:.3f} below production {current.model_id} "
                        f"({now:.3f}), more than the margin {margin:g}")
    if top1 > now + EPS:
        how = f"{top1 - now:.3f} above"
    elif top1 < now - EPS:
        how = f"{now - top1:.3f} below, within the margin {margin:g} of,"
    else:
        how = "equal to"
    return Decision(True, f"checks passed and top-1 {top1:.3f} is {how} production {current.model_id} ({now:.3f})")


def weights_digest(model_path: str | os.PathLike) -> str:
    """sha256 over the weight files' names and contents: the same weights give the same digest wherever they lie."""
    model_path = Path(model_path)
    files = sorted(p for p in model_path.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    if not files:
        raise UsageError(f"{model_path} holds no weights (*.safetensors or *.bin); pass a trained model folder "
                         "(trained_model's model_path)")
    digest = hashlib.sha256()
    for file in files:
        digest.update(f"{file.relative_to(model_path).as_posix()}\0{sha256_file(file)}\n".encode())
    return digest.hexdigest()


def make_model_id(digest: str, now: datetime) -> str:
    """UTC time + the weights' short hash: sorts by promotion time and tells two models apart at a glance."""
    return f"{now.astimezone(timezone.utc):%Y%m%d-%H%M%S}-{digest[:8]}"


def in_production(digest: str, current: ModelInfo | None) -> bool:
    """Whether the production model has these weights (its id ends in their short hash)."""
    return current is not None and current.model_id.endswith(f"-{digest[:8]}")


def models_dir(data_dir: str | os.PathLike | None = None) -> Path:
    return production_dir(data_dir) / MODELS_DIR


def _link_or_copy(src: str, dst: str) -> str:
    # A hard link costs nothing for a 14 GB model. Safe because training never rewrites a result's files in
    # place: it swaps in a new folder. Across filesystems (or where links are refused) copy.
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
    return dst


def promote(model_path: str | os.PathLike, *, data_dir: str | os.PathLike | None, categories: CategoryMap,
            base_model: str, data_version: str, metrics: Mapping[str, Any], per_class: pd.DataFrame | None = None,
            training_meta: Mapping[str, Any] | None = None, lineage: Mapping[str, str] | None = None,
            keep: int = DEFAULT_KEEP, digest: str | None = None, now: datetime | None = None) -> ModelInfo:
    """Copy the trained folder ``model_path`` into production and point production at it.

    The copy (hard links where possible) gets categories.json, model_info.json and the model card README.md,
    all in a staging folder swapped into place whole; the pointer is written after, atomically, and only then
    are old promoted folders pruned to the newest ``keep`` (never the one the pointer names). ``training_meta``
    defaults to the folder's training_meta.json; ``lineage`` (e.g. the evaluation run) goes into the card.
    Returns the new production ModelInfo, with its model_path.
    """
    model_path = Path(model_path)
    if not model_path.is_dir():
        raise UsageError(f"cannot promote {model_path}: not a folder; pass trained_model's model_path")
    if keep < 1:
        raise UsageError(f"keep must be at least 1 (the production model itself); got {keep}")
    digest = digest or weights_digest(model_path)
    now = now or datetime.now(timezone.utc)
    if training_meta is None:
        training_meta = read_result_meta(model_path)
    info = ModelInfo(model_id=make_model_id(digest, now), base_model=base_model, data_version=data_version,
                     metrics=dict(metrics), promoted_at=now.astimezone(timezone.utc).isoformat(timespec="seconds"))
    final = models_dir(data_dir) / info.model_id
    with staging_folder(final) as staged:
        shutil.copytree(model_path, staged, copy_function=_link_or_copy, dirs_exist_ok=True)
        # Atomic writes replace a file rather than write into it: a hard-linked file of the trained folder with
        # the same name is left untouched.
        atomic_write_json(staged / CATEGORIES_FILE, categories.to_json())
        atomic_write_json(staged / MODEL_INFO_FILE, info.to_json())
        card = model_card(replace(info, model_path=str(final)), categories, training_meta=training_meta,
                          per_class=per_class, lineage=lineage)
        atomic_write_text(staged / MODEL_CARD_FILE, card)
    info = replace(info, model_path=str(final))
    try:
        write_pointer(info, data_dir)
    except BaseException:
        # Not in production: leave no folder that looks promoted.
        shutil.rmtree(final, ignore_errors=True)
        raise
    logger.info("promoted %s to %s", model_path, final)
    prune(data_dir, keep=keep)
    return info


def prune(data_dir: str | os.PathLike | None = None, *, keep: int = DEFAULT_KEEP) -> list[Path]:
    """Remove promoted folders beyond the newest ``keep`` (the pointer's folder always stays), and staging
    folders left by a promotion killed mid-copy. Returns what was removed."""
    root = models_dir(data_dir)
    if not root.is_dir():
        return []
    current = read_pointer(data_dir)
    in_use = Path(current.model_path).resolve() if current is not None else None
    folders = sorted((p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")),
                     key=lambda p: p.name, reverse=True)  # ids start with the UTC time: newest first
    doomed = [p for p in folders[keep:] if p.resolve() != in_use]
    doomed += [p for p in root.iterdir() if p.name.startswith(".") and p.name.endswith(".partial")
               and time.time() - p.stat().st_mtime > STALE_STAGING_S]
    for folder in doomed:
        shutil.rmtree(folder, ignore_errors=True)
        logger.info("removed old promoted model folder %s", folder)
    return doomed
