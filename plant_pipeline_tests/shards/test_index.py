"""The shard index schema: every writer's index validates, and a malformed one is refused naming the field."""

from __future__ import annotations

import copy
import json
import re

import pytest

from plant_pipeline.ml.shards.format import (
    INDEX_FILE,
    ShardFormatError,
    make_index,
    read_index,
    shard_entry,
    split_entry,
    split_shard_paths,
    validate_index,
    write_index,
)

SHA = "ab" * 32


def good_index() -> dict:
    shards = [{"file": "train/train-00000.tar", "samples": 2, "bytes": 20480, "sha256": SHA},
              {"file": "train/train-00001.tar", "samples": 1, "bytes": 10240, "sha256": SHA}]
    quarantined = [{"image_id": 7, "path": "jpg/a7.jpg", "reason": "missing file", "split": "train"}]
    return make_index(model_name="tiny", pixel_shape=(3, 64, 64), num_image_tokens=64, image_token_id=5,
                      vocab_size=300, splits={"train": split_entry(shards, quarantined)})


def test_a_good_index_validates_and_totals_are_summed():
    index = validate_index(good_index())
    assert index["splits"]["train"]["samples"] == 3 and index["splits"]["train"]["bytes"] == 30720
    # Quarantine records keep the schema's fields only (the build's carry the split too).
    assert index["splits"]["train"]["quarantined"] == [{"image_id": 7, "path": "jpg/a7.jpg", "reason": "missing file"}]
    assert list(index) == ["format_version", "model_name", "revision", "pixel_shape", "num_image_tokens",
                           "image_token_id", "vocab_size", "splits"]


def _drop(field):
    def change(index):
        del index[field]
    return change


def _set(path, value):
    def change(index):
        target = index
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
    return change


@pytest.mark.parametrize("change,field,expected", [
    (_drop("num_image_tokens"), "(index)", "missing ['num_image_tokens']"),
    (_set(["format_version"], 2), "format_version", "expected 1"),
    (_set(["model_name"], ""), "model_name", "a non-empty string"),
    (_set(["pixel_shape"], [64, 64, 3]), "pixel_shape", "[3, H, W]"),
    (_set(["num_image_tokens"], True), "num_image_tokens", "an integer >= 1"),
    (_set(["splits"], {}), "splits", "at least one split"),
    (_set(["splits", "train", "samples"], 4), "splits.train.samples", "3, the sum of its shards' samples"),
    (_set(["splits", "train", "bytes"], "30720"), "splits.train.bytes", "an integer >= 0"),
    (_set(["splits", "train", "shards", 1, "sha256"], "ABC"), "splits.train.shards[1].sha256", "64 lowercase hex"),
    (_set(["splits", "train", "shards", 0, "file"], "../elsewhere.tar"), "splits.train.shards[0].file",
     "inside the shards folder"),
    (_set(["splits", "train", "shards", 0, "file"], "/tmp/x.tar"), "splits.train.shards[0].file",
     "inside the shards folder"),
    (_set(["splits", "train", "shards", 0, "samples"], -1), "splits.train.shards[0].samples", "an integer >= 0"),
    (_set(["splits", "train", "quarantined"], [{"image_id": 7}]), "splits.train.quarantined[0]", "missing ['path'"),
])
def test_a_malformed_index_is_refused_naming_the_field(tmp_path, change, field, expected):
    index = copy.deepcopy(good_index())
    change(index)
    (tmp_path / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(ShardFormatError) as raised:
        read_index(tmp_path)
    message = str(raised.value)
    assert str(tmp_path / INDEX_FILE) in message and f"field {field!r}" in message and expected in message, message
    # The writers refuse it too, and leave nothing behind.
    with pytest.raises(ShardFormatError, match=re.escape(f"field {field!r}")):
        write_index(tmp_path / "new", index)
    assert not (tmp_path / "new" / INDEX_FILE).exists()


def test_an_index_that_is_not_json_is_refused_naming_the_file(tmp_path):
    (tmp_path / INDEX_FILE).write_text('{"format_version": 1,')
    with pytest.raises(ShardFormatError, match="not a JSON shard index"):
        read_index(tmp_path)
    with pytest.raises(FileNotFoundError, match="materialise flower_shards"):
        read_index(tmp_path / "nowhere")


def test_write_index_round_trips_and_shard_entry_reads_the_file(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "train-00000.tar").write_bytes(b"\0" * 10240)
    entry = shard_entry(tmp_path, "train/train-00000.tar", 0)
    assert entry["bytes"] == 10240 and len(entry["sha256"]) == 64
    index = make_index(model_name="m", pixel_shape=[3, 8, 8], num_image_tokens=4, splits={"train": split_entry([entry])})
    write_index(tmp_path, index)
    assert read_index(tmp_path) == index
    assert split_shard_paths(tmp_path, "train") == [tmp_path / "train" / "train-00000.tar"]
    with pytest.raises(ShardFormatError, match="has no split 'test'"):
        split_shard_paths(tmp_path, "test")


def test_toy_shards_index_validates_with_the_tokenizer_facts(toy_shards, tiny_processor):
    index = read_index(toy_shards)
    assert index["image_token_id"] == tiny_processor.tokenizer.convert_tokens_to_ids(tiny_processor.image_token)
    assert index["vocab_size"] == len(tiny_processor.tokenizer)
    for split, info in index["splits"].items():
        for shard in info["shards"]:
            assert shard_entry(toy_shards, shard["file"], shard["samples"]) == shard, (split, shard)
