"""The question, the answer and their token ids, built with the processor's own chat template.

Token ids depend only on the category (the image tokens are placeholders the model fills in), so they
are encoded once per category and reused for every image of it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
from PIL import Image

from plant_pipeline.ml.shards.format import IGNORE_INDEX

QUESTION = "What flower is this?"


def answer_text(name: str) -> str:
    return f"This is a {name}."


def conversation(question: str, answer: str | None = None) -> list[dict]:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    if answer is not None:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return messages


def load_processor(model_source: str, revision: str | None = None, local_files_only: bool = True):
    """The model's processor (tokenizer, image processor, chat template) from a folder or a hub id."""
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(model_source, revision=revision, local_files_only=local_files_only)


def common_prefix_length(arrays: Sequence[np.ndarray]) -> int:
    """How many leading tokens all ``arrays`` share."""
    n = min(len(a) for a in arrays)
    stacked = np.stack([a[:n] for a in arrays])
    differs = np.nonzero((stacked != stacked[0]).any(axis=0))[0]
    return int(differs[0]) if len(differs) else n


def _output_size(image_processor) -> tuple[int, int]:
    """(width, height) the processor crops or resizes to, where it says; else a small square."""
    for attr in ("crop_size", "size"):
        size = getattr(image_processor, attr, None)
        height, width = (getattr(size, "height", None), getattr(size, "width", None)) if size is not None else (None, None)
        if isinstance(size, dict):
            height, width = size.get("height"), size.get("width")
        if height and width:
            return int(width), int(height)
    return 32, 32


@dataclass
class PromptEncoder:
    """Encodes (question, answer) pairs into ``input_ids`` and ``labels`` for one processor.

    The answer starts where the tokens of the full conversation first differ from those of the bare
    generation prompt: BPE tokenizers often merge the prompt's trailing space into the answer's first
    word, so ``len(prompt_ids)`` would mislabel one position.
    """

    processor: object
    question: str = QUESTION
    _cache: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        # Any image will do: the processor resizes it, so the image-token count is the model's own. One of
        # the processor's output size makes that resize a copy.
        self._blank = Image.new("RGB", _output_size(self.processor.image_processor))
        self.image_token_id = self.processor.tokenizer.convert_tokens_to_ids(self.processor.image_token)
        self.prompt_ids = self._ids(self.processor.apply_chat_template(
            conversation(self.question), tokenize=False, add_generation_prompt=True
        ))

    def _ids(self, text: str) -> np.ndarray:
        # Through the processor so the image placeholder is expanded exactly as at training time.
        # Pixel values are discarded: skip normalising them (one full-size image per class adds up).
        out = self.processor(text=[text], images=[self._blank], return_tensors="np",
                             do_rescale=False, do_normalize=False)
        return np.asarray(out["input_ids"][0], dtype=np.int32)

    @property
    def num_image_tokens(self) -> int:
        return int((self.prompt_ids == self.image_token_id).sum())

    def encode(self, answer: str) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids, labels) for the conversation ending in ``answer``; labels are -100 on the prompt."""
        if answer not in self._cache:
            self._store(answer, self._ids(self._text(answer)))
        input_ids, labels = self._cache[answer]
        return input_ids.copy(), labels.copy()

    def encode_category(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        return self.encode(answer_text(name))

    def encode_categories(self, names: Sequence[str]) -> list[tuple[np.ndarray, np.ndarray]]:
        """encode_category for each of ``names``, in one tokenizer call rather than a processor call each.

        The image is the same blank in every prompt, so the processor expands its placeholder the same way
        each time. The batch uses that expansion (the placeholder repeated ``num_image_tokens`` times), and
        is kept only where its first prompt equals the processor's own ids; otherwise each name goes
        through the processor.
        """
        answers = [answer for answer in dict.fromkeys(map(answer_text, names)) if answer not in self._cache]
        texts = [self._text(answer) for answer in answers]
        batch = self._tokenize_expanded(texts) if len(texts) > 1 else None
        if batch is not None and np.array_equal(batch[0], self._ids(texts[0])):
            for answer, input_ids in zip(answers, batch):
                self._store(answer, input_ids)
        return [self.encode_category(name) for name in names]

    def _text(self, answer: str) -> str:
        return self.processor.apply_chat_template(conversation(self.question, answer), tokenize=False)

    def _tokenize_expanded(self, texts: Sequence[str]) -> list[np.ndarray] | None:
        # Tokenize with the placeholder as one token, then repeat that token: the same ids as tokenizing the
        # expanded text (encode_categories checks), without scanning hundreds of placeholders in every text.
        out = []
        for ids in self.processor.tokenizer(list(texts))["input_ids"]:
            ids = np.asarray(ids, dtype=np.int32)
            at = np.flatnonzero(ids == self.image_token_id)
            if len(at) != 1:
                return None
            out.append(np.concatenate([ids[:at[0]], np.repeat(ids[at], self.num_image_tokens), ids[at[0] + 1:]]))
        return out

    def _store(self, answer: str, input_ids: np.ndarray) -> None:
        start = common_prefix_length([self.prompt_ids, input_ids])
        if start >= len(input_ids):
            raise ValueError(f"answer {answer!r} produced no tokens after the prompt; check the chat template")
        labels = input_ids.copy()
        labels[:start] = IGNORE_INDEX
        self._cache[answer] = (input_ids, labels)
