"""Identifier: probabilities over all categories, top-k answers naming the model, batches equal to single photos,
and on real photos exactly the pixels the shards store."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from plant_pipeline.ml.data.categories import OXFORD_QUESTION, CategoryMap
from plant_pipeline.ml.serving.identifier import Identifier
from plant_pipeline.ml.serving.photos import PhotoError
from plant_pipeline.ml.serving.registry import MODEL_INFO_FILE, ModelInfo, write_pointer
from plant_pipeline.ml.testing import make_model_folder
from plant_pipeline_tests.mini_release import extract_photos

CATEGORIES = CategoryMap(("rose", "common daisy", "tulip", "sunflower", "giant white arum lily"),
                         question=OXFORD_QUESTION, source="test", display_names={"rose": "Rose (Rosa)"})


@pytest.fixture(scope="module")
def model_folder(tiny_model_dir, tmp_path_factory):
    return make_model_folder(tmp_path_factory.mktemp("trained") / "run-7", CATEGORIES, models_dir=tiny_model_dir.parent)


@pytest.fixture(scope="module")
def identifier(model_folder):
    return Identifier.load(model_folder, device="cpu")


@pytest.fixture(scope="module")
def photos():
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (40 + 9 * i, 70 - 5 * i, 3), dtype=np.uint8)) for i in range(4)]


class ForwardCounter:
    """Counts the vision tower's forwards: one per batch of photos scored (the prefix forward)."""

    def __init__(self, identifier):
        self.calls = 0
        self.handle = identifier.model.model.vision_tower.register_forward_pre_hook(self._count)

    def _count(self, *_):
        self.calls += 1

    def __enter__(self):
        return self

    def __exit__(self, *_):
        self.handle.remove()


def test_scores_are_probabilities_over_all_categories(identifier, photos):
    answers = identifier.identify(photos, top_k=len(CATEGORIES))
    assert len(answers) == len(photos)
    for answer in answers:
        scores = [g.score for g in answer.guesses]
        assert sorted(g.category_id for g in answer.guesses) == list(range(len(CATEGORIES)))
        assert sum(scores) == pytest.approx(1.0, abs=1e-9)
        assert all(0 < s < 1 for s in scores)
        assert scores == sorted(scores, reverse=True)


def test_top_k_is_the_best_k_and_names_the_model(identifier, photos):
    full = identifier.identify(photos[0], top_k=99)[0]  # more than there are: all of them
    top = identifier.identify(photos[0], top_k=2)[0]
    assert len(full.guesses) == len(CATEGORIES) and top.guesses == full.guesses[:2]
    assert (top.model_id, top.data_version) == ("run-7", "unknown")  # a raw trained folder
    guess = next(g for g in full.guesses if g.name == "rose")
    assert (guess.category_id, guess.display_name) == (0, "Rose (Rosa)")
    assert top.to_json() == {"photo": "photo 1", "model_id": "run-7", "data_version": "unknown",
                             "top": [{"category_id": g.category_id, "name": g.name, "display_name": g.display_name,
                                      "score": g.score} for g in top.guesses]}
    with pytest.raises(ValueError, match="top_k must be >= 1"):
        identifier.identify(photos[0], top_k=0)


def test_a_batch_scores_like_one_photo_at_a_time_in_one_forward_per_batch(identifier, photos):
    try:
        identifier.max_batch = 16
        with ForwardCounter(identifier) as counter:
            together = identifier.identify(photos, top_k=len(CATEGORIES))
        assert counter.calls == 1
        identifier.max_batch = 3
        with ForwardCounter(identifier) as counter:
            pairs = identifier.identify(photos, top_k=len(CATEGORIES))
        assert counter.calls == 2  # 3 + 1
        identifier.max_batch = 1
        alone = identifier.identify(photos, top_k=len(CATEGORIES))
    finally:
        identifier.max_batch = 16
    for answers in (pairs, alone):
        for a, b in zip(together, answers):
            assert [g.category_id for g in a.guesses] == [g.category_id for g in b.guesses]
            assert np.allclose([g.score for g in a.guesses], [g.score for g in b.guesses], atol=1e-5, rtol=0)


def test_threads_share_one_identifier(identifier, photos):
    from concurrent.futures import ThreadPoolExecutor

    expected = [a.guesses for a in identifier.identify(photos[:2])]
    with ThreadPoolExecutor(3) as pool:  # as the web service calls it, from worker threads
        answers = list(pool.map(lambda _: identifier.identify(photos[:2]), range(3)))
    for answer in answers:
        assert [[g.category_id for g in a.guesses] for a in answer] == [[g.category_id for g in e] for e in expected]
        assert np.allclose([g.score for a in answer for g in a.guesses], [g.score for e in expected for g in e],
                           atol=1e-6, rtol=0)


def test_photos_are_named_and_a_bad_one_stops_everything_before_any_forward(identifier, photos, tmp_path):
    good = tmp_path / "good.png"
    photos[0].save(good)
    answers = identifier.identify([good, good.read_bytes(), photos[1]])
    assert [a.photo for a in answers] == ["good.png", "photo 2", "photo 3"]
    assert [a.photo for a in identifier.identify([photos[0]], names=["my leaf"])] == ["my leaf"]
    with pytest.raises(ValueError, match="2 names for 1 photos"):
        identifier.identify([photos[0]], names=["a", "b"])
    (tmp_path / "broken.jpg").write_bytes(b"not a photo at all")
    with ForwardCounter(identifier) as counter, pytest.raises(PhotoError, match=r"^broken\.jpg: "):
        identifier.identify([good, tmp_path / "broken.jpg", photos[2]])
    assert counter.calls == 0


def test_production_model_reports_its_promoted_identity(model_folder, tmp_path):
    promoted = tmp_path / "data" / "production" / "models" / "m-1"
    make_model_folder(promoted, CATEGORIES, models_dir=model_folder.parent.parent)
    info = ModelInfo(model_id="m-1", base_model="tiny-random-llava", data_version="abc123",
                     metrics={"top1_accuracy": 0.5})
    (promoted / MODEL_INFO_FILE).write_text(json.dumps(info.to_json()))
    write_pointer(ModelInfo(**{**info.to_json(), "model_path": str(promoted)}), tmp_path / "data")
    identifier = Identifier.load("production", device="cpu", data_dir=tmp_path / "data")
    assert identifier.info.model_path == str(promoted) and identifier.info.metrics == {"top1_accuracy": 0.5}
    answer = identifier.identify(Image.new("RGB", (30, 30), (200, 30, 30)))[0]
    assert (answer.model_id, answer.data_version) == ("m-1", "abc123")


def test_raw_folder_without_categories_says_what_to_do(model_folder, tmp_path):
    raw = make_model_folder(tmp_path / "raw", CATEGORIES, models_dir=model_folder.parent.parent)
    (raw / "categories.json").unlink()
    with pytest.raises(ValueError, match="has no categories.json .* promote the model"):
        Identifier.load(raw, device="cpu")


def test_many_names_are_pruned_as_evaluation_prunes(model_folder, monkeypatch, photos):
    from plant_pipeline.ml.evaluation import scoring
    from plant_pipeline.ml.serving import identifier as identifier_module

    monkeypatch.setattr(scoring, "RANK_ALL_UP_TO", 3)  # 5 names > 3: "auto" prunes, as for > 2000 names
    monkeypatch.setattr(identifier_module, "PRUNE_KEEP", 1)
    pruned = Identifier.load(model_folder, device="cpu")
    assert pruned.keep_first_tokens == 1
    guesses = pruned.identify(photos[:2], top_k=len(CATEGORIES))[0].guesses
    assert sum(g.score for g in guesses) == pytest.approx(1.0, abs=1e-9)
    assert any(g.score == 0.0 for g in guesses)  # names under an unlikely first token are no answer


# --- real photos: the tensor the model is evaluated on ---------------------------------------------------------

@pytest.fixture(scope="module")
def real_photos(shared_datasets, tmp_path_factory):
    """Six photos of the mini release, extracted from its tgz."""
    root = tmp_path_factory.mktemp("real")
    return root, extract_photos(shared_datasets, root, range(1, 7))


def test_real_photos_give_the_shards_pixels_bit_for_bit(real_photos, identifier, model_folder, tmp_path):
    from plant_pipeline.ml.shards.build import ShardConfig, build_shards
    from plant_pipeline_tests.shards.flower_folder import read_all

    root, paths = real_photos
    manifest = pd.DataFrame({"image_id": range(1, len(paths) + 1), "path": [f"jpg/{p.name}" for p in paths],
                             "label": [i % len(CATEGORIES) for i in range(len(paths))],
                             "split": ["train", "validation", "test"] * (len(paths) // 3), "source": "test"})
    result = build_shards(manifest, root, str(model_folder), tmp_path / "shards", categories=CATEGORIES,
                          config=ShardConfig(num_workers=1))
    assert result.quarantined == []
    stored = {s.meta["path"]: s.pixels for split in ("train", "validation", "test")
              for s in read_all(tmp_path / "shards", split)}
    pixels = identifier.pixels(paths)
    assert pixels.dtype == torch.uint8 and tuple(pixels.shape) == (len(paths), *result.index["pixel_shape"])
    for path, mine in zip(paths, pixels.numpy()):
        assert np.array_equal(mine, stored[f"jpg/{path.name}"]), path.name
