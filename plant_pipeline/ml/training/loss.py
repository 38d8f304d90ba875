"""The training objective: cross-entropy over answer tokens only, with logits computed at just the positions
that predict one. Shared by CustomTrainer and anything that scores a trained model the same way."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from plant_pipeline.ml.shards.format import IGNORE_INDEX
from plant_pipeline.ml.shards.pixels import PixelNormalizer
from plant_pipeline.ml.training.collate import LOGIT_POSITIONS, MODEL_INPUTS


def labelled_token_loss(model: nn.Module, inputs: dict[str, Any], normalizer: PixelNormalizer | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sum of cross-entropy over answer tokens, number of answer tokens (a 0-d tensor), logits [B, K, vocab]).

    Logits are computed only at the K sequence positions where some row of the batch predicts an answer
    token (``logit_positions`` from the collator, else found here): passed as a 1-D index tensor in
    ``logits_to_keep``, LlavaForConditionalGeneration applies ``lm_head`` to those hidden states alone (a
    dozen positions instead of one per image token; every transformers 5 release takes a 1-D tensor there).
    The call goes through the outermost model (DDP, PEFT, accelerate's autocast wrapper), so DDP's gradient
    hooks fire exactly as for an ordinary forward; calling the inner language model and lm_head directly
    would bypass them. uint8 ``pixel_values`` are expanded with ``normalizer`` on their device first.
    """
    labels = inputs["labels"]
    shifted = labels[:, 1:]  # position t predicts token t + 1
    columns = inputs.get(LOGIT_POSITIONS)
    if columns is None:
        columns = (shifted != IGNORE_INDEX).any(dim=0).nonzero().squeeze(1)
    targets = shifted[:, columns]  # [B, K], -100 where this row has no answer token at that position
    model_inputs = {k: inputs[k] for k in MODEL_INPUTS}
    if model_inputs["pixel_values"].dtype == torch.uint8:
        if normalizer is None:
            raise ValueError(
                "pixel_values are uint8 (a collator with defer_pixel_normalization=True) but no PixelNormalizer "
                "was given: pass the collator's normalizer as CustomTrainer(pixel_normalizer=...)")
        model_inputs["pixel_values"] = normalizer(model_inputs["pixel_values"])
    outputs = model(**model_inputs, logits_to_keep=columns, use_cache=False)
    logits = outputs.logits
    if tuple(logits.shape[:2]) != tuple(targets.shape):
        raise RuntimeError(
            f"{type(model).__name__} returned logits of shape {tuple(logits.shape)} for logits_to_keep of "
            f"{columns.numel()} positions; expected [{targets.shape[0]}, {targets.shape[1]}, vocab]. The model "
            "must accept a 1-D tensor as logits_to_keep (LlavaForConditionalGeneration does)."
        )
    loss_sum = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX,
                               reduction="sum")
    return loss_sum, (targets != IGNORE_INDEX).sum(), logits
