"""Promotion: which evaluated model goes into production (decide) and how it gets there (promote: a complete
folder first, the pointer last, old folders pruned but never the one in production)."""

from __future__ import annotations

import json
import os
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from plant_pipeline.ml.data.categories import CategoryMap
from plant_pipeline.ml.errors import UsageError
from plant_pipeline.ml.serving import promotion
from plant_pipeline.ml.serving.promotion import decide, in_production, promote, prune, weights_digest
from plant_pipeline.ml.serving.registry import (
    CATEGORIES_FILE,
    MODEL_CARD_FILE,
    MODEL_INFO_FILE,
    ModelInfo,
    pointer_path,
    read_pointer,
    resolve_model,
    write_pointer,
)
from plant_pipeline.ml.training.results import RESULT_META

CATEGORIES = CategoryMap(("rosa canina", "bellis perennis", "tulipa"), question="What plant is this?",
                         source="image_folder")
T0 = datetime(2026, 12, 3, 14, 15, 2, tzinfo=timezone.utc)


def _production(top1: float, model_id: str = "20261203-141502-3fa9c2d1") -> ModelInfo:
    return ModelInfo(model_id=model_id, base_model="tiny-random-llava", data_version="abc",
                     metrics={"top1_accuracy": top1}, model_path="/somewhere")


@pytest.mark.parametrize("top1, promoted, words", [
    (0.51, True, ["0.510", "0.047 above", "0.463"]),
    (0.45, True, ["0.450", "within the margin 0.02", "0.463"]),
    (0.443, True, ["0.443", "0.020 below"]),  # exactly the margin (float noise tolerated)
    (0.412, False, ["top-1 0.412 is 0.051 below production 20261203-141502-3fa9c2d1 (0.463)",
                    "more than the margin 0.02"]),
])
def test_decide_compares_top1_with_production_within_the_margin(top1, promoted, words):
    decision = decide({"top1_accuracy": top1}, _production(0.463), margin=0.02, checks_passed=True)
    assert decision.promote is promoted
    for word in words:
        assert word in decision.reason


def test_failing_checks_keep_even_a_better_model_out_and_name_the_check():
    decision = decide({"top1_accuracy": 0.9}, _production(0.463), margin=0.02, checks_passed=False,
                      failed_checks=["coverage"])
    assert not decision.promote
    assert "coverage" in decision.reason and "0.900" in decision.reason
    assert "production stays 20261203-141502-3fa9c2d1" in decision.reason


def test_the_first_model_is_promoted_when_its_checks_pass():
    assert decide({"top1_accuracy": 0.01}, None, margin=0.02, checks_passed=True).promote
    refused = decide({"top1_accuracy": 0.01}, None, margin=0.02, checks_passed=False, failed_checks=["accuracy_floor"])
    assert not refused.promote and "accuracy_floor" in refused.reason and "no production model" in refused.reason


@pytest.mark.parametrize("candidate, margin", [({}, 0.02), ({"top1_accuracy": "0.5"}, 0.02),
                                               ({"top1_accuracy": float("nan")}, 0.02),
                                               ({"top1_accuracy": 0.5}, -0.1)])
def test_decide_refuses_what_it_cannot_compare(candidate, margin):
    with pytest.raises(UsageError):
        decide(candidate, _production(0.5), margin=margin, checks_passed=True)


def _trained(path: Path, weights: bytes = b"weights-1") -> Path:
    """A trained folder as train() leaves it (a dummy weights file is enough: promotion does not load it)."""
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(weights)
    (path / "processor_config.json").write_text("{}")
    (path / RESULT_META).write_text(json.dumps({"kind": "full", "steps": 3, "train_config": {"use_lora": False},
                                                "model_spec": {"model_name": "tiny-random-llava"}}))
    return path


def _promote(trained: Path, data_dir: Path, *, now=T0, top1: float = 0.5, **kwargs) -> ModelInfo:
    return promote(trained, data_dir=data_dir, categories=CATEGORIES, base_model="tiny-random-llava",
                   data_version="0123456789ab", metrics={"top1_accuracy": top1, "num_test_images": 12}, now=now,
                   **kwargs)


def test_promote_writes_a_complete_folder_then_the_pointer(tmp_path):
    trained = _trained(tmp_path / "trained")
    data_dir = tmp_path / "data"
    info = _promote(trained, data_dir)

    digest = weights_digest(trained)
    assert info.model_id == f"20261203-141502-{digest[:8]}"
    folder = Path(info.model_path)
    assert folder == (data_dir / "production" / "models" / info.model_id).resolve()
    assert read_pointer(data_dir) == info and resolve_model("production", data_dir) == folder
    assert (folder / "model.safetensors").read_bytes() == b"weights-1"
    assert json.loads((folder / RESULT_META).read_text())["kind"] == "full"
    assert CategoryMap.from_json(json.loads((folder / CATEGORIES_FILE).read_text())) == CATEGORIES
    inside = ModelInfo.from_json(json.loads((folder / MODEL_INFO_FILE).read_text()), folder)
    assert inside.model_path == "" and inside.model_id == info.model_id and inside.data_version == "0123456789ab"
    assert inside.metrics == {"top1_accuracy": 0.5, "num_test_images": 12}
    assert inside.promoted_at == "2026-12-03T14:15:02+00:00"
    assert info.model_id in (folder / MODEL_CARD_FILE).read_text()
    # Hard links where the filesystem allows (tmp_path is one filesystem), and the trained folder is untouched.
    assert os.stat(folder / "model.safetensors").st_ino == os.stat(trained / "model.safetensors").st_ino
    assert sorted(p.name for p in trained.iterdir()) == ["model.safetensors", "processor_config.json", RESULT_META]
    assert in_production(digest, read_pointer(data_dir)) and not in_production(weights_digest(
        _trained(tmp_path / "other", b"weights-2")), read_pointer(data_dir))


def test_promote_copies_where_it_cannot_link(tmp_path, monkeypatch):
    def refuse(src, dst):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(promotion.os, "link", refuse)
    trained = _trained(tmp_path / "trained")
    folder = Path(_promote(trained, tmp_path / "data").model_path)
    assert (folder / "model.safetensors").read_bytes() == b"weights-1"
    assert os.stat(folder / "model.safetensors").st_ino != os.stat(trained / "model.safetensors").st_ino


def _leftovers(data_dir: Path) -> list[str]:
    return sorted(p.name for p in (data_dir / "production" / "models").iterdir())


@pytest.mark.parametrize("where", ["model_card", "write_pointer"])
def test_a_crash_before_the_pointer_leaves_the_old_production_and_no_folder(tmp_path, monkeypatch, where):
    data_dir = tmp_path / "data"
    old = _promote(_trained(tmp_path / "old", b"old"), data_dir)
    pointer_before = pointer_path(data_dir).read_bytes()

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(promotion, where, crash)
    with pytest.raises(KeyboardInterrupt):
        _promote(_trained(tmp_path / "new", b"new"), data_dir, now=T0 + timedelta(hours=1))
    assert pointer_path(data_dir).read_bytes() == pointer_before
    assert _leftovers(data_dir) == [old.model_id], "no new folder, whole or half, and no staging folder"
    assert sorted(p.name for p in pointer_path(data_dir).parent.iterdir()) == ["models", "production.json"]


def test_prune_keeps_the_newest_and_never_the_production_one(tmp_path):
    data_dir = tmp_path / "data"
    infos = [_promote(_trained(tmp_path / f"t{i}", f"w{i}".encode()), data_dir, now=T0 + timedelta(minutes=i),
                      keep=2) for i in range(4)]
    assert _leftovers(data_dir) == [infos[2].model_id, infos[3].model_id]
    # A rollback to an older model: it stays however many newer ones there are.
    write_pointer(infos[2], data_dir)
    assert prune(data_dir, keep=1) == []
    newer = _promote(_trained(tmp_path / "t4", b"w4"), data_dir, now=T0 + timedelta(minutes=9), keep=3)
    write_pointer(infos[2], data_dir)
    removed = prune(data_dir, keep=1)
    assert [p.name for p in removed] == [infos[3].model_id]
    assert _leftovers(data_dir) == [infos[2].model_id, newer.model_id]


def test_promote_refuses_a_folder_without_weights(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="holds no weights"):
        _promote(tmp_path / "empty", tmp_path / "data")
    with pytest.raises(UsageError, match="not a folder"):
        _promote(tmp_path / "missing", tmp_path / "data")
    assert not pointer_path(tmp_path / "data").exists()
