"""The model card of a promoted model: lineage, training settings, test metrics, weakest categories, use and limits."""

from __future__ import annotations

import pandas as pd

from plant_pipeline.ml.data.categories import CategoryMap
from plant_pipeline.ml.evaluation.metrics import per_class_table
from plant_pipeline.ml.serving.model_card import model_card
from plant_pipeline.ml.serving.registry import ModelInfo

NAMES = tuple(f"plant {i:02d}" for i in range(14)) + ("odd | name",)
CATEGORIES = CategoryMap(NAMES, question="Which plant is in this photo?", source="image_folder")
INFO = ModelInfo(model_id="20261203-141502-3fa9c2d1", base_model="llava-hf/llava-interleave-qwen-0.5b-hf",
                 data_version="0123456789ab", promoted_at="2026-12-03T14:15:02+00:00",
                 metrics={"top1_accuracy": 0.4123, "macro_accuracy": 0.3988, "top5_accuracy": 0.8, "num_test_images": 75},
                 model_path="/data/production/models/20261203-141502-3fa9c2d1")
LORA_META = {"kind": "lora_adapter", "steps": 200, "max_steps": 200, "device": "cuda:0", "dtype": "bfloat16",
             "world_size": 2, "final_validation_loss": 0.731, "seconds": 812.4,
             "train_config": {"use_lora": True, "lora_r": 16, "lora_alpha": 32, "learning_rate": 0.0002,
                              "per_device_train_batch_size": 8, "gradient_accumulation_steps": 4}}


def _per_class() -> pd.DataFrame:
    # Category i has 5 test images, i // 2 of them right (at most 5): the lowest ids are the weakest.
    rows = []
    for label in range(len(NAMES)):
        for k in range(5):
            right = k < min(label // 2, 5)
            rows.append({"label": label, "predicted_label": label if right else (label + 1) % len(NAMES),
                         "correct": right})
    return per_class_table(pd.DataFrame(rows), NAMES)


def _section(card: str, title: str) -> str:
    return card.split(f"## {title}", 1)[1].split("\n## ", 1)[0]


def test_the_card_names_the_model_its_data_and_its_training():
    card = model_card(INFO, CATEGORIES, training_meta=LORA_META, per_class=_per_class())
    assert card.startswith("# Plant identifier 20261203-141502-3fa9c2d1\n")
    assert "| Base model | llava-hf/llava-interleave-qwen-0.5b-hf |" in card
    assert "| Data source | image_folder |" in card and "| Data version | 0123456789ab" in card
    assert "| Categories | 15 |" in card and "*Which plant is in this photo?*" in card
    training = _section(card, "Training")
    assert "| Fine-tuning | LoRA (rank 16, alpha 32) adapter on the base model |" in training
    assert "| Steps | 200 |" in training and "| Learning rate | 0.000 |" not in training
    assert "| Learning rate | 0.0002 |" in training
    assert "| Batch size | 64 (8 per device x 4 accumulation x 2 processes) |" in training
    assert "| dtype | bfloat16 |" in training and "| Device | cuda:0 |" in training
    assert "| Training time (s) | 812 |" in training


def test_the_card_holds_the_test_metrics_and_the_ten_weakest_categories():
    card = model_card(INFO, CATEGORIES, training_meta=LORA_META, per_class=_per_class())
    metrics = _section(card, "Test metrics")
    assert "| Top-1 accuracy | 0.412 |" in metrics and "| Macro accuracy (mean over categories) | 0.399 |" in metrics
    assert "| Top-5 accuracy | 0.800 |" in metrics and "| Test images | 75 |" in metrics
    weakest = _section(card, "Weakest 10 categories")
    rows = [line for line in weakest.splitlines() if line.startswith(("| plant", "| odd"))]
    assert [row.split(" | ")[0][2:] for row in rows] == [f"plant {i:02d}" for i in range(10)]
    assert rows[0] == "| plant 00 | 5 | 0 | 0.000 | plant 01 |"
    assert "odd \\| name" not in weakest, "the strongest category is not among the weakest"


def test_the_card_says_what_the_model_is_for_and_how_to_use_it():
    card = model_card(INFO, CATEGORIES)
    limits = _section(card, "Limits")
    assert "research model" in limits.lower()
    assert "outside them still gets one of their names" in limits and "confident" in limits
    assert "edible" in limits and "safe" in limits
    use = _section(card, "How to use")
    assert "plant-pipeline identify photo.jpg" in use and "Identifier.load()" in use
    assert f"--model {INFO.model_path}" in use
    # Without a training record or a per-class table the card says so rather than inventing rows.
    assert "No training record" in _section(card, "Training") and "## Weakest" not in card


def test_full_fine_tuning_and_names_with_pipes_render_as_one_cell():
    card = model_card(INFO, CATEGORIES, training_meta={"kind": "full", "train_config": {"use_lora": False}},
                      per_class=_per_class(), weakest=15, lineage={"Evaluation run": "abc-123"})
    assert "| Fine-tuning | full (every trainable weight) |" in card
    assert "| odd \\| name | 5 | 5 | 1.000 |" in card
    assert "| Evaluation run | abc-123 |" in _section(card, "Lineage")
