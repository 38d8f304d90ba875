"""Using a trained model: which one is in production (registry), identifying photos with it (identifier), and
promoting a newly evaluated model (promotion)."""

from plant_pipeline.ml.serving.model_card import model_card
from plant_pipeline.ml.serving.photos import MAX_PHOTO_BYTES, MAX_PIXELS, PhotoError, PhotoTooLarge, read_photo
from plant_pipeline.ml.serving.promotion import Decision, decide, promote, prune, weights_digest
from plant_pipeline.ml.serving.registry import (
    CATEGORIES_FILE,
    MODEL_CARD_FILE,
    MODEL_INFO_FILE,
    PRODUCTION,
    ModelInfo,
    NoProductionModel,
    pointer_path,
    production_dir,
    read_pointer,
    resolve_model,
    write_pointer,
)

__all__ = ["CATEGORIES_FILE", "MAX_PHOTO_BYTES", "MAX_PIXELS", "MODEL_CARD_FILE", "MODEL_INFO_FILE", "PRODUCTION",
           "Decision", "Guess", "Identification", "Identifier", "ModelInfo", "NoProductionModel", "PhotoError",
           "PhotoTooLarge", "decide", "model_card", "pointer_path", "production_dir", "promote", "prune",
           "read_photo", "read_pointer", "resolve_model", "weights_digest", "write_pointer"]

_LAZY = {"Guess", "Identification", "Identifier"}  # identifier.py imports torch and transformers: only when used


def __getattr__(name: str):
    if name in _LAZY:
        from plant_pipeline.ml.serving import identifier

        return getattr(identifier, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
