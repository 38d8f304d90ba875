"""Shards for any categories: names and question from a CategoryMap, recorded in the index and read back."""

from __future__ import annotations

import json

import pytest

from plant_pipeline.ml.data.categories import CategoryMap, oxford_map
from plant_pipeline.ml.shards import check_class_coverage, check_integrity, read_categories
from plant_pipeline.ml.shards.build import ShardConfig, build_shards
from plant_pipeline.ml.shards.format import INDEX_FILE, ShardFormatError, read_index
from plant_pipeline.ml.shards.prompts import PromptEncoder, load_processor
from plant_pipeline_tests.shards.flower_folder import build_flowers, read_all, tree_digest

MADE_UP = CategoryMap(("fern", "löwenzahn", "moss"), question="Which plant grows here?", source="image_folder",
                      allow_new=True)


@pytest.fixture(scope="module")
def made_up(flowers, tiny_model_dir, tmp_path_factory):
    root, manifest = flowers
    out = tmp_path_factory.mktemp("made_up")
    build_shards(manifest, root, str(tiny_model_dir), out, categories=MADE_UP, model_name="tiny",
                 config=ShardConfig(num_workers=1, batch_size=4))
    return out


def test_index_records_the_categories_and_samples_use_them(made_up, flowers, tiny_model_dir):
    assert read_index(made_up)["categories"] == MADE_UP.to_json()
    assert read_categories(made_up) == MADE_UP
    processor = load_processor(str(tiny_model_dir))
    encoder = PromptEncoder(processor, question=MADE_UP.question)
    samples = read_all(made_up, "train")
    assert samples and {s.meta["name"] for s in samples} <= set(MADE_UP.names)
    for sample in samples:
        input_ids, labels = encoder.encode_category(MADE_UP.names[sample.meta["label"]])
        assert sample.meta["name"] == MADE_UP.names[sample.meta["label"]]
        assert sample.input_ids.tolist() == input_ids.tolist() and sample.labels.tolist() == labels.tolist()
    text = processor.tokenizer.decode(samples[0].input_ids)
    assert MADE_UP.question in text and "What flower" not in text
    assert check_integrity(made_up, flowers[1]).passed


def test_class_coverage_counts_the_index_categories(made_up):
    default = check_class_coverage(made_up)
    assert default.description == check_class_coverage(made_up, 3).description
    assert all(3 not in absent for absent in default.metadata["missing"].values())
    four = check_class_coverage(made_up, 4)  # class 3 has no samples anywhere
    assert not four.passed and all(3 in four.metadata["missing"][split] for split in ("train", "validation", "test"))


def test_default_categories_are_oxfords_and_give_the_same_shard_bytes(flowers, tiny_model_dir, tmp_path, made_up):
    root, manifest = flowers
    build_shards(manifest, root, str(tiny_model_dir), tmp_path / "default", model_name="tiny",
                 config=ShardConfig(num_workers=1, batch_size=3))
    explicit = build_flowers(flowers, tiny_model_dir, tmp_path / "explicit").out_dir  # Oxford's first three names
    shards = {k: v for k, v in tree_digest(tmp_path / "default").items() if k.endswith(".tar")}
    assert shards and shards == {k: v for k, v in tree_digest(explicit).items() if k.endswith(".tar")}
    assert read_categories(tmp_path / "default") == oxford_map()
    assert shards != {k: v for k, v in tree_digest(made_up).items() if k.endswith(".tar")}  # other names, question


def test_an_index_without_categories_reads_as_oxford_and_a_bad_one_fails(made_up, tmp_path):
    index = read_index(made_up)
    del index["categories"]
    (tmp_path / INDEX_FILE).write_text(json.dumps(index))
    assert read_categories(tmp_path) == oxford_map()
    index["categories"] = {"id_to_name": {"0": "fern", "2": "moss"}}
    (tmp_path / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(ShardFormatError, match="categories"):
        read_index(tmp_path)


def test_prompts_for_ten_thousand_names_encode_quickly(tiny_model_dir):
    import time

    encoder = PromptEncoder(load_processor(str(tiny_model_dir)), question="What plant is this?")
    names = [f"plant {i}" for i in range(10_000)]
    started = time.perf_counter()
    encoded = encoder.encode_categories(names)
    seconds = time.perf_counter() - started
    assert len(encoded) == 10_000 and len({tuple(ids) for ids, _ in encoded[:100]}) == 100
    assert seconds < 30, f"encoding 10,000 names took {seconds:.1f} s"
