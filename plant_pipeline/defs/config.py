"""Launchpad config and resources generated from the core's dataclasses, so each knob is declared once.

A core ``@dataclass`` field with ``metadata={"help": ...}`` becomes a pydantic field (of a ``dagster.Config``,
or of a ``ConfigurableResource`` with ``base=``) with that default and description; the core dataclass still
validates the values in its ``__post_init__``.
"""

import dataclasses
import sys
from typing import Any, get_type_hints

from dagster import Config
from pydantic import Field, create_model


def config_from_dataclass(name: str, cls: type, doc: str, *, base: type = Config, exclude: tuple[str, ...] = (),
                          **extra_fields: Any) -> type:
    """A ``base`` subclass with one field per dataclass field not in ``exclude`` (plus ``extra_fields``)."""
    hints = get_type_hints(cls)
    fields: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name in exclude:
            continue
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
    # The caller's module, as a class statement there would have: what reprs and pickle look up.
    module = sys._getframe(1).f_globals["__name__"]
    return create_model(name, __base__=base, __doc__=doc, __module__=module, **fields)


def to_dataclass(cls: type, config: Any, **overrides: Any):
    """The core dataclass from a run's config or a resource (dropping fields the dataclass does not have)."""
    names = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in config.model_dump().items() if k in names}
    values.update(overrides)
    return cls(**values)
