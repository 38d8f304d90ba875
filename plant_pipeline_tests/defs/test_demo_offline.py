"""After `make demo`, a launch in the UI runs offline on the demo's data and model: the code location, loaded with
what `make dev` then sets (PLANT_PIPELINE_MODEL, PLANT_PIPELINE_RUN_CONFIG = config/demo.yaml + the release
overlay), runs prepare_data with no run config of its own, as *Materialize all* would, the hub unreachable."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd

from plant_pipeline.ml.data.demo_release import make_demo_release
from plant_pipeline.ml.model.spec import model_slug

REPO = Path(__file__).resolve().parents[2]
# A fresh process: the assets' config classes take their defaults from PLANT_PIPELINE_RUN_CONFIG when imported.
LAUNCH = """
from dagster import DagsterInstance
from plant_pipeline.definitions import defs
result = defs().resolve_job_def("prepare_data").execute_in_process(instance=DagsterInstance.ephemeral(),
                                                                   raise_on_error=False)
for event in result.all_events:
    if event.event_type_value == "STEP_FAILURE":
        print("FAILED", event.step_key, event.event_specific_data.error.message)
print("SUCCESS" if result.success else "FAILURE")
"""


def test_prepare_data_runs_offline_on_the_demo_without_run_config(tmp_path, tiny_model_dir):
    release = make_demo_release(tmp_path / "release", train_per_class=1, validation_per_class=1, test_per_class=1,
                                image_size=32)
    overlay = tmp_path / "demo_run.yaml"  # what the Makefile writes: the demo release's folder
    overlay.write_text(json.dumps({"ops": {"oxford_flowers": {"config": {"local_dir": str(release.out_dir)}}}}))
    env = {**os.environ, "PLANT_PIPELINE_MODEL": str(tiny_model_dir), "PLANT_PIPELINE_DATA_DIR": str(tmp_path / "data"),
           "PLANT_PIPELINE_RUN_CONFIG": f"{REPO / 'config' / 'demo.yaml'}{os.pathsep}{overlay}",
           "DAGSTER_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1",
           # Were anything to reach for the network, it would fail here rather than wait.
           "HF_ENDPOINT": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9"}
    launched = subprocess.run([sys.executable, "-c", LAUNCH], env=env, cwd=tmp_path, capture_output=True, text=True,
                              timeout=300)
    assert launched.stdout.strip().endswith("SUCCESS"), launched.stdout + launched.stderr[-3000:]
    manifest = pd.read_parquet(tmp_path / "data" / "oxford_flowers" / "manifest.parquet")
    assert len(manifest) == 102 * 3 and set(manifest["split"]) == {"train", "validation", "test"}
    index = json.loads((tmp_path / "data" / "shards" / model_slug(str(tiny_model_dir)) / "index.json").read_text())
    assert index["splits"]["train"]["samples"] == 102
