"""The Dagster code location: every module under plant_pipeline/defs/, loaded as Dagster's project layout does.

Each module contributes what it defines: assets and checks (defs/assets/), jobs and the retraining schedule
(automation.py), sensors, the resources (resources.py) and the executor every job runs on (run_health.py).
``dagster dev -w workspace.yaml``, ``dg dev`` and ``dagster asset materialize -m plant_pipeline.definitions``
all load ``defs``; ``defs()`` returns the ``Definitions`` (tests call it).
"""

from pathlib import Path

from dagster import Definitions, definitions, load_from_defs_folder


@definitions
def defs() -> Definitions:
    return load_from_defs_folder(path_within_project=Path(__file__).parent)
