"""Sources of a person's own labelled plant photos: an image folder and a Hugging Face ``datasets`` dataset, each
read into a manifest plus the categories found in the data."""

from plant_pipeline.ml.data.sources.common import SourceData, SourceError, content_image_id, content_version
from plant_pipeline.ml.data.sources.folder import read_image_folder
from plant_pipeline.ml.data.sources.hf import read_datasets_source

__all__ = ["SourceData", "SourceError", "content_image_id", "content_version", "read_datasets_source",
           "read_image_folder"]
