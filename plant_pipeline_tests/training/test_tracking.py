"""Experiment tracking of train(): an MLflow run in a local SQLite store and on a real tracking server, read back
through MlflowClient; a resumed training continues its run; a server that is down fails before training;
TensorBoard and none."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest

from plant_pipeline.ml.training import TrainConfig, train
from plant_pipeline.ml.training.tracking import (
    RUN_RECORD,
    TrackingError,
    TrackingSettings,
    check_tracking_store,
    local_store_uri,
    make_tracking_callbacks,
    recorded_run,
    run_url,
    tensorboard_callback,
)
from plant_pipeline_tests.http_server import free_port

FAST = dict(per_device_train_batch_size=4, per_device_eval_batch_size=8, learning_rate=3e-3, warmup_ratio=0.0,
            lr_scheduler_type="constant", dataloader_num_workers=0, shuffle_buffer=16, max_eval_samples=8,
            logging_steps=1, save_steps=2, eval_steps=2)
SERVER_START_S = 30


def _train(spec, shards, root: Path, max_steps: int, **kwargs):
    return train(TrainConfig(max_steps=max_steps, **{**FAST, **kwargs}), model_spec=spec, shards_dir=shards,
                 checkpoints_dir=root / "ck", output_dir=root / "out")


def _use_store(monkeypatch, uri: str, **tags: str) -> None:
    for key, value in TrackingSettings(tracking_uri=uri, experiment_name="flowers-test", tags=tags).to_env().items():
        monkeypatch.setenv(key, value)


def _history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


# ---- settings and checks (no training) ------------------------------------------------------------

def test_settings_travel_through_the_environment(tmp_path):
    settings = TrackingSettings(tracking_uri=local_store_uri(tmp_path / "mlflow"), experiment_name="e",
                                tags={"dagster.run_id": "abc"})
    assert TrackingSettings.from_env(settings.to_env()) == settings
    assert settings.artifact_location() == (tmp_path / "mlflow" / "artifacts").resolve().as_uri()
    assert TrackingSettings(tracking_uri="http://mlflow:5000").artifact_location() is None
    with pytest.raises(TrackingError, match="MLFLOW_TAGS must be a JSON object"):
        TrackingSettings.from_env({"MLFLOW_TAGS": "[1]"})


def test_run_url_only_for_a_server():
    assert run_url("http://mlflow.team:5000/", "3", "r1") == "http://mlflow.team:5000/#/experiments/3/runs/r1"
    assert run_url("sqlite:////data/mlflow/mlflow.db", "3", "r1") is None


def test_a_closed_port_fails_the_check_quickly_naming_the_uri():
    uri = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(TrackingError, match=f"server {uri} does not answer"):
        check_tracking_store(uri, timeout=2)
    assert time.monotonic() - started < 5


def test_tensorboard_without_the_package_names_the_extra(monkeypatch, tmp_path):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    with pytest.raises(TrackingError, match=r"plant_pipeline\[tensorboard\]"):
        tensorboard_callback(tmp_path)


def test_only_rank_zero_tracks(monkeypatch, tmp_path):
    args = SimpleNamespace(output_dir=str(tmp_path), max_steps=4)
    closed = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", closed)
    assert make_tracking_callbacks(TrainConfig(report_to="none"), args) == []
    monkeypatch.setenv("RANK", "1")
    assert make_tracking_callbacks(TrainConfig(report_to="mlflow"), args) == [], "other ranks neither check nor log"
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(TrackingError, match=closed):
        make_tracking_callbacks(TrainConfig(report_to="mlflow"), args)


# ---- train() into a local store -----------------------------------------------------------------

@pytest.fixture(scope="module")
def local_run(spec, toy_shards, tmp_path_factory):
    """4 steps into a SQLite store, then resumed to 6: one MLflow run."""
    from mlflow import MlflowClient

    root = tmp_path_factory.mktemp("tracked")
    uri = local_store_uri(root / "mlflow")
    with pytest.MonkeyPatch.context() as env:
        _use_store(env, uri, **{"dagster.run_id": "run-1"})
        first = _train(spec, toy_shards, root, 4)
        record = recorded_run(root / "ck")
        env.setenv("MLFLOW_TAGS", '{"dagster.run_id": "run-2"}')
        resumed = _train(spec, toy_shards, root, 6)
    return root, MlflowClient(uri), record, first, resumed


def test_a_run_logs_params_metrics_and_the_loss_curve(local_run, spec):
    root, client, record, first, _ = local_run
    run = client.get_run(record["run_id"])
    assert client.get_experiment(run.info.experiment_id).name == "flowers-test"
    params = run.data.params
    assert params["learning_rate"] == "0.003" and params["report_to"] == "mlflow"
    assert params["model.model_name"] == spec.model_name
    assert len(params["data.train_shards_sha256"]) == 64
    assert params["data.num_categories"] == "102" and params["run.max_steps"] == "4"
    assert params["run.folder"] == "ck"
    losses = _history(client, run.info.run_id, "loss")
    assert [step for step, _ in losses][:4] == [1, 2, 3, 4], "every logging step"
    # Step 0: the evaluation before training (the resumed training's too, before it loads its checkpoint).
    assert sorted({step for step, _ in _history(client, run.info.run_id, "eval_loss")}) == [0, 2, 4, 6]
    for key in ("learning_rate", "samples_per_second", "rss_mb"):
        assert _history(client, run.info.run_id, key), key
    assert first.final_validation_loss == pytest.approx(
        dict(_history(client, run.info.run_id, "eval_loss"))[4], rel=1e-5)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "loss_curve.png" in artifacts
    # The artifacts live beside the database, not in the working directory.
    assert list((root / "mlflow" / "artifacts").rglob("loss_curve.png"))


def test_a_resumed_training_continues_its_run(local_run):
    root, client, record, _, resumed = local_run
    assert recorded_run(root / "ck")["run_id"] == record["run_id"], "the same run, not a second one"
    assert len(client.search_runs([record["experiment_id"]])) == 1
    run = client.get_run(record["run_id"])
    assert resumed.resumed_from_step == 4
    assert max(step for step, _ in _history(client, record["run_id"], "loss")) == 6
    assert run.info.status == "FINISHED"
    assert run.data.tags["dagster.run_id"] == "run-2", "the tag names the run that last trained"
    assert run.data.params["run.max_steps"] == "4", "MLflow keeps a parameter's first value"


def test_evaluation_logs_to_the_trainings_run(local_run, tmp_path):
    from plant_pipeline.ml.evaluation.tracking import log_evaluation

    _, client, record, _, _ = local_run
    (tmp_path / "per_class.csv").write_text("name,accuracy\nrose,1.0\n")
    (tmp_path / "confusion_matrix.png").write_bytes(b"\x89PNG")
    (tmp_path / "predictions.parquet").write_bytes(b"")
    summary = {"top1_accuracy": 0.5, "macro_accuracy": 0.25, "top5_accuracy": None}
    logged = log_evaluation(record["tracking_uri"], record["run_id"], summary, tmp_path, step=6)
    assert logged == ["evaluation/confusion_matrix.png", "evaluation/per_class.csv"]
    assert _history(client, record["run_id"], "test_top1_accuracy") == [(6, 0.5)]
    assert _history(client, record["run_id"], "test_macro_accuracy") == [(6, 0.25)]
    assert not _history(client, record["run_id"], "test_top5_accuracy"), "no top-5: nothing invented"
    assert {a.path for a in client.list_artifacts(record["run_id"], "evaluation")} == set(logged)


# ---- a real tracking server, one that is down, TensorBoard and none -------------------------------

@pytest.fixture
def mlflow_server(tmp_path):
    """``mlflow server`` on 127.0.0.1 with a SQLite backend in tmp_path; skipped if it does not come up."""
    mlflow_cli = Path(sys.executable).parent / "mlflow"
    if not mlflow_cli.exists():
        pytest.skip(f"no mlflow command beside {sys.executable}")
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    log = (tmp_path / "server.log").open("w")
    process = subprocess.Popen(
        [str(mlflow_cli), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "server-artifacts")],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + SERVER_START_S
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=1):
                    break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    pytest.skip(f"mlflow server did not answer on {uri} within {SERVER_START_S} s: "
                                + (tmp_path / "server.log").read_text()[-800:])
                time.sleep(0.3)
        yield uri
    finally:
        # The server, its workers and its job consumers: one process group, started in their own session.
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # whatever of the group is left
        process.wait(timeout=10)
        log.close()


# Starts an `mlflow server` (~15 s); the local store's tests cover the same logging: `pytest -m slow`.
@pytest.mark.slow
def test_a_tracking_server_receives_the_run(spec, toy_shards, tmp_path, monkeypatch, mlflow_server):
    from mlflow import MlflowClient

    _use_store(monkeypatch, mlflow_server, **{"dagster.run_id": "served"})
    _train(spec, toy_shards, tmp_path, 2)
    record = recorded_run(tmp_path / "ck")
    assert record["tracking_uri"] == mlflow_server
    client = MlflowClient(mlflow_server)
    run = client.get_run(record["run_id"])
    assert run.data.tags["dagster.run_id"] == "served" and run.info.status == "FINISHED"
    assert [step for step, _ in _history(client, record["run_id"], "loss")] == [1, 2]
    assert "loss_curve.png" in {a.path for a in client.list_artifacts(record["run_id"])}
    assert list((tmp_path / "server-artifacts").rglob("loss_curve.png")), "uploaded to the server's store"


def test_a_server_that_is_down_fails_before_training(spec, toy_shards, tmp_path, monkeypatch):
    uri = f"http://127.0.0.1:{free_port()}"
    _use_store(monkeypatch, uri)
    with pytest.raises(TrackingError, match=f"server {uri} does not answer"):
        _train(spec, toy_shards, tmp_path, 2)
    assert not list((tmp_path / "ck").glob("checkpoint-*")), "no step was trained"
    assert not (tmp_path / "ck" / RUN_RECORD).exists()


@pytest.mark.parametrize("report_to", ["tensorboard", "none"])
def test_tensorboard_writes_event_files_and_none_logs_nothing(spec, toy_shards, tmp_path, monkeypatch, report_to):
    if report_to == "tensorboard" and shutil.which("tensorboard", path=str(Path(sys.executable).parent)) is None:
        pytest.skip("tensorboard is not installed (the test extra installs it)")
    uri = local_store_uri(tmp_path / "mlflow")
    _use_store(monkeypatch, uri)
    _train(spec, toy_shards, tmp_path, 2, report_to=report_to)
    events = list((tmp_path / "ck" / "tensorboard").glob("events.out.tfevents.*"))
    assert bool(events) == (report_to == "tensorboard")
    assert not (tmp_path / "ck" / RUN_RECORD).exists() and not (tmp_path / "mlflow" / "mlflow.db").exists()
