"""Evaluation for any number of categories: names and question from the shards' index, ranking in candidate
batches, first-token pruning, sparse confusion counts and figures that stay readable for many classes."""

from __future__ import annotations

import io
import json

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from plant_pipeline.ml.data.categories import CategoryMap
from plant_pipeline.ml.evaluation import (
    choose_method,
    confusion_counts,
    confusion_matrix,
    evaluate_shards,
    evaluation_figures,
    most_confused_pairs,
    per_class_table,
    read_shard_categories,
)
from plant_pipeline.ml.evaluation.scoring import CandidateSet, score_candidates_shared_prefix
from plant_pipeline.ml.shards.pixels import PixelNormalizer
from plant_pipeline.ml.shards.prompts import PromptEncoder
from plant_pipeline.ml.testing import write_toy_shards

MADE_UP = CategoryMap(("Rosa canina", "Löwenzahn", "Bellis perennis"), question="What plant is this?", source="made_up")


def pseudo_latin(count: int, seed: int = 0) -> list[str]:
    """Distinct, varied two-word names from a seeded generator."""
    rng = np.random.default_rng(seed)
    syllables = ["ro", "sa", "bel", "lis", "per", "en", "nis", "ta", "rax", "cum", "vi", "o", "la", "me", "lia",
                 "cal", "thus", "ni", "gra", "ph", "yl", "um", "ac", "er", "qu", "us"]
    names: set[str] = set()
    while len(names) < count:
        word = lambda n: "".join(rng.choice(syllables, n))  # noqa: E731
        names.add(f"{word(rng.integers(2, 4)).capitalize()} {word(rng.integers(2, 5))}")
    return sorted(names)


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir):
    from transformers import LlavaForConditionalGeneration

    return LlavaForConditionalGeneration.from_pretrained(tiny_model_dir).eval()


@pytest.fixture(scope="module")
def made_up_shards(tmp_path_factory, tiny_processor):
    out = write_toy_shards(tmp_path_factory.mktemp("made_up"), tiny_processor, classes=3,
                           per_class={"train": 1, "test": 2})
    index_path = out / "index.json"
    index = json.loads(index_path.read_text())
    index["categories"] = MADE_UP.to_json()
    index_path.write_text(json.dumps(index, ensure_ascii=False), encoding="utf-8")
    return out


def test_made_up_categories_end_to_end(tiny_model, tiny_processor, made_up_shards):
    assert read_shard_categories(made_up_shards) == MADE_UP
    result = evaluate_shards(tiny_model, tiny_processor, made_up_shards)
    frame = result.predictions
    assert result.method == "rank" and result.num_categories == 3 and "3 names" in result.method_reason
    assert len(frame) == 6 and set(frame["label"]) == {0, 1, 2}
    assert set(frame["name"]) == set(MADE_UP.names)
    assert set(frame["predicted_name"]) <= set(MADE_UP.names)
    table = per_class_table(frame, MADE_UP.names)
    assert table["test_images"].tolist() == [2, 2, 2]
    figures = evaluation_figures(frame, table, MADE_UP.names)
    assert set(figures) == {"confusion_matrix.png", "per_class_accuracy.png"}


def test_question_comes_from_categories(tiny_model, tiny_processor, made_up_shards):
    # Same images, another question: the scores must change, so the question is really asked.
    other = CategoryMap(MADE_UP.names, question="Which herb grows here?", source="made_up")
    a = evaluate_shards(tiny_model, tiny_processor, made_up_shards, method="rank").predictions["score"]
    b = evaluate_shards(tiny_model, tiny_processor, made_up_shards, method="rank",
                        categories=other).predictions["score"]
    assert not np.allclose(a.to_numpy(), b.to_numpy())


@pytest.fixture(scope="module")
def many(tiny_processor):
    names = pseudo_latin(2000)
    encoder = PromptEncoder(tiny_processor, question="What plant is this?")
    candidates = CandidateSet.from_encoder(encoder, names)
    size = tiny_processor.image_processor.crop_size
    pixels = torch.randint(0, 256, (1, 3, size["height"], size["width"]), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    return candidates, PixelNormalizer.from_processor(tiny_processor.image_processor)(pixels)


def _score(model, candidates, pixels, **kwargs):
    with torch.inference_mode():
        return score_candidates_shared_prefix(model, pixels, candidates.prefix_ids, candidates.continuations,
                                              answer_start=candidates.answer_start, **kwargs)


@pytest.fixture(scope="module")
def full_scores(tiny_model, many):
    candidates, pixels = many
    return _score(tiny_model, candidates, pixels, candidate_batch=200, layout="packed")


def test_candidate_batches_give_the_same_scores(tiny_model, many, full_scores):
    candidates, pixels = many
    # One batch of all 2,000 names; "expanded" keeps that single forward small (a packed mask would be quadratic).
    whole, tokens_whole = _score(tiny_model, candidates, pixels, candidate_batch=2000, layout="expanded")
    batched, tokens = full_scores
    assert batched.shape == (1, 2000)
    assert torch.equal(tokens, tokens_whole)
    torch.testing.assert_close(batched, whole, rtol=1e-4, atol=1e-4)


def test_pruning_keeps_the_top1_when_k_covers_it(tiny_model, many, full_scores):
    candidates, pixels = many
    full, _ = full_scores
    distinct = len({int(c[0]) for c in candidates.continuations})
    pruned, _ = _score(tiny_model, candidates, pixels, candidate_batch=200, keep_first_tokens=distinct // 4)
    kept = torch.isfinite(pruned)
    assert kept.any(1).all() and not kept.all(), "K below the distinct first tokens must prune some names"
    # A kept name has exactly its full score, so whenever K covers the full winner's first token, top-1 is the same.
    torch.testing.assert_close(pruned[kept], full[kept], rtol=1e-4, atol=1e-4)
    best = full.argmax(1)
    assert bool(kept[0, best[0]]), "K = a quarter of the first tokens covers the winner's on this seeded image"
    assert int(pruned.argmax(1)[0]) == int(best[0])


def test_auto_method_choice():
    assert choose_method("auto", 102)[0] == "rank"
    assert choose_method("auto", 10_000)[0] == "prune"
    assert choose_method("generate", 10_000)[0] == "generate"


def _predictions(labels, predicted):
    return pd.DataFrame({"label": np.asarray(labels, dtype=np.int64),
                         "predicted_label": pd.array(predicted, dtype="Int64"),
                         "correct": np.asarray(labels) == np.asarray([-1 if p is None else p for p in predicted])})


def test_confused_pairs_on_a_hand_made_example():
    names = ["a", "b", "c", "d"]
    # a->b twice, c->a once, d->c three times, b right twice, one unmatched answer.
    frame = _predictions([0, 0, 2, 3, 3, 3, 1, 1, 0], [1, 1, 0, 2, 2, 2, 1, 1, None])
    pairs = most_confused_pairs(frame, names, top=2)
    assert pairs[["name", "predicted_name", "count"]].values.tolist() == [["d", "c", 3], ["a", "b", 2]]
    assert pairs["share"].tolist() == [1.0, pytest.approx(2 / 3)]
    cells = confusion_counts(frame, 4)
    assert cells["count"].sum() == 8
    assert (confusion_matrix(frame, 4)[cells["label"], cells["predicted_label"]] == cells["count"]).all()


def test_confusion_is_sparse_for_10000_classes():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10_000, 5000)
    frame = _predictions(labels, np.where(rng.random(5000) < 0.5, labels, rng.integers(0, 10_000, 5000)).tolist())
    assert len(confusion_counts(frame, 10_000)) <= 5000
    with pytest.raises(ValueError, match="confusion_counts"):
        confusion_matrix(frame, 10_000)


@pytest.mark.parametrize("classes", [10, 1000])
def test_figures_stay_bounded(classes):
    rng = np.random.default_rng(classes)
    names = pseudo_latin(classes, seed=classes)
    labels = np.repeat(np.arange(classes), 2)
    predicted = np.where(rng.random(len(labels)) < 0.6, labels, rng.integers(0, classes, len(labels)))
    frame = _predictions(labels, predicted.tolist())
    figures = evaluation_figures(frame, per_class_table(frame, names), names)
    expected = {"confusion_matrix.png", "per_class_accuracy.png"} if classes <= 150 else \
        {"confused_pairs.png", "per_class_accuracy.png"}
    assert set(figures) == expected
    for data in figures.values():
        width, height = Image.open(io.BytesIO(data)).size
        assert width <= 2000 and height <= 2000, (width, height)
