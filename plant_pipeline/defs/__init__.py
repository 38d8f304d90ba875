"""The thin Dagster layer: assets, checks, jobs, sensors and resources that call one core function each.

``plant_pipeline.definitions`` loads this folder with ``dagster.load_from_defs_folder``: a module contributes the
Dagster objects at its top level, or, where it has a ``@definitions`` function (resources, automation,
run_health), only what that function returns, built when the code location loads.
"""
# No `from __future__ import annotations` here: Dagster reads config and resource types from annotations at runtime.
