"""The twins of the documented real models through the pipeline's core: what each must share with its hub model,
shard pixels exact to its processor, prompt masking, answer-position logits, training, and shared-prefix scoring."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from PIL import Image

from plant_pipeline.ml.data.categories import CATEGORY_NAMES
from plant_pipeline.ml.evaluation import evaluate_shards
from plant_pipeline.ml.evaluation.scoring import CandidateSet, score_candidates_naive, score_candidates_shared_prefix
from plant_pipeline.ml.model import ModelSpec
from plant_pipeline.ml.model.twins import LLAVA_15_7B, QWEN_INTERLEAVE_05B, TWINS, build_twin
from plant_pipeline.ml.shards.format import IGNORE_INDEX, split_shard_paths
from plant_pipeline.ml.shards.geometry import direct_resize_and_crop
from plant_pipeline.ml.shards.pixels import PixelNormalizer, resize_and_crop
from plant_pipeline.ml.shards.prompts import PromptEncoder, answer_text
from plant_pipeline.ml.testing import write_toy_shards
from plant_pipeline.ml.training import TrainConfig, labelled_token_loss, make_stream, memory_efficient_collate_fn, train

# What each twin must share with its hub model (from the hub's config.json, preprocessor, processor and
# tokenizer configs): the code path differs on every line of this table.
EXPECTED = {
    QWEN_INTERLEAVE_05B.real_model: dict(
        vision_type="siglip_vision_model", text_type="qwen2", strategy="full", feature_layer=-1, tied=True,
        image_processor="SiglipImageProcessorPil", extra_image_tokens=0, bos=None, eos="<|im_end|>",
        prompt_end="<|im_start|>assistant\n", answer_end="<|im_end|>\n"),
    LLAVA_15_7B.real_model: dict(
        vision_type="clip_vision_model", text_type="llama", strategy="default", feature_layer=-2, tied=False,
        image_processor="CLIPImageProcessorPil", extra_image_tokens=1, bos="<s>", eos="</s>",
        prompt_end="ASSISTANT:", answer_end=". "),
}


@pytest.fixture(scope="module", params=sorted(TWINS), ids=lambda name: name.split("/")[-1])
def twin(request, twin_builds):
    """(hub id, folder, ModelSpec, processor) of one twin, loaded as a hub model would be."""
    folder = twin_builds(request.param)
    spec = ModelSpec(model_name=str(folder), local_files_only=True, device="cpu", dtype="float32")
    return request.param, folder, spec, spec.load_processor()


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _photo_like(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8))


def test_twin_has_the_real_models_classes_and_geometry(twin):
    real_model, _, spec, processor = twin
    expected = EXPECTED[real_model]
    model = spec.load_model()
    config = model.config
    assert (config.vision_config.model_type, config.text_config.model_type) == (expected["vision_type"],
                                                                                 expected["text_type"])
    assert config.vision_feature_select_strategy == processor.vision_feature_select_strategy == expected["strategy"]
    assert config.vision_feature_layer == expected["feature_layer"]
    assert bool(config.tie_word_embeddings) == expected["tied"]
    tied = model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert tied == expected["tied"]
    assert type(processor.image_processor).__name__ == expected["image_processor"]
    assert processor.num_additional_image_tokens == expected["extra_image_tokens"]
    assert (processor.tokenizer.bos_token, processor.tokenizer.eos_token) == (expected["bos"], expected["eos"])
    assert processor.tokenizer.convert_tokens_to_ids("<image>") == config.image_token_id
    # The image-token count the processor inserts is what the vision tower gives after the strategy.
    encoder = PromptEncoder(processor)
    assert encoder.num_image_tokens == config.image_seq_length == TWINS[real_model].image_seq_length
    image = _photo_like(90, 61)
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"},
                                                                       {"type": "text", "text": "What?"}]}],
                                         add_generation_prompt=True)
    assert text.endswith(expected["prompt_end"])
    inputs = processor(text=[text], images=[image], return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
    # As in the real models, the embedding has rows no token decodes to.
    assert logits.shape == (1, inputs["input_ids"].shape[1], config.text_config.vocab_size)
    assert config.text_config.vocab_size > len(processor.tokenizer)


def test_siglip_twin_squashes_to_a_square_and_clip_twin_crops(twin):
    real_model, _, _, processor = twin
    size = TWINS[real_model].image_size
    # A 4:1 image whose left quarter is black: squashed to a square (SigLIP) the black quarter stays; resized by
    # its short side and centre-cropped (CLIP) the crop holds only the middle half, all white.
    wide = np.full((40, 160, 3), 255, dtype=np.uint8)
    wide[:, :40] = 0
    pixels = resize_and_crop(processor.image_processor, Image.fromarray(wide))
    assert pixels.shape == (3, size, size)
    squashed = TWINS[real_model].vision == "siglip"
    assert (pixels[:, :, : size // 5].max() < 10) == squashed
    assert (pixels.min() > 245) == (not squashed)


def test_twin_builds_deterministically(tmp_path, twin):
    real_model, folder, _, _ = twin
    again = build_twin(tmp_path / "again", TWINS[real_model])
    for name in ("model.safetensors", "tokenizer.json", "processor_config.json", "config.json"):
        assert hashlib.sha256((again / name).read_bytes()).digest() == \
            hashlib.sha256((folder / name).read_bytes()).digest(), name


def test_shard_pixels_are_exact_to_the_twins_processor(twin):
    _, _, _, processor = twin
    image_processor = processor.image_processor
    fast = direct_resize_and_crop(image_processor)
    assert fast is not None, "the twin's PIL processor should take the direct resize path"
    normalizer = PixelNormalizer.from_processor(image_processor)
    for seed, (width, height) in enumerate(((401, 300), (300, 401), (97, 61), (61, 97), (345, 700))):
        image = _photo_like(width, height, seed)
        stored = fast(image)
        np.testing.assert_array_equal(stored, resize_and_crop(image_processor, image))
        # uint8 in the shard, expanded by the table: exactly the processor's own float pixel values.
        expected = image_processor(images=[image], return_tensors="pt")["pixel_values"]
        assert torch.equal(normalizer(torch.from_numpy(stored)[None]), expected)


@pytest.fixture(scope="module")
def shards(twin, tmp_path_factory):
    return write_toy_shards(tmp_path_factory.mktemp("twin_shards"), twin[3])


def test_prompt_masking_labels_exactly_the_answer(twin):
    real_model, _, _, processor = twin
    encoder = PromptEncoder(processor)
    for name in ("pink primrose", "globe thistle", "bishop of llandaff"):
        ids, labels = encoder.encode_category(name)
        answer = labels != IGNORE_INDEX
        start = int(np.argmax(answer))
        assert answer[start:].all(), "the answer is one run of tokens at the end"
        decoded = processor.tokenizer.decode(ids[start:])
        assert decoded.strip().startswith(answer_text(name)) and decoded.endswith(EXPECTED[real_model]["answer_end"])
        assert processor.tokenizer.decode(ids[:start]).rstrip().endswith(EXPECTED[real_model]["prompt_end"].rstrip())
        assert (ids[:start] == encoder.image_token_id).sum() == encoder.num_image_tokens


def test_answer_position_logits_give_the_models_own_loss(twin, shards):
    _, _, spec, processor = twin
    model = spec.load_model()
    batch = memory_efficient_collate_fn(processor)(
        list(make_stream(split_shard_paths(shards, "validation"), shuffle=False)))
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}
    with torch.no_grad():
        reference = model(**inputs, labels=batch["labels"]).loss
        full = model(**inputs).logits
        total, count, kept = labelled_token_loss(model, batch)
    assert abs(float(total) / int(count) - reference.item()) < 1e-5
    columns = (batch["labels"][:, 1:] != IGNORE_INDEX).any(dim=0).nonzero().squeeze(1)
    torch.testing.assert_close(kept, full[:, columns], atol=1e-5, rtol=0)


def test_twin_learns_the_toy_task(twin, shards, tmp_path):
    _, _, spec, _ = twin
    config = TrainConfig(max_steps=8, save_steps=8, eval_steps=8, logging_steps=4, per_device_train_batch_size=8,
                         per_device_eval_batch_size=8, learning_rate=3e-3, warmup_ratio=0.0,
                         lr_scheduler_type="constant", dataloader_num_workers=0, shuffle_buffer=16,
                         max_eval_samples=8, report_to="none")
    result = train(config, model_spec=spec, shards_dir=shards, checkpoints_dir=tmp_path / "checkpoints",
                   output_dir=tmp_path / "model")
    assert result.steps == 8
    assert result.final_validation_loss < result.initial_validation_loss - 0.3, result.log_history


def test_shared_prefix_ranking_equals_the_naive_scorer(twin, shards):
    _, _, spec, processor = twin
    model = spec.load_model().eval()
    candidates = CandidateSet.from_encoder(PromptEncoder(processor), CATEGORY_NAMES)
    size = processor.image_processor.crop_size or processor.image_processor.size
    pixels = torch.randint(0, 256, (2, 3, size["height"], size["width"]), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    pixels = PixelNormalizer.from_processor(processor.image_processor)(pixels)
    with torch.inference_mode():
        naive, naive_counts = score_candidates_naive(model, pixels, candidates.encoded())
        for layout in ("packed", "expanded"):
            shared, counts = score_candidates_shared_prefix(
                model, pixels, candidates.prefix_ids, candidates.continuations, answer_start=candidates.answer_start,
                candidate_batch=40, layout=layout)
            torch.testing.assert_close(shared, naive, atol=1e-4, rtol=0)
            assert torch.equal(counts, naive_counts)
    names = list(CATEGORY_NAMES[:6])
    results = {scorer: evaluate_shards(model, processor, shards, names=names, normalize="sum", max_samples=4,
                                       scorer=scorer) for scorer in ("shared", "naive")}
    assert results["shared"].predictions["predicted_label"].tolist() == \
        results["naive"].predictions["predicted_label"].tolist()


REAL_SIZES = {QWEN_INTERLEAVE_05B.real_model: 384, LLAVA_15_7B.real_model: 336}


def _at_size(image_processor, size: int):
    """The same image-processor class and settings at another size (the real model's)."""
    settings = image_processor.to_dict()
    settings["size"] = {"height": size, "width": size} if "height" in settings["size"] else {"shortest_edge": size}
    if settings.get("crop_size"):
        settings["crop_size"] = {"height": size, "width": size}
    return type(image_processor).from_dict(settings)


def test_shard_pixels_are_exact_on_real_photos_at_twin_and_real_size(twin, shared_datasets):
    import io
    import tarfile

    real_model, _, _, processor = twin
    processors = [processor.image_processor, _at_size(processor.image_processor, REAL_SIZES[real_model])]
    assert processors[1].size != processors[0].size
    archive = shared_datasets / "oxford-flowers-102-mini" / "102flowers.tgz"
    checked = 0
    with tarfile.open(archive) as tar:
        for member in tar:
            if not member.isfile():
                continue
            image = Image.open(io.BytesIO(tar.extractfile(member).read()))
            for image_processor in processors:
                stored = direct_resize_and_crop(image_processor)(image.convert("RGB"))
                np.testing.assert_array_equal(stored, resize_and_crop(image_processor, image), err_msg=member.name)
                expected = image_processor(images=[image], return_tensors="pt")["pixel_values"]
                normalized = PixelNormalizer.from_processor(image_processor)(torch.from_numpy(stored)[None])
                assert torch.equal(normalized, expected), member.name
            checked += 1
            if checked == 6:
                break
    assert checked == 6
