"""Using a trained model: which one is in production (registry), identifying photos with it (identifier), and
promoting a newly evaluated model (promotion)."""

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

__all__ = ["CATEGORIES_FILE", "MODEL_CARD_FILE", "MODEL_INFO_FILE", "PRODUCTION", "ModelInfo", "NoProductionModel",
           "pointer_path", "production_dir", "read_pointer", "resolve_model", "write_pointer"]
