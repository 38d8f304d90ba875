"""plant_pipeline: fine-tune a LLaVA vision-language model on Oxford Flowers 102, orchestrated by Dagster.

``plant_pipeline.ml`` is the pure core (no Dagster); ``plant_pipeline.defs`` is the thin Dagster layer.
"""
