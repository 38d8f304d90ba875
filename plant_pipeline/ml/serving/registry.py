"""Which model is in production: one small pointer file that promotion writes and every reader follows.

``<data_dir>/production/production.json`` names the promoted model folder (``<data_dir>/production/models/<id>``,
a copy that later trainings cannot overwrite), its base model, the version of the data it was trained on, and its
test metrics. It is replaced atomically, so a reader sees the old pointer or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from plant_pipeline.ml.errors import UsageError
from plant_pipeline.ml.files import atomic_write_json

DATA_DIR_ENV = "PLANT_PIPELINE_DATA_DIR"  # the same variable the Dagster layer binds its storage to
DEFAULT_DATA_DIR = "data"
PRODUCTION = "production"  # the model name that means "whatever the pointer names"
POINTER_FILE = "production.json"
# What a promoted model folder holds beside the weights and processor (written by promotion, read by Identifier).
MODEL_INFO_FILE = "model_info.json"
CATEGORIES_FILE = "categories.json"
MODEL_CARD_FILE = "README.md"


class NoProductionModel(UsageError):
    """No model has been promoted yet, or the pointer names a folder that is gone."""


@dataclass(frozen=True)
class ModelInfo:
    """Who a model is: written as MODEL_INFO_FILE in a promoted folder and, with its path, as the pointer."""

    model_id: str  # unique per promoted model, e.g. "20261203-141502-3fa9c2d1"
    base_model: str  # the hub id or folder the weights were fine-tuned from
    data_version: str  # the shards' version the model was trained and evaluated on
    metrics: dict[str, Any] = field(default_factory=dict)  # top1_accuracy, macro_accuracy, top5_accuracy, ...
    promoted_at: str = ""  # ISO 8601, UTC
    model_path: str = ""  # the promoted folder (absolute); empty inside the folder's own MODEL_INFO_FILE

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Any, where: str | os.PathLike) -> ModelInfo:
        if not isinstance(data, dict) or not all(isinstance(data.get(k), str) for k in ("model_id", "base_model",
                                                                                       "data_version")):
            raise UsageError(f"{where}: expected a JSON object with model_id, base_model and data_version strings; "
                             f"got {str(data)[:200]!r}. Promote the model again (materialise production_model)")
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def data_dir_default() -> Path:
    """``$PLANT_PIPELINE_DATA_DIR``, else ``data``: where ``make demo`` and ``dagster dev`` keep their outputs."""
    return Path(os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR)


def production_dir(data_dir: str | os.PathLike | None = None) -> Path:
    return Path(data_dir if data_dir is not None else data_dir_default()).resolve() / PRODUCTION


def pointer_path(data_dir: str | os.PathLike | None = None) -> Path:
    return production_dir(data_dir) / POINTER_FILE


def read_model_info(path: str | os.PathLike) -> ModelInfo | None:
    """A ModelInfo file (the pointer, or a promoted folder's MODEL_INFO_FILE), or None where there is none."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        data = json.loads(text)
    except ValueError as err:
        raise UsageError(f"{path} is not valid JSON ({err}); materialise production_model to write it again") from err
    return ModelInfo.from_json(data, path)


def read_pointer(data_dir: str | os.PathLike | None = None) -> ModelInfo | None:
    """The production model's info (with its ``model_path``), or None when nothing has been promoted."""
    path = pointer_path(data_dir)
    info = read_model_info(path)
    if info is None:
        return None
    if not info.model_path:
        raise UsageError(f"{path} names no model_path; materialise production_model to write it again")
    return info


def write_pointer(info: ModelInfo, data_dir: str | os.PathLike | None = None) -> Path:
    """Point production at ``info.model_path`` (a complete folder), atomically."""
    if not info.model_path or not Path(info.model_path).is_dir():
        raise UsageError(f"cannot point production at {info.model_path!r}: not a folder")
    return atomic_write_json(pointer_path(data_dir), info.to_json())


def resolve_model(model: str | os.PathLike = PRODUCTION, data_dir: str | os.PathLike | None = None) -> Path:
    """The model folder ``model`` names: "production" follows the pointer; anything else is a folder."""
    if str(model) != PRODUCTION:
        path = Path(model)
        if not path.is_dir():
            raise UsageError(f"model {str(model)!r} is not a folder; pass a trained or promoted model folder, "
                             f"or {PRODUCTION!r}")
        return path.resolve()
    info = read_pointer(data_dir)
    if info is None:
        raise NoProductionModel(
            f"no production model: {pointer_path(data_dir)} does not exist. Run `make demo`, or materialise "
            "production_model in the Dagster UI, or pass a model folder")
    path = Path(info.model_path)
    if not path.is_dir():
        raise NoProductionModel(f"{pointer_path(data_dir)} names {path}, which does not exist; materialise "
                                "production_model again")
    return path
