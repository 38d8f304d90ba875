"""Asset ``trained_model``: fine-tune the model on the train shards in a separate process, launched through Pipes.

The asset writes a run file and starts ``python -m plant_pipeline.ml.training.cli`` (or ``torch.distributed.run``
with ``nproc_per_node`` ranks); progress lines and the final metadata come back through Dagster Pipes, so
the Dagster process never loads the model. The child's output is teed to ``<checkpoints>/launch/train.log``;
a child that fails turns into a Failure with its exit code and the last lines of that log. With report_to="mlflow"
the tracking resource's store is checked before the launch and handed to the child through MLflow's environment
variables, and the metadata links the MLflow run.

The asset holds its own output's lock and the shards' lock shared for the whole training, so flower_shards cannot
rebuild the shards under it. The child dies with the Dagster process (Linux) and holds both locks while it lives.
"""

import ctypes
import json
import os
import signal
import subprocess
import sys
import warnings
from collections import deque
from dataclasses import asdict
from pathlib import Path

from dagster import (
    AssetExecutionContext,
    DagsterExecutionInterruptedError,
    Failure,
    MaterializeResult,
    MetadataValue,
    PipesClientCompletedInvocation,
    PipesSubprocessClient,
    PreviewWarning,
    asset,
    open_pipes_session,
)
from pydantic import Field

from plant_pipeline.defs.config import config_from_dataclass, to_dataclass
from plant_pipeline.defs.failures import usage_errors_as_failures
from plant_pipeline.defs.locks import asset_lock
from plant_pipeline.defs.metadata import image
from plant_pipeline.defs.resources import ModelResource, PipelineStorage, TrackingResource, with_run_config_defaults
from plant_pipeline.ml.files import atomic_write_json
from plant_pipeline.ml.shards import read_index
from plant_pipeline.ml.training import (
    ENTRY_MODULE,
    RunFile,
    RunIdentity,
    TrainConfig,
    check_tracking_store,
    recorded_run,
    run_url,
)

LOG_TAIL_LINES = 40
# open_pipes_session reads a preview property of Dagster's own message reader and warns on every training;
# nothing here uses the preview feature.
warnings.filterwarnings("ignore", message=".*expected_writer_count", category=PreviewWarning)
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
# Resolved here, not in the forked child, which should run as little Python as it can before exec.
_prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None

# Defaults from PLANT_PIPELINE_RUN_CONFIG's files where it is set (make dev after make demo).
TrainedModelConfig = with_run_config_defaults(config_from_dataclass(
    "TrainedModelConfig", TrainConfig, "Fine-tuning settings; the same config with the same shards resumes.",
    nproc_per_node=(int, Field(default=1, description=(
        "Training processes on this machine: 1 runs one process; N > 1 runs N DDP ranks with "
        "torch.distributed.run (one per GPU; gloo on CPU). The train split needs N x dataloader_num_workers "
        "shards."))),
), "trained_model")


def launch_command(nproc_per_node: int, *args: str) -> list[str]:
    """The entry point as one process, or as ``nproc_per_node`` ranks under torchrun (the venv's Python either way)."""
    if nproc_per_node == 1:
        return [sys.executable, "-m", ENTRY_MODULE, *args]
    # --standalone: a local rendezvous on a free port, so parallel runs on one machine do not collide.
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc_per_node}",
            "-m", ENTRY_MODULE, *args]


def die_with_parent(sig: int = signal.SIGTERM):
    """A ``preexec_fn`` that has the kernel send ``sig`` to the child when the launching process dies (Linux).

    A Dagster run killed with SIGKILL (OOM killer, closed terminal, container restart) otherwise leaves the
    training running, writing checkpoints. SIGTERM, not SIGKILL, so torchrun stops its ranks before it exits.
    The signal fires when the launching *thread* exits: Popen and the wait for the child share one thread.
    Elsewhere (macOS has no prctl) it is None and an orphan trains on, but keeps the locks it inherited.
    """
    if _prctl is None:
        return None
    parent = os.getpid()

    def preexec() -> None:
        _prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl: no signal will come
            os.kill(os.getpid(), sig)

    return preexec


class TeeingPipesSubprocessClient(PipesSubprocessClient):
    """PipesSubprocessClient that also tees the child's stdout+stderr to a log file and keeps its tail.

    The stock client's ``forward_stdio=False`` pipes the output without reading it (a child that logs much
    would block); here one reader copies every line to the run's stdout (the compute logs) and the file, and a
    non-zero exit raises a Failure holding the exit code and the last ``tail_lines`` lines.
    """

    def __init__(self, log_path: Path, tail_lines: int = LOG_TAIL_LINES, pass_fds: tuple[int, ...] = (), **kwargs):
        super().__init__(**kwargs)
        self.log_path = Path(log_path)
        self.tail_lines = tail_lines
        self.pass_fds = tuple(pass_fds)  # lock files the child inherits, so an orphaned child still holds them

    def run(self, *, context, command, extras=None, env=None, cwd=None) -> PipesClientCompletedInvocation:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        tail: deque[str] = deque(maxlen=self.tail_lines)
        with open_pipes_session(context=context, context_injector=self.context_injector,
                                message_reader=self.message_reader, extras=extras) as session:
            process = subprocess.Popen(
                command, cwd=cwd or self.cwd, env={**os.environ, **self.env, **(env or {}),
                                                   **session.get_bootstrap_env_vars()},
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace", bufsize=1,
                pass_fds=self.pass_fds, preexec_fn=die_with_parent())
            context.log.info(f"training process pid {process.pid}: {' '.join(command)}")
            try:
                with self.log_path.open("w") as log:
                    for line in process.stdout:
                        log.write(line)
                        log.flush()
                        sys.stdout.write(line)
                        tail.append(line.rstrip("\n"))
                process.wait()
            except DagsterExecutionInterruptedError:
                if self.forward_termination:
                    context.log.info("[pipes] execution interrupted, sending SIGINT to the training process")
                    process.send_signal(signal.SIGINT)
                    process.wait(timeout=self.termination_timeout_seconds)
                raise
        if process.returncode != 0:
            shown = "\n".join(tail)
            raise Failure(
                description=f"the training process exited with code {process.returncode}; last {len(tail)} lines "
                            f"of {self.log_path}:\n{shown}",
                metadata={"exit_code": process.returncode, "log": MetadataValue.path(str(self.log_path)),
                          "command": " ".join(command)},
            )
        return PipesClientCompletedInvocation(session)


@asset(
    deps=["flower_shards"],
    group_name="training",
    # One training at a time holds the accelerator: the instance limits every pool to one slot (dagster.yaml).
    pool="gpu",
    code_version="1",
    kinds={"pytorch"},
    description="The model fine-tuned on the train shards (streamed), with checkpoints it resumes from; "
    "its metadata shows the losses, speed, memory and a loss curve, and links its MLflow run. Trains in a separate "
    "process (nproc_per_node DDP ranks) launched through Dagster Pipes.",
)
@usage_errors_as_failures("trained_model")
def trained_model(
    context: AssetExecutionContext, config: TrainedModelConfig, storage: PipelineStorage, model: ModelResource,
    tracking: TrackingResource,
) -> MaterializeResult:
    # Its own output written by one run at a time; the shards read under a shared lock for the whole training, so
    # flower_shards waits for it (then fails naming this run) and it waits while shards are being written.
    with asset_lock(context, storage) as own, asset_lock(context, storage, "flower_shards", shared=True) as shards:
        return _train(context, config, storage, model, tracking, lock_fds=(own.fileno(), shards.fileno()))


def mlflow_metadata(checkpoints_dir: Path) -> dict:
    """The MLflow run a training in ``checkpoints_dir`` logged to: its id, store and, on a server, its page."""
    record = recorded_run(checkpoints_dir)
    if record is None:
        return {}
    metadata = {"mlflow_run_id": record["run_id"], "mlflow_tracking_uri": record["tracking_uri"]}
    url = run_url(record["tracking_uri"], record["experiment_id"], record["run_id"])
    if url:
        metadata["mlflow_run"] = MetadataValue.url(url)
    return metadata


# How many decimals people read: losses to 4, memory in MB to 1 (the full values stay in result.json and MLflow).
_SHOWN_DIGITS = {"final_train_loss": 4, "final_validation_loss": 4, "initial_validation_loss": 4,
                 "best_eval_loss": 4, "peak_memory_mb": 1, "peak_cuda_memory_mb": 1, "peak_mps_memory_mb": 1}


def _shown(key: str, entry):
    """A reported metadata value rounded for reading where _SHOWN_DIGITS names it; anything else as it came."""
    value = getattr(entry, "value", entry)
    if key in _SHOWN_DIGITS and isinstance(value, float):
        return round(value, _SHOWN_DIGITS[key])
    return entry


def _train(context: AssetExecutionContext, config: TrainedModelConfig, storage: PipelineStorage,
           model: ModelResource, tracking: TrackingResource, lock_fds: tuple[int, ...]) -> MaterializeResult:
    train_config = to_dataclass(TrainConfig, config)  # validated here too: a bad setting fails before any launch
    if config.nproc_per_node < 1:
        raise Failure(f"nproc_per_node must be at least 1; got {config.nproc_per_node}")
    settings = None
    if train_config.report_to == "mlflow":
        settings = tracking.settings(storage, **{"dagster.run_id": context.run.run_id})
        check_tracking_store(settings.tracking_uri)  # a server that is down fails here, before the launch
    spec = model.spec(storage)
    spec.source()  # builds tiny-random-llava once here, so N ranks do not race to build it
    shards_dir = storage.shards_dir(spec.slug)
    # The core's run identity names the folders: runs that can resume each other share them, no others do.
    name = RunIdentity.of(train_config, spec, read_index(shards_dir)).folder_name()
    checkpoints_dir = storage.path("checkpoints", name)
    launch_dir = checkpoints_dir / "launch"
    context.log.info(f"run {name} on {config.nproc_per_node} process(es): {json.dumps(asdict(train_config))}")

    run_file = RunFile(train=train_config, model=spec, shards_dir=str(shards_dir),
                       checkpoints_dir=str(checkpoints_dir), output_dir=str(storage.path("models", name)))
    atomic_write_json(launch_dir / "run.json", run_file.to_json())
    result_path = launch_dir / "result.json"
    result_path.unlink(missing_ok=True)
    command = launch_command(config.nproc_per_node, "--config", str(launch_dir / "run.json"),
                             "--result", str(result_path))
    client = TeeingPipesSubprocessClient(log_path=launch_dir / "train.log", pass_fds=lock_fds)
    # The package root on the child's path, so the entry point imports even where the project is not installed.
    root = str(Path(__file__).resolve().parents[3])
    env = {"PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    if settings is not None:
        env.update(settings.to_env())
    reported = client.run(context=context, command=command, env=env).get_materialize_result()

    metadata = {key: _shown(key, value) for key, value in (reported.metadata or {}).items()}
    if settings is not None:
        metadata.update(mlflow_metadata(checkpoints_dir))
    curve = json.loads(result_path.read_text()).get("loss_curve_path")
    if curve:
        metadata["loss_curve"] = image(Path(curve), "training and validation loss")
    return MaterializeResult(metadata=metadata, data_version=reported.data_version, tags=reported.tags)
