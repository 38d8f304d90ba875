"""Assets ``folder_photos`` and ``hf_dataset_photos``: a person's own labelled plant photos as sources.

Each reads its photos and writes a manifest and its categories under ``data/sources/<asset>/``; ``category_map``
takes the source its config names (Oxford by default) and feeds the rest of the graph from it. A source whose
location is not set is not in use: it materialises as such, in a second, so that "Materialize all" still works.
"""

import hashlib

from dagster import AssetExecutionContext, Config, DataVersion, MaterializeResult, MetadataValue, asset
from pydantic import Field

from plant_pipeline.defs.locks import locked_output
from plant_pipeline.defs.metadata import table
from plant_pipeline.defs.resources import PipelineStorage
from plant_pipeline.ml.data import (
    DEFAULT_QUESTION,
    SourceData,
    read_datasets_source,
    read_image_folder,
    summarize_manifest,
    write_category_map,
    write_manifest,
)
from plant_pipeline.ml.data.splits import DEFAULT_FRACTIONS

MANIFEST_FILE = "manifest.parquet"
CATEGORIES_FILE = "categories.json"
_SPLITS_HELP = ("Fractions of train, validation and test for photos whose source gives no split, assigned from each "
                "photo's content hash: adding photos never moves one, and a photo under two names lands in one split.")


def _not_in_use(setting: str) -> MaterializeResult:
    return MaterializeResult(
        metadata={"in_use": False, "how_to_use": f"Set {setting} in this asset's config and source: "
                  "<this asset's name> in category_map's config (see the README, 'Your own plants')."},
        data_version=DataVersion("not-in-use"),
    )


def _write_source(context: AssetExecutionContext, storage: PipelineStorage, name: str, data: SourceData,
                  location: str) -> MaterializeResult:
    folder = storage.source_dir(name)
    write_manifest(data.manifest, folder / MANIFEST_FILE)
    write_category_map(folder / CATEGORIES_FILE, data.categories)
    for warning in data.warnings:
        context.log.warning(warning)
    summary = summarize_manifest(data.manifest)
    context.log.info(f"{name}: {summary} from {location}")
    return MaterializeResult(
        metadata={
            "in_use": True,
            "location": location,
            **summary,
            "num_categories": len(data.categories),
            "question": data.categories.question,
            "warnings": MetadataValue.json(data.warnings[:50]),
            "manifest_path": MetadataValue.path(str(folder / MANIFEST_FILE)),
            "preview": table(data.manifest.drop(columns=["sha256"], errors="ignore"), limit=10),
        },
        # Follows the content (photo bytes, category, split), not paths: the same photos moved elsewhere are no change.
        data_version=DataVersion(hashlib.sha256(
            (data.content_version + data.categories.question).encode()).hexdigest()[:16]),
    )


class _SourceConfig(Config):
    """What every source of one's own photos takes: the split fractions and the question."""

    split_fractions: list[float] = Field(default=list(DEFAULT_FRACTIONS), description=_SPLITS_HELP)
    question: str = Field(default=DEFAULT_QUESTION, description="The question every prompt asks about the photo.")


class ImageFolderConfig(_SourceConfig):
    root: str = Field(
        default="",
        description="A folder of <category>/<photos> or <train|validation|test>/<category>/<photos>; photos in "
        "subfolders of a category folder belong to it. Empty: this source is not in use.",
    )
    max_photo_mb: float = Field(default=50, gt=0, description="Photos larger than this many MB are left out, named.")


@asset(
    group_name="data",
    code_version="1",
    kinds={"python", "parquet"},
    description="Your own photos from an image folder (one folder per category, optionally under split folders): "
    "checked, split by content hash where no split is given, and a manifest with the categories from the folder names.",
)
@locked_output
def folder_photos(
    context: AssetExecutionContext, config: ImageFolderConfig, storage: PipelineStorage
) -> MaterializeResult:
    if not config.root.strip():
        return _not_in_use("root")
    data = read_image_folder(config.root, fractions=config.split_fractions, question=config.question,
                             source="folder_photos", max_photo_mb=config.max_photo_mb)
    return _write_source(context, storage, "folder_photos", data, config.root)


class HfDatasetConfig(_SourceConfig):
    dataset: str = Field(
        default="",
        description="A folder written by datasets' save_to_disk, a local imagefolder folder, or a Hugging Face hub "
        "dataset id (needs the hub to be reachable). Empty: this source is not in use.",
    )
    image_column: str = Field(default="image", description="The column holding the photos.")
    label_column: str = Field(default="label", description="The ClassLabel column; its names become the categories.")
    revision: str | None = Field(default=None, description="Hub datasets: a branch, tag or commit to pin.")


@asset(
    group_name="data",
    code_version="1",
    kinds={"python", "parquet"},
    description="Your own photos from a Hugging Face `datasets` dataset (save_to_disk folder, imagefolder or hub id): "
    "the images exported as files by content hash, the ClassLabel names as categories, and a manifest.",
)
@locked_output
def hf_dataset_photos(
    context: AssetExecutionContext, config: HfDatasetConfig, storage: PipelineStorage
) -> MaterializeResult:
    if not config.dataset.strip():
        return _not_in_use("dataset")
    data = read_datasets_source(
        config.dataset, storage.source_dir("hf_dataset_photos") / "images", data_root=storage.path(),
        image_column=config.image_column, label_column=config.label_column, revision=config.revision,
        fractions=config.split_fractions, question=config.question, source="hf_dataset_photos",
    )
    return _write_source(context, storage, "hf_dataset_photos", data, config.dataset)
