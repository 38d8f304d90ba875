"""CustomTrainer and train(): answer-token loss, learning, saving and reloading, resume after a kill, fail-fast."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from plant_pipeline.ml.files import sha256_file
from plant_pipeline.ml.model.spec import ModelSpec
from plant_pipeline.ml.shards.format import split_shard_paths
from plant_pipeline.ml.training import (
    ShardIntegrityError,
    TrainConfig,
    TrainConfigError,
    labelled_token_loss,
    load_trained,
    make_stream,
    memory_efficient_collate_fn,
    train,
)
from plant_pipeline.ml.training.checkpoints import checkpoint_is_complete, find_resumable_checkpoint
from plant_pipeline.ml.training.streaming import StreamConfigError
from plant_pipeline.ml.training.trainer import CustomTrainer, NonFiniteLossError

REPO = Path(__file__).resolve().parents[2]
FAST = dict(per_device_train_batch_size=4, per_device_eval_batch_size=8, learning_rate=3e-3, warmup_ratio=0.0,
            lr_scheduler_type="constant", dataloader_num_workers=0, shuffle_buffer=16, logging_steps=5,
            max_eval_samples=8)


@pytest.fixture(scope="module")
def val_batch(toy_shards, tiny_processor):
    samples = list(make_stream(split_shard_paths(toy_shards, "validation"), shuffle=False))
    return memory_efficient_collate_fn(tiny_processor)(samples)


def _validation_loss(model, batch) -> float:
    with torch.no_grad():
        total, count, _ = labelled_token_loss(model, batch)
    return float(total) / int(count)


# ---- the loss -------------------------------------------------------------------------------------

def test_compute_loss_matches_the_models_full_logits_loss(spec, val_batch, tmp_path, toy_shards, tiny_processor):
    from peft import LoraConfig, get_peft_model
    from transformers import TrainingArguments

    model = spec.load_model()
    inputs = {k: val_batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "labels")}
    reference = model(**inputs).loss  # full logits, shifted cross-entropy, mean over answer tokens
    trainer = CustomTrainer(model=model, args=TrainingArguments(tmp_path, report_to="none", use_cpu=True))
    loss, outputs = trainer.compute_loss(model, val_batch, return_outputs=True)
    assert abs(loss.item() - reference.item()) < 1e-5
    # The kept logits are exactly the full logits at the positions that predict an answer token.
    full = model(**{k: v for k, v in inputs.items() if k != "labels"}).logits
    answer = val_batch["labels"][:, 1:] != -100
    columns = answer.any(dim=0).nonzero().squeeze(1)
    assert outputs["logits"].shape[1] == len(columns) < full.shape[1] / 4
    assert torch.allclose(outputs["logits"], full[:, columns], atol=1e-5)
    # With num_items_in_batch (gradient accumulation), the sum is divided by the whole batch's token count.
    n = int(answer.sum())
    assert abs(trainer.compute_loss(model, val_batch, num_items_in_batch=2 * n).item() - reference.item() / 2) < 1e-5
    # uint8 pixels (defer_pixel_normalization) are expanded by the trainer to the same loss; without the
    # collator's table the error says what to pass.
    deferred = dict(val_batch, pixel_values=torch.from_numpy(np.stack(
        [s.pixels for s in make_stream(split_shard_paths(toy_shards, "validation"), shuffle=False)])))
    assert deferred["pixel_values"].dtype == torch.uint8
    assert trainer.pixel_normalizer is None
    with pytest.raises(ValueError, match="pixel_normalizer"):
        trainer.compute_loss(model, deferred)
    trainer.pixel_normalizer = memory_efficient_collate_fn(tiny_processor).normalizer
    assert abs(trainer.compute_loss(model, deferred).item() - reference.item()) < 1e-5
    # Through a PEFT wrapper (adapters start as the identity) the loss is unchanged.
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert abs(trainer.compute_loss(peft_model, val_batch).item() - reference.item()) < 1e-5


def test_get_batch_samples_counts_answer_tokens_of_every_batch(spec, val_batch, tmp_path):
    from transformers import TrainingArguments

    trainer = CustomTrainer(model=spec.load_model(), args=TrainingArguments(tmp_path, report_to="none", use_cpu=True))
    batches, count = trainer.get_batch_samples(iter([val_batch, val_batch]), 3, trainer.args.device)
    assert len(batches) == 2 and batches[0]["sample_keys"] == val_batch["sample_keys"]
    assert int(count) == 2 * int((val_batch["labels"][:, 1:] != -100).sum())


def test_gradient_accumulation_weighs_every_answer_token_equally(spec, toy_shards, tiny_processor, tmp_path):
    """One optimizer step over 8 samples: 2 micro-batches of 4 give the same update as 1 batch of 8.

    The samples' answers differ in length, so averaging per micro-batch (the Trainer's default) would not.
    """
    from transformers import TrainingArguments

    samples = list(make_stream(split_shard_paths(toy_shards, "train"), shuffle=False))[:8]
    collate = memory_efficient_collate_fn(tiny_processor)
    answers = [int((s.labels != -100).sum()) for s in samples]
    assert len(set(answers[:4])) > 1 or sum(answers[:4]) != sum(answers[4:]), "the test needs uneven answers"

    def one_step(batch_size: int, accumulation: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = spec.load_model()
        args = TrainingArguments(tmp_path / f"b{batch_size}", report_to="none", use_cpu=True, max_steps=1,
                                 per_device_train_batch_size=batch_size, gradient_accumulation_steps=accumulation,
                                 optim="sgd", learning_rate=1.0, lr_scheduler_type="constant", max_grad_norm=0.0,
                                 save_strategy="no", disable_tqdm=True, remove_unused_columns=False,
                                 label_names=["labels"], dataloader_num_workers=0, seed=0)
        stream = make_stream(split_shard_paths(toy_shards, "train"), shuffle=False, epochs=1)
        before = {k: v.detach().clone() for k, v in model.named_parameters()}
        CustomTrainer(model=model, args=args, data_collator=collate, train_dataset=stream).train()
        # With plain SGD at learning rate 1 the change of each parameter is minus its gradient.
        return {k: before[k] - v.detach() for k, v in model.named_parameters()}

    whole, accumulated = one_step(8, 1), one_step(4, 2)
    assert sum(float(g.abs().sum()) for g in whole.values()) > 0
    differ = [k for k in whole if not torch.allclose(whole[k], accumulated[k], rtol=1e-4, atol=1e-7)]
    assert not differ, f"gradients differ: {differ[:5]}"


# ---- a LoRA run, shared by several tests ----------------------------------------------------------

@pytest.fixture(scope="module")
def lora_run(spec, toy_shards, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_run")
    events: list[dict] = []
    cleanups: list[int] = []
    with pytest.MonkeyPatch.context() as mp:
        import plant_pipeline.ml.training.trainer as trainer_module

        real_collect = trainer_module.gc.collect
        mp.setattr(trainer_module.gc, "collect", lambda *a: cleanups.append(1) or real_collect(*a))
        config = TrainConfig(max_steps=12, save_steps=6, eval_steps=6, memory_cleanup_steps=3,
                             **{**FAST, "logging_steps": 3})
        result = train(config, model_spec=spec, shards_dir=toy_shards, checkpoints_dir=root / "checkpoints",
                       output_dir=root / "model", on_log=events.append)
    return result, events, cleanups


def test_lora_training_lowers_validation_loss(lora_run):
    result, _, _ = lora_run
    assert result.steps == 12 and result.resumed_from_step is None
    assert result.final_validation_loss < result.initial_validation_loss - 0.3
    assert 0 < result.trainable_params < result.total_params / 5
    assert result.samples_per_second > 0 and result.peak_memory_mb > 50
    assert result.device == "cpu" and result.dtype == "float32"
    steps_logged = [e["step"] for e in result.log_history if "loss" in e]
    assert steps_logged == [1, 3, 6, 9, 12]
    assert [e["step"] for e in result.log_history if "eval_loss" in e] == [0, 6, 12]


def test_lora_parameters_changed(lora_run, spec):
    from safetensors.torch import load_file

    result, _, _ = lora_run
    weights = load_file(Path(result.model_path) / "adapter_model.safetensors")
    lora_b = [v for k, v in weights.items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b)  # LoRA B starts at zero
    lora_layers = {k.split(".lora_")[0] for k in weights if ".lora_" in k}
    assert lora_layers and all(".language_model." in k and k.endswith(("q_proj", "k_proj", "v_proj", "o_proj"))
                               for k in lora_layers)  # not CLIP's q/k/v_proj
    projector = {k: v for k, v in weights.items() if "multi_modal_projector" in k and k.endswith("linear_1.weight")}
    base = spec.load_model().model.multi_modal_projector.linear_1.weight
    assert projector and all(not torch.allclose(v, base) for v in projector.values())


def test_progress_reaches_on_log_and_memory_is_cleaned(lora_run):
    _, events, cleanups = lora_run
    train_events = [e for e in events if "loss" in e]
    assert [e["step"] for e in train_events] == [1, 3, 6, 9, 12]
    assert all(e["max_steps"] == 12 and e["samples_per_second"] > 0 and "eta_seconds" in e for e in train_events)
    assert train_events[-1]["eta_seconds"] == 0
    assert any("eval_loss" in e for e in events)
    assert len(cleanups) >= 3  # after steps 3, 6, 9 (12 ends the run)


def test_saved_adapter_reloads_with_the_same_loss(lora_run, spec, val_batch):
    result, _, _ = lora_run
    path = Path(result.model_path)
    assert (path / "loss_curve.png").stat().st_size > 1000
    meta = json.loads((path / "training_meta.json").read_text())
    assert meta["kind"] == "lora_adapter" and meta["steps"] == 12
    model, processor = load_trained(path, spec)
    assert type(model).__name__ == "PeftModel" and processor.tokenizer.pad_token_id is not None
    assert abs(_validation_loss(model, val_batch) - result.final_validation_loss) < 1e-5
    assert not any(p.name.startswith(".") for p in path.parent.iterdir())  # no temp folder left behind


def test_trained_folder_answers_with_the_categories_it_was_trained_on(lora_run, toy_shards):
    from PIL import Image

    from plant_pipeline.ml.serving.identifier import Identifier
    from plant_pipeline.ml.shards.format import read_categories

    result, _, _ = lora_run
    identifier = Identifier.load(result.model_path, device="cpu")  # a raw trained folder: no categories.json
    assert identifier.categories == read_categories(toy_shards)
    [answer] = identifier.identify(Image.new("RGB", (40, 30), (200, 30, 30)), top_k=3)
    assert len(answer.guesses) == 3 and answer.model_id == Path(result.model_path).name
    assert all(g.name in identifier.categories.names for g in answer.guesses)


# ---- other kinds of run ---------------------------------------------------------------------------

def test_merged_lora_reloads_as_a_plain_model(spec, toy_shards, tmp_path, val_batch):
    # Also: epochs instead of steps (32 train samples / batch 4 / 2 = 4 steps), and gradient checkpointing.
    config = TrainConfig(num_train_epochs=0.5, save_steps=4, eval_steps=0, merge_lora=True,
                         gradient_checkpointing=True, **FAST)
    result = train(config, model_spec=spec, shards_dir=toy_shards, checkpoints_dir=tmp_path / "ck",
                   output_dir=tmp_path / "model")
    assert result.steps == result.max_steps == 4
    assert not (tmp_path / "model" / "adapter_config.json").exists()
    model, _ = load_trained(result.model_path, spec)
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert abs(_validation_loss(model, val_batch) - result.final_validation_loss) < 1e-4
    assert result.final_validation_loss < result.initial_validation_loss


def test_full_fine_tuning_trains_only_the_unfrozen_parts(spec, toy_shards, tmp_path, val_batch):
    config = TrainConfig(max_steps=4, save_steps=4, eval_steps=0, use_lora=False, **{**FAST, "learning_rate": 1e-3})
    result = train(config, model_spec=spec, shards_dir=toy_shards, checkpoints_dir=tmp_path / "ck",
                   output_dir=tmp_path / "model")
    base = spec.load_model()
    model, _ = load_trained(result.model_path, spec)
    vision = sum(p.numel() for p in base.model.vision_tower.parameters())
    assert result.trainable_params == result.total_params - vision
    assert torch.equal(model.model.vision_tower.embeddings.patch_embedding.weight,
                       base.model.vision_tower.embeddings.patch_embedding.weight)
    assert not torch.equal(model.lm_head.weight, base.lm_head.weight)
    assert abs(_validation_loss(model, val_batch) - result.final_validation_loss) < 1e-5
    assert result.final_validation_loss < result.initial_validation_loss


def test_bfloat16_is_allowed_on_cpu(spec, toy_shards, tmp_path):
    config = TrainConfig(max_steps=3, save_steps=3, eval_steps=0, dtype="bfloat16", **FAST)
    result = train(config, model_spec=spec, shards_dir=toy_shards, checkpoints_dir=tmp_path / "ck",
                   output_dir=tmp_path / "model")
    assert result.dtype == "bfloat16" and result.steps == 3
    assert result.final_validation_loss < result.initial_validation_loss


# ---- resume after a kill --------------------------------------------------------------------------

CHILD = textwrap.dedent("""
    import sys, time
    from plant_pipeline.ml.training.trainer import CustomTrainer
    from plant_pipeline.ml.model.spec import ModelSpec
    from plant_pipeline.ml.training import TrainConfig, train
    step = CustomTrainer.training_step
    def slow_step(self, *args, **kwargs):  # leaves time to kill the run between checkpoints
        time.sleep(0.25)
        return step(self, *args, **kwargs)
    CustomTrainer.training_step = slow_step
    config = TrainConfig(max_steps=12, save_steps=4, eval_steps=0, **{fast})
    train(config, model_spec=ModelSpec(model_name=sys.argv[1], device="cpu", local_files_only=True),
          shards_dir=sys.argv[2], checkpoints_dir=sys.argv[3], output_dir=sys.argv[4])
""")


def test_killed_run_resumes_from_its_last_complete_checkpoint(spec, toy_shards, tmp_path):
    checkpoints, output = tmp_path / "checkpoints", tmp_path / "model"
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD.format(fast=repr(FAST)), spec.model_name, str(toy_shards), str(checkpoints),
         str(output)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and child.poll() is None:
            done = find_resumable_checkpoint(checkpoints)
            if done is not None:
                break
            time.sleep(0.05)
        assert child.poll() is None, f"the run ended before it could be killed: {child.stderr.read().decode()[-2000:]}"
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
    killed_at = int(find_resumable_checkpoint(checkpoints).name.split("-")[1])
    assert 4 <= killed_at < 12 and not output.exists()

    config = TrainConfig(max_steps=12, save_steps=4, eval_steps=0, **FAST)
    result = train(config, model_spec=spec, shards_dir=toy_shards, checkpoints_dir=checkpoints, output_dir=output)
    assert result.resumed_from_step is not None and result.resumed_from_step >= killed_at
    assert result.steps == 12
    state = json.loads((checkpoints / "checkpoint-12" / "trainer_state.json").read_text())
    assert state["global_step"] == 12
    logged = [e["step"] for e in result.log_history if "loss" in e]
    assert logged == sorted(logged) and logged[-1] == 12 and 1 in logged  # history spans both runs
    assert result.final_validation_loss < result.initial_validation_loss

    # A changed setting must not silently continue these checkpoints.
    with pytest.raises(TrainConfigError, match="learning_rate"):
        train(TrainConfig(max_steps=16, save_steps=4, eval_steps=0, **{**FAST, "learning_rate": 1e-4}),
              model_spec=spec, shards_dir=toy_shards, checkpoints_dir=checkpoints, output_dir=output)


def test_checkpoint_completeness(tmp_path):
    from safetensors.torch import save_file

    def make(step: int, files: list[str], state_step: int | None = None) -> Path:
        path = tmp_path / f"checkpoint-{step}"
        path.mkdir()
        for name in files:  # well-formed files: find_resumable_checkpoint also checks their structure
            if name.endswith(".safetensors"):
                save_file({"w": torch.zeros(2)}, path / name)
            else:
                torch.save({"step": step}, path / name)
        if state_step is not None:
            (path / "trainer_state.json").write_text(json.dumps({"global_step": state_step}))
        return path

    full = ["adapter_model.safetensors", "optimizer.pt", "scheduler.pt"]
    good = make(5, full, 5)
    no_state = make(10, full)  # killed before trainer_state.json
    no_optimizer = make(15, ["adapter_model.safetensors", "scheduler.pt"], 15)
    wrong_step = make(20, full, 19)
    assert checkpoint_is_complete(good)
    assert not any(checkpoint_is_complete(p) for p in (no_state, no_optimizer, wrong_step))
    (tmp_path / "checkpoint-25").mkdir()
    (tmp_path / "checkpoint-25" / "trainer_state.json").write_text('{"global_st')  # cut off mid-write
    assert find_resumable_checkpoint(tmp_path) == good


# ---- failing fast ---------------------------------------------------------------------------------

def _copied_shards(toy_shards: Path, tmp_path: Path) -> tuple[Path, dict]:
    shards = tmp_path / "shards"
    shutil.copytree(toy_shards, shards)
    return shards, json.loads((shards / "index.json").read_text())


def test_a_damaged_shard_fails_before_the_model_loads(spec, toy_shards, tmp_path, monkeypatch):
    shards, index = _copied_shards(toy_shards, tmp_path)
    entry = index["splits"]["train"]["shards"][1]
    path = shards / entry["file"]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit: same size, other content
    path.write_bytes(bytes(data))
    monkeypatch.setattr(ModelSpec, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(ShardIntegrityError) as caught:
        train(TrainConfig(max_steps=2, **FAST), model_spec=spec, shards_dir=shards, checkpoints_dir=tmp_path / "ck",
              output_dir=tmp_path / "model")
    message = str(caught.value)
    assert str(path) in message and entry["sha256"] in message and sha256_file(path) in message
    assert "rematerialise flower_shards" in message
    assert not (tmp_path / "ck").exists()


def test_a_missing_shard_is_a_usage_error_of_the_cli(spec, toy_shards, tmp_path, capsys):
    from plant_pipeline.ml.training.cli import RunFile, main

    shards, index = _copied_shards(toy_shards, tmp_path)
    missing = shards / index["splits"]["validation"]["shards"][0]["file"]
    missing.unlink()
    run_file = RunFile(train=TrainConfig(max_steps=2, **FAST), model=spec, shards_dir=str(shards),
                       checkpoints_dir=str(tmp_path / "ck"), output_dir=str(tmp_path / "model"))
    (tmp_path / "run.json").write_text(json.dumps(run_file.to_json()))
    assert main(["--config", str(tmp_path / "run.json")]) == 2
    error = capsys.readouterr().err
    assert "ShardIntegrityError" in error and str(missing) in error and "missing" in error

def test_non_finite_loss_stops_before_saving(spec, toy_shards, tmp_path, monkeypatch):
    real = CustomTrainer.compute_loss

    def poisoned(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = real(self, model, inputs, return_outputs, num_items_in_batch)
        return loss * float("nan") if self.state.global_step >= 4 else loss

    monkeypatch.setattr(CustomTrainer, "compute_loss", poisoned)
    config = TrainConfig(max_steps=8, save_steps=2, eval_steps=0, **FAST)
    with pytest.raises(NonFiniteLossError) as caught:
        train(config, model_spec=spec, shards_dir=toy_shards, checkpoints_dir=tmp_path / "ck",
              output_dir=tmp_path / "model")
    error = caught.value
    assert error.step == 5 and "step 5" in str(error)
    assert len(error.sample_keys) == 4 and all(k.startswith("image_") and k in str(error) for k in error.sample_keys)
    saved = sorted(int(p.name.split("-")[1]) for p in (tmp_path / "ck").glob("checkpoint-*"))
    assert saved == [2, 4]
    assert not (tmp_path / "model").exists()


@pytest.mark.parametrize("kwargs, match", [
    ({"per_device_train_batch_size": 0}, "per_device_train_batch_size must be a positive integer"),
    ({"max_steps": 0}, "max_steps"),
    ({"use_lora": True, "freeze_language_model": True}, "freeze_language_model"),
    ({"use_lora": False, "merge_lora": True}, "merge_lora"),
    ({"dtype": "fp8"}, "dtype"),
    ({"lr_scheduler_type": "exponential"}, "lr_scheduler_type"),
    ({"pad_to_multiple_of": 0}, "pad_to_multiple_of must be a positive integer"),
])
def test_invalid_settings_are_rejected_when_made(kwargs, match):
    with pytest.raises(TrainConfigError, match=match):
        TrainConfig(**kwargs)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"lora_target_modules": ["q_proj", "query"]}, TrainConfigError, r"\['query'\].*available: .*o_proj"),
    ({"dtype": "float16"}, TrainConfigError, "float16 training needs a GPU"),
    ({"dataloader_num_workers": 8}, StreamConfigError, "min_shards"),
])
def test_settings_that_do_not_fit_the_model_or_machine_fail_before_work(spec, toy_shards, tmp_path, kwargs, error,
                                                                          match):
    with pytest.raises(error, match=match):
        train(TrainConfig(max_steps=5, **{**FAST, **kwargs}), model_spec=spec, shards_dir=toy_shards,
              checkpoints_dir=tmp_path / "ck", output_dir=tmp_path / "model")
    assert not (tmp_path / "ck").exists() and not (tmp_path / "model").exists()


# ---- compile_blocks ---------------------------------------------------------------------------------


# ~6 s of torch.compile on a CPU: -m slow (compile_blocks is for CUDA; bench/gpu_train.py runs it there).
@pytest.mark.slow
def test_compiled_blocks_give_the_eager_loss_and_gradients(spec, val_batch):
    from plant_pipeline.ml.training.compile import compile_blocks

    def loss_and_grads(model):
        model.zero_grad()
        total, count, _ = labelled_token_loss(model, val_batch)
        (total / count).backward()
        return float(total / count), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    torch.manual_seed(0)
    model = spec.load_model(device="cpu", dtype=torch.float32)
    names_before = [name for name, _ in model.named_parameters()]
    eager_loss, eager_grads = loss_and_grads(model)
    config = model.config
    layers = config.vision_config.num_hidden_layers + config.text_config.num_hidden_layers
    # aot_eager runs dynamo and AOT autograd (the graph capture and the backward split) without generating C++.
    assert compile_blocks(model, backend="aot_eager") == layers
    compiled_loss, compiled_grads = loss_and_grads(model)
    assert compiled_loss == pytest.approx(eager_loss, rel=1e-6)
    assert compiled_grads.keys() == eager_grads.keys() and len(eager_grads) > 0
    for name, grad in eager_grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)
    # nn.Module.compile keeps the parameter names, so checkpoints and save_pretrained are unchanged
    assert [name for name, _ in model.named_parameters()] == names_before


def test_compile_blocks_pads_to_a_few_shapes_unless_told_otherwise():
    assert TrainConfig().padding_multiple() is None
    assert TrainConfig(compile_blocks=True).padding_multiple() == 64
    assert TrainConfig(compile_blocks=True, pad_to_multiple_of=8).padding_multiple() == 8
    assert TrainConfig(pad_to_multiple_of=16).padding_multiple() == 16
