"""Assets ``oxford_flowers`` (download, verify, extract, manifest) and ``category_map`` (the 102 names)."""

import hashlib
import json
from pathlib import Path

import pandas as pd
from dagster import (
    AssetCheckResult,
    AssetExecutionContext,
    Config,
    DataVersion,
    MaterializeResult,
    MetadataValue,
    asset,
    asset_check,
)
from pydantic import Field

from plant_pipeline.defs.locks import locked_output
from plant_pipeline.defs.metadata import ProgressLog, table
from plant_pipeline.defs.resources import PipelineStorage
from plant_pipeline.ml.data import (
    CATEGORY_NAMES,
    OFFICIAL_BASE_URL,
    OFFICIAL_MD5,
    ExtractLimits,
    build_manifest,
    fetch_md5sums,
    fetch_release,
    read_manifest,
    safe_extract_tgz,
    summarize_manifest,
    write_manifest,
)
from plant_pipeline.ml.files import atomic_write_json, sha256_file

# Manifest paths are relative to the data root, so every source (the official release, later user photos)
# lives in one table.
DATASET_DIR = "oxford_flowers"
IMAGES_DIR = "extracted"


class OxfordFlowersConfig(Config):
    base_url: str = Field(
        default=OFFICIAL_BASE_URL,
        description="Where 102flowers.tgz, imagelabels.mat and setid.mat are downloaded from: the official "
        "site or a mirror such as http://127.0.0.1:8000/.",
    )
    md5: dict[str, str] = Field(
        default=dict(OFFICIAL_MD5),
        description="Expected md5 of each of the three files (default: the official ones). Empty ({}) reads "
        "them from the source's own 'md5sums' listing, fetched again on every run so that a new release on "
        "the mirror is downloaded; it guards against corruption but not tampering.",
    )
    local_dir: str | None = Field(
        default=None,
        description="Read the three files from this folder instead of downloading (air-gapped copies, the demo).",
    )
    max_extracted_gib: float = Field(
        default=ExtractLimits.max_total_bytes / 2**30,
        gt=0,
        description="Refuse an archive whose files add up to more than this many GiB (the release: about 0.32 GiB).",
    )
    max_compression_ratio: float = Field(
        default=ExtractLimits.max_ratio,
        ge=1,
        description="Refuse an archive that expands to more than this many times its size once past 64 MiB "
        "(a decompression bomb; the release's JPEGs expand about 1:1).",
    )


def _data_version(manifest_path: Path, checksums: dict[str, str]) -> DataVersion:
    """The manifest's content hash and the release files' md5s: downstream assets go stale only when the
    data really changed, and new pixels under the same names and labels are a change."""
    digest = hashlib.sha256(sha256_file(manifest_path).encode())
    digest.update(json.dumps(checksums, sort_keys=True).encode())
    return DataVersion(digest.hexdigest()[:16])


@asset(
    group_name="data",
    code_version="1",
    kinds={"python", "parquet"},
    description="The Oxford Flowers 102 release, downloaded with checksums, safely extracted, and a manifest "
    "of image, label and split.",
)
@locked_output
def oxford_flowers(
    context: AssetExecutionContext, config: OxfordFlowersConfig, storage: PipelineStorage
) -> MaterializeResult:
    root = storage.path(DATASET_DIR)
    md5 = config.md5 or fetch_md5sums(root / "downloads", base_url=config.base_url, local_dir=config.local_dir)
    fetched = fetch_release(
        root / "downloads",
        base_url=config.base_url,
        local_dir=config.local_dir,
        md5=md5,
        progress=ProgressLog(context.log),
    )
    images_root = root / IMAGES_DIR
    limits = ExtractLimits(
        max_total_bytes=int(config.max_extracted_gib * 2**30), max_ratio=config.max_compression_ratio
    )
    safe_extract_tgz(fetched.paths["102flowers.tgz"], images_root, limits=limits)
    manifest = build_manifest(images_root, fetched.paths["imagelabels.mat"], fetched.paths["setid.mat"])
    manifest["path"] = f"{DATASET_DIR}/{IMAGES_DIR}/" + manifest["path"]
    write_manifest(manifest, storage.manifest_path)
    summary = summarize_manifest(manifest)
    context.log.info(f"manifest: {summary}")
    return MaterializeResult(
        metadata={
            **summary,
            "manifest_path": MetadataValue.path(str(storage.manifest_path)),
            "source": fetched.source,
            "bytes_downloaded": fetched.bytes_downloaded,
            "checksums": MetadataValue.json(fetched.checksums),
            "preview": table(manifest, limit=10),
        },
        data_version=_data_version(storage.manifest_path, fetched.checksums),
    )


@asset(
    deps=[oxford_flowers],
    group_name="data",
    code_version="1",
    kinds={"python", "json"},
    description="The 102 category names with their ids (0-based labels of the manifest).",
)
@locked_output
def category_map(context: AssetExecutionContext, storage: PipelineStorage) -> MaterializeResult:
    mapping = {
        "id_to_name": {str(label): name for label, name in enumerate(CATEGORY_NAMES)},
        "name_to_id": {name: label for label, name in enumerate(CATEGORY_NAMES)},
    }
    path = atomic_write_json(storage.category_map_path, mapping)
    names = pd.DataFrame({"category_id": range(len(CATEGORY_NAMES)), "name": CATEGORY_NAMES})
    return MaterializeResult(
        metadata={"num_categories": len(CATEGORY_NAMES), "path": MetadataValue.path(str(path)), "categories": table(names)},
        data_version=DataVersion(sha256_file(path)[:16]),
    )


@asset_check(asset=category_map, description="102 unique names, and every label in the manifest has one.")
def category_map_complete(storage: PipelineStorage) -> AssetCheckResult:
    mapping = json.loads(storage.category_map_path.read_text())
    names = list(mapping["id_to_name"].values())
    labels = set(read_manifest(storage.manifest_path)["label"].tolist())
    unnamed = sorted(label for label in labels if str(label) not in mapping["id_to_name"])
    duplicates = sorted({name for name in names if names.count(name) > 1})
    return AssetCheckResult(
        passed=len(names) == 102 and not duplicates and not unnamed,
        metadata={"num_names": len(names), "duplicate_names": duplicates, "labels_without_name": unnamed},
    )
