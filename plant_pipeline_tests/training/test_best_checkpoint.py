"""Early stopping on validation loss and the best checkpoint: a run stops when validation loss stops improving and
says so, keep="best" saves the best checkpoint's weights (keep="last" the last), and both survive a resume."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from plant_pipeline.ml.testing import write_toy_shards
from plant_pipeline.ml.training import TrainConfig, TrainConfigError, train, training_arguments
from plant_pipeline.ml.training.trainer import CustomTrainer

# One train shard of 8 samples in batches of 8 (every step sees the same batch, so a resume continues exactly),
# validation and a checkpoint at every step. The learning rates make validation loss fall, then rise: the best
# checkpoint is not the last (lowest at step 2 (full) or 1 (LoRA) of 4, measured on this tiny model).
RUN = dict(save_steps=1, eval_steps=1, per_device_train_batch_size=8, per_device_eval_batch_size=8,
           lr_scheduler_type="constant", warmup_ratio=0.0, dataloader_num_workers=0, shuffle_buffer=1,
           logging_steps=1, max_eval_samples=8, report_to="none")
DIVERGING = {"full": dict(use_lora=False, learning_rate=3e-2), "lora": dict(use_lora=True, learning_rate=1e-1)}


@pytest.fixture(scope="module")
def one_shard(tmp_path_factory, tiny_processor) -> Path:
    return write_toy_shards(tmp_path_factory.mktemp("one_shard"), tiny_processor,
                            per_class={"train": 2, "validation": 2})


def _train(config: TrainConfig, spec, shards: Path, root: Path):
    return train(config, model_spec=spec, shards_dir=shards, checkpoints_dir=root / "ck", output_dir=root / "model")


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    files = sorted(folder.glob("*.safetensors"))
    assert len(files) == 1, files
    return load_file(files[0])


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _eval_losses(result) -> dict[int, float]:
    """Validation loss by step, during training (step 0, the untrained model, is no checkpoint)."""
    return {e["step"]: e["eval_loss"] for e in result.log_history if "eval_loss" in e and e["step"] > 0}


@pytest.mark.parametrize("kind", list(DIVERGING))
def test_early_stopping_stops_at_the_patience_and_keeps_the_best_checkpoint(spec, one_shard, tmp_path, kind):
    config = TrainConfig(max_steps=8, early_stopping_patience=2, **DIVERGING[kind], **RUN)
    result = _train(config, spec, one_shard, tmp_path)

    losses = _eval_losses(result)
    assert result.stopped_early and result.steps < config.max_steps, losses
    assert max(losses) == result.steps  # no step trained after the evaluation that stopped it
    # It stopped at the first evaluation that made two in a row without a new lowest loss.
    lowest, misses, expected = None, 0, None
    for step in sorted(losses):
        lowest, misses = (losses[step], 0) if lowest is None or losses[step] < lowest else (lowest, misses + 1)
        if misses == 2:
            expected = step
            break
    assert expected == result.steps, losses
    assert "early_stopping_patience=2" in result.stop_reason and "did not improve" in result.stop_reason

    best = min(losses, key=losses.get)
    assert result.best_step == best != result.steps
    assert result.best_eval_loss == losses[best]
    saved = _weights(tmp_path / "model")
    assert _equal(saved, _weights(tmp_path / "ck" / f"checkpoint-{best}"))
    assert not _equal(saved, _weights(tmp_path / "ck" / f"checkpoint-{result.steps}"))

    # Killed while writing the result: the stopped run is restored from its last checkpoint, not trained further.
    shutil.rmtree(tmp_path / "model")
    again = _train(config, spec, one_shard, tmp_path)
    assert (again.steps, again.stopped_early, again.best_step) == (result.steps, True, best)
    assert again.resumed_from_step == result.steps
    assert _equal(_weights(tmp_path / "model"), saved)
    # Run once more with the result in place: kept as it is, not retrained.
    written = (tmp_path / "model" / "training_meta.json").stat().st_mtime_ns
    kept = _train(config, spec, one_shard, tmp_path)
    assert kept.stopped_early and kept.steps == result.steps and kept.best_step == best
    assert (tmp_path / "model" / "training_meta.json").stat().st_mtime_ns == written


def test_an_improvement_within_the_threshold_counts_as_none(spec, one_shard, tmp_path):
    # Validation loss falls at every step at this learning rate, but never by a million.
    config = TrainConfig(max_steps=8, learning_rate=3e-3, early_stopping_patience=1, early_stopping_threshold=1e6,
                         **{**RUN, "save_steps": 2, "eval_steps": 2})
    result = _train(config, spec, one_shard, tmp_path)
    assert (result.stopped_early, result.steps) == (True, 4)
    assert "by more than 1000000.0" in result.stop_reason
    unlimited = _train(TrainConfig(max_steps=4, learning_rate=3e-3, **{**RUN, "save_steps": 2, "eval_steps": 2}),
                       spec, one_shard, tmp_path / "unlimited")
    assert not unlimited.stopped_early and unlimited.stop_reason is None and unlimited.steps == 4


def test_keep_last_saves_the_last_weights(spec, one_shard, tmp_path):
    result = _train(TrainConfig(max_steps=4, keep="last", **DIVERGING["lora"], **RUN), spec, one_shard, tmp_path)
    losses = _eval_losses(result)
    assert min(losses, key=losses.get) != 4, "the best is not the last here, or this test shows nothing"
    assert result.best_step is None and result.best_eval_loss is None and not result.stopped_early
    assert _equal(_weights(tmp_path / "model"), _weights(tmp_path / "ck" / "checkpoint-4"))


def test_keep_best_without_evaluations_during_training_keeps_the_last(spec, one_shard, tmp_path):
    result = _train(TrainConfig(max_steps=2, **{**RUN, "eval_steps": 0}), spec, one_shard, tmp_path)
    assert result.best_step == 2 and result.best_eval_loss == result.final_validation_loss
    assert _equal(_weights(tmp_path / "model"), _weights(tmp_path / "ck" / "checkpoint-2"))


class Killed(Exception):
    """Stands for a SIGKILL: the process state is gone, the checkpoints on disk stay."""


@pytest.mark.parametrize("kind", list(DIVERGING))
def test_a_resumed_run_keeps_the_same_best_checkpoint(spec, one_shard, tmp_path, monkeypatch, kind):
    config = TrainConfig(max_steps=4, **DIVERGING[kind], **RUN)
    whole = _train(config, spec, one_shard, tmp_path / "whole")
    assert whole.best_step < 3, "the best must come before the kill for this test to show anything"

    real = CustomTrainer.training_step

    def step_then_die(self, *args, **kwargs):
        if self.state.global_step >= 3:  # checkpoint-3 is written: past the best
            raise Killed("killed before step 4")
        return real(self, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(CustomTrainer, "training_step", step_then_die)
        with pytest.raises(Killed):
            _train(config, spec, one_shard, tmp_path / "resumed")
    resumed = _train(config, spec, one_shard, tmp_path / "resumed")
    assert resumed.resumed_from_step == 3
    assert (resumed.best_step, resumed.best_eval_loss) == (whole.best_step, whole.best_eval_loss)
    assert _equal(_weights(tmp_path / "resumed" / "model"), _weights(tmp_path / "whole" / "model"))


def test_the_settings_must_let_every_checkpoint_be_validated():
    with pytest.raises(TrainConfigError) as caught:
        TrainConfig(save_steps=50, eval_steps=20)
    assert all(s in str(caught.value) for s in ("save_steps=50", "eval_steps=20", "save_steps to 60", "keep='last'"))
    TrainConfig(save_steps=50, eval_steps=20, keep="last")
    TrainConfig(save_steps=100, eval_steps=50)
    with pytest.raises(TrainConfigError, match="eval_steps=0"):
        TrainConfig(eval_steps=0, early_stopping_patience=3)


@pytest.mark.parametrize(("settings", "overrides", "expected"), [
    ({}, {}, (True, "eval_loss")),
    ({"keep": "last"}, {}, (False, None)),
    ({"keep": "last", "early_stopping_patience": 2}, {}, (False, "eval_loss")),  # early stopping compares with it
    ({"eval_steps": 0}, {}, (False, None)),
    ({}, {"save_strategy": "no"}, (False, "eval_loss")),  # a benchmark without checkpoints
    ({}, {"eval_strategy": "no"}, (False, None)),
])
def test_training_arguments_track_the_best_checkpoint_as_keep_says(tmp_path, settings, overrides, expected):
    args = training_arguments(TrainConfig(**settings), output_dir=str(tmp_path), max_steps=10,
                              device=torch.device("cpu"), dtype=torch.float32, workers=0, **overrides)
    assert (args.load_best_model_at_end, args.metric_for_best_model) == expected
    assert args.metric_for_best_model is None or args.greater_is_better is False
