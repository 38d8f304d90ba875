"""validate_sample on tiny hand-made samples: each broken promise is caught and named."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from plant_pipeline.ml.shards.format import Sample
from plant_pipeline.ml.shards.validation import SampleValidationError, validate_normalizer, validate_tokens
from plant_pipeline.ml.testing import encode_sample, tar_sample, validate_sample

IMAGE = 7
RULES = dict(pixel_shape=(3, 4, 4), vocab_size=50, image_token_id=IMAGE, num_image_tokens=3)


def good_sample() -> Sample:
    input_ids = np.array([1, IMAGE, IMAGE, IMAGE, 10, 11, 20, 21, 2], dtype=np.int32)
    labels = np.array([-100] * 6 + [20, 21, 2], dtype=np.int32)
    return Sample("image_00001", np.zeros((3, 4, 4), np.uint8), input_ids, labels, {"image_id": 1})


def test_good_sample_passes():
    validate_sample(good_sample(), **RULES)


def _set(**changes):
    def apply(sample: Sample) -> Sample:
        for name, value in changes.items():
            setattr(sample, name, value)
        return sample
    return apply


def _labels(values):
    return _set(labels=np.array(values, dtype=np.int32))


BROKEN = {
    "pixels dtype": (_set(pixels=np.zeros((3, 4, 4), np.float32)), "pixels dtype float32, expected uint8"),
    "pixels shape": (_set(pixels=np.zeros((3, 4, 5), np.uint8)), "pixels shape (3, 4, 5), expected (3, 4, 4)"),
    "pixels channels last": (_set(pixels=np.zeros((4, 4, 3), np.uint8)), "expected (3, 4, 4)"),
    "ids int64": (_set(input_ids=good_sample().input_ids.astype(np.int64)), "input_ids is int64"),
    "ids 2-D": (_set(input_ids=good_sample().input_ids[None]), "expected 1-D int32"),
    "lengths differ": (_labels([-100] * 6 + [20, 21]), "input_ids has 9 tokens but labels has 8"),
    "id beyond vocab": (_set(input_ids=np.array([1, IMAGE, IMAGE, IMAGE, 10, 11, 20, 21, 50], np.int32)),
                        "token ids span [1, 50], expected [0, 50)"),
    "negative id": (_set(input_ids=np.array([-1, IMAGE, IMAGE, IMAGE, 10, 11, 20, 21, 2], np.int32)),
                    "token ids span [-1, 21]"),
    "too few image tokens": (_set(input_ids=np.array([1, IMAGE, IMAGE, 5, 10, 11, 20, 21, 2], np.int32)),
                             "2 image tokens (id 7), expected 3"),
    "label is another token": (_labels([-100] * 6 + [20, 22, 2]), "labels[7] = 22, expected input_ids[7] = 21"),
    "no answer": (_labels([-100] * 9), "expected at least one answer token"),
    "image token labelled": (_labels([1, IMAGE, IMAGE, IMAGE, 10, 11, 20, 21, 2]), "image token is among the labelled"),
    "hole in answer": (_labels([-100] * 6 + [20, -100, 2]), "at position 7, after the answer starts at 6"),
    "prompt token labelled after mask": (_labels([-100] * 4 + [10, -100, 20, 21, 2]), "after the answer starts at 4"),
    "key with dot": (_set(key="image.00001"), "without '.' or '/'"),
    "empty key": (_set(key=""), "non-empty string"),
}


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_broken_sample_is_rejected_with_a_specific_message(name):
    mutate, message = BROKEN[name]
    with pytest.raises(SampleValidationError) as info:
        validate_sample(mutate(good_sample()), **RULES)
    assert message in str(info.value)
    if "key" not in name:
        assert "'image_00001'" in str(info.value)  # names the sample


def test_empty_ids_are_rejected():
    sample = _set(input_ids=np.zeros(0, np.int32), labels=np.zeros(0, np.int32))(good_sample())
    with pytest.raises(SampleValidationError, match="input_ids is empty"):
        validate_sample(sample, **RULES)


def test_real_prompt_encoding_passes(tiny_processor):
    from plant_pipeline.ml.shards.prompts import PromptEncoder

    encoder = PromptEncoder(tiny_processor)
    input_ids, labels = encoder.encode_category("rose")
    validate_tokens("image_00001", input_ids, labels, vocab_size=len(tiny_processor.tokenizer),
                    image_token_id=encoder.image_token_id, num_image_tokens=encoder.num_image_tokens)
    # The same ids checked against another model's image-token count must fail.
    with pytest.raises(SampleValidationError, match="image tokens"):
        validate_tokens("image_00001", input_ids, labels, vocab_size=len(tiny_processor.tokenizer),
                        image_token_id=encoder.image_token_id, num_image_tokens=encoder.num_image_tokens + 1)


def test_normalizer_table_must_be_finite(tiny_processor):
    from plant_pipeline.ml.shards.pixels import PixelNormalizer

    validate_normalizer(PixelNormalizer.from_processor(tiny_processor.image_processor))
    table = np.ones((3, 256), np.float32)
    table[1, 3] = np.nan
    with pytest.raises(SampleValidationError, match="NaN or inf"):
        validate_normalizer(SimpleNamespace(table=table))
    with pytest.raises(SampleValidationError, match="expected \\(3, 256\\)"):
        validate_normalizer(SimpleNamespace(table=np.ones((3, 255), np.float32)))


@pytest.mark.parametrize("key", ["image.00001", "train/image_00001", "../image_00001", "", 7])
def test_every_writer_of_the_format_refuses_a_key_that_would_regroup_members(key):
    # WebDataset cuts a member name at its first dot: "image.00001.pixels.npy" would become key "image".
    # encode_sample (webdataset's TarWriter, the toy shards, the benches) and tar.write_sample (build_shards'
    # layout) both check the key, so no writer can put such a member name into a shard.
    sample = good_sample()
    sample.key = key
    with pytest.raises(SampleValidationError, match="expected a non-empty string without '.' or '/'"):
        encode_sample(sample)
    with pytest.raises(SampleValidationError, match="expected a non-empty string without '.' or '/'"):
        tar_sample(sample)
