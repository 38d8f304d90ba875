"""Checks that one preprocessed sample is what the model will accept, before it is written to a shard.

Pure functions over numpy arrays: a sample that fails is quarantined with the message, never stored.
"""

from __future__ import annotations

import numpy as np

from plant_pipeline.ml.errors import UsageError
from plant_pipeline.ml.shards.format import IGNORE_INDEX


class SampleValidationError(UsageError):
    """A sample breaks the shard format's promises; the message names the sample, the expected and the actual."""


def _fail(key: str, what: str) -> None:
    raise SampleValidationError(f"sample {key!r}: {what}")


def validate_key(key: object) -> None:
    # WebDataset splits a member name at the first dot of its basename, so a dot or slash in a key
    # would silently regroup the members of a sample.
    if not isinstance(key, str) or not key or "." in key or "/" in key:
        raise SampleValidationError(f"sample key {key!r}: expected a non-empty string without '.' or '/'")


def validate_pixels(key: str, pixels: object, pixel_shape: tuple[int, int, int]) -> None:
    if not isinstance(pixels, np.ndarray):
        _fail(key, f"pixels are a {type(pixels).__name__}, expected a numpy array")
    if pixels.dtype != np.uint8:
        _fail(key, f"pixels dtype {pixels.dtype}, expected uint8")
    if tuple(pixels.shape) != tuple(pixel_shape):
        _fail(key, f"pixels shape {tuple(pixels.shape)}, expected {tuple(pixel_shape)}")


def validate_tokens(
    key: str, input_ids: object, labels: object, *, vocab_size: int, image_token_id: int, num_image_tokens: int
) -> None:
    for name, array in (("input_ids", input_ids), ("labels", labels)):
        if not isinstance(array, np.ndarray):
            _fail(key, f"{name} is a {type(array).__name__}, expected a numpy array")
        if array.dtype != np.int32 or array.ndim != 1:
            _fail(key, f"{name} is {array.dtype} with shape {array.shape}, expected 1-D int32")
    if len(input_ids) != len(labels):
        _fail(key, f"input_ids has {len(input_ids)} tokens but labels has {len(labels)}; expected equal lengths")
    if len(input_ids) == 0:
        _fail(key, "input_ids is empty")
    low, high = int(input_ids.min()), int(input_ids.max())
    if low < 0 or high >= vocab_size:
        _fail(key, f"token ids span [{low}, {high}], expected [0, {vocab_size})")
    image_positions = input_ids == image_token_id
    count = int(image_positions.sum())
    if count != num_image_tokens:
        _fail(key, f"{count} image tokens (id {image_token_id}), expected {num_image_tokens}")

    ignored = labels == IGNORE_INDEX
    if not np.all(ignored | (labels == input_ids)):
        bad = int(np.nonzero(~ignored & (labels != input_ids))[0][0])
        _fail(key, f"labels[{bad}] = {int(labels[bad])}, expected input_ids[{bad}] = {int(input_ids[bad])} or {IGNORE_INDEX}")
    if ignored.all():
        _fail(key, f"every label is {IGNORE_INDEX}; expected at least one answer token")
    if np.any(image_positions & ~ignored):
        _fail(key, "an image token is among the labelled (answer) positions; expected it masked with -100")
    # The prompt is masked, the answer is not: -100 on a prefix, then labelled to the end.
    answer_start = int(np.argmin(ignored))
    if ignored[answer_start:].any():
        hole = answer_start + int(np.argmax(ignored[answer_start:]))
        _fail(key, f"labels are {IGNORE_INDEX} at position {hole}, after the answer starts at {answer_start}; "
                   "expected -100 only on the prompt prefix")


def validate_normalizer(normalizer) -> None:
    """The float half of the processor (pixels.PixelNormalizer) must map every byte to a finite value.

    Checked once per build rather than per sample: the float pixels are a lookup in this table, so a
    finite table means finite pixel_values for every stored image.
    """
    table = np.asarray(normalizer.table)
    if table.shape != (3, 256):
        raise SampleValidationError(f"pixel lookup table has shape {table.shape}, expected (3, 256)")
    if not np.isfinite(table).all():
        raise SampleValidationError(
            "the processor's rescale/normalise turns some byte values into NaN or inf (is an image_std 0?); "
            "fix the processor's config before writing shards"
        )
