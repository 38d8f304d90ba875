"""The pipeline's errors: one base class, and one subclass for what a person can fix.

A ``UsageError`` is bad input or a setting that does not fit (a config value, a damaged file, a missing
shard): its message names the file or field, what was expected and what was found, and what to do. Command
lines print it as one line and exit with status 2 instead of a traceback. Anything else is a bug or an
outage and keeps its traceback.
"""

from __future__ import annotations


class PlantPipelineError(Exception):
    """Every error the pipeline raises on purpose."""


class UsageError(PlantPipelineError, ValueError):
    """Input or settings to change; the message alone says what to do. A ValueError, as callers expect."""
