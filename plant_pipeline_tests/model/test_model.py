"""The tiny model, model loading, prompts and the uint8 pixel path."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from plant_pipeline.ml.data.categories import CATEGORY_NAMES
from plant_pipeline.ml.images import PixelFormatError, to_rgb
from plant_pipeline.ml.model import TINY_MODEL_NAME, ModelConfigError, ModelSpec, TinyLlavaSpec, build_tiny_llava
from plant_pipeline.ml.model.spec import model_slug, resolve_device, resolve_dtype
from plant_pipeline.ml.shards.format import IGNORE_INDEX
from plant_pipeline.ml.shards.pixels import PixelNormalizer, resize_and_crop
from plant_pipeline.ml.shards.prompts import PromptEncoder


def _weights_digest(folder) -> str:
    return hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()


def test_tiny_model_is_deterministic_and_not_rebuilt(tmp_path, tiny_model_dir):
    again = build_tiny_llava(tmp_path / "again")
    assert _weights_digest(again) == _weights_digest(tiny_model_dir)
    mtime = (again / "model.safetensors").stat().st_mtime_ns
    build_tiny_llava(tmp_path / "again")
    assert (again / "model.safetensors").stat().st_mtime_ns == mtime
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary build folder left behind"


def test_tiny_model_of_another_spec_replaces_the_folder_whole(tmp_path, tiny_model_dir):
    folder = tmp_path / "tiny"
    build_tiny_llava(folder)
    (folder / "stale.bin").write_bytes(b"left by the old build")
    smaller = TinyLlavaSpec(text_layers=1)
    build_tiny_llava(folder, smaller)
    assert json.loads((folder / "tiny_llava_spec.json").read_text())["text_layers"] == 1
    assert json.loads((folder / "config.json").read_text())["text_config"]["num_hidden_layers"] == 1
    assert not (folder / "stale.bin").exists(), "the new build was merged into the old folder"
    assert _weights_digest(folder) != _weights_digest(tiny_model_dir)
    assert [p.name for p in tmp_path.iterdir()] == ["tiny"], "staging or old folder left behind"


def test_model_spec_builds_tiny_model_and_loads_it_like_a_hub_model(tmp_path):
    spec = ModelSpec(model_name=TINY_MODEL_NAME, models_dir=str(tmp_path), local_files_only=True, device="cpu")
    processor = spec.load_processor()
    model = spec.load_model()
    assert (tmp_path / TINY_MODEL_NAME / "config.json").exists()
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert model.dtype == torch.float32 and model.device.type == "cpu"
    assert processor.tokenizer.convert_tokens_to_ids("<image>") == model.config.image_token_id


def test_tiny_model_forward_and_backward(tiny_model_dir, tiny_processor):
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(tiny_model_dir)
    encoder = PromptEncoder(tiny_processor)
    input_ids, labels = encoder.encode_category("sunflower")
    pixels = torch.from_numpy(resize_and_crop(tiny_processor.image_processor, Image.new("RGB", (70, 50), "yellow")))
    out = model(
        input_ids=torch.from_numpy(input_ids).long()[None],
        labels=torch.from_numpy(labels).long()[None],
        pixel_values=PixelNormalizer.from_processor(tiny_processor.image_processor)(pixels[None]),
    )
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert model.model.multi_modal_projector.linear_1.weight.grad.abs().sum() > 0


def test_prompt_labels_cover_exactly_the_answer(tiny_processor):
    encoder = PromptEncoder(tiny_processor)
    input_ids, labels = encoder.encode_category("pink primrose")
    answer = input_ids[labels != IGNORE_INDEX]
    assert tiny_processor.tokenizer.decode(answer).strip() == "This is a pink primrose.</s>"
    start = int(np.argmax(labels != IGNORE_INDEX))
    assert (labels[:start] == IGNORE_INDEX).all() and (labels[start:] == input_ids[start:]).all()
    assert encoder.num_image_tokens == 64 == int((input_ids == encoder.image_token_id).sum())
    # The prompt the model sees at inference is the training sequence up to the answer (give or take the
    # space BPE merges into the answer's first word).
    assert np.array_equal(encoder.prompt_ids[:start], input_ids[:start])


def test_prompt_encodings_differ_only_in_the_answer(tiny_processor):
    encoder = PromptEncoder(tiny_processor)
    a_ids, a_labels = encoder.encode_category("rose")
    b_ids, b_labels = encoder.encode_category("bird of paradise")
    start = int(np.argmax(a_labels != IGNORE_INDEX))
    assert start == int(np.argmax(b_labels != IGNORE_INDEX))
    assert np.array_equal(a_ids[:start], b_ids[:start]) and not np.array_equal(a_ids, b_ids)


class ProcessorSpy:
    """A processor that counts its calls and can swap its tokenizer, delegating everything else."""

    def __init__(self, processor, tokenizer=None):
        self._processor = processor
        self.tokenizer = tokenizer or processor.tokenizer
        self.calls = 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self._processor(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._processor, name)


def test_batched_category_encoding_equals_one_processor_call_each(tiny_processor):
    names = list(CATEGORY_NAMES[:12]) + ["rose", "rose"]
    spy = ProcessorSpy(tiny_processor)
    encoder = PromptEncoder(spy)
    calls_for_prompt = spy.calls
    batched = encoder.encode_categories(names)
    assert spy.calls - calls_for_prompt == 1, "the batch should need the processor only for its reference prompt"
    one_by_one = PromptEncoder(tiny_processor)
    assert len(batched) == len(names)
    for name, (ids, labels) in zip(names, batched):
        expected_ids, expected_labels = one_by_one.encode_category(name)
        assert np.array_equal(ids, expected_ids) and np.array_equal(labels, expected_labels), name


def test_batched_encoding_falls_back_to_the_processor_when_it_differs(tiny_processor):
    # A tokenizer that splits the image placeholder some other way: the batch no longer matches the processor.
    tokenizer = tiny_processor.tokenizer

    class OtherTokenizer:
        def __call__(self, texts, **kwargs):
            image = tokenizer.convert_tokens_to_ids("<image>")
            return {"input_ids": [[tokenizer.pad_token_id, image, tokenizer.pad_token_id] for _ in texts]}

        def __getattr__(self, name):
            return getattr(tokenizer, name)

    spy = ProcessorSpy(tiny_processor, OtherTokenizer())
    encoder = PromptEncoder(spy)
    names = ["rose", "sunflower", "lotus"]
    expected = [PromptEncoder(tiny_processor).encode_category(name) for name in names]
    calls_for_prompt = spy.calls
    for (ids, labels), (expected_ids, expected_labels) in zip(encoder.encode_categories(names), expected):
        assert np.array_equal(ids, expected_ids) and np.array_equal(labels, expected_labels)
    # One call to compare the batch with, then one per name.
    assert spy.calls - calls_for_prompt == 1 + len(names), "each name should have gone through the processor"


@pytest.mark.parametrize("mode", ["L", "CMYK", "P", "RGBA", "LA", "I;16"])
def test_to_rgb_converts_every_mode(mode):
    image = Image.new("RGB", (20, 10), (200, 30, 90)).convert(mode)
    converted = to_rgb(image)
    assert converted.mode == "RGB" and converted.size == (20, 10)


def test_transparent_pixels_become_white_not_black():
    image = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert to_rgb(image).getpixel((0, 0)) == (255, 255, 255)


def test_pixel_normalizer_rejects_float_input(tiny_processor):
    normalizer = PixelNormalizer.from_processor(tiny_processor.image_processor)
    with pytest.raises(PixelFormatError, match="uint8"):
        normalizer(torch.zeros(1, 3, 64, 64))


def test_uint8_path_reproduces_processor_exactly_on_real_photos(shared_datasets, tiny_processor):
    """The stored bytes + lookup table give the processor's float pixel_values bit for bit."""
    normalizer = PixelNormalizer.from_processor(tiny_processor.image_processor)
    archive = shared_datasets / "oxford-flowers-102-mini" / "102flowers.tgz"
    checked = 0
    with tarfile.open(archive) as tar:
        for member in tar:
            if not member.isfile():
                continue
            image = Image.open(io.BytesIO(tar.extractfile(member).read()))
            expected = tiny_processor.image_processor(images=[image], return_tensors="pt")["pixel_values"]
            stored = torch.from_numpy(resize_and_crop(tiny_processor.image_processor, image))
            assert stored.dtype == torch.uint8
            assert (normalizer(stored[None]) - expected).abs().max().item() == 0.0, member.name
            checked += 1
            if checked == 12:
                break
    assert checked == 12


def test_uint8_path_is_exact_for_a_336px_clip_processor():
    """The lookup table is read off the processor, so other sizes and statistics are exact too."""
    from transformers.models.clip import CLIPImageProcessorPil

    processor = CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                                      image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, size=(400, 500, 3), dtype=np.uint8))
    expected = processor(images=[image], return_tensors="pt")["pixel_values"]
    stored = torch.from_numpy(resize_and_crop(processor, image))
    assert stored.shape == (3, 336, 336)
    assert torch.equal(PixelNormalizer.from_processor(processor)(stored[None]), expected)


def test_device_and_dtype_resolution_on_cpu():
    device = resolve_device("auto")
    assert device.type in {"cuda", "mps", "cpu"}
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(ModelConfigError, match="dtype must be one of"):
        resolve_dtype("float8", torch.device("cpu"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_absent_device_is_refused_with_advice():
    with pytest.raises(ModelConfigError, match="no CUDA GPU"):
        resolve_device("cuda")


@pytest.mark.parametrize(
    ("name", "slug"),
    [("llava-hf/llava-1.5-7b-hf", "llava-hf--llava-1.5-7b-hf"), ("tiny-random-llava", "tiny-random-llava"),
     ("/abs/path/model/", "abs--path--model")],
)
def test_model_slug(name, slug):
    assert model_slug(name) == slug
