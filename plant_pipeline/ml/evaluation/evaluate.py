"""Predict a label for every image of a split: stream its shards in batches, rank the category names
(scoring.py) or generate an answer and match it (answers.py), and collect one row per image."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from plant_pipeline.ml.data.categories import CategoryMap
from plant_pipeline.ml.evaluation.answers import generate_answers, match_answer
from plant_pipeline.ml.evaluation.scoring import (
    NORMALIZE,
    PRUNE_KEEP,
    CandidateSet,
    EvaluationError,
    choose_method,
    normalize_scores,
    rank_candidates,
    score_candidates_naive,
)
from plant_pipeline.ml.shards.format import decode_sample, read_categories, read_index, split_shard_paths
from plant_pipeline.ml.shards.pixels import PixelNormalizer
from plant_pipeline.ml.shards.prompts import PromptEncoder

logger = logging.getLogger(__name__)

METHODS = ("auto", "rank", "prune", "generate")
# "auto" picks rank or prune by the number of names: scoring.choose_method, shared with the Identifier.
SCORERS = ("shared", "naive")
# score: the best candidate's (normalised) log-likelihood for "rank", the answer's similarity to the matched name
# (1.0 exact) for "generate"; top5 (labels, best first) only for "rank"; answer_text only for "generate";
# match: "rank", or match_answer's "exact" | "closest" | "unmatched". predicted_label is <NA> when unmatched.
PREDICTION_COLUMNS = ("image_id", "key", "label", "name", "predicted_label", "predicted_name", "correct", "score",
                      "top5", "answer_text", "match")


@dataclass
class EvalResult:
    """Per-image predictions and how fast they came; ``predictions`` has the columns in PREDICTION_COLUMNS."""

    predictions: pd.DataFrame
    method: str
    normalize: str
    split: str
    num_images: int
    seconds: float
    images_per_second: float
    num_categories: int = 0
    method_reason: str = ""


# The shards' categories (Oxford's for an older index); one reader, the shards stage's.
read_shard_categories = read_categories


def _iter_batches(urls: list[str], batch_size: int, max_samples: int | None):
    import webdataset as wds

    dataset = wds.WebDataset(urls, shardshuffle=False, empty_check=False).map(decode_sample)
    batch, seen = [], 0
    for sample in dataset:
        if max_samples is not None and seen >= max_samples:
            break
        batch.append(sample)
        seen += 1
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def evaluate_shards(
    model,
    processor,
    shards_dir: str | Path,
    *,
    split: str = "test",
    method: str = "auto",
    categories: CategoryMap | None = None,
    names: Sequence[str] | None = None,
    batch_size: int = 8,
    normalize: str = "mean",
    max_samples: int | None = None,
    progress: Callable[[int, int | None], None] | None = None,
    scorer: str = "shared",
    candidate_batch: int = 128,
    layout: str = "auto",
    max_new_tokens: int = 16,
    keep_first_tokens: int = PRUNE_KEEP,
) -> EvalResult:
    """Predict a label for every image of one split, streaming its shards in batches on ``model.device``.

    ``categories`` (default: those in the shards' index) give the names and the question; ``names`` overrides the
    names only. Method "rank" scores all names as answers and takes the best (``scorer="naive"`` is the slow
    reference, for checks and benchmarks; ``candidate_batch`` and ``layout`` go to score_candidates_shared_prefix);
    "prune" ranks only the names under the ``keep_first_tokens`` likeliest first tokens (see
    score_candidates_shared_prefix for when that can differ from "rank"); "generate" answers greedily and maps the
    text to a name with match_answer; "auto" picks rank or prune by the number of names (choose_method).
    """
    if method not in METHODS:
        raise EvaluationError(f"method must be one of {METHODS}; got {method!r}")
    if normalize not in NORMALIZE:
        raise EvaluationError(f"normalize must be one of {NORMALIZE}; got {normalize!r}")
    if scorer not in SCORERS:
        raise EvaluationError(f"scorer must be one of {SCORERS}; got {scorer!r}")
    if batch_size < 1:
        raise EvaluationError(f"batch_size must be >= 1; got {batch_size}")
    if categories is None:
        categories = read_shard_categories(shards_dir)
    names = tuple(categories.names if names is None else names)
    method, reason = choose_method(method, len(names))
    prune = keep_first_tokens if method == "prune" else None
    paths = split_shard_paths(shards_dir, split)
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} shard(s) listed in {Path(shards_dir) / 'index.json'} are missing, "
                                f"e.g. {missing[0]}; rebuild the shards")
    total = int(read_index(shards_dir)["splits"][split]["samples"])
    if max_samples is not None:
        total = min(total, max_samples)

    encoder = PromptEncoder(processor, question=categories.question)
    normalizer = PixelNormalizer.from_processor(processor.image_processor)
    candidates = CandidateSet.from_encoder(encoder, names) if method != "generate" else None
    encoded = candidates.encoded() if candidates is not None and scorer == "naive" else None
    was_training = model.training
    model.eval()
    rows: list[dict] = []
    start = time.perf_counter()
    try:
        with torch.inference_mode():
            for batch in _iter_batches([str(p) for p in paths], batch_size, max_samples):
                for sample in batch:
                    if not 0 <= int(sample.meta["label"]) < len(names):
                        raise EvaluationError(f"sample {sample.key!r} has label {sample.meta['label']}, outside the "
                                              f"{len(names)} names being scored")
                pixel_values = normalizer(torch.from_numpy(np.stack([s.pixels for s in batch])))
                if method != "generate":
                    rows.extend(_rank_rows(model, batch, pixel_values, candidates, encoded, normalize,
                                           candidate_batch, layout, prune))
                else:
                    answers = generate_answers(model, processor, pixel_values, encoder.prompt_ids, max_new_tokens)
                    rows.extend(_generate_rows(batch, answers, names))
                if progress is not None:
                    progress(len(rows), total)
    finally:
        model.train(was_training)
    seconds = time.perf_counter() - start
    if not rows:
        raise EvaluationError(f"split {split!r} of {shards_dir} has no images to evaluate")
    predictions = _predictions_frame(rows)
    logger.info("%s on %d %s images: %.1f images/s", method, len(rows), split, len(rows) / seconds)
    return EvalResult(predictions=predictions, method=method, normalize=normalize, split=split, num_images=len(rows),
                      seconds=seconds, images_per_second=len(rows) / seconds, num_categories=len(names),
                      method_reason=reason)


def _rank_rows(model, batch, pixel_values, candidates: CandidateSet, encoded, normalize, candidate_batch,
               layout, keep_first_tokens=None) -> list[dict]:
    if encoded is not None:
        scores = normalize_scores(*score_candidates_naive(model, pixel_values, encoded), normalize)
    else:
        scores = rank_candidates(model, pixel_values, candidates, normalize=normalize,
                                 candidate_batch=candidate_batch, layout=layout, keep_first_tokens=keep_first_tokens)
    top = scores.topk(min(5, scores.shape[1]), dim=1)
    rows = []
    for i, sample in enumerate(batch):
        best = int(top.indices[i, 0])
        rows.append(_row(sample, best, candidates.names[best], float(top.values[i, 0]),
                         # Pruned candidates score -inf: they are no answer, so they are not in the top 5.
                         [int(c) for c, v in zip(top.indices[i], top.values[i]) if torch.isfinite(v)], None, "rank",
                         candidates.names))
    return rows


def _generate_rows(batch, answers: list[str], names: tuple[str, ...]) -> list[dict]:
    rows = []
    for sample, text in zip(batch, answers):
        label, how, similarity = match_answer(text, names)
        rows.append(_row(sample, label, None if label is None else names[label], similarity, None, text, how, names))
    return rows


def _row(sample, predicted, predicted_name, score, top5, answer_text, match, names) -> dict:
    label = int(sample.meta["label"])
    return {"image_id": int(sample.meta["image_id"]), "key": sample.key, "label": label,
            "name": names[label], "predicted_label": predicted,
            "predicted_name": predicted_name, "correct": predicted is not None and predicted == label,
            "score": score, "top5": top5, "answer_text": answer_text, "match": match}


def _predictions_frame(rows: list[dict]) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=list(PREDICTION_COLUMNS))
    return frame.astype({"image_id": "int64", "label": "int64", "predicted_label": "Int64", "correct": "bool",
                         "score": "float64"})
