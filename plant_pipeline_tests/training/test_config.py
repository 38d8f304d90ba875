"""TrainConfig rejects values that cannot work when it is made, or in train() before the model loads."""

from __future__ import annotations

import pytest

from plant_pipeline.ml.model.spec import ModelSpec
from plant_pipeline.ml.training import TrainConfig, TrainConfigError, train


@pytest.mark.parametrize("kwargs, match", [
    ({"weight_decay": float("nan")}, "weight_decay must be a finite number >= 0; got nan"),
    ({"weight_decay": float("inf")}, "weight_decay must be a finite number >= 0; got inf"),
    ({"weight_decay": -0.1}, "weight_decay must be a finite number >= 0"),
    ({"max_grad_norm": float("nan")}, "max_grad_norm must be a finite number >= 0; got nan"),
    ({"max_grad_norm": float("inf")}, "max_grad_norm must be a finite number >= 0; got inf"),
    ({"num_train_epochs": float("inf")}, "num_train_epochs must be a finite number > 0"),
    ({"max_steps": 10, "warmup_steps": 11}, "warmup_steps=11 is beyond max_steps=10"),
])
def test_values_that_cannot_work_are_rejected_when_made(kwargs, match):
    with pytest.raises(TrainConfigError, match=match):
        TrainConfig(**kwargs)


def test_edge_values_that_work_are_accepted():
    TrainConfig(max_steps=10, warmup_steps=10, weight_decay=0.0, max_grad_norm=0.0)
    TrainConfig(max_steps=10, warmup_steps=50, num_train_epochs=3.0)  # checked once train() knows the steps


def test_warmup_beyond_the_steps_that_epochs_make_fails_before_the_model_loads(tiny_model_dir, toy_shards, tmp_path,
                                                                              monkeypatch):
    spec = ModelSpec(model_name=str(tiny_model_dir), device="cpu", local_files_only=True)
    monkeypatch.setattr(ModelSpec, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    # 32 train samples / batch 4 x 0.5 epochs = 4 steps
    config = TrainConfig(num_train_epochs=0.5, per_device_train_batch_size=4, warmup_steps=5,
                         dataloader_num_workers=0)
    with pytest.raises(TrainConfigError, match=r"warmup_steps=5 is beyond max_steps=4 \(from num_train_epochs=0.5\)"):
        train(config, model_spec=spec, shards_dir=toy_shards, checkpoints_dir=tmp_path / "ck",
              output_dir=tmp_path / "model")
    assert not (tmp_path / "ck").exists()
