"""The tracking resource and the MLflow run of the Dagster layer: trained_model logs its training to the resource's
store and links the run, model_evaluation logs its figures to the same run, and a store that is down fails the
asset before the training process is launched."""

from __future__ import annotations

import shutil
import socket

import pytest
import torch
from dagster import AssetKey, DagsterInstance, EnvVar, materialize

from plant_pipeline import definitions
from plant_pipeline.defs.assets.evaluation import model_evaluation
from plant_pipeline.defs.assets.training import trained_model
from plant_pipeline.defs.resources import ModelResource, PipelineStorage, TrackingResource
from plant_pipeline.ml.training.tracking import DEFAULT_EXPERIMENT, EXPERIMENT_ENV, TRACKING_URI_ENV

TRAIN_CONFIG = {"max_steps": 2, "per_device_train_batch_size": 4, "per_device_eval_batch_size": 8,
                "learning_rate": 3e-3, "warmup_ratio": 0.0, "lr_scheduler_type": "constant", "save_steps": 2,
                "eval_steps": 2, "logging_steps": 1, "dataloader_num_workers": 0, "shuffle_buffer": 16,
                "max_eval_samples": 8}
EVAL_CONFIG = {"batch_size": 8, "compare_with_base": False, "accuracy_floor": 0.0}


def test_the_default_store_lies_under_the_data_folder(tmp_path):
    settings = TrackingResource().settings(PipelineStorage(data_dir=str(tmp_path)), **{"dagster.run_id": "r"})
    assert settings.tracking_uri == f"sqlite:///{tmp_path.resolve() / 'mlflow' / 'mlflow.db'}"
    assert settings.artifact_location() == (tmp_path.resolve() / "mlflow" / "artifacts").as_uri()
    assert settings.experiment_name == DEFAULT_EXPERIMENT and settings.tags == {"dagster.run_id": "r"}
    server = TrackingResource(tracking_uri="http://mlflow.team:5000").settings(PipelineStorage(data_dir="data"))
    assert server.tracking_uri == "http://mlflow.team:5000"


def test_definitions_bind_the_tracking_resource_to_mlflows_variables(monkeypatch):
    monkeypatch.delenv(TRACKING_URI_ENV, raising=False)
    monkeypatch.delenv(EXPERIMENT_ENV, raising=False)
    tracking = definitions.defs().resources["tracking"]
    assert isinstance(tracking, TrackingResource)
    assert (tracking.tracking_uri, tracking.experiment_name) == ("", DEFAULT_EXPERIMENT)
    monkeypatch.setenv(TRACKING_URI_ENV, "http://mlflow.team:5000")
    tracking = definitions.defs().resources["tracking"]
    assert tracking.tracking_uri == EnvVar(TRACKING_URI_ENV)
    assert tracking.process_config_and_initialize().tracking_uri == "http://mlflow.team:5000"
    assert all((f.description or "").strip() for f in TrackingResource.model_fields.values())


def _materialize(tmp_path, tiny_model_dir, toy_shards, tracking: TrackingResource, instance, *assets):
    storage = PipelineStorage(data_dir=str(tmp_path / "data"))
    model = ModelResource(model_name=str(tiny_model_dir), local_files_only=True, device="cpu")
    shards_dir = storage.shards_dir(model.spec(storage).slug)
    if not shards_dir.exists():
        shutil.copytree(toy_shards, shards_dir)
    ops = {"trained_model": {"config": TRAIN_CONFIG}, "model_evaluation": {"config": EVAL_CONFIG}}
    names = [a.key.path[-1] for a in assets]
    return materialize(list(assets), instance=instance, raise_on_error=False,
                       resources={"storage": storage, "model": model, "tracking": tracking},
                       run_config={"ops": {name: ops[name] for name in names}})


def _metadata(result, name: str) -> dict:
    [event] = [e for e in result.get_asset_materialization_events() if e.asset_key == AssetKey(name)]
    return {k: v.value for k, v in event.materialization.metadata.items()}


@pytest.fixture
def one_thread(monkeypatch):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # reaches the training process
    yield
    torch.set_num_threads(threads)


# ~16 s: -m slow keeps make test under 10 minutes; training/test_tracking.py checks the logging itself.
@pytest.mark.slow
def test_training_and_evaluation_log_to_one_mlflow_run(tmp_path, tiny_model_dir, toy_shards, one_thread):
    from mlflow import MlflowClient

    tracking = TrackingResource(experiment_name="flowers-assets")
    with DagsterInstance.ephemeral() as instance:
        result = _materialize(tmp_path, tiny_model_dir, toy_shards, tracking, instance, trained_model,
                              model_evaluation)
        assert result.success, [str(e.event_specific_data.error) for e in result.all_events
                                if e.event_type_value == "STEP_FAILURE"]
    trained, evaluated = _metadata(result, "trained_model"), _metadata(result, "model_evaluation")
    uri = trained["mlflow_tracking_uri"]
    assert uri == f"sqlite:///{(tmp_path / 'data').resolve() / 'mlflow' / 'mlflow.db'}"
    assert "mlflow_run" not in trained, "a local store has no page to link; the run id and store say where"
    assert evaluated["mlflow_run_id"] == trained["mlflow_run_id"]
    client = MlflowClient(uri)
    run = client.get_run(trained["mlflow_run_id"])
    assert run.data.tags["dagster.run_id"] == result.run_id
    assert client.get_experiment(run.info.experiment_id).name == "flowers-assets"
    assert run.data.params["max_steps"] == "2"
    assert run.data.metrics["test_top1_accuracy"] == evaluated["top1_accuracy"]
    assert run.data.metrics["test_macro_accuracy"] == evaluated["macro_accuracy"]
    evaluation = {a.path for a in client.list_artifacts(run.info.run_id, "evaluation")}
    assert {"evaluation/per_class.csv", "evaluation/confusion_matrix.png"} <= evaluation
    assert "loss_curve.png" in {a.path for a in client.list_artifacts(run.info.run_id)}


def test_a_tracking_server_that_is_down_fails_before_the_launch(tmp_path, tiny_model_dir, toy_shards):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        uri = f"http://127.0.0.1:{sock.getsockname()[1]}"
    with DagsterInstance.ephemeral() as instance:
        result = _materialize(tmp_path, tiny_model_dir, toy_shards, TrackingResource(tracking_uri=uri), instance,
                              trained_model)
    assert not result.success
    [failure] = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    assert f"server {uri} does not answer" in str(failure.event_specific_data.error)
    assert not list((tmp_path / "data" / "checkpoints").rglob("train.log")), "no training process was started"
