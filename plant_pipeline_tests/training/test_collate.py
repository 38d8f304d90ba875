"""MemoryEfficientCollator: padding, label masking, exact pixel values and errors that name the samples."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from plant_pipeline.ml.shards.format import IGNORE_INDEX, Sample
from plant_pipeline.ml.shards.pixels import PixelNormalizer, resize_and_crop
from plant_pipeline.ml.shards.prompts import PromptEncoder
from plant_pipeline.ml.training.collate import CollateError, MemoryEfficientCollator, memory_efficient_collate_fn


@pytest.fixture(scope="module")
def collator(tiny_processor) -> MemoryEfficientCollator:
    return memory_efficient_collate_fn(tiny_processor)


def _sample(key: str, length: int, prompt: int, pixels: np.ndarray | None = None) -> Sample:
    ids = np.arange(10, 10 + length, dtype=np.int32)
    labels = ids.copy()
    labels[:prompt] = IGNORE_INDEX
    if pixels is None:
        pixels = np.full((3, 8, 8), 7, dtype=np.uint8)
    return Sample(key, pixels, ids, labels, {"label": 0})


def test_pads_right_to_the_longest_sample(collator):
    batch = collator([_sample("a", 5, 2), _sample("b", 9, 4)])
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (2, 9)
    assert batch["input_ids"].dtype == batch["labels"].dtype == batch["attention_mask"].dtype == torch.long
    pad = collator.pad_token_id
    assert batch["input_ids"][0].tolist() == list(range(10, 15)) + [pad] * 4
    assert batch["attention_mask"][0].tolist() == [1] * 5 + [0] * 4
    assert batch["attention_mask"][1].tolist() == [1] * 9
    # -100 on the prompt and on the padding; the answer keeps its token ids.
    assert batch["labels"][0].tolist() == [IGNORE_INDEX] * 2 + [12, 13, 14] + [IGNORE_INDEX] * 4
    assert batch["labels"][1, :4].eq(IGNORE_INDEX).all() and batch["labels"][1, 4:].tolist() == list(range(14, 19))
    assert batch["sample_keys"] == ["a", "b"]
    assert batch["pixel_values"].shape == (2, 3, 8, 8) and batch["pixel_values"].dtype == torch.float32


def test_logit_positions_are_where_some_row_predicts_an_answer(collator):
    batch = collator([_sample("a", 5, 2), _sample("b", 9, 4)])
    # a's answer tokens sit at 2..4 (predicted from 1..3), b's at 4..8 (from 3..7).
    assert batch["logit_positions"].tolist() == list(range(1, 8))
    assert batch["logit_positions"].dtype == torch.long


def test_deferred_pixels_expand_to_the_same_values(collator):
    rng = np.random.default_rng(1)
    samples = [_sample(k, 6, 2, rng.integers(0, 256, size=(3, 8, 8), dtype=np.uint8)) for k in "abc"]
    deferred = MemoryEfficientCollator(collator.normalizer, collator.pad_token_id, defer_pixel_normalization=True)
    raw = deferred(samples)["pixel_values"]
    assert raw.dtype == torch.uint8 and raw.shape == (3, 3, 8, 8)
    assert torch.equal(collator.normalizer(raw), collator(samples)["pixel_values"])


def test_pad_to_multiple_of(collator):
    rounded = MemoryEfficientCollator(collator.normalizer, collator.pad_token_id, pad_to_multiple_of=8)
    batch = rounded([_sample("a", 5, 2), _sample("b", 9, 4)])
    assert batch["input_ids"].shape == (2, 16)
    assert batch["attention_mask"][:, 9:].eq(0).all() and batch["labels"][:, 9:].eq(IGNORE_INDEX).all()


def test_pixel_values_are_exactly_the_processors(tiny_processor, collator):
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, size=(50 + 7 * i, 70, 3), dtype=np.uint8)) for i in range(3)]
    encoder = PromptEncoder(tiny_processor)
    ids, labels = encoder.encode_category("pink primrose")
    samples = [Sample(f"img{i}", resize_and_crop(tiny_processor.image_processor, im), ids, labels, {})
               for i, im in enumerate(images)]
    expected = tiny_processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
    got = collator(samples)["pixel_values"]
    assert got.dtype == expected.dtype and torch.equal(got, expected)


def test_factory_uses_the_tokenizers_pad_token(tiny_processor, collator):
    assert collator.pad_token_id == tiny_processor.tokenizer.pad_token_id
    assert isinstance(collator.normalizer, PixelNormalizer)


def _bad(kind: str) -> list[Sample]:
    good = _sample("good_0001", 6, 2)
    bad = _sample("bad_0002", 6, 2)
    if kind == "pixel shapes differ":
        bad.pixels = np.zeros((3, 16, 16), dtype=np.uint8)
    elif kind == "float pixels":
        bad.pixels = bad.pixels.astype(np.float32)
    elif kind == "length mismatch":
        bad.labels = bad.labels[:-1]
    elif kind == "float ids":
        bad.input_ids = bad.input_ids.astype(np.float32)
    elif kind == "no answer":
        bad.labels[:] = IGNORE_INDEX
    elif kind == "labels differ from ids":
        bad.labels[-1] += 1
    return [good, bad]


@pytest.mark.parametrize("kind", ["pixel shapes differ", "float pixels", "length mismatch", "float ids", "no answer",
                                  "labels differ from ids"])
def test_bad_batch_names_the_sample(collator, kind):
    with pytest.raises(CollateError, match="bad_0002"):
        collator(_bad(kind))


def test_empty_batch_is_an_error(collator):
    with pytest.raises(ValueError, match="empty batch"):
        collator([])
