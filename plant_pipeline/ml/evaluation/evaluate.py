"""Score a LLaVA on the test shards: rank all 102 answers by likelihood, or generate one and match it to a name.

Ranking runs the image and prompt once per batch of images and scores every candidate's remaining tokens from
that key/value cache in one more forward (score_candidates_shared_prefix), 50x to 400x faster than one forward
per candidate (bench/evaluate.py). Scores are length-normalised by default (``normalize="mean"``, the average
log-probability per answer token): the summed log-likelihood adds one negative term per token, so a 6-token
"giant white arum lily" loses to a 1-token "rose" whenever the model is unsure of either, which biases an
untrained or lightly tuned model towards short names. All answers share "This is a" and the closing "." and
eos, which keeps the mean close to the sum's choice once the model is confident. ``"sum"`` is the plain joint
likelihood (what greedy decoding approximates), kept for comparison.
"""

from __future__ import annotations

import difflib
import inspect
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch

from plant_pipeline.ml.data.categories import CATEGORY_NAMES
from plant_pipeline.ml.errors import UsageError
from plant_pipeline.ml.shards.format import IGNORE_INDEX, decode_sample, read_index, split_shard_paths
from plant_pipeline.ml.shards.pixels import PixelNormalizer
from plant_pipeline.ml.shards.prompts import PromptEncoder, common_prefix_length

logger = logging.getLogger(__name__)

METHODS = ("rank", "generate")
NORMALIZE = ("mean", "sum")
SCORERS = ("shared", "naive")
MATCH_CUTOFF = 0.75
# score: the best candidate's (normalised) log-likelihood for "rank", the answer's similarity to the matched name
# (1.0 exact) for "generate"; top5 (labels, best first) only for "rank"; answer_text only for "generate";
# match: "rank", or match_answer's "exact" | "closest" | "unmatched". predicted_label is <NA> when unmatched.
PREDICTION_COLUMNS = ("image_id", "key", "label", "name", "predicted_label", "predicted_name", "correct", "score",
                      "top5", "answer_text", "match")


class EvaluationError(UsageError):
    """The evaluation cannot run as asked (bad setting, empty split, candidates that cannot share a prefix)."""


# --- Candidates ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CandidateSet:
    """Every candidate answer's token ids, split into the prefix they all share and each one's continuation.

    ``answer_start[c]`` is where candidate c's answer begins in its full ids (prefix + continuation); it may lie
    inside the shared prefix ("This is a" is shared by all answers) and, with BPE merging the prompt's trailing
    space into the answer, before the end of the bare generation prompt.
    """

    names: tuple[str, ...]
    prefix_ids: np.ndarray  # int64 [P]
    continuations: tuple[np.ndarray, ...]  # int64 [n_c], n_c >= 1
    answer_start: np.ndarray  # int64 [C]

    @classmethod
    def from_encoder(cls, encoder: PromptEncoder, names: Sequence[str] = CATEGORY_NAMES) -> "CandidateSet":
        encoded = encoder.encode_categories(names)
        full = [ids.astype(np.int64) for ids, _ in encoded]
        starts = np.array([int(np.argmax(labels != IGNORE_INDEX)) for _, labels in encoded], dtype=np.int64)
        # Keep at least one token per candidate after the prefix: its first token is scored by the prefix's logits.
        shared = min(common_prefix_length(full), min(len(ids) for ids in full) - 1)
        image_token_id = encoder.image_token_id
        if (full[0][:shared] == image_token_id).sum() != encoder.num_image_tokens:
            raise EvaluationError(
                f"the candidates' shared prefix ({shared} tokens) does not hold all {encoder.num_image_tokens} image "
                "tokens; the answers must follow the image in the chat template"
            )
        if (starts > shared).any() or (starts < 1).any():
            bad = [names[i] for i in np.nonzero((starts > shared) | (starts < 1))[0][:5]]
            raise EvaluationError(
                f"answers of {bad} start outside the shared prefix [1, {shared}]; check the chat template"
            )
        return cls(names=tuple(names), prefix_ids=full[0][:shared].copy(),
                   continuations=tuple(ids[shared:].copy() for ids in full), answer_start=starts)

    @property
    def num_answer_tokens(self) -> np.ndarray:
        """Answer tokens per candidate: the ones in the shared prefix after answer_start plus the continuation."""
        lengths = np.array([len(c) for c in self.continuations], dtype=np.int64)
        return len(self.prefix_ids) - self.answer_start + lengths

    def full_ids(self, index: int) -> np.ndarray:
        return np.concatenate([self.prefix_ids, self.continuations[index]])

    def encoded(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """(input_ids, labels) per candidate, the shape the naive scorer takes."""
        pairs = []
        for c in range(len(self.names)):
            ids = self.full_ids(c)
            labels = ids.copy()
            labels[: self.answer_start[c]] = IGNORE_INDEX
            pairs.append((ids, labels))
        return pairs


# --- Scoring ------------------------------------------------------------------------------------------------------

def _model_input_dtype(model) -> torch.dtype:
    return next(model.parameters()).dtype


def _token_logprobs(logits: torch.Tensor, targets: torch.Tensor, slice_len: int = 256) -> torch.Tensor:
    """log p(target) per position [..., T], in float32 whatever the model's dtype.

    Works through T in slices so that the float32 copy of a large vocabulary's logits stays small.
    """
    parts = []
    for begin in range(0, logits.shape[-2], slice_len):
        part = logits[..., begin:begin + slice_len, :].float()
        target = targets[..., begin:begin + slice_len].unsqueeze(-1)
        parts.append(part.gather(-1, target).squeeze(-1) - torch.logsumexp(part, dim=-1))
    return torch.cat(parts, dim=-1)


def _cache_kwarg(model) -> str:
    """The forward's name for the key/value cache: ``cache`` since transformers 5.2x, ``past_key_values`` before."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # a peft wrapper
    return "cache" if "cache" in inspect.signature(type(base).forward).parameters else "past_key_values"


def _output_cache(output):
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)


def _cache_layers(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise EvaluationError(f"expected a transformers Cache with .layers from the prefix forward; got {type(cache)}")
    return [(layer.keys, layer.values) for layer in layers]


def _auto_layout(model) -> str:
    # A custom 4D mask needs an attention that takes one as given; flash-attention kernels take only padding masks.
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return "packed" if getattr(config, "_attn_implementation", None) in ("sdpa", "eager") else "expanded"


@dataclass
class _Prefix:
    """The prefix's key/values (B rows) and how to continue from them."""

    model: object
    layers: list[tuple[torch.Tensor, torch.Tensor]]
    length: int
    cache_kwarg: str

    def forward(self, input_ids, attention_mask, position_ids, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of ``input_ids`` continuing the prefix; ``rows`` picks (and repeats) prefix rows per input row."""
        from transformers import DynamicCache

        data = self.layers if rows is None else [(k[rows], v[rows]) for k, v in self.layers]
        # A fresh cache per call: the forward appends to it, and the prefix must stay as it is for the next chunk.
        cache = DynamicCache(ddp_cache_data=data, config=self.model.config)
        return self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          use_cache=True, **{self.cache_kwarg: cache}).logits


def _score_packed(prefix: _Prefix, chunk: list[np.ndarray], num_images: int) -> torch.Tensor:
    """[B, len(chunk)]: log p of each continuation's tokens after its first, all candidates in one row per image.

    The candidates are laid end to end after the prefix; a block-diagonal causal mask lets each token see the
    prefix and the earlier tokens of its own candidate only, and position ids restart at the prefix length for
    each candidate, so every token sees exactly what it would in its own sequence. The prefix is not copied per
    candidate and no padding is computed.
    """
    device = prefix.layers[0][0].device
    dtype = _model_input_dtype(prefix.model)
    inputs = torch.as_tensor(np.concatenate([c[:-1] for c in chunk]), dtype=torch.long, device=device)
    targets = torch.as_tensor(np.concatenate([c[1:] for c in chunk]), dtype=torch.long, device=device)
    segment = torch.as_tensor(np.repeat(np.arange(len(chunk)), [len(c) - 1 for c in chunk]), device=device)
    offsets = torch.as_tensor(np.concatenate([np.arange(len(c) - 1) for c in chunk]), device=device)
    packed = len(inputs)
    order = torch.arange(packed, device=device)
    allowed = torch.ones(packed, prefix.length + packed, dtype=torch.bool, device=device)
    allowed[:, prefix.length:] = (segment[:, None] == segment[None, :]) & (order[None, :] <= order[:, None])
    # An additive float mask serves both sdpa and eager attention.
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, torch.finfo(dtype).min)
    logits = prefix.forward(
        input_ids=inputs.unsqueeze(0).expand(num_images, -1),
        attention_mask=mask[None, None].expand(num_images, 1, -1, -1),
        position_ids=(prefix.length + offsets).unsqueeze(0).expand(num_images, -1),
    )
    token_lp = _token_logprobs(logits, targets.unsqueeze(0).expand(num_images, -1))
    sums = torch.zeros(num_images, len(chunk), dtype=torch.float32, device=device)
    return sums.index_add_(1, segment, token_lp)


def _score_expanded(prefix: _Prefix, chunk: list[np.ndarray], num_images: int) -> torch.Tensor:
    """[B, len(chunk)] like _score_packed, for any attention: the prefix cache is repeated once per (image,
    candidate) row and the candidates are right-padded (padding comes after every real token, so the causal
    mask alone keeps it out of their view; the padding mask makes that explicit)."""
    device = prefix.layers[0][0].device
    width = max(len(c) for c in chunk) - 1
    inputs = torch.zeros(len(chunk), width, dtype=torch.long)
    targets = torch.zeros(len(chunk), width, dtype=torch.long)
    valid = torch.zeros(len(chunk), width, dtype=torch.long)
    for c, tokens in enumerate(chunk):
        tokens = torch.as_tensor(np.asarray(tokens), dtype=torch.long)
        n = len(tokens) - 1
        inputs[c, :n], targets[c, :n], valid[c, :n] = tokens[:-1], tokens[1:], 1
    rows = num_images * len(chunk)
    inputs, targets, valid = (t.to(device).repeat(num_images, 1) for t in (inputs, targets, valid))
    logits = prefix.forward(
        input_ids=inputs,
        attention_mask=torch.cat([torch.ones(rows, prefix.length, dtype=torch.long, device=device), valid], 1),
        position_ids=torch.arange(prefix.length, prefix.length + width, device=device).unsqueeze(0).expand(rows, -1),
        rows=torch.arange(num_images, device=device).repeat_interleave(len(chunk)),
    )
    token_lp = _token_logprobs(logits, targets) * valid
    return token_lp.sum(1).view(num_images, len(chunk))


def score_candidates_shared_prefix(
    model,
    pixel_values: torch.Tensor,
    prefix_ids: np.ndarray,
    candidates: Sequence[np.ndarray],
    *,
    answer_start: int | Sequence[int] | np.ndarray | None = None,
    candidate_batch: int = 128,
    layout: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-likelihood of every candidate continuation for every image, sharing one prefix forward per batch.

    pixel_values [B, 3, H, W]; prefix_ids [P] (image tokens and prompt, identical for all candidates);
    candidates: C arrays of token ids that follow the prefix. ``answer_start`` (one index into prefix + candidate,
    or one per candidate, default P) says where the scored answer begins, so answer tokens inside the shared prefix
    ("This is a") count too. The prefix runs once with the images; each candidate's first token is scored from its
    last logits, the rest by one forward per ``candidate_batch`` candidates (for all B images) from its cache.
    ``layout``: "packed" (candidates end to end under a block-diagonal mask; sdpa/eager attention), "expanded"
    (the cache copied for each image x candidate row, right-padded; any attention, but a forward then holds
    B x candidate_batch copies of the prefix's keys and values) or "auto" (packed where the attention allows).
    Returns (loglik float32 [B, C] on the CPU, num_tokens int64 [C]).
    """
    if candidate_batch < 1:
        raise EvaluationError(f"candidate_batch must be >= 1; got {candidate_batch}")
    if not candidates or any(len(c) == 0 for c in candidates):
        raise EvaluationError("every candidate needs at least one token after the shared prefix")
    if layout not in ("auto", "packed", "expanded"):
        raise EvaluationError(f"layout must be auto, packed or expanded; got {layout!r}")
    device = model.device
    num_images, num_candidates, prefix_len = pixel_values.shape[0], len(candidates), len(prefix_ids)
    candidates = [np.asarray(c, dtype=np.int64) for c in candidates]
    starts = np.broadcast_to(np.asarray(prefix_len if answer_start is None else answer_start, dtype=np.int64),
                             (num_candidates,))
    if (starts < 1).any() or (starts > prefix_len).any():
        raise EvaluationError(f"answer_start must lie in [1, {prefix_len}]; got {starts.min()}..{starts.max()}")
    first = int(starts.min())
    in_prefix = prefix_len - first  # answer tokens inside the shared prefix (for the earliest-starting candidate)

    prefix = torch.as_tensor(np.asarray(prefix_ids), dtype=torch.long, device=device)
    out = model(
        input_ids=prefix.unsqueeze(0).expand(num_images, -1),
        pixel_values=pixel_values.to(device=device, dtype=_model_input_dtype(model)),
        use_cache=True,
        logits_to_keep=in_prefix + 1,
    )
    prefix_logits = out.logits  # [B, in_prefix + 1, V]: predictions of prefix[first:] and of the first candidate token
    scores = torch.zeros(num_images, num_candidates, dtype=torch.float32, device=device)
    if in_prefix:
        shared_lp = _token_logprobs(prefix_logits[:, :-1], prefix[first:].unsqueeze(0).expand(num_images, -1))
        # suffix[:, i] = sum of shared_lp[:, i:]; candidate c starts at i = starts[c] - first (0 when i == in_prefix).
        suffix = torch.cat([shared_lp.flip(1).cumsum(1).flip(1), torch.zeros_like(shared_lp[:, :1])], dim=1)
        scores += suffix[:, torch.as_tensor(starts - first, device=device)]
    first_tokens = torch.as_tensor([int(c[0]) for c in candidates], device=device)
    last = prefix_logits[:, -1].float()
    scores += last.gather(1, first_tokens.expand(num_images, -1)) - torch.logsumexp(last, -1, keepdim=True)

    longer = [c for c in range(num_candidates) if len(candidates[c]) > 1]
    if longer:
        state = _Prefix(model, _cache_layers(_output_cache(out)), prefix_len, _cache_kwarg(model))
        del out, prefix_logits
        layout = _auto_layout(model) if layout == "auto" else layout
        score_rest = _score_packed if layout == "packed" else _score_expanded
        for begin in range(0, len(longer), candidate_batch):
            chunk = longer[begin:begin + candidate_batch]
            scores[:, chunk] += score_rest(state, [candidates[c] for c in chunk], num_images)
    lengths = np.array([len(c) for c in candidates])
    num_tokens = torch.as_tensor(prefix_len - starts + lengths, dtype=torch.long)
    return scores.cpu(), num_tokens


def score_candidates_naive(
    model, pixel_values: torch.Tensor, encoded: Sequence[tuple[np.ndarray, np.ndarray]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference scorer: one full forward (image + prompt + answer) per image and candidate.

    ``encoded`` holds (input_ids, labels) per candidate, labels -100 outside the answer, as PromptEncoder makes them.
    Returns (summed answer log-likelihood float32 [B, C], answer token counts int64 [C]).
    """
    device = model.device
    pixel_values = pixel_values.to(device=device, dtype=_model_input_dtype(model))
    scores = torch.zeros(pixel_values.shape[0], len(encoded), dtype=torch.float32)
    counts = torch.zeros(len(encoded), dtype=torch.long)
    for c, (input_ids, labels) in enumerate(encoded):
        ids = torch.as_tensor(np.asarray(input_ids), dtype=torch.long, device=device).unsqueeze(0)
        answer = torch.as_tensor(np.asarray(labels) != IGNORE_INDEX, device=device)
        counts[c] = int(answer.sum())
        # Position j is predicted by the logits at j - 1.
        scored = answer[1:]
        for b in range(pixel_values.shape[0]):
            logits = model(input_ids=ids, pixel_values=pixel_values[b:b + 1]).logits[0, :-1]
            scores[b, c] = _token_logprobs(logits[scored], ids[0, 1:][scored]).sum().cpu()
    return scores, counts


def normalize_scores(loglik: torch.Tensor, num_tokens: torch.Tensor, normalize: str = "mean") -> torch.Tensor:
    """'sum': total log-likelihood; 'mean': log-likelihood per answer token (see the module docstring)."""
    if normalize == "sum":
        return loglik
    if normalize == "mean":
        return loglik / num_tokens.to(loglik.dtype)
    raise EvaluationError(f"normalize must be one of {NORMALIZE}; got {normalize!r}")


# --- Generation and answer matching -------------------------------------------------------------------------------

def generate_answers(model, processor, pixel_values: torch.Tensor, prompt_ids: np.ndarray,
                     max_new_tokens: int = 16) -> list[str]:
    """Greedy answers, one per image, decoded without special tokens."""
    device = model.device
    prompt = torch.as_tensor(np.asarray(prompt_ids), dtype=torch.long, device=device)
    prompt = prompt.unsqueeze(0).expand(pixel_values.shape[0], -1).contiguous()
    tokenizer = processor.tokenizer
    output = model.generate(
        input_ids=prompt,
        attention_mask=torch.ones_like(prompt),
        pixel_values=pixel_values.to(device=device, dtype=_model_input_dtype(model)),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
    )
    return tokenizer.batch_decode(output[:, prompt.shape[1]:], skip_special_tokens=True)


_LEAD_IN = re.compile(r"^(?:(?:this|that|it)\s+(?:is|s)\s+|its\s+)?(?:a|an|the)\s+")


def normalize_name(text: str) -> str:
    """Lowercase, hyphens as spaces, other punctuation dropped, whitespace collapsed."""
    text = text.lower().replace("-", " ").replace("_", " ")
    text = re.sub(r"[^\w\s]", "", text)
    return " ".join(text.split())


def _answer_core(text: str) -> str:
    # Only the first sentence or line counts: a model may ramble on after the name.
    first = re.split(r"[.\n]", text.strip(), maxsplit=1)[0]
    return _LEAD_IN.sub("", normalize_name(first))


def match_answer(text: str, names: Sequence[str] = CATEGORY_NAMES,
                 cutoff: float = MATCH_CUTOFF) -> tuple[int | None, str, float]:
    """Map a generated answer to a label: (label or None, "exact" | "closest" | "unmatched", similarity 0..1).

    "This is a/an/the" is stripped and case and punctuation ignored; failing an exact match, the name with the
    highest difflib ratio wins if it reaches ``cutoff`` (ties go to the lower label).
    """
    core = _answer_core(text)
    normalized = [normalize_name(name) for name in names]
    if core in normalized:
        return normalized.index(core), "exact", 1.0
    if not core:
        return None, "unmatched", 0.0
    ratios = [difflib.SequenceMatcher(None, core, name).ratio() for name in normalized]
    best = int(np.argmax(ratios))
    if ratios[best] >= cutoff:
        return best, "closest", float(ratios[best])
    return None, "unmatched", float(ratios[best])


# --- Evaluating a split -------------------------------------------------------------------------------------------

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
    method: str = "rank",
    names: Sequence[str] = CATEGORY_NAMES,
    batch_size: int = 8,
    normalize: str = "mean",
    max_samples: int | None = None,
    progress: Callable[[int, int | None], None] | None = None,
    scorer: str = "shared",
    candidate_batch: int = 128,
    layout: str = "auto",
    max_new_tokens: int = 16,
) -> EvalResult:
    """Predict a label for every image of one split, streaming its shards in batches on ``model.device``.

    method "rank" scores all ``names`` as answers and takes the best (``scorer="naive"`` is the slow reference,
    for checks and benchmarks; ``candidate_batch`` and ``layout`` go to score_candidates_shared_prefix);
    "generate" answers greedily and maps the text to a name with match_answer.
    """
    if method not in METHODS:
        raise EvaluationError(f"method must be one of {METHODS}; got {method!r}")
    if normalize not in NORMALIZE:
        raise EvaluationError(f"normalize must be one of {NORMALIZE}; got {normalize!r}")
    if scorer not in SCORERS:
        raise EvaluationError(f"scorer must be one of {SCORERS}; got {scorer!r}")
    if batch_size < 1:
        raise EvaluationError(f"batch_size must be >= 1; got {batch_size}")
    names = tuple(names)
    paths = split_shard_paths(shards_dir, split)
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} shard(s) listed in {Path(shards_dir) / 'index.json'} are missing, "
                                f"e.g. {missing[0]}; rebuild the shards")
    total = int(read_index(shards_dir)["splits"][split]["samples"])
    if max_samples is not None:
        total = min(total, max_samples)

    encoder = PromptEncoder(processor)
    normalizer = PixelNormalizer.from_processor(processor.image_processor)
    candidates = CandidateSet.from_encoder(encoder, names) if method == "rank" else None
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
                if method == "rank":
                    rows.extend(_rank_rows(model, batch, pixel_values, candidates, encoded, normalize,
                                           candidate_batch, layout))
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
                      seconds=seconds, images_per_second=len(rows) / seconds)


def _rank_rows(model, batch, pixel_values, candidates: CandidateSet, encoded, normalize, candidate_batch,
               layout) -> list[dict]:
    if encoded is not None:
        loglik, num_tokens = score_candidates_naive(model, pixel_values, encoded)
    else:
        loglik, num_tokens = score_candidates_shared_prefix(
            model, pixel_values, candidates.prefix_ids, candidates.continuations,
            answer_start=candidates.answer_start, candidate_batch=candidate_batch, layout=layout)
    scores = normalize_scores(loglik, num_tokens, normalize)
    top = scores.topk(min(5, scores.shape[1]), dim=1)
    rows = []
    for i, sample in enumerate(batch):
        best = int(top.indices[i, 0])
        rows.append(_row(sample, best, candidates.names[best], float(top.values[i, 0]),
                         [int(x) for x in top.indices[i]], None, "rank", candidates.names))
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
            "name": sample.meta.get("name", names[label]), "predicted_label": predicted,
            "predicted_name": predicted_name, "correct": predicted is not None and predicted == label,
            "score": score, "top5": top5, "answer_text": answer_text, "match": match}


def _predictions_frame(rows: list[dict]) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=list(PREDICTION_COLUMNS))
    return frame.astype({"image_id": "int64", "label": "int64", "predicted_label": "Int64", "correct": "bool",
                         "score": "float64"})
