"""The identify web service (FastAPI): create_app() builds it, ``plant-pipeline serve`` runs it under uvicorn.

create_app is imported on first use, so the batcher can be imported without FastAPI and the model code.
"""

__all__ = ["create_app"]


def __getattr__(name: str):
    if name == "create_app":
        from plant_pipeline.service.app import create_app

        return create_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
