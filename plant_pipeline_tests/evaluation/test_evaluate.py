"""Tests of scoring.py, answers.py and evaluate.py on the tiny random LLaVA: shared-prefix ranking against the naive
scorer, normalisation, answer matching, and evaluate_shards on the toy shards."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from plant_pipeline.ml.data.categories import CATEGORY_NAMES
from plant_pipeline.ml.evaluation import EvaluationError, evaluate_shards
from plant_pipeline.ml.evaluation.answers import generate_answers, match_answer
from plant_pipeline.ml.evaluation.evaluate import PREDICTION_COLUMNS
from plant_pipeline.ml.evaluation.scoring import (
    CandidateSet,
    normalize_scores,
    score_candidates_naive,
    score_candidates_shared_prefix,
)
from plant_pipeline.ml.shards.format import IGNORE_INDEX
from plant_pipeline.ml.shards.pixels import PixelNormalizer
from plant_pipeline.ml.shards.prompts import PromptEncoder


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir):
    from transformers import LlavaForConditionalGeneration

    return LlavaForConditionalGeneration.from_pretrained(tiny_model_dir).eval()


@pytest.fixture(scope="module")
def encoder(tiny_processor) -> PromptEncoder:
    return PromptEncoder(tiny_processor)


@pytest.fixture(scope="module")
def candidates(encoder) -> CandidateSet:
    return CandidateSet.from_encoder(encoder, CATEGORY_NAMES)


def random_pixels(processor, count: int, seed: int = 0) -> torch.Tensor:
    size = processor.image_processor.crop_size
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (count, 3, size["height"], size["width"]), dtype=torch.uint8, generator=generator)
    return PixelNormalizer.from_processor(processor.image_processor)(pixels)


def test_candidate_set_splits_every_answer_at_one_shared_prefix(encoder, candidates):
    assert len(candidates.continuations) == len(CATEGORY_NAMES)
    assert (candidates.prefix_ids == encoder.image_token_id).sum() == encoder.num_image_tokens
    for c, name in enumerate(CATEGORY_NAMES):
        ids, labels = encoder.encode_category(name)
        np.testing.assert_array_equal(candidates.full_ids(c), ids)
        assert candidates.answer_start[c] == np.argmax(labels != IGNORE_INDEX)
        assert candidates.num_answer_tokens[c] == (labels != IGNORE_INDEX).sum()
    # "This is a" is shared by all answers, so the prefix reaches past the bare prompt here.
    assert len(candidates.prefix_ids) > candidates.answer_start.max()


@pytest.fixture(scope="module")
def naive_102(tiny_model, tiny_processor, candidates):
    """The reference: one forward per candidate, all 102, for one image."""
    with torch.inference_mode():
        return score_candidates_naive(tiny_model, random_pixels(tiny_processor, 1), candidates.encoded())


@pytest.mark.parametrize("layout", ["packed", "expanded"])
def test_shared_prefix_agrees_with_naive_on_all_102_candidates(tiny_model, tiny_processor, candidates, naive_102,
                                                               layout):
    naive, naive_counts = naive_102
    with torch.inference_mode():
        shared, shared_counts = score_candidates_shared_prefix(
            tiny_model, random_pixels(tiny_processor, 1), candidates.prefix_ids, candidates.continuations,
            answer_start=candidates.answer_start, candidate_batch=40, layout=layout)
    assert shared.shape == (1, len(CATEGORY_NAMES))
    torch.testing.assert_close(shared, naive, atol=1e-4, rtol=0)
    assert torch.equal(shared_counts, naive_counts)
    for normalize in ("sum", "mean"):
        assert torch.equal(normalize_scores(shared, shared_counts, normalize).argmax(1),
                           normalize_scores(naive, naive_counts, normalize).argmax(1))


def test_shared_prefix_with_uneven_answer_starts_and_chunks(tiny_model, tiny_processor, candidates):
    # Answers that start at different places inside the prefix (as when BPE merges the prompt's last space into
    # the answer), one-token continuations, and several chunks must still match the naive scorer.
    subset = [0, 7, 19, 42, 77, 101]
    prefix_len = len(candidates.prefix_ids)
    starts = np.array([prefix_len, prefix_len - 1, prefix_len - 4, prefix_len - 2, prefix_len - 6, prefix_len - 3])
    conts = [candidates.continuations[c] for c in subset]
    conts[3] = conts[3][-1:]  # a continuation of one token: scored from the prefix's last logits alone
    encoded = []
    for cont, start in zip(conts, starts):
        ids = np.concatenate([candidates.prefix_ids, cont])
        labels = ids.copy()
        labels[:start] = IGNORE_INDEX
        encoded.append((ids, labels))
    pixels = random_pixels(tiny_processor, 3, seed=1)
    with torch.inference_mode():
        naive, naive_counts = score_candidates_naive(tiny_model, pixels, encoded)
        for layout in ("packed", "expanded"):
            shared, counts = score_candidates_shared_prefix(tiny_model, pixels, candidates.prefix_ids, conts,
                                                            answer_start=starts, candidate_batch=4, layout=layout)
            only_continuations, _ = score_candidates_shared_prefix(tiny_model, pixels, candidates.prefix_ids, conts,
                                                                   layout=layout)
            torch.testing.assert_close(shared, naive, atol=1e-4, rtol=0)
            assert torch.equal(counts, naive_counts)
            # Without answer_start only the continuation counts; the shared tokens' log-probs are negative.
            torch.testing.assert_close(only_continuations[:, 0], shared[:, 0], atol=1e-5, rtol=0)
            assert (only_continuations[:, 1:] > shared[:, 1:]).all()
    assert counts.tolist() == (prefix_len - starts + [len(c) for c in conts]).tolist()


def test_packed_layout_with_eager_attention(tiny_model_dir, tiny_processor, candidates):
    # The packed layout's additive mask must also hold where attention adds it to the scores by hand.
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(tiny_model_dir, attn_implementation="eager").eval()
    pixels = random_pixels(tiny_processor, 2, seed=2)
    subset = [3, 50, 90]
    with torch.inference_mode():
        shared, _ = score_candidates_shared_prefix(model, pixels, candidates.prefix_ids,
                                                   [candidates.continuations[c] for c in subset],
                                                   answer_start=candidates.answer_start[subset], layout="packed")
        naive, _ = score_candidates_naive(model, pixels, [candidates.encoded()[c] for c in subset])
    torch.testing.assert_close(shared, naive, atol=1e-4, rtol=0)


def test_shared_prefix_rejects_bad_arguments(tiny_model, tiny_processor, candidates):
    pixels = random_pixels(tiny_processor, 1)
    with pytest.raises(EvaluationError, match="at least one token"):
        score_candidates_shared_prefix(tiny_model, pixels, candidates.prefix_ids, [np.array([], dtype=np.int64)])
    with pytest.raises(EvaluationError, match="layout"):
        score_candidates_shared_prefix(tiny_model, pixels, candidates.prefix_ids, candidates.continuations[:2],
                                       layout="tree")
    with pytest.raises(EvaluationError, match="answer_start"):
        score_candidates_shared_prefix(tiny_model, pixels, candidates.prefix_ids, candidates.continuations[:2],
                                       answer_start=len(candidates.prefix_ids) + 1)


def test_sum_and_mean_normalisation_choose_differently_as_documented():
    # A 2-token answer at -3.0 in all vs an 8-token answer at -4.0: the sum prefers the short one, the
    # per-token mean (-1.5 vs -0.5) the long one, so long names are not penalised for their length.
    loglik = torch.tensor([[-3.0, -4.0]])
    counts = torch.tensor([2, 8])
    assert normalize_scores(loglik, counts, "sum").argmax().item() == 0
    assert normalize_scores(loglik, counts, "mean").argmax().item() == 1
    torch.testing.assert_close(normalize_scores(loglik, counts, "mean"), torch.tensor([[-1.5, -0.5]]))
    with pytest.raises(EvaluationError, match="normalize"):
        normalize_scores(loglik, counts, "max")


@pytest.mark.parametrize(("text", "expected"), [
    ("This is a rose.", (73, "exact")),
    ("ROSE!", (73, "exact")),
    ("This is an Anthurium", (79, "exact")),
    ("this is the globe flower", (15, "exact")),  # "globe-flower": hyphen vs space
    ("It's a colts foot.", (11, "exact")),  # "colt's foot": apostrophe dropped
    ("This is a rose. This is a tulip.", (73, "exact")),  # only the first sentence counts
    ("This is a sunflowr.", (53, "closest")),
    ("This is a canterbury bell", (2, "closest")),
    ("This is a bicycle.", (None, "unmatched")),
    ("", (None, "unmatched")),
])
def test_match_answer(text, expected):
    label, how, similarity = match_answer(text, CATEGORY_NAMES)
    assert (label, how) == expected
    assert similarity == 1.0 if how == "exact" else similarity < 1.0


def test_evaluate_shards_rank_on_toy_shards(tiny_model, tiny_processor, toy_shards):
    calls = []
    result = evaluate_shards(tiny_model, tiny_processor, toy_shards, batch_size=3,
                             progress=lambda done, total: calls.append((done, total)))
    frame = result.predictions
    assert list(frame.columns) == list(PREDICTION_COLUMNS)
    assert len(frame) == result.num_images == 8 and frame["image_id"].is_unique
    assert calls[-1] == (8, 8) and [c[0] for c in calls] == [3, 6, 8]
    assert set(frame["label"]) == {0, 1, 2, 3}
    assert (frame["name"] == [CATEGORY_NAMES[x] for x in frame["label"]]).all()
    assert (frame["correct"] == (frame["predicted_label"] == frame["label"])).all()
    assert all(len(t) == 5 and t[0] == p for t, p in zip(frame["top5"], frame["predicted_label"]))
    assert (frame["predicted_name"] == [CATEGORY_NAMES[x] for x in frame["predicted_label"]]).all()
    assert (frame["score"] < 0).all() and (frame["match"] == "rank").all()
    assert result.method == "rank" and result.images_per_second > 0 and not tiny_model.training


def test_evaluate_shards_shared_and_naive_agree_on_a_subset_of_names(tiny_model, tiny_processor, toy_shards):
    names = CATEGORY_NAMES[:4]
    shared = evaluate_shards(tiny_model, tiny_processor, toy_shards, names=names, normalize="sum", max_samples=5)
    naive = evaluate_shards(tiny_model, tiny_processor, toy_shards, names=names, normalize="sum", max_samples=5,
                            scorer="naive")
    assert len(shared.predictions) == 5
    assert shared.predictions["predicted_label"].tolist() == naive.predictions["predicted_label"].tolist()
    np.testing.assert_allclose(shared.predictions["score"], naive.predictions["score"], atol=1e-4)
    assert all(len(t) == 4 for t in shared.predictions["top5"])


def test_evaluate_shards_rejects_bad_settings(tiny_model, tiny_processor, toy_shards):
    with pytest.raises(EvaluationError, match="method"):
        evaluate_shards(tiny_model, tiny_processor, toy_shards, method="vote")
    with pytest.raises(EvaluationError, match="outside the 2 names"):
        evaluate_shards(tiny_model, tiny_processor, toy_shards, names=CATEGORY_NAMES[:2])


class ScriptedModel(torch.nn.Module):
    """Stands in for a LLaVA in generate(): answers image i of each batch with the i-th scripted text."""

    def __init__(self, tokenizer, answers: list[str]):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.answers = [tokenizer(a, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
                        for a in answers]

    @property
    def device(self) -> torch.device:
        return self.weight.device

    def generate(self, input_ids, pixel_values, max_new_tokens, **kwargs):
        width = max(len(a) for a in self.answers)
        rows = [a + [self.answers[0][-1]] * (width - len(a)) for a in self.answers[: input_ids.shape[0]]]
        return torch.cat([input_ids, torch.tensor(rows)[:, :max_new_tokens]], dim=1)


def test_evaluate_shards_generate_maps_answers(tiny_processor, toy_shards):
    texts = ["This is a Pink Primrose!", "this is an hard leaved pocket orchid", "It's a canterbury bell.",
             "This is a bicycle."]
    model = ScriptedModel(tiny_processor.tokenizer, texts)
    result = evaluate_shards(model, tiny_processor, toy_shards, method="generate", batch_size=4)
    frame = result.predictions
    assert len(frame) == 8 and list(frame.columns) == list(PREDICTION_COLUMNS)
    assert frame["answer_text"].tolist() == texts * 2
    assert frame["match"].tolist() == ["exact", "exact", "closest", "unmatched"] * 2
    assert frame["predicted_label"].iloc[:3].tolist() == [0, 1, 2] and frame["predicted_label"].isna().sum() == 2
    assert (frame["correct"] == (frame["predicted_label"] == frame["label"]).fillna(False)).all()
    assert frame["top5"].isna().all() and not frame.loc[3, "correct"]


def test_generate_answers_on_the_tiny_model(tiny_model, tiny_processor, encoder):
    pixels = random_pixels(tiny_processor, 2)
    with torch.inference_mode():
        answers = generate_answers(tiny_model, tiny_processor, pixels, encoder.prompt_ids, max_new_tokens=4)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
    # Greedy: the same image gives the same answer.
    with torch.inference_mode():
        again = generate_answers(tiny_model, tiny_processor, pixels, encoder.prompt_ids, max_new_tokens=4)
    assert again == answers
