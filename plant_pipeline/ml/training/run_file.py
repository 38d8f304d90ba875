"""The run file: everything one training run needs, as the JSON the launchers (the Dagster asset, torchrun,
accelerate) hand to the entry point ``python -m plant_pipeline.ml.training.cli``.

Kept apart from cli.py so that importing the training package does not import the entry point's module: runpy
then warns on every launch that the module was imported before it ran.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from plant_pipeline.ml.errors import UsageError
from plant_pipeline.ml.model.spec import ModelSpec
from plant_pipeline.ml.training.config import TrainConfig

ENTRY_MODULE = "plant_pipeline.ml.training.cli"


class RunFileError(UsageError):
    """A run file that is not valid JSON or names unknown settings."""




@dataclass
class RunFile:
    """Everything one training run needs; ``to_json``/``load`` are the on-disk form the launchers share."""

    train: TrainConfig = field(default_factory=TrainConfig)
    model: ModelSpec = field(default_factory=ModelSpec)
    shards_dir: str = ""
    checkpoints_dir: str = ""
    output_dir: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"train": asdict(self.train), "model": asdict(self.model), "shards_dir": str(self.shards_dir),
                "checkpoints_dir": str(self.checkpoints_dir), "output_dir": str(self.output_dir)}

    @classmethod
    def from_json(cls, data: dict[str, Any], source: str = "the run file") -> RunFile:
        allowed = {"train", "model", "shards_dir", "checkpoints_dir", "output_dir"}
        unknown = sorted(set(data) - allowed)
        missing = sorted({"shards_dir", "checkpoints_dir", "output_dir"} - set(data))
        if unknown or missing:
            raise RunFileError(f"{source}: unknown keys {unknown}, missing keys {missing}; expected {sorted(allowed)}")
        return cls(train=_build(TrainConfig, data.get("train", {}), f"{source} [train]"),
                   model=_build(ModelSpec, data.get("model", {}), f"{source} [model]"),
                   shards_dir=str(data["shards_dir"]), checkpoints_dir=str(data["checkpoints_dir"]),
                   output_dir=str(data["output_dir"]))

    @classmethod
    def load(cls, path: str | Path, overrides: list[str] = ()) -> RunFile:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise RunFileError(f"{path} is not valid JSON ({err}); write it with RunFile.to_json()") from err
        for item in overrides:
            _apply_override(data, item)
        return cls.from_json(data, str(path))


def _build(cls: type, values: dict[str, Any], source: str):
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise RunFileError(f"{source}: unknown settings {unknown}; {cls.__name__} has {sorted(names)}")
    return cls(**values)


def _apply_override(data: dict[str, Any], item: str) -> None:
    """``section.key=value`` (or ``key=value`` for a top-level path); the value is JSON, else a plain string."""
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise RunFileError(f"--set {item!r}: expected KEY=VALUE, e.g. train.max_steps=20 or output_dir=/tmp/out")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    *sections, last = key.split(".")
    target = data
    for section in sections:
        target = target.setdefault(section, {})
    target[last] = value
