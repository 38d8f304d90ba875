"""The model: which LLaVA to load (hub id, local folder or the built-in tiny one) and how.
"""

from plant_pipeline.ml.model.spec import DEFAULT_REAL_MODEL, ModelConfigError, ModelSpec
from plant_pipeline.ml.model.tiny import TINY_MODEL_NAME, TinyLlavaSpec, build_tiny_llava, build_tiny_processor

__all__ = [
    "DEFAULT_REAL_MODEL",
    "TINY_MODEL_NAME",
    "ModelConfigError",
    "ModelSpec",
    "TinyLlavaSpec",
    "build_tiny_llava",
    "build_tiny_processor",
]
