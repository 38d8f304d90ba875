"""The model card (README.md) of a promoted model: what it was trained from and on, how, how well it did on the
test split and where it does worst, what it is for and not for, and how to use it."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import pandas as pd

from plant_pipeline.ml.data.categories import CategoryMap
from plant_pipeline.ml.serving.registry import ModelInfo

WEAKEST = 10  # categories listed in the card, worst first


def _cell(value: Any, digits: int = 3) -> str:
    """A Markdown table cell: numbers rounded, missing values as n/a, pipes escaped (category names are data)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def _table(rows: list[tuple[str, Any]]) -> list[str]:
    return ["| | |", "|---|---|", *(f"| {name} | {_cell(value)} |" for name, value in rows)]


def _fine_tuning(meta: Mapping[str, Any], config: Mapping[str, Any]) -> str | None:
    kind = meta.get("kind")
    if kind is None and "use_lora" not in config:
        return None  # not recorded: say nothing rather than guess
    if kind == "full" or (kind is None and config.get("use_lora") is False):
        return "full (every trainable weight)"
    lora = f"LoRA (rank {config.get('lora_r', '?')}, alpha {config.get('lora_alpha', '?')})"
    return f"{lora}, merged into the base weights" if kind == "merged" else f"{lora} adapter on the base model"


def _training_rows(meta: Mapping[str, Any]) -> list[tuple[str, Any]]:
    config = meta.get("train_config") or {}
    steps = meta.get("steps")
    if steps is not None and meta.get("max_steps") not in (None, steps):
        steps = f"{steps} of {meta['max_steps']}"
    if meta.get("stopped_early"):
        steps = f"{steps} (stopped early: {meta.get('stop_reason') or 'no reason recorded'})"
    per_device = config.get("per_device_train_batch_size")
    batch = None
    if per_device is not None:
        accumulation, world = config.get("gradient_accumulation_steps", 1), meta.get("world_size", 1)
        batch = f"{per_device * accumulation * world} ({per_device} per device x {accumulation} accumulation x " \
                f"{world} process{'es' if world != 1 else ''})"
    rate = config.get("learning_rate")
    rows = [("Fine-tuning", _fine_tuning(meta, config)), ("Steps", steps),
            ("Learning rate", f"{rate:g}" if isinstance(rate, (int, float)) else rate), ("Batch size", batch), ("dtype", meta.get("dtype")),
            ("Device", meta.get("device")), ("Final validation loss", meta.get("final_validation_loss")),
            ("Kept weights of step", meta.get("best_step")), ("Training time (s)", meta.get("seconds"))]
    if isinstance(rows[-1][1], float):
        rows[-1] = (rows[-1][0], round(rows[-1][1]))
    return [(name, value) for name, value in rows if value is not None]


def _weakest(per_class: pd.DataFrame, limit: int) -> list[str]:
    scored = per_class[per_class["test_images"] > 0].sort_values(["accuracy", "category_id"], kind="stable")
    lines = ["| Category | Test images | Correct | Accuracy | Most often taken for |", "|---|---|---|---|---|"]
    for row in scored.head(limit).itertuples(index=False):
        lines.append(f"| {_cell(row.name)} | {row.test_images} | {row.correct} | {_cell(float(row.accuracy))} | "
                     f"{_cell(row.most_confused_with or '-')} |")
    return lines


def model_card(info: ModelInfo, categories: CategoryMap, *, training_meta: Mapping[str, Any] | None = None,
               per_class: pd.DataFrame | None = None, lineage: Mapping[str, str] | None = None,
               weakest: int = WEAKEST) -> str:
    """README.md text for the promoted model ``info``. ``per_class`` is evaluation's per_class_table (columns
    category_id, name, test_images, correct, accuracy, most_confused_with); ``lineage`` names where the model and
    its evaluation came from (shown as given)."""
    metrics = info.metrics
    lines = [
        f"# Plant identifier {info.model_id}",
        "",
        (f"A LLaVA vision-language model fine-tuned to answer *{_cell(categories.question)}* with one of "
         f"{len(categories)} plant categories. Promoted {info.promoted_at or 'at an unrecorded time'}."),
        "",
        *_table([("Model id", info.model_id), ("Base model", info.base_model),
                 ("Data source", categories.source), ("Data version", f"{info.data_version} (the shards' index)"),
                 ("Categories", len(categories))]),
        "",
        "## Training",
        "",
    ]
    rows = _training_rows(training_meta or {})
    lines += _table(rows) if rows else ["No training record (training_meta.json) came with this model."]
    lines += ["", "## Test metrics", "",
              *_table([("Top-1 accuracy", metrics.get("top1_accuracy")),
                       ("Macro accuracy (mean over categories)", metrics.get("macro_accuracy")),
                       ("Top-5 accuracy", metrics.get("top5_accuracy")),
                       ("Test images", metrics.get("num_test_images"))]),
              ""]
    if per_class is not None and len(per_class):
        lines += [f"## Weakest {min(weakest, int((per_class['test_images'] > 0).sum()))} categories", "",
                  *_weakest(per_class, weakest), ""]
    lines += [
        "## Intended use",
        "",
        (f"Research and hobby use: suggesting which of these {len(categories)} categories a photo of a plant "
         "shows, with scores a person weighs before trusting the answer."),
        "",
        "## Limits",
        "",
        ("- A research model, measured only on the test split above; photos unlike the training data (other "
         "cameras, light, seasons, parts of the plant) score lower."),
        (f"- It knows only its {len(categories)} categories: a plant outside them still gets one of their names, "
         "often with a confident score."),
        "- Not for deciding whether a plant is edible, medicinal, poisonous or otherwise safe to touch or eat.",
        "",
        "## How to use",
        "",
        "```bash",
        "plant-pipeline identify photo.jpg            # the production model",
        f"plant-pipeline identify photo.jpg --model {info.model_path or '<this folder>'}",
        "plant-pipeline serve                          # a page and POST /v1/identify on http://127.0.0.1:8000",
        "```",
        "",
        "```python",
        "from plant_pipeline.ml.serving.identifier import Identifier",
        "",
        'identifier = Identifier.load()                # "production", or this folder\'s path',
        'print(identifier.identify("photo.jpg", top_k=5)[0].guesses)',
        "```",
        "",
    ]
    if lineage:
        lines += ["## Lineage", "", *_table(list(lineage.items())), ""]
    return "\n".join(lines)
