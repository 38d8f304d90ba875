"""The model: which LLaVA to load (hub id, local folder or the built-in tiny one) and how; offline twins of
the documented real models (same classes and processor behaviour, small random weights) for tests.
"""

from plant_pipeline.ml.model.spec import DEFAULT_REAL_MODEL, ModelConfigError, ModelSpec
from plant_pipeline.ml.model.tiny import TINY_MODEL_NAME, TinyLlavaSpec, build_tiny_llava, build_tiny_processor
from plant_pipeline.ml.model.twins import TWINS, TwinSpec, build_twin

__all__ = [
    "DEFAULT_REAL_MODEL",
    "TINY_MODEL_NAME",
    "TWINS",
    "ModelConfigError",
    "ModelSpec",
    "TinyLlavaSpec",
    "TwinSpec",
    "build_tiny_llava",
    "build_tiny_processor",
    "build_twin",
]
