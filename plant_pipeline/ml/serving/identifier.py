"""Identify plants in photos with a trained model: ``Identifier.load("production").identify(["leaf.jpg"])``.

A photo goes through the shards' own path (images.to_rgb, then shards.geometry.PhotoPixels and the processor's
normalisation), so it becomes exactly the tensor the model was evaluated on; every category name is ranked as the
answer by the shared-prefix ranking evaluation uses (evaluation.scoring.rank_candidates), and a softmax over all
categories turns the ranking scores into probabilities.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from plant_pipeline.ml.data.categories import CategoryMap, read_category_map
from plant_pipeline.ml.errors import UsageError
from plant_pipeline.ml.evaluation.scoring import (
    NORMALIZE,
    PRUNE_KEEP,
    CandidateSet,
    choose_method,
    rank_candidates,
)
from plant_pipeline.ml.model.spec import ModelSpec, resolve_device
from plant_pipeline.ml.serving.photos import MAX_PHOTO_BYTES, MAX_PIXELS, PhotoSource, photo_name, read_photo
from plant_pipeline.ml.serving.registry import (
    CATEGORIES_FILE,
    MODEL_INFO_FILE,
    PRODUCTION,
    ModelInfo,
    read_model_info,
    resolve_model,
)
from plant_pipeline.ml.shards.format import read_categories
from plant_pipeline.ml.shards.geometry import PhotoPixels
from plant_pipeline.ml.shards.pixels import PixelNormalizer
from plant_pipeline.ml.shards.prompts import PromptEncoder
from plant_pipeline.ml.training.results import RESULT_META, load_trained, read_result_meta

logger = logging.getLogger(__name__)

DEFAULT_MAX_BATCH = 16
UNKNOWN_VERSION = "unknown"


@dataclass(frozen=True)
class Guess:
    """One category proposed for a photo; ``score`` is its probability among all the model's categories."""

    category_id: int
    name: str
    display_name: str
    score: float

    def to_json(self) -> dict[str, Any]:
        return {"category_id": self.category_id, "name": self.name, "display_name": self.display_name,
                "score": self.score}


@dataclass(frozen=True)
class Identification:
    """The answer for one photo: its top guesses, best first, and which model gave them."""

    photo: str
    guesses: tuple[Guess, ...]
    model_id: str
    data_version: str

    def to_json(self) -> dict[str, Any]:
        return {"photo": self.photo, "model_id": self.model_id, "data_version": self.data_version,
                "top": [guess.to_json() for guess in self.guesses]}


def candidate_batch_for(photos: int) -> int:
    """Candidates per forward for a batch of ``photos`` (the default): about 256 photo x candidate rows. Each
    forward packs a photo's candidates end to end, so its attention grows with the square of the candidates packed:
    a large batch does better with fewer per forward (tiny model, 102 names, 2 cores: 8 photos 81 ms at 32 against
    94 ms at 128), a single photo with more (17 ms at 128 against 21 ms at 64). The scores do not change."""
    return max(16, min(128, 256 // max(1, photos)))


class Identifier:
    """A loaded model and its categories, ready to identify photos; one forward per batch of ``max_batch`` photos.

    Thread-safe: forwards run one at a time under a lock (a web service calls identify from worker threads), while
    reading and resizing photos runs outside it.
    """

    def __init__(self, model, processor, categories: CategoryMap, info: ModelInfo, *,
                 max_batch: int = DEFAULT_MAX_BATCH, normalize: str = "mean", candidate_batch: int | None = None,
                 layout: str = "auto") -> None:
        if normalize not in NORMALIZE:
            raise UsageError(f"normalize must be one of {NORMALIZE}; got {normalize!r}")
        self.model = model.eval()
        self.processor = processor
        self.categories = categories
        self.info = info
        self.device = torch.device(model.device)
        self.max_batch = max_batch
        self.normalize, self.candidate_batch, self.layout = normalize, candidate_batch, layout
        method, reason = choose_method("auto", len(categories))
        self.keep_first_tokens = PRUNE_KEEP if method == "prune" else None
        self.candidates = CandidateSet.from_encoder(PromptEncoder(processor, question=categories.question),
                                                    categories.names)
        self.to_pixels = PhotoPixels.of(processor.image_processor)
        self.normalizer = PixelNormalizer.from_processor(processor.image_processor)
        self._lock = threading.Lock()
        logger.info("identifier %s: %d categories (%s) on %s", info.model_id, len(categories), reason, self.device)

    @property
    def max_batch(self) -> int:
        return self._max_batch

    @max_batch.setter
    def max_batch(self, value: int) -> None:
        if int(value) < 1:
            raise UsageError(f"max_batch must be >= 1; got {value}")
        self._max_batch = int(value)

    @classmethod
    def load(cls, model: str | os.PathLike = PRODUCTION, *, device: str = "auto",
             data_dir: str | os.PathLike | None = None, max_batch: int = DEFAULT_MAX_BATCH,
             categories: CategoryMap | None = None) -> Identifier:
        """Load ``model``: "production" (the promoted model the pointer in ``data_dir`` names) or a model folder,
        promoted or as trained_model wrote it. ``device`` "auto" picks cuda, then mps, then cpu.

        A promoted folder holds its categories and identity; a raw trained folder is named by its folder, with
        data version "unknown", and takes its categories from ``categories`` or the shards its training recorded.
        """
        folder = resolve_model(model, data_dir)
        meta = read_result_meta(folder)
        if meta is None:
            raise UsageError(f"{folder} is not a trained model folder: it has no {RESULT_META}; pass the folder "
                             "trained_model wrote, a promoted one, or 'production'")
        if not isinstance(meta.get("model_spec"), dict):
            raise UsageError(f"{folder / RESULT_META} has no model_spec (the base model the weights belong to); "
                             "train the model again with this version of the pipeline")
        spec_fields = {f.name for f in fields(ModelSpec)}  # a newer pipeline's extra keys are ignored
        spec = ModelSpec(**{k: v for k, v in meta["model_spec"].items() if k in spec_fields})
        info = _model_info(folder, spec)
        if categories is None:
            categories = _categories(folder, meta)
        model_, processor = load_trained(folder, spec, device=resolve_device(device))
        return cls(model_, processor, categories, info, max_batch=max_batch)

    def pixels(self, images: Sequence[PhotoSource] | PhotoSource, *, names: Sequence[str] | None = None,
               max_bytes: int = MAX_PHOTO_BYTES, max_pixels: int = MAX_PIXELS) -> torch.Tensor:
        """uint8 [B, 3, H, W]: the photos exactly as the shards store them (PhotoError naming a bad one)."""
        sources, labels = _as_list(images, names)
        photos = [read_photo(source, name=label, max_bytes=max_bytes, max_pixels=max_pixels)
                  for source, label in zip(sources, labels)]
        return torch.from_numpy(np.stack([self.to_pixels(photo) for photo in photos]))

    def identify(self, images: Sequence[PhotoSource] | PhotoSource, top_k: int = 5, *,
                 names: Sequence[str] | None = None, max_bytes: int = MAX_PHOTO_BYTES,
                 max_pixels: int = MAX_PIXELS) -> list[Identification]:
        """The top ``top_k`` categories for each photo (paths, bytes or PIL images), in the order given.

        Every photo is read first, so a bad one raises PhotoError naming it before any forward runs. ``names``
        name the photos in answers and errors (default: file names, else "photo 1", "photo 2", ...).
        """
        if int(top_k) < 1:
            raise UsageError(f"top_k must be >= 1; got {top_k}")
        sources, labels = _as_list(images, names)
        pixels = self.pixels(sources, names=labels, max_bytes=max_bytes, max_pixels=max_pixels)
        with self._lock:
            info, categories = self.info, self.categories
            probabilities = [self._probabilities(pixels[begin:begin + self.max_batch])
                             for begin in range(0, len(pixels), self.max_batch)]
        probs = torch.cat(probabilities)
        k = min(int(top_k), len(categories))
        top = probs.topk(k, dim=1)
        return [Identification(photo=label, model_id=info.model_id, data_version=info.data_version,
                               guesses=tuple(Guess(int(c), categories.names[int(c)], categories.display(int(c)),
                                                   float(p)) for p, c in zip(top.values[i], top.indices[i])))
                for i, label in enumerate(labels)]

    def _probabilities(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, C] float64 probabilities over all categories for uint8 [B, 3, H, W] pixels: one forward."""
        with torch.inference_mode():
            pixel_values = self.normalizer(pixels.to(self.device))
            scores = rank_candidates(self.model, pixel_values, self.candidates, normalize=self.normalize,
                                     candidate_batch=self.candidate_batch or candidate_batch_for(len(pixels)),
                                     layout=self.layout,
                                     keep_first_tokens=self.keep_first_tokens)
        return torch.softmax(scores.double(), dim=1)  # a pruned candidate's -inf becomes 0


def _as_list(images, names: Sequence[str] | None) -> tuple[list, list[str]]:
    """The photos as a list (one photo alone is a list of one) and a name for each."""
    if isinstance(images, (str, os.PathLike, bytes, bytearray, memoryview, Image.Image)):
        images = [images]
    images = list(images)
    if not images:
        raise UsageError("no photos to identify; pass at least one path, bytes or PIL image")
    if names is None:
        names = [photo_name(source, f"photo {i + 1}") for i, source in enumerate(images)]
    elif len(names) != len(images):
        raise UsageError(f"{len(names)} names for {len(images)} photos; pass one name per photo")
    return images, [str(name) for name in names]


def _model_info(folder: Path, spec: ModelSpec) -> ModelInfo:
    info = read_model_info(folder / MODEL_INFO_FILE)
    if info is None:  # a folder as trained_model wrote it: not promoted, so no id or data version of its own
        info = ModelInfo(model_id=folder.name, base_model=spec.model_name, data_version=UNKNOWN_VERSION)
    return replace(info, model_path=str(folder))


def _categories(folder: Path, meta: dict) -> CategoryMap:
    path = folder / CATEGORIES_FILE
    if path.is_file():
        return read_category_map(path)
    if isinstance(meta.get("categories"), dict):  # what training recorded from its shards' index
        return CategoryMap.from_json(meta["categories"], f"{folder / RESULT_META}: categories")
    train_config = meta.get("train_config") if isinstance(meta.get("train_config"), dict) else {}
    shards_dir = meta.get("shards_dir") or train_config.get("shards_dir")
    if not shards_dir:
        raise UsageError(f"{folder} has no {CATEGORIES_FILE} and its {RESULT_META} names no shards_dir to take the "
                         "categories from; promote the model (materialise production_model) or pass categories=")
    return read_categories(shards_dir)
