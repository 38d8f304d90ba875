"""RunIdentity: the one identity that names a run's checkpoints folder and decides whether train() resumes."""

from __future__ import annotations

import dataclasses

import pytest

from plant_pipeline.ml.model.spec import ModelSpec
from plant_pipeline.ml.shards.format import read_index
from plant_pipeline.ml.training import RunIdentity, TrainConfig, TrainConfigError, train

RUN = dict(save_steps=2, eval_steps=0, per_device_train_batch_size=4, per_device_eval_batch_size=8,
           learning_rate=3e-3, lr_scheduler_type="constant", warmup_ratio=0.0, dataloader_num_workers=0,
           shuffle_buffer=16, logging_steps=1, max_eval_samples=8)


def _folder(config: TrainConfig, spec: ModelSpec, shards) -> str:
    return RunIdentity.of(config, spec, read_index(shards)).folder_name()


def test_folder_name_follows_what_checkpoints_depend_on_and_nothing_else(spec, toy_shards):
    base = _folder(TrainConfig(max_steps=4, **RUN), spec, toy_shards)
    assert base.startswith(f"{spec.slug}-")
    assert _folder(TrainConfig(max_steps=4, **RUN), spec, toy_shards) == base
    # Raising max_steps or changing how often to log/evaluate/save continues the same run.
    assert _folder(TrainConfig(**{**RUN, "max_steps": 8, "logging_steps": 3, "save_steps": 4}), spec,
                   toy_shards) == base
    assert _folder(TrainConfig(**{**RUN, "max_steps": 4, "learning_rate": 1e-3}), spec, toy_shards) != base
    assert _folder(TrainConfig(max_steps=4, **RUN), dataclasses.replace(spec, revision="v2"), toy_shards) != base


def test_result_key_holds_the_steps_and_ranks_the_checkpoint_key_leaves_out(spec, toy_shards):
    identity = RunIdentity.of(TrainConfig(max_steps=4, **RUN), spec, read_index(toy_shards))
    assert identity.result_key(4, 1) != identity.result_key(8, 1) != identity.result_key(8, 2)
    assert "max_steps" not in identity.checkpoint_key()["config"]


def test_another_revision_trains_fresh_in_its_own_folder_and_the_same_settings_resume(spec, toy_shards, tmp_path):
    other = dataclasses.replace(spec, revision="v2")  # a local folder ignores the revision when loading

    def run(model_spec: ModelSpec, max_steps: int, folder: str | None = None):
        config = TrainConfig(max_steps=max_steps, **RUN)
        folder = folder or _folder(config, model_spec, toy_shards)
        return folder, train(config, model_spec=model_spec, shards_dir=toy_shards,
                             checkpoints_dir=tmp_path / "checkpoints" / folder, output_dir=tmp_path / "models" / folder)

    first_folder, first = run(spec, 2)
    assert first.resumed_from_step is None
    other_folder, fresh = run(other, 2)
    assert other_folder != first_folder
    assert fresh.resumed_from_step is None and fresh.steps == 2, "a new revision starts over, it is not refused"
    again_folder, resumed = run(spec, 4)
    assert again_folder == first_folder
    assert resumed.resumed_from_step == 2 and resumed.steps == 4
    # The core still refuses checkpoints of another identity put in its folder by hand.
    with pytest.raises(TrainConfigError, match="revision"):
        run(other, 6, folder=first_folder)
