"""Rank candidate answers by likelihood: every category name scored as the answer for each image.

The image and prompt run once per batch of images, and every candidate's remaining tokens are scored from
that key/value cache in one more forward (score_candidates_shared_prefix) instead of one full forward per
candidate (score_candidates_naive, the reference). Scores are length-normalised by default (``"mean"``, the
average log-probability per answer token): the summed log-likelihood adds one negative term per token, so a
6-token "giant white arum lily" loses to a 1-token "rose" whenever the model is unsure of either, which biases
an untrained or lightly tuned model towards short names. All answers share "This is a" and the closing "." and
eos, which keeps the mean close to the sum's choice once the model is confident. ``"sum"`` is the plain joint
likelihood (what greedy decoding approximates), kept for comparison.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from plant_pipeline.ml.errors import UsageError
from plant_pipeline.ml.shards.format import IGNORE_INDEX
from plant_pipeline.ml.shards.prompts import PromptEncoder, common_prefix_length

NORMALIZE = ("mean", "sum")
# "auto" ranks every name up to RANK_ALL_UP_TO names; beyond, it prunes to the names under the PRUNE_KEEP likeliest
# first tokens: full ranking's cost grows with the names' total tokens, the pruned one's mostly with K.
RANK_ALL_UP_TO = 2000
PRUNE_KEEP = 64


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
    def from_encoder(cls, encoder: PromptEncoder, names: Sequence[str]) -> CandidateSet:
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


def choose_method(method: str, num_names: int) -> tuple[str, str]:
    """(the method to run, why): "auto" ranks all names up to RANK_ALL_UP_TO, prunes beyond."""
    if method != "auto":
        return method, f"{method} as configured"
    if num_names <= RANK_ALL_UP_TO:
        return "rank", f"auto: rank all {num_names} names (<= {RANK_ALL_UP_TO})"
    return "prune", (f"auto: {num_names} names > {RANK_ALL_UP_TO}; rank the names under the {PRUNE_KEEP} likeliest "
                     "first tokens per image batch")


# --- Scoring ------------------------------------------------------------------------------------------------------

def model_input_dtype(model) -> torch.dtype:
    """The dtype the model's weights (and so its pixel inputs) are in."""
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
    dtype = model_input_dtype(prefix.model)
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
    keep_first_tokens: int | None = None,
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
    ``keep_first_tokens`` K prunes by a first-token trie: only candidates whose first continuation token is among
    the K likeliest distinct first tokens (for any image of the batch) are scored further, the others get -inf.
    Pruning returns the same best candidate as full ranking whenever that candidate's first token is in the top K;
    it can differ when the best answer starts with an unlikely token that its later tokens make up for (more so
    under "mean" normalisation, which rewards long names with confident tails).
    Memory: the [B, C] score matrix plus one forward of ``candidate_batch`` candidates, whatever C is.
    Returns (loglik float32 [B, C] on the CPU, num_tokens int64 [C]).
    """
    if keep_first_tokens is not None and keep_first_tokens < 1:
        raise EvaluationError(f"keep_first_tokens must be >= 1 or None; got {keep_first_tokens}")
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
        pixel_values=pixel_values.to(device=device, dtype=model_input_dtype(model)),
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
    if keep_first_tokens is not None:
        distinct = torch.unique(first_tokens)
        if keep_first_tokens < len(distinct):
            first_lp = last[:, distinct]  # [B, distinct first tokens]: one column per trie branch
            top = first_lp.topk(keep_first_tokens, dim=1).indices.flatten().unique()
            kept = torch.isin(first_tokens, distinct[top]).cpu().numpy()
            scores[:, torch.as_tensor(~kept, device=device)] = float("-inf")
            longer = [c for c in longer if kept[c]]
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
    pixel_values = pixel_values.to(device=device, dtype=model_input_dtype(model))
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
    """'sum': total log-likelihood; 'mean': log-likelihood per answer token (see this module's docstring)."""
    if normalize == "sum":
        return loglik
    if normalize == "mean":
        return loglik / num_tokens.to(loglik.dtype)
    raise EvaluationError(f"normalize must be one of {NORMALIZE}; got {normalize!r}")


def rank_candidates(model, pixel_values: torch.Tensor, candidates: CandidateSet, *, normalize: str = "mean",
                    candidate_batch: int = 128, layout: str = "auto",
                    keep_first_tokens: int | None = None) -> torch.Tensor:
    """Every candidate's normalised score for every image, float32 [B, C] on the CPU, higher is likelier: the one
    ranking that evaluation and the Identifier share (score_candidates_shared_prefix, then normalize_scores).

    Candidates pruned by ``keep_first_tokens`` score -inf.
    """
    loglik, num_tokens = score_candidates_shared_prefix(
        model, pixel_values, candidates.prefix_ids, candidates.continuations, answer_start=candidates.answer_start,
        candidate_batch=candidate_batch, layout=layout, keep_first_tokens=keep_first_tokens)
    return normalize_scores(loglik, num_tokens, normalize)
