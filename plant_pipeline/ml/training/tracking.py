"""Experiment tracking of a training run (``TrainConfig.report_to``): one MLflow run per training run, continued
when the training resumes (its id is kept with the checkpoints) and logged by rank 0 alone, or TensorBoard files.

The settings come from MLflow's own environment variables, so a run launched by the trained_model asset and one
started from the command line read them alike. The tracking store is checked before training starts, with a short
timeout: a server that is down fails the run there, not halfway through it. mlflow is imported only when used.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from plant_pipeline.ml.errors import UsageError
from plant_pipeline.ml.files import atomic_write_json
from plant_pipeline.ml.training.config import TrainConfig

logger = logging.getLogger(__name__)

TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"  # MLflow's own variables
EXPERIMENT_ENV = "MLFLOW_EXPERIMENT_NAME"
TAGS_ENV = "MLFLOW_TAGS"  # a JSON object of run tags, as transformers' MLflowCallback reads it
DEFAULT_EXPERIMENT = "plant_pipeline"
RUN_RECORD = "mlflow_run.json"  # in the checkpoints folder: the MLflow run a resumed training continues
CHECK_TIMEOUT_S = 5.0
LOSS_CURVE_ARTIFACT = "loss_curve.png"
TENSORBOARD_DIR = "tensorboard"  # in the checkpoints folder, so a resumed training adds to the same logs


class TrackingError(UsageError):
    """The tracking store cannot be reached or used, or report_to needs a package that is not installed."""


@dataclass(frozen=True)
class TrackingSettings:
    """Where a run is logged. ``tracking_uri`` empty: MLflow's default (``mlflow.db`` in the working directory)."""

    tracking_uri: str = ""
    experiment_name: str = DEFAULT_EXPERIMENT
    tags: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> TrackingSettings:
        raw = environ.get(TAGS_ENV, "")
        try:
            tags = json.loads(raw) if raw else {}
        except json.JSONDecodeError as err:
            raise TrackingError(f"{TAGS_ENV} is not JSON ({err}); expected an object like "
                                '{"team": "flowers"}') from err
        if not isinstance(tags, dict):
            raise TrackingError(f"{TAGS_ENV} must be a JSON object of tags; got {raw!r}")
        return cls(tracking_uri=environ.get(TRACKING_URI_ENV, ""),
                   experiment_name=environ.get(EXPERIMENT_ENV) or DEFAULT_EXPERIMENT,
                   tags={str(k): str(v) for k, v in tags.items()})

    def to_env(self) -> dict[str, str]:
        """The variables that hand these settings to a training process."""
        env = {EXPERIMENT_ENV: self.experiment_name, TAGS_ENV: json.dumps(self.tags)}
        if self.tracking_uri:
            env[TRACKING_URI_ENV] = self.tracking_uri
        return env

    def artifact_location(self) -> str | None:
        """For a SQLite store, ``artifacts/`` beside the database (MLflow would use the working directory);
        elsewhere None: the server decides."""
        path = sqlite_path(self.tracking_uri)
        return (path.parent / "artifacts").as_uri() if path is not None else None


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI, else None."""
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None


def local_store_uri(folder: str | Path) -> str:
    """The URI of a SQLite store in ``folder`` (its artifacts go to ``folder/artifacts``)."""
    return f"sqlite:///{Path(folder).resolve() / 'mlflow.db'}"


def check_tracking_store(uri: str, timeout: float = CHECK_TIMEOUT_S) -> None:
    """TrackingError unless the store at ``uri`` can be used: a server answers its /health within ``timeout``
    seconds; a SQLite store's folder exists or can be made. Cheap: no mlflow import."""
    what_to_do = (f"start the server, point {TRACKING_URI_ENV} (or the tracking resource's tracking_uri) at one "
                  "that runs, or set report_to='none'")
    scheme = urllib.parse.urlsplit(uri).scheme
    if scheme in ("http", "https"):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as response:
                status = response.status
        except (urllib.error.URLError, OSError) as err:  # refused, unknown host, timeout
            reason = getattr(err, "reason", err)
            raise TrackingError(f"the MLflow tracking server {uri} does not answer within {timeout:g} s "
                                f"({reason}); {what_to_do}") from err
        if status != 200:
            raise TrackingError(f"the MLflow tracking server {uri} answers /health with HTTP {status}, expected "
                                f"200; {what_to_do}")
    elif (path := sqlite_path(uri)) is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise TrackingError(f"the MLflow store {uri}: cannot create {path.parent} ({err}); point "
                                f"{TRACKING_URI_ENV} at a writable folder or set report_to='none'") from err


def tensorboard_callback(log_dir: Path):
    """transformers' TensorBoardCallback writing to ``log_dir``; TrackingError naming the extra when the package
    is missing. (Left to itself, its writer goes to ./runs when a record is logged before training begins, as
    train()'s first evaluation is.)"""
    if importlib.util.find_spec("tensorboard") is None:
        raise TrackingError("report_to='tensorboard' needs the tensorboard package, which is not installed: "
                            "pip install 'plant_pipeline[tensorboard]' (or tensorboard), or set report_to to mlflow "
                            "or none")
    from torch.utils.tensorboard import SummaryWriter
    from transformers.integrations import TensorBoardCallback

    return TensorBoardCallback(tb_writer=SummaryWriter(log_dir=str(log_dir)))


def recorded_run(checkpoints_dir: str | Path) -> dict | None:
    """``{"run_id", "experiment_id", "tracking_uri"}`` of the MLflow run a training in ``checkpoints_dir``
    logged to, or None."""
    try:
        record = json.loads((Path(checkpoints_dir) / RUN_RECORD).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and "run_id" in record else None


def run_url(tracking_uri: str, experiment_id: str, run_id: str) -> str | None:
    """The run's page in the MLflow UI of a tracking server; None for a local store (open it with ``mlflow ui``)."""
    if urllib.parse.urlsplit(tracking_uri).scheme not in ("http", "https"):
        return None
    return f"{tracking_uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


def _param_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text[:500]  # within every MLflow version's limit per value (lora_target_modules is the longest)


def run_params(config: TrainConfig, checkpoints_dir: Path, max_steps: int,
               data: dict[str, Any] | None = None) -> dict[str, str]:
    """The run's parameters: every TrainConfig field, the run identity recorded in the checkpoints folder (model,
    revision, train shards' sha256), the resolved max_steps, the ranks and ``data``: the source and its number of
    categories (data_params), where the caller knows them."""
    from plant_pipeline.ml.training.checkpoints import RUN_CONFIG

    params: dict[str, Any] = dict(asdict(config))
    try:
        identity = json.loads((checkpoints_dir / RUN_CONFIG).read_text())
    except (OSError, ValueError):
        identity = {}  # build_trainer without train(): a benchmark, no checkpoints identity
    params.update({f"model.{k}": identity[k] for k in ("model_name", "revision") if k in identity})
    if "train_shards_sha256" in identity:
        params["data.train_shards_sha256"] = identity["train_shards_sha256"]
    params.update({"run.folder": checkpoints_dir.name, "run.max_steps": max_steps,
                   "run.world_size": int(os.environ.get("WORLD_SIZE", "1")), **(data or {})})
    return {key: _param_value(value) for key, value in params.items()}


class MlflowRun:
    """One MLflow run, through MlflowClient (no global active run, so nothing leaks between runs in a process)."""

    def __init__(self, client, run_id: str, experiment_id: str):
        self.client, self.run_id, self.experiment_id = client, run_id, experiment_id

    @classmethod
    def attach(cls, tracking_uri: str, run_id: str) -> MlflowRun:
        """An existing run (evaluation logs to the training's run); the store is checked first."""
        from mlflow import MlflowClient

        check_tracking_store(tracking_uri)
        client = MlflowClient(tracking_uri)
        return cls(client, run_id, client.get_run(run_id).info.experiment_id)

    @classmethod
    def open(cls, settings: TrackingSettings, checkpoints_dir: Path, params: dict[str, str], *,
             resume: bool) -> MlflowRun:
        """The run recorded in ``checkpoints_dir`` when resuming in the same store, else a new one; records it."""
        from mlflow import MlflowClient
        from mlflow.entities import Param
        from mlflow.exceptions import MlflowException

        client = MlflowClient(settings.tracking_uri or None)
        uri = client.tracking_uri
        record = recorded_run(checkpoints_dir) if resume else None
        run = None
        if record is not None and record.get("tracking_uri") == uri:
            try:
                run = client.get_run(record["run_id"])
            except MlflowException:
                logger.warning("MLflow run %s (recorded in %s) is gone from %s; starting a new run",
                               record["run_id"], checkpoints_dir / RUN_RECORD, uri)
            if run is not None and run.info.lifecycle_stage != "active":
                run = None  # deleted in the UI: a resumed training logs to a new run
        if run is None:
            experiment = client.get_experiment_by_name(settings.experiment_name)
            if experiment is None:
                try:
                    experiment_id = client.create_experiment(settings.experiment_name,
                                                             artifact_location=settings.artifact_location())
                except MlflowException:  # another run created it first
                    experiment_id = client.get_experiment_by_name(settings.experiment_name).experiment_id
            else:
                experiment_id = experiment.experiment_id
            run = client.create_run(experiment_id, run_name=checkpoints_dir.name, tags=settings.tags)
            new_params = params
            logger.info("MLflow run %s in experiment %r of %s", run.info.run_id, settings.experiment_name, uri)
        else:
            client.update_run(run.info.run_id, status="RUNNING")
            # MLflow refuses to change a logged parameter: a resume with, say, a higher max_steps keeps the first.
            new_params = {k: v for k, v in params.items() if k not in run.data.params}
            logger.info("continuing MLflow run %s of %s", run.info.run_id, uri)
        run_id = run.info.run_id
        for key, value in settings.tags.items():
            client.set_tag(run_id, key, value)
        items = [Param(k, v) for k, v in new_params.items()]
        for start in range(0, len(items), 100):  # MLflow's batch limit
            client.log_batch(run_id, params=items[start:start + 100])
        atomic_write_json(checkpoints_dir / RUN_RECORD, {"run_id": run_id, "experiment_id": run.info.experiment_id,
                                                          "tracking_uri": uri})
        return cls(client, run_id, run.info.experiment_id)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def log_files(self, files: Iterable[Path], artifact_path: str | None = None) -> None:
        for file in files:
            self.client.log_artifact(self.run_id, str(file), artifact_path)


def _numeric(logs: Mapping[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in logs.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def data_params(index: dict) -> dict[str, Any]:
    """The data facts of shards' index.json for the run's parameters: source, number of categories, question."""
    from plant_pipeline.ml.data import CategoryMap, oxford_map

    found = index.get("categories")
    categories = CategoryMap.from_json(found) if found else oxford_map()  # indexes before issue 15: Oxford's
    return {"data.source": categories.source, "data.num_categories": len(categories),
            "data.question": categories.question}


def make_tracking_callbacks(config: TrainConfig, args, callbacks: Iterable = (),
                            data: dict[str, Any] | None = None) -> list:
    """The callback that logs to ``config.report_to`` from rank 0 (none for "none" and on other ranks): MLflow
    (the store is checked here, before any training step) or TensorBoard files in ``<checkpoints>/tensorboard``.

    ``callbacks``: the run's other callbacks; the progress callback's training speed is logged with each record.
    """
    if config.report_to == "none" or int(os.environ.get("RANK", "0")) != 0:
        return []
    if config.report_to == "tensorboard":
        return [tensorboard_callback(Path(args.output_dir) / TENSORBOARD_DIR)]
    from transformers import TrainerCallback

    settings = TrackingSettings.from_env()
    check_tracking_store(settings.tracking_uri)
    checkpoints_dir = Path(args.output_dir)
    progress = next((c for c in callbacks if hasattr(c, "samples_per_second")), None)

    class MlflowTrackingCallback(TrainerCallback):
        """Opens the run at the first event (so a Trainer built and never used logs nothing) and logs every
        record the Trainer logs, with speed and memory; at the end the loss curve, and the run is finished."""

        def __init__(self):
            self.run: MlflowRun | None = None

        def _run(self, state) -> MlflowRun:
            if self.run is None:
                self.run = MlflowRun.open(settings, checkpoints_dir, run_params(config, checkpoints_dir,
                                                                                state.max_steps or args.max_steps,
                                                                                data),
                                          resume=config.resume)
            return self.run

        def on_train_begin(self, args, state, control, **kwargs):
            self._run(state)

        def on_log(self, args, state, control, logs=None, **kwargs):
            metrics = _numeric(logs or {})
            if progress is not None and progress.samples_per_second > 0:
                metrics["samples_per_second"] = progress.samples_per_second
            metrics.update(_memory_mb())
            self._run(state).log_metrics(metrics, state.global_step)

        def on_train_end(self, args, state, control, **kwargs):
            from plant_pipeline.ml.training.results import plot_loss_curve

            run = self._run(state)
            with tempfile.TemporaryDirectory() as tmp:
                run.log_files([plot_loss_curve(state.log_history, Path(tmp) / LOSS_CURVE_ARTIFACT)])
            run.client.set_terminated(run.run_id, "FINISHED")

    return [MlflowTrackingCallback()]


def _memory_mb() -> dict[str, float]:
    """This process's resident memory and, on CUDA, the peak allocated, in MiB."""
    import psutil
    import torch

    memory = {"rss_mb": psutil.Process().memory_info().rss / 2**20}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        memory["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return memory
