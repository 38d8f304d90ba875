"""The thin Dagster layer: assets, checks and resources that call one core function each."""
# No `from __future__ import annotations` here: Dagster reads config and resource types from annotations at runtime.
