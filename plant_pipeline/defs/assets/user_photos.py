"""Asset ``user_photos``: photos users drop into ``data/incoming/<category>/``, each taken in once by content hash.

incoming_photos_sensor (sensors.py) launches it when new photos appear; flower_shards adds them to the train split.
"""

import pandas as pd
from dagster import (
    AssetExecutionContext,
    Config,
    DataVersion,
    MaterializeResult,
    MetadataValue,
    asset,
)
from pydantic import Field

from plant_pipeline.defs.assets.flowers import category_map
from plant_pipeline.defs.locks import locked_output
from plant_pipeline.defs.metadata import table
from plant_pipeline.defs.resources import PipelineStorage
from plant_pipeline.ml.data import (
    DEFAULT_MAX_BYTES,
    DEFAULT_SETTLE_S,
    CategoryMap,
    IngestResult,
    intake,
    oxford_map,
    read_category_map,
    user_manifest,
    write_category_map,
)
from plant_pipeline.ml.data.incoming import DEFAULT_MIN_NEW_PHOTOS
from plant_pipeline.ml.files import sha256_file

_LISTED = 50  # rows of the metadata tables; the counts say how many there were


class UserPhotosConfig(Config):
    split: str = Field(
        default="train",
        description="The split photos of existing categories taken in by this run join: train (the default), "
        "validation or test. Photos of a category created by this run are split by their content hash instead "
        "(80/10/10), so a new category gets validation and test photos too. Photos taken in earlier keep theirs.",
    )
    min_new_photos: int = Field(
        default=DEFAULT_MIN_NEW_PHOTOS,
        ge=1,
        description="A folder under incoming/ that names no category creates one (when the source allows new "
        "categories) once it holds at least this many valid photos; until then its photos wait in place.",
    )
    max_photo_mb: float = Field(
        default=DEFAULT_MAX_BYTES / 1e6,
        gt=0,
        description="Files larger than this many megabytes (10^6 bytes) are left in place unread, with the reason. "
        "incoming_photos_sensor applies the default.",
    )
    settle_seconds: float = Field(
        default=DEFAULT_SETTLE_S,
        ge=0,
        description="A file modified less than this many seconds ago may still be being written: it waits for a "
        "later run.",
    )


@asset(
    deps=[category_map],  # reads category_map.json: which folders are categories, whether new ones may be created
    group_name="data",
    code_version="2",  # 2: any source's categories; new categories where the source allows them
    kinds={"python", "parquet"},
    description="Photos from data/incoming/<category name or 0-based id>/ (subfolders too; a new folder name "
    "creates a category where the source allows it, written to category_map.json): decoded, taken in "
    "once each by sha256, copied to data/user_photos/ with a manifest (source 'user') and, last, a ledger. "
    "Unknown categories, symlinks, oversized, undecodable and conflicting files, and photos already in the data "
    "(the release's, by sha256: a test photo never joins the train split), are reported and left in place; "
    "files still being written wait.",
)
@locked_output
def user_photos(
    context: AssetExecutionContext, config: UserPhotosConfig, storage: PipelineStorage
) -> MaterializeResult:
    storage.incoming_dir.mkdir(parents=True, exist_ok=True)  # so that people see where photos go
    max_bytes = int(config.max_photo_mb * 1e6)
    categories = current_categories(storage)
    with intake(storage.path(), config.split, categories=categories, min_new_photos=config.min_new_photos,
                max_bytes=max_bytes, settle_s=config.settle_seconds) as result:
        # Everything that can fail runs inside the block: the ledger is written only when it ends cleanly, and
        # the map with the new categories before it, so that no ledger names a category the map lacks.
        metadata = _report(context, storage, result)
        if result.new_categories:
            write_category_map(storage.category_map_path, result.categories)
            context.log.info(f"{len(result.new_categories)} new categories: {', '.join(result.new_categories)}")
    context.log.info(f"{len(result.added)} new photos taken in; {len(result.photos)} user photos in all")
    # The manifest's hash: flower_shards goes stale only when the set of user photos really changed.
    return MaterializeResult(metadata=metadata, data_version=DataVersion(sha256_file(result.manifest_path)[:16]))


def current_categories(storage: PipelineStorage) -> CategoryMap:
    """The data's categories (category_map.json), or Oxford's before category_map first ran."""
    path = storage.category_map_path
    return read_category_map(path) if path.is_file() else oxford_map()


def _report(context: AssetExecutionContext, storage: PipelineStorage, result: IngestResult) -> dict:
    """The log lines and the materialisation's metadata for one intake."""
    for item in result.rejected:
        context.log.warning(f"left in place: {item.original}: {item.reason}")
    for item in result.waiting:
        context.log.info(f"not yet: {item.original}: {item.reason}")
    for item in result.scan.duplicates:
        context.log.info(f"not taken in again: {item.original}: {item.reason}")
    manifest = user_manifest(result.photos)
    metadata = {
        "new_photos": len(result.added),
        "duplicates": len(result.scan.duplicates),
        "rejected": len(result.rejected),
        "already_in_data": result.scan.in_data,  # of the rejected: the same bytes as a photo of the manifests
        "waiting": len(result.waiting),
        "already_taken_in": result.scan.known,
        "num_photos": len(result.photos),
        "photos_per_split": MetadataValue.json(manifest["split"].value_counts().to_dict()),
        "num_classes": int(manifest["label"].nunique()),
        "new_categories": MetadataValue.json(result.new_categories),
        "num_categories": len(result.categories),
        "incoming_dir": MetadataValue.path(str(storage.incoming_dir)),
        "ledger_path": MetadataValue.path(str(result.ledger_path)),
        "manifest_path": MetadataValue.path(str(result.manifest_path)),
    }
    if result.added:
        added = pd.DataFrame(result.added)[["image_id", "original", "name", "label", "split", "path"]]
        metadata["taken_in"] = table(added, limit=_LISTED)
    skipped = ([("rejected", s) for s in result.rejected] + [("waiting", s) for s in result.waiting]
               + [("duplicate", s) for s in result.scan.duplicates])
    if skipped:
        rows = pd.DataFrame([{"file": s.original, "outcome": kind, "reason": s.reason} for kind, s in skipped])
        metadata["left_in_place"] = table(rows, limit=_LISTED)
    return metadata
