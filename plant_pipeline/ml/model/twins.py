"""Offline twins of the documented real models: the same classes, processor geometry, vision-feature strategy,
tokenizer class and chat template as each hub model, with random weights and small widths (built by tiny.py's
builders). A twin folder loads through ``ModelSpec(model_name=<folder>, local_files_only=True)`` like the hub
model, so the tests run the real models' code path without the hub.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

from plant_pipeline.ml.model.tiny import (
    IMAGE_TOKEN,
    bpe_vocab_and_merges,
    build_llava_model,
    save_built,
    train_bpe,
    training_corpus,
)

TWIN_SPEC_FILE = "twin_spec.json"

# llava-hf/llava-interleave-qwen-0.5b-hf's chat_template.json: images first, then the text, ChatML turns.
QWEN_INTERLEAVE_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}"
    "{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
    "{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] }}{% endgeneration %}{% endfor %}{% endif %}"
    "{{'<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# llava-hf/llava-1.5-7b-hf's chat_template.json: "USER: <image>\n... ASSISTANT:"; no BOS (the tokenizer adds
# it), no EOS after the answer, and the generation prompt ends without the space the answer starts with.
LLAVA_15_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}"
    "{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


@dataclass(frozen=True)
class TwinSpec:
    """One real model's shape, shrunk: what must match it (kinds, strategy, template) and the small sizes."""

    real_model: str
    vision: str  # "siglip" (no CLS token) or "clip" (CLS token)
    text: str  # "qwen2" or "llama"
    image_size: int  # the image processor's output square; the real ones are 384 and 336
    patch_size: int  # the real patch size (14): 384 is not a multiple of it, and neither is the twin's size
    strategy: str  # vision_feature_select_strategy
    feature_layer: int  # vision_feature_layer
    tie_word_embeddings: bool
    seed: int = 0
    vision_hidden: int = 64
    vision_layers: int = 3
    vision_heads: int = 4
    text_hidden: int = 96
    text_layers: int = 2
    text_heads: int = 4
    vocab_size: int = 1024

    @property
    def folder_name(self) -> str:
        return "twin-" + self.real_model.split("/")[-1]

    @property
    def image_seq_length(self) -> int:
        return (self.image_size // self.patch_size) ** 2


QWEN_INTERLEAVE_05B = TwinSpec(
    real_model="llava-hf/llava-interleave-qwen-0.5b-hf", vision="siglip", text="qwen2", image_size=64, patch_size=14,
    strategy="full", feature_layer=-1, tie_word_embeddings=True)
LLAVA_15_7B = TwinSpec(
    real_model="llava-hf/llava-1.5-7b-hf", vision="clip", text="llama", image_size=56, patch_size=14,
    strategy="default", feature_layer=-2, tie_word_embeddings=False)
TWINS = {spec.real_model: spec for spec in (QWEN_INTERLEAVE_05B, LLAVA_15_7B)}


def _qwen2_tokenizer(spec: TwinSpec):
    """Qwen2Tokenizer as Qwen1.5-Chat's: ChatML markers, no BOS, EOS <|im_end|>, pad <|endoftext|>."""
    from tokenizers import Regex, pre_tokenizers
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", IMAGE_TOKEN]
    split = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
                                     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    trained = train_bpe(training_corpus(("user\n", "assistant\n")), spec.vocab_size, specials, split,
                        pre_tokenizers.ByteLevel.alphabet())
    vocab, merges = bpe_vocab_and_merges(trained)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None, eos_token="<|im_end|>",
                               pad_token="<|endoftext|>", extra_special_tokens={"image_token": IMAGE_TOKEN})
    # Added tokens, as in the real tokenizer: never split by the BPE, even <|im_start|>, which no setting names.
    tokenizer.add_tokens(specials, special_tokens=True)
    return tokenizer


def _llama_tokenizer(spec: TwinSpec):
    """LlamaTokenizer as llava-1.5's: sentencepiece-style "▁" spaces, BOS <s> added, <image> and <pad> added."""
    from tokenizers import pre_tokenizers
    from transformers import LlamaTokenizer

    # Trained on words (as sentencepiece splits on whitespace), so no merge crosses a space; LlamaTokenizer then
    # encodes without splitting, as the real one does.
    metaspace = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    alphabet = sorted(set("".join(training_corpus())) - {" "}) + ["▁"]
    trained = train_bpe(training_corpus(("USER:", "ASSISTANT:")), spec.vocab_size, ["<unk>", "<s>", "</s>"],
                        metaspace, alphabet)
    vocab, merges = bpe_vocab_and_merges(trained)
    # Byte-fallback tokens right after the specials, as in Llama's vocabulary: a character the BPE never saw
    # (the template's "\n") becomes its UTF-8 bytes, not <unk>.
    ordered = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    ordered += [token for token, _ in sorted(vocab.items(), key=lambda item: item[1]) if token not in ordered]
    vocab = {token: i for i, token in enumerate(ordered)}
    tokenizer = LlamaTokenizer(vocab=vocab, merges=merges, pad_token="<pad>", padding_side="left",
                               add_bos_token=True, extra_special_tokens={"image_token": IMAGE_TOKEN})
    tokenizer.add_tokens([IMAGE_TOKEN, "<pad>"], special_tokens=True)
    tokenizer.update_post_processor()  # built from a vocabulary, it would not prepend <s> as the real one does
    return tokenizer


def build_twin_processor(spec: TwinSpec):
    """The twin's ``LlavaProcessor``: the real model's image-processor class and geometry, tokenizer and template."""
    from transformers import LlavaProcessor
    from transformers.models.clip import CLIPImageProcessorPil
    from transformers.models.siglip import SiglipImageProcessorPil

    square = {"height": spec.image_size, "width": spec.image_size}
    if spec.vision == "siglip":
        # Resize straight to the square (aspect ratio not kept), no crop; SigLIP has no CLS token.
        image_processor = SiglipImageProcessorPil(size=square, resample=3, image_mean=[0.5] * 3, image_std=[0.5] * 3)
        extra_tokens = 0
    else:
        # Shortest edge to the size, then the centre square; CLIP's CLS token is counted, then dropped ("default").
        image_processor = CLIPImageProcessorPil(size={"shortest_edge": spec.image_size}, crop_size=square)
        extra_tokens = 1
    if spec.text == "qwen2":
        tokenizer, template = _qwen2_tokenizer(spec), QWEN_INTERLEAVE_TEMPLATE
    else:
        tokenizer, template = _llama_tokenizer(spec), LLAVA_15_TEMPLATE
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=spec.patch_size,
                          vision_feature_select_strategy=spec.strategy, num_additional_image_tokens=extra_tokens,
                          chat_template=template)


def padded_vocab_size(tokens: int) -> int:
    """More embedding rows than ``tokens``, a multiple of 64, as in both real models (32064 rows for llava-1.5's
    32002 tokens, 152000 for Qwen1.5's 151647): the logits hold ids that no token decodes to."""
    return (tokens // 64 + 1) * 64


def _configs(spec: TwinSpec, tokenizer):
    from transformers import CLIPVisionConfig, LlamaConfig, Qwen2Config, SiglipVisionConfig

    sizes = dict(hidden_size=spec.vision_hidden, intermediate_size=spec.vision_hidden * 4,
                 num_hidden_layers=spec.vision_layers, num_attention_heads=spec.vision_heads,
                 image_size=spec.image_size, patch_size=spec.patch_size)
    if spec.vision == "siglip":
        # No pooling head, as in the real tower: LLaVA reads the hidden states only.
        vision = SiglipVisionConfig(**sizes, vision_use_head=False, layer_norm_eps=1e-6)
    else:
        vision = CLIPVisionConfig(**sizes, projection_dim=spec.vision_hidden)
    text_kind = Qwen2Config if spec.text == "qwen2" else LlamaConfig
    text = text_kind(hidden_size=spec.text_hidden, intermediate_size=spec.text_hidden * 3,
                     num_hidden_layers=spec.text_layers, num_attention_heads=spec.text_heads,
                     num_key_value_heads=spec.text_heads, vocab_size=padded_vocab_size(len(tokenizer)),
                     max_position_embeddings=512,
                     pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                     eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=spec.tie_word_embeddings)
    return vision, text


def build_twin(out_dir: str | os.PathLike, spec: TwinSpec) -> Path:
    """Build ``spec``'s twin deterministically into ``out_dir`` unless it is already there with this spec."""

    def build():
        processor = build_twin_processor(spec)
        vision, text = _configs(spec, processor.tokenizer)
        model = build_llava_model(vision, text, processor.tokenizer, image_seq_length=spec.image_seq_length,
                                  strategy=spec.strategy, feature_layer=spec.feature_layer, seed=spec.seed)
        return model, processor

    return save_built(out_dir, TWIN_SPEC_FILE, asdict(spec), build)
