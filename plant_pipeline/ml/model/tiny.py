"""Build ``tiny-random-llava``: a LLaVA small enough to train in minutes on a CPU, made offline.

A CLIP-style vision tower and a Llama-style language model with random weights, a byte-level BPE
tokenizer trained here on the prompts and the 102 category names, and a real ``LlavaProcessor``
with a chat template. It is saved with ``save_pretrained`` so it loads through exactly the same
``from_pretrained`` path as a model from the Hugging Face hub.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from plant_pipeline.ml.data.categories import CATEGORY_NAMES
from plant_pipeline.ml.files import staging_folder

logger = logging.getLogger(__name__)

TINY_MODEL_NAME = "tiny-random-llava"
IMAGE_TOKEN = "<image>"
PAD_TOKEN = "<pad>"
BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
SPEC_FILE = "tiny_llava_spec.json"

# LLaVA-1.5 style conversation; the generation prompt ends where the answer starts.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>\n{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% if message['role'] == 'user' %} {% else %}{{ eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT: {% endif %}"
)


@dataclass(frozen=True)
class TinyLlavaSpec:
    """Sizes of the tiny model; the defaults train on 2 CPU cores in minutes."""

    seed: int = 0
    image_size: int = 64
    patch_size: int = 8
    vision_hidden: int = 96
    vision_layers: int = 3
    vision_heads: int = 4
    text_hidden: int = 128
    text_layers: int = 2
    text_heads: int = 4
    vocab_size: int = 1024

    @property
    def image_seq_length(self) -> int:
        return (self.image_size // self.patch_size) ** 2


def training_corpus(extra: tuple[str, ...] = ("USER: ASSISTANT: ",)) -> list[str]:
    """The questions, the 102 answers and the chat template's role markers (``extra``), repeated by weight."""
    questions = ["What flower is this?", "What plant is this?", "Which flower is shown in the image?"]
    answers = [f"This is a {name}." for name in CATEGORY_NAMES]
    return questions * 50 + answers * 20 + [" ".join(extra) * 10]


def train_bpe(corpus: list[str], vocab_size: int, special_tokens: list[str], pre_tokenizer, alphabet: list[str]):
    """A ``tokenizers`` BPE trained on ``corpus`` (deterministic: same corpus, same vocabulary)."""
    from tokenizers import Tokenizer, models, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizer
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special_tokens, initial_alphabet=alphabet,
                                  show_progress=False)
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    return tokenizer


def bpe_vocab_and_merges(tokenizer) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The trained model's vocabulary and merges, as a tokenizer class's ``vocab=``/``merges=`` take them."""
    model = json.loads(tokenizer.to_str())["model"]
    return model["vocab"], [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]


def _build_tokenizer(spec: TinyLlavaSpec):
    from tokenizers import decoders, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokenizer = train_bpe(training_corpus(), spec.vocab_size, [PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, IMAGE_TOKEN],
                          pre_tokenizers.ByteLevel(add_prefix_space=False), pre_tokenizers.ByteLevel.alphabet())
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=None,
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        padding_side="right",
    )


def build_tiny_processor(spec: TinyLlavaSpec = TinyLlavaSpec()):
    """The tiny model's ``LlavaProcessor`` (its tokenizer trained here, deterministically); also a processor for
    random models of other shapes that need no real vocabulary."""
    from transformers import LlavaProcessor
    from transformers.models.clip import CLIPImageProcessorPil

    tokenizer = _build_tokenizer(spec)
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": spec.image_size},
        crop_size={"height": spec.image_size, "width": spec.image_size},
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=spec.patch_size,
        vision_feature_select_strategy="default",
        # CLIP prepends a CLS token that the "default" strategy drops; the processor must count it.
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )


def _build_model(spec: TinyLlavaSpec, tokenizer):
    from transformers import CLIPVisionConfig, LlamaConfig

    vision = CLIPVisionConfig(
        hidden_size=spec.vision_hidden,
        intermediate_size=spec.vision_hidden * 4,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_heads,
        image_size=spec.image_size,
        patch_size=spec.patch_size,
        projection_dim=spec.vision_hidden,
    )
    text = LlamaConfig(
        hidden_size=spec.text_hidden,
        intermediate_size=spec.text_hidden * 4,
        num_hidden_layers=spec.text_layers,
        num_attention_heads=spec.text_heads,
        num_key_value_heads=spec.text_heads,
        vocab_size=len(tokenizer),
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    return build_llava_model(vision, text, tokenizer, image_seq_length=spec.image_seq_length,
                             strategy="default", feature_layer=-1, seed=spec.seed)


def build_llava_model(vision, text, tokenizer, *, image_seq_length: int, strategy: str, feature_layer: int,
                      seed: int):
    """A ``LlavaForConditionalGeneration`` with random weights (seeded) from a vision and a text config."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=image_seq_length,
        vision_feature_select_strategy=strategy,
        vision_feature_layer=feature_layer,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=text.tie_word_embeddings,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def save_built(out_dir: str | os.PathLike, spec_file: str, spec: dict, build) -> Path:
    """``build()`` -> (model, processor), saved into ``out_dir`` unless it already holds this ``spec``.

    Saved into a staging folder that then replaces ``out_dir`` whole, so a crash never leaves a half-saved
    model that a later run would load.
    """
    out_dir = Path(out_dir)
    saved = out_dir / spec_file
    if saved.exists() and json.loads(saved.read_text()) == spec:
        return out_dir
    logger.info("building %s into %s", spec_file, out_dir)
    model, processor = build()
    with staging_folder(out_dir) as staged:
        model.save_pretrained(staged)
        processor.save_pretrained(staged)
        (staged / spec_file).write_text(json.dumps(spec, indent=2))
    return out_dir


def build_tiny_llava(out_dir: str | os.PathLike, spec: TinyLlavaSpec = TinyLlavaSpec()) -> Path:
    """Build the tiny model deterministically into ``out_dir`` unless it is already there with this spec."""

    def build():
        processor = build_tiny_processor(spec)
        return _build_model(spec, processor.tokenizer), processor

    return save_built(out_dir, SPEC_FILE, asdict(spec), build)
