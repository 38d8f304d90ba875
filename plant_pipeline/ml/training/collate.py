"""Batch decoded shard samples into model inputs, padding only to the longest sequence in the batch.

Shards hold uint8 pixels; the float ``pixel_values`` are made per batch by the processor's own lookup table
(pixels.py), so a sample costs one byte per channel until the moment the model needs it: here, or, with
``defer_pixel_normalization``, on the GPU inside CustomTrainer (a quarter of the bytes to move there).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from plant_pipeline.ml.errors import UsageError
from plant_pipeline.ml.shards.format import IGNORE_INDEX, Sample
from plant_pipeline.ml.shards.pixels import PixelNormalizer

SAMPLE_KEYS = "sample_keys"  # batch entry holding the shard keys; never passed to the model
# Batch entry: the sequence positions whose logits the loss needs (some row predicts an answer token from
# there). Computed here on the CPU so the training step needs no host-device sync to find them.
LOGIT_POSITIONS = "logit_positions"
MODEL_INPUTS = ("input_ids", "attention_mask", "pixel_values")


class CollateError(UsageError):
    """A batch whose samples cannot be stacked into model inputs (shapes, dtypes, labels)."""


def _keys(samples: Sequence[Sample]) -> str:
    shown = [getattr(s, "key", "<no key>") for s in samples[:8]]
    more = f" and {len(samples) - 8} more" if len(samples) > 8 else ""
    return ", ".join(map(str, shown)) + more


@dataclass
class MemoryEfficientCollator:
    """``list[Sample] -> dict`` of padded tensors for ``LlavaForConditionalGeneration``.

    Input: samples as decode_sample returns them: ``pixels`` uint8 [3, H, W] (the same H, W for all),
    ``input_ids`` and ``labels`` integer [L] of equal length per sample, labels -100 on the prompt and
    equal to input_ids elsewhere, at least one answer token after position 0.

    Output (B samples, T = longest L in the batch, rounded up to ``pad_to_multiple_of``):
      ``input_ids`` long [B, T], right-padded with ``pad_token_id``;
      ``attention_mask`` long [B, T], 1 on real tokens, 0 on padding;
      ``labels`` long [B, T], right-padded with -100;
      ``pixel_values`` float32 [B, 3, H, W], bit-identical to the processor's output for these images;
        with ``defer_pixel_normalization`` the uint8 pixels themselves, which CustomTrainer expands on the
        device with the same table (pixels.py), giving the same float values;
      ``logit_positions`` long [K], the sorted positions t where labels[:, t + 1] != -100 in some row;
      ``sample_keys`` list[str] of the shard keys, for error messages.
      The last two are not model inputs: CustomTrainer passes only input_ids, attention_mask and
      pixel_values to the model.

    A batch that breaks the contract raises CollateError (a ValueError) naming the sample keys.
    """

    normalizer: PixelNormalizer
    pad_token_id: int
    pad_to_multiple_of: int | None = None
    defer_pixel_normalization: bool = False

    def __post_init__(self) -> None:
        if self.pad_to_multiple_of is not None and self.pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be a positive integer or None; got {self.pad_to_multiple_of}")

    def _validate(self, samples: Sequence[Sample]) -> None:
        if len(samples) == 0:
            raise CollateError("cannot collate an empty batch: the data loader produced no samples")
        shape = None
        for sample in samples:
            key = getattr(sample, "key", "<no key>")
            pixels, input_ids, labels = sample.pixels, sample.input_ids, sample.labels
            if (not isinstance(pixels, np.ndarray) or pixels.dtype != np.uint8 or pixels.ndim != 3
                    or pixels.shape[0] != 3):
                raise CollateError(
                    f"sample {key!r}: pixels must be a uint8 array [3, H, W]; got "
                    f"{getattr(pixels, 'dtype', type(pixels).__name__)} {tuple(getattr(pixels, 'shape', ()))}. "
                    "Rebuild the shards (flower_shards)."
                )
            if shape is None:
                shape = pixels.shape
            elif pixels.shape != shape:
                raise CollateError(
                    f"pixel shapes differ within one batch: sample {samples[0].key!r} has {tuple(shape)}, sample "
                    f"{key!r} has {tuple(pixels.shape)} (batch: {_keys(samples)}). All shards of one model must be "
                    "made with the same processor: rebuild them."
                )
            for name, array in (("input_ids", input_ids), ("labels", labels)):
                if not isinstance(array, np.ndarray) or array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
                    raise CollateError(
                        f"sample {key!r}: {name} must be a 1-D integer array; got "
                        f"{getattr(array, 'dtype', type(array).__name__)} {tuple(getattr(array, 'shape', ()))}"
                    )
            if input_ids.shape != labels.shape:
                raise CollateError(
                    f"sample {key!r}: input_ids has length {len(input_ids)} but labels has length {len(labels)}; "
                    "they must match position for position. Rebuild the shards."
                )
            answer = labels != IGNORE_INDEX
            if not answer[1:].any():
                raise CollateError(
                    f"sample {key!r}: no answer tokens to learn (labels are all -100 after position 0); "
                    "check the prompt encoding and rebuild the shards"
                )
            if np.any(labels[answer] != input_ids[answer]):
                raise CollateError(
                    f"sample {key!r}: labels differ from input_ids outside the prompt; labels must be input_ids "
                    "with the prompt set to -100"
                )

    def __call__(self, samples: list[Sample]) -> dict[str, Any]:
        self._validate(samples)
        lengths = [len(s.input_ids) for s in samples]
        longest = max(lengths)
        if self.pad_to_multiple_of:
            longest = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = len(samples)
        input_ids = torch.full((batch, longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((batch, longest), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((batch, longest), dtype=torch.long)
        for row, (sample, length) in enumerate(zip(samples, lengths)):
            input_ids[row, :length] = torch.from_numpy(sample.input_ids.astype(np.int64, copy=False))
            labels[row, :length] = torch.from_numpy(sample.labels.astype(np.int64, copy=False))
            attention_mask[row, :length] = 1
        # Stack bytes, then expand to float once for the whole batch (or leave that to the device).
        pixels = torch.from_numpy(np.stack([s.pixels for s in samples]))
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "pixel_values": pixels if self.defer_pixel_normalization else self.normalizer(pixels),
            LOGIT_POSITIONS: (labels[:, 1:] != IGNORE_INDEX).any(dim=0).nonzero().squeeze(1),
            SAMPLE_KEYS: [s.key for s in samples],
        }


def memory_efficient_collate_fn(processor, pad_to_multiple_of: int | None = None,
                                defer_pixel_normalization: bool = False) -> MemoryEfficientCollator:
    """The collator for one ``LlavaProcessor``: its pixel lookup table and its tokenizer's pad token."""
    tokenizer = processor.tokenizer
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_token_id is None:
        raise ValueError("the processor's tokenizer has neither a pad token nor an eos token to pad with")
    return MemoryEfficientCollator(
        normalizer=PixelNormalizer.from_processor(processor.image_processor),
        pad_token_id=int(pad_token_id),
        pad_to_multiple_of=pad_to_multiple_of,
        defer_pixel_normalization=defer_pixel_normalization,
    )
