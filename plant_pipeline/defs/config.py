"""Launchpad config generated from the core's dataclass configs, so each knob is declared once.

A core ``@dataclass`` field with ``metadata={"help": ...}`` becomes a ``dagster.Config`` field with that
description; the core dataclass still validates the values in its ``__post_init__``.
"""

import dataclasses
from typing import Any, get_type_hints

from dagster import Config
from pydantic import Field, create_model


def config_from_dataclass(name: str, cls: type, doc: str, **extra_fields: Any) -> type[Config]:
    """A ``dagster.Config`` subclass with one field per dataclass field (plus ``extra_fields``)."""
    hints = get_type_hints(cls)
    fields: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        description = f.metadata.get("help", "")
        if f.default is not dataclasses.MISSING:
            default = Field(default=f.default, description=description)
        elif f.default_factory is not dataclasses.MISSING:
            # A concrete default (pydantic copies it per instance) so the Launchpad shows it.
            default = Field(default=f.default_factory(), description=description)
        else:
            default = Field(description=description)
        fields[f.name] = (hints[f.name], default)
    fields.update(extra_fields)
    model = create_model(name, __base__=Config, __doc__=doc, **fields)
    return model


def to_dataclass(cls: type, config: Config, **overrides: Any):
    """The core dataclass from a run's config (dropping fields the dataclass does not have)."""
    names = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in config.model_dump().items() if k in names}
    values.update(overrides)
    return cls(**values)
