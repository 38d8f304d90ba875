"""The "generate" method: answer each image greedily, then map the free text to a category name."""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence

import numpy as np
import torch

from plant_pipeline.ml.evaluation.scoring import model_input_dtype

MATCH_CUTOFF = 0.75


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
        pixel_values=pixel_values.to(device=device, dtype=model_input_dtype(model)),
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


def match_answer(text: str, names: Sequence[str],
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
