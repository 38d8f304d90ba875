"""Resuming train(): an interrupted run, resumed, ends with the uninterrupted run's weights; a finished run is never
retrained into another model; checkpoints that do not load are named and skipped; weights that do not fit fail."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from plant_pipeline.ml.testing import write_toy_shards
from plant_pipeline.ml.training import CheckpointError, TrainConfig, configure_trainable, train
from plant_pipeline.ml.training.checkpoints import CHECKPOINT_MANIFEST, find_resumable_checkpoint
from plant_pipeline.ml.training.trainer import CustomTrainer

# One train shard of 8 samples, batches of 8 and no shuffle buffer: every step sees the same batch whatever the
# stream's seed, so a resumed run (which reads a fresh shuffle) must match an uninterrupted one exactly.
RUN = dict(max_steps=4, save_steps=2, eval_steps=0, per_device_train_batch_size=8, per_device_eval_batch_size=8,
           learning_rate=3e-3, lr_scheduler_type="linear", warmup_steps=1, dataloader_num_workers=0,
           shuffle_buffer=1, logging_steps=1, max_eval_samples=8)


@pytest.fixture(scope="module")
def one_shard(tmp_path_factory, tiny_processor) -> Path:
    return write_toy_shards(tmp_path_factory.mktemp("one_shard"), tiny_processor,
                            per_class={"train": 2, "validation": 2})


class Killed(Exception):
    """Stands for a SIGKILL: the process state is gone, the checkpoints on disk stay."""


def _kill_after(monkeypatch, step: int) -> None:
    real = CustomTrainer.training_step

    def step_then_die(self, *args, **kwargs):
        if self.state.global_step >= step:  # checkpoint-<step> is written by now
            raise Killed(f"killed before step {step + 1}")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(CustomTrainer, "training_step", step_then_die)


def _weights(output: Path) -> dict[str, torch.Tensor]:
    files = sorted(output.glob("*.safetensors"))
    assert len(files) == 1, files
    return load_file(files[0])


def _assert_same_weights(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    differ = {k: float((actual[k] - expected[k]).abs().max())
              for k in expected if not torch.equal(actual[k], expected[k])}
    assert not differ, f"{len(differ)} tensors differ, largest: {sorted(differ.items(), key=lambda kv: -kv[1])[:3]}"


@pytest.mark.parametrize("use_lora", [False, True], ids=["full", "lora"])
def test_resumed_and_finished_runs_give_the_uninterrupted_weights(spec, one_shard, tmp_path, monkeypatch, use_lora):
    config = TrainConfig(use_lora=use_lora, **RUN)

    def run(name: str):
        return train(config, model_spec=spec, shards_dir=one_shard, checkpoints_dir=tmp_path / name / "ck",
                     output_dir=tmp_path / name / "model")

    whole = run("whole")
    expected = _weights(tmp_path / "whole" / "model")
    base = spec.load_model().state_dict()
    assert not use_lora or any("lora_B" in k and v.abs().sum() > 0 for k, v in expected.items())
    assert use_lora or not torch.equal(expected["language_model.lm_head.weight"], base["lm_head.weight"])

    with monkeypatch.context() as patch:
        _kill_after(patch, 2)
        with pytest.raises(Killed):
            run("resumed")
    assert find_resumable_checkpoint(tmp_path / "resumed" / "ck").name == "checkpoint-2"
    assert not (tmp_path / "resumed" / "model").exists()
    resumed = run("resumed")
    assert resumed.resumed_from_step == 2 and resumed.steps == 4
    _assert_same_weights(_weights(tmp_path / "resumed" / "model"), expected)
    assert resumed.final_validation_loss == pytest.approx(whole.final_validation_loss, abs=1e-6)

    # Run again once finished: the result is kept as it is (not even rewritten).
    written = (tmp_path / "resumed" / "model" / "training_meta.json").stat()
    again = run("resumed")
    kept = (tmp_path / "resumed" / "model" / "training_meta.json").stat()
    assert (kept.st_ino, kept.st_mtime_ns) == (written.st_ino, written.st_mtime_ns)
    assert again.resumed_from_step == again.steps == 4  # resumed at the end: nothing left to train
    _assert_same_weights(_weights(tmp_path / "resumed" / "model"), expected)
    assert again.final_validation_loss == pytest.approx(whole.final_validation_loss, abs=1e-6)

    # Killed while writing the result: the final checkpoint's weights become the result, not the base model's.
    shutil.rmtree(tmp_path / "resumed" / "model")
    rebuilt = run("resumed")
    assert rebuilt.resumed_from_step == rebuilt.steps == 4
    _assert_same_weights(_weights(tmp_path / "resumed" / "model"), expected)
    assert rebuilt.final_validation_loss == pytest.approx(whole.final_validation_loss, abs=1e-6)


@pytest.mark.parametrize("use_lora", [False, True], ids=["full", "lora"])
def test_weights_that_do_not_fit_the_model_fail_naming_file_and_keys(spec, tmp_path, use_lora):
    from transformers import TrainingArguments

    model = configure_trainable(spec.load_model(), TrainConfig(use_lora=use_lora, **RUN))
    model.save_pretrained(tmp_path / "ck")
    weights_file = tmp_path / "ck" / ("adapter_model.safetensors" if use_lora else "model.safetensors")
    weights = load_file(weights_file)
    dropped = next(k for k in weights if k.endswith(("norm.weight", "v_proj.lora_A.weight")))
    weights[dropped.replace(".weight", ".surplus")] = weights.pop(dropped)
    save_file(weights, weights_file, metadata={"format": "pt"})
    trainer = CustomTrainer(model=model, args=TrainingArguments(tmp_path / "out", report_to="none", use_cpu=True))
    with pytest.raises(CheckpointError) as caught:
        trainer.restore_checkpoint(tmp_path / "ck")
    message = str(caught.value)
    assert str(weights_file) in message and "missing keys" in message and "unexpected keys" in message
    assert dropped.rsplit(".", 2)[-2] in message and ".surplus" in message


# ---- damaged checkpoints --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def two_checkpoints(spec, one_shard, tmp_path_factory) -> Path:
    """checkpoints_dir of a finished 4-step LoRA run that kept checkpoint-2 and checkpoint-4."""
    root = tmp_path_factory.mktemp("two_checkpoints")
    train(TrainConfig(save_total_limit=None, **RUN), model_spec=spec, shards_dir=one_shard,
          checkpoints_dir=root / "ck", output_dir=root / "model")
    assert sorted(p.name for p in (root / "ck").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert all((root / "ck" / name / CHECKPOINT_MANIFEST).is_file() for name in ("checkpoint-2", "checkpoint-4"))
    return root / "ck"


def _truncate(file: Path) -> None:
    file.write_bytes(file.read_bytes()[:-100])


def _flip_middle_byte(file: Path) -> None:
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    file.write_bytes(bytes(data))


DAMAGE = {
    # with the manifest: sizes and digests
    "weights truncated": ("adapter_model.safetensors", _truncate, False, "bytes"),
    "optimizer byte flipped": ("optimizer.pt", _flip_middle_byte, False, "sha256"),
    # without (a checkpoint of an older run, or cut off before the manifest): the files' structure
    "weights truncated, no manifest": ("adapter_model.safetensors", _truncate, True, "header promises"),
    "optimizer truncated, no manifest": ("optimizer.pt", _truncate, True, "not a readable torch file"),
    "scheduler garbled, no manifest": ("scheduler.pt", lambda f: f.write_bytes(b"garbage" * 20), True,
                                       "not a readable torch file"),
    # trainer_state.json is written last by the Trainer: a broken one is an interrupted save
    "trainer state garbled": ("trainer_state.json", lambda f: f.write_text('{"global_step": 4, "log_hi'), False,
                              "does not parse"),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_a_damaged_newest_checkpoint_is_named_and_the_older_one_resumed(spec, one_shard, two_checkpoints, tmp_path,
                                                                        caplog, case):
    name, damage, drop_manifest, why = DAMAGE[case]
    checkpoints = tmp_path / "ck"
    shutil.copytree(two_checkpoints, checkpoints)
    damage(checkpoints / "checkpoint-4" / name)
    if drop_manifest:
        (checkpoints / "checkpoint-4" / CHECKPOINT_MANIFEST).unlink()
    with caplog.at_level(logging.WARNING, logger="plant_pipeline.ml.training.checkpoints"):
        result = train(TrainConfig(save_total_limit=None, **RUN), model_spec=spec, shards_dir=one_shard,
                       checkpoints_dir=checkpoints, output_dir=tmp_path / "model")
    assert result.resumed_from_step == 2 and result.steps == 4
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and name in r.getMessage()]
    assert warned and why in warned[0] and str(checkpoints / "checkpoint-4" / name) in warned[0], caplog.text
    # The run saved step 4 again over the damaged files: the checkpoint checks out now.
    assert find_resumable_checkpoint(checkpoints) == checkpoints / "checkpoint-4"


def test_no_loadable_checkpoint_is_an_error_naming_the_files(spec, one_shard, two_checkpoints, tmp_path):
    checkpoints = tmp_path / "ck"
    shutil.copytree(two_checkpoints, checkpoints)
    _flip_middle_byte(checkpoints / "checkpoint-4" / "adapter_model.safetensors")
    _truncate(checkpoints / "checkpoint-2" / "optimizer.pt")
    with pytest.raises(CheckpointError) as caught:
        train(TrainConfig(save_total_limit=None, **RUN), model_spec=spec, shards_dir=one_shard,
              checkpoints_dir=checkpoints, output_dir=tmp_path / "model")
    message = str(caught.value)
    assert str(checkpoints / "checkpoint-4" / "adapter_model.safetensors") in message
    assert str(checkpoints / "checkpoint-2" / "optimizer.pt") in message and "resume=False" in message
    assert sorted(p.name for p in checkpoints.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]  # kept
    assert not (tmp_path / "model").exists()
