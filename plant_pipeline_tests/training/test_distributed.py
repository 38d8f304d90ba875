"""Distributed training on CPU (gloo): the train_cli entry point under torchrun, and trained_model through Pipes.

Each test starts real processes (two DDP ranks where it matters) on the tiny model and the toy shards.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from dagster import AssetKey, DagsterInstance, materialize

from plant_pipeline.defs.assets.training import launch_command, trained_model
from plant_pipeline.defs.resources import ModelResource, PipelineStorage, TrackingResource
from plant_pipeline.ml.model.spec import ModelSpec, model_slug
from plant_pipeline.ml.shards.format import split_shard_paths
from plant_pipeline.ml.training import RunFile, RunFileError, TrainConfig, make_stream
from plant_pipeline.ml.training.streaming import StreamConfigError

# Raised inside dagster's own Pipes code (1.13), not ours.
pytestmark = pytest.mark.filterwarnings("ignore:AssetExecutionContext.run_id is deprecated:DeprecationWarning")
REPO = Path(__file__).resolve().parents[2]
FAST = dict(max_steps=4, per_device_train_batch_size=4, per_device_eval_batch_size=8, learning_rate=3e-3,
            warmup_ratio=0.0, lr_scheduler_type="constant", dataloader_num_workers=0, shuffle_buffer=16,
            logging_steps=2, save_steps=4, eval_steps=0, max_eval_samples=8)
METADATA_KEYS = {"model_path", "steps", "final_train_loss", "final_validation_loss", "initial_validation_loss",
                 "samples_per_second", "peak_memory_mb", "device", "dtype", "trainable_params", "total_params",
                 "checkpoints_dir", "seconds", "loss_curve", "stopped_early", "best_step", "best_eval_loss",
                 "mlflow_run_id", "mlflow_tracking_uri"}


def _train_keys(shards_dir: Path) -> list[str]:
    return [s.key for s in make_stream(split_shard_paths(shards_dir, "train"), shuffle=False)]


def _child_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


# ---- the stream's split between readers (no processes) --------------------------------------------

@pytest.mark.parametrize("world_size,workers", [(2, 1), (2, 2)])
def test_every_rank_and_worker_reads_disjoint_shards_covering_the_epoch(toy_shards, monkeypatch, world_size, workers):
    shards = split_shard_paths(toy_shards, "train")
    expected = sorted(_train_keys(toy_shards))  # before the rank/worker variables are set
    seen: list[list[str]] = []
    for rank in range(world_size):
        for worker in range(workers):
            # webdataset reads these variables before asking torch.distributed / the DataLoader.
            for key, value in (("RANK", rank), ("WORLD_SIZE", world_size), ("WORKER", worker), ("NUM_WORKERS", workers)):
                monkeypatch.setenv(key, str(value))
            stream = make_stream(shards, shuffle=True, shuffle_buffer=4, seed=7, epochs=1, distributed=True,
                                 world_size=world_size, num_workers=workers)
            seen.append([s.key for s in stream])
    flat = [k for keys in seen for k in keys]
    assert all(seen), "every reader gets samples"
    assert len(flat) == len(set(flat)), "no sample is read by two readers"
    assert sorted(flat) == expected


def test_fewer_shards_than_readers_fails_early_with_the_fix(toy_shards):
    with pytest.raises(StreamConfigError, match=r"4 shard\(s\) but 6 readers.*3 rank\(s\) x 2"):
        make_stream(split_shard_paths(toy_shards, "train"), shuffle=True, distributed=True, world_size=3,
                    num_workers=2)


def test_run_file_round_trips_and_rejects_unknown_settings(tmp_path):
    run = RunFile(train=TrainConfig(**FAST), model=ModelSpec(model_name="m", device="cpu"), shards_dir="s",
                  checkpoints_dir="c", output_dir="o")
    path = tmp_path / "run.json"
    path.write_text(json.dumps(run.to_json()))
    loaded = RunFile.load(path, ["train.max_steps=9", "output_dir=/x"])
    assert loaded.train.max_steps == 9 and loaded.output_dir == "/x" and loaded.model == run.model
    path.write_text(json.dumps({**run.to_json(), "train": {"max_stepz": 3}}))
    with pytest.raises(RunFileError, match="max_stepz"):
        RunFile.load(path)


# ---- torchrun --------------------------------------------------------------------------------------

def test_torchrun_two_ranks_train_in_step_on_disjoint_samples(tiny_model_dir, toy_shards, tmp_path):
    # shuffle_buffer=1 keeps the samples in shard order: with a larger buffer the endless stream mixes the next
    # epoch's first samples into this one's last batches, so the first 16 per rank would not be one exact epoch.
    run = RunFile(train=TrainConfig(**{**FAST, "shuffle_buffer": 1}), model=ModelSpec(model_name=str(tiny_model_dir), device="cpu",
                                                             local_files_only=True),
                  shards_dir=str(toy_shards), checkpoints_dir=str(tmp_path / "ck"), output_dir=str(tmp_path / "out"))
    (tmp_path / "run.json").write_text(json.dumps(run.to_json()))
    keys_dir = tmp_path / "keys"
    command = launch_command(2, "--config", str(tmp_path / "run.json"), "--result", str(tmp_path / "result.json"),
                             "--record-keys", str(keys_dir))
    done = subprocess.run(command, env=_child_env(), capture_output=True, text=True, timeout=240, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    steps = {json.loads(p.read_text())["rank"]: json.loads(p.read_text())["steps"]
             for p in keys_dir.glob("result-rank*.json")}
    assert steps == {0: 4, 1: 4}
    train_keys = set(_train_keys(toy_shards))
    per_rank: dict[int, list[str]] = {0: [], 1: []}
    for path in keys_dir.glob("keys-rank*.jsonl"):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            per_rank[record["rank"]] += [k for k in record["keys"] if k in train_keys]  # drop validation batches
    # 4 steps x 4 samples per rank = 16 = half of the 32 train samples: one epoch between the two ranks.
    assert len(per_rank[0]) == len(per_rank[1]) == 16
    assert not set(per_rank[0]) & set(per_rank[1])
    assert set(per_rank[0]) | set(per_rank[1]) == train_keys

    result = json.loads((tmp_path / "result.json").read_text())
    assert result["world_size"] == 2 and result["steps"] == 4
    assert result["final_validation_loss"] < result["initial_validation_loss"]
    assert sorted(p.name for p in (tmp_path / "ck").glob("checkpoint-*")) == ["checkpoint-4"]
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()

    # Resume under DDP: two more steps continue from checkpoint-4.
    done = subprocess.run(launch_command(2, "--config", str(tmp_path / "run.json"), "--result",
                                         str(tmp_path / "result2.json"), "--set", "train.max_steps=6",
                                         "--set", "train.save_steps=2"),
                          env=_child_env(), capture_output=True, text=True, timeout=240, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    resumed = json.loads((tmp_path / "result2.json").read_text())
    assert resumed["resumed_from_step"] == 4 and resumed["steps"] == 6


# ---- accelerate launch -----------------------------------------------------------------------------

# Two ranks again (as the torchrun test), under accelerate's launcher: `pytest -m slow`, to keep `make test` short.
@pytest.mark.slow
def test_accelerate_launch_runs_the_entry_point_with_the_shipped_config(tiny_model_dir, toy_shards, tmp_path):
    # On CPU accelerate starts one process (several need MPI); the point is that the shipped config file and the
    # entry point work together unchanged. FSDP / DeepSpeed need GPUs: bench/gpu_fsdp.py runs FSDP there.
    run = RunFile(train=TrainConfig(**FAST), model=ModelSpec(model_name=str(tiny_model_dir), device="cpu",
                                                             local_files_only=True),
                  shards_dir=str(toy_shards), checkpoints_dir=str(tmp_path / "ck"), output_dir=str(tmp_path / "out"))
    (tmp_path / "run.json").write_text(json.dumps(run.to_json()))
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(REPO / "config" / "accelerate" / "ddp.yaml"), "--cpu", "--num_processes", "1",
               "-m", "plant_pipeline.ml.training.cli", "--config", str(tmp_path / "run.json"),
               "--result", str(tmp_path / "result.json")]
    done = subprocess.run(command, env=_child_env(), capture_output=True, text=True, timeout=240, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["steps"] == 4 and result["final_validation_loss"] < result["initial_validation_loss"]
    out = tmp_path / "out"
    assert (out / "adapter_model.safetensors").is_file() and (out / "processor_config.json").is_file()
    assert not (out / "training_args.bin").exists(), "no pickle in the result folder"
    assert not list(tmp_path.glob(".out.saving*")), "the staging folder is gone"


def test_merge_lora_is_refused_before_any_work_when_weights_are_sharded(tiny_model_dir, toy_shards, tmp_path,
                                                                        monkeypatch):
    from plant_pipeline.ml.training import TrainConfigError, train

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(TrainConfigError, match="merge_lora=True cannot merge adapters into weights that FSDP shards"):
        train(TrainConfig(**FAST, merge_lora=True), model_spec=ModelSpec(model_name=str(tiny_model_dir), device="cpu"),
              shards_dir=toy_shards, checkpoints_dir=tmp_path / "ck", output_dir=tmp_path / "out")
    assert not (tmp_path / "ck").exists() and not (tmp_path / "out").exists()


# ---- the asset through Pipes -----------------------------------------------------------------------

@pytest.fixture
def pipeline_data(tiny_model_dir, toy_shards, tmp_path):
    """A data root holding the toy shards where trained_model looks for them (shards/<model slug>)."""
    data = tmp_path / "data"
    shards = data / "shards" / model_slug(str(tiny_model_dir))
    shards.parent.mkdir(parents=True)
    os.symlink(toy_shards, shards)
    return data


def _materialize(instance: DagsterInstance, data: Path, model_dir: Path, **config):
    return materialize(
        [trained_model], instance=instance, raise_on_error=False,
        resources={"storage": PipelineStorage(data_dir=str(data)),
                   "model": ModelResource(model_name=str(model_dir), device="cpu", local_files_only=True),
                   "tracking": TrackingResource(tracking_uri=os.environ["MLFLOW_TRACKING_URI"])},
        run_config={"ops": {"trained_model": {"config": {**FAST, **config}}}},
    )


# The asset launching torchrun (~17 s); the torchrun and crashing-child tests cover the launch: `pytest -m slow`.
@pytest.mark.slow
def test_asset_trains_two_ranks_through_pipes(pipeline_data, tiny_model_dir):
    instance = DagsterInstance.ephemeral()
    result = _materialize(instance, pipeline_data, tiny_model_dir, nproc_per_node=2)
    failures = [str(e.event_specific_data.error) for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    assert result.success, failures
    [event] = [e for e in result.get_asset_materialization_events() if e.asset_key == AssetKey("trained_model")]
    meta = {k: v.value for k, v in event.materialization.metadata.items()}
    assert set(meta) == METADATA_KEYS, "a fresh run: no resumed_from_step, no CUDA/MPS peaks on CPU"
    assert meta["steps"] == 4 and meta["device"] == "cpu:0"
    assert meta["final_validation_loss"] < meta["initial_validation_loss"]
    assert meta["loss_curve"].startswith("![training and validation loss](data:image/png;base64,")
    assert (Path(meta["model_path"]) / "adapter_config.json").is_file()
    assert Path(meta["checkpoints_dir"]).parent == pipeline_data / "checkpoints"
    # Progress reached the Dagster run through Pipes (from rank 0 of the child, not from this process).
    logs = [r.user_message for r in instance.all_logs(result.run_id) if "step 4/4, loss" in r.user_message]
    assert logs, "the child's progress lines came back through Pipes"
    log = (Path(meta["checkpoints_dir"]) / "launch" / "train.log").read_text()
    assert "rank1" in log and "rank0" in log
    # One MLflow run for the two ranks: rank 0 alone logs.
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=meta["mlflow_tracking_uri"])
    runs = client.search_runs([client.get_run(meta["mlflow_run_id"]).info.experiment_id],
                              filter_string=f"tags.`dagster.run_id` = '{result.run_id}'")
    assert [run.info.run_id for run in runs] == [meta["mlflow_run_id"]]
    assert [m.step for m in client.get_metric_history(meta["mlflow_run_id"], "loss")][-1] == 4


def test_a_crashing_child_fails_the_asset_with_its_exit_code_and_log(pipeline_data, tiny_model_dir):
    # An unknown LoRA target passes TrainConfig's own checks, so the parent launches the child, which rejects it
    # against the model (TrainConfigError) and exits with code 2.
    result = _materialize(DagsterInstance.ephemeral(), pipeline_data, tiny_model_dir,
                          lora_target_modules=["no_such_proj"])
    assert not result.success
    [error] = [e.event_specific_data.error for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    text = str(error.message) + "".join(str(c.message) for c in (error.cause, error.context) if c)
    assert "exited with code 2" in text, text
    assert "no_such_proj" in text and "match no linear layer" in text, text
