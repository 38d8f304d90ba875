"""Assets ``oxford_flowers`` (download, verify, extract, manifest) and ``category_map`` (the categories of the chosen
source, with append-only ids)."""

import hashlib
import json
from dataclasses import replace
from pathlib import Path

import pandas as pd
from dagster import (
    AssetCheckResult,
    AssetExecutionContext,
    Config,
    DataVersion,
    Failure,
    MaterializeResult,
    MetadataValue,
    asset,
    asset_check,
)
from pydantic import Field

from plant_pipeline.defs.failures import usage_errors_as_failures
from plant_pipeline.defs.locks import locked_output
from plant_pipeline.defs.metadata import ProgressLog, table
from plant_pipeline.defs.resources import PipelineStorage, with_run_config_defaults
from plant_pipeline.ml.data import (
    DEFAULT_QUESTION,
    OFFICIAL_BASE_URL,
    OFFICIAL_MD5,
    OXFORD_QUESTION,
    OXFORD_SOURCE,
    CategoryMap,
    ExtractLimits,
    build_manifest,
    check_category_counts,
    fetch_md5sums,
    fetch_release,
    merge_category_map,
    oxford_map,
    read_category_map,
    read_display_names,
    read_manifest,
    relabel,
    safe_extract_tgz,
    summarize_manifest,
    write_category_map,
    write_manifest,
)
from plant_pipeline.ml.data.download import source_cache_dir
from plant_pipeline.ml.files import sha256_file

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


# Defaults from PLANT_PIPELINE_RUN_CONFIG's files where it is set (make dev after make demo).
OxfordFlowersConfig = with_run_config_defaults(OxfordFlowersConfig, "oxford_flowers")


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
    # One folder per source: a real run that fails must not delete the demo's verified archive as stale.
    downloads = source_cache_dir(root / "downloads", base_url=config.base_url, local_dir=config.local_dir)
    with usage_errors_as_failures("oxford_flowers"):
        md5 = config.md5 or fetch_md5sums(downloads, base_url=config.base_url, local_dir=config.local_dir)
        fetched = fetch_release(
            downloads,
            base_url=config.base_url,
            local_dir=config.local_dir,
            md5=md5,
            progress=ProgressLog(context.log),
            compare_listing=bool(config.md5),
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


class CategoryMapConfig(Config):
    source: str = Field(
        default=OXFORD_SOURCE,
        description="The source asset that feeds this run: oxford_flowers (the default), folder_photos or "
        "hf_dataset_photos. Its categories become the map; ids stay as they were for the same source (new "
        "categories are appended), and start afresh when the source changes.",
    )
    display_names_file: str | None = Field(
        default=None,
        description="Optional JSON file {category name: display name}, e.g. {\"rosa canina\": \"Dog rose\"}.",
    )
    question: str | None = Field(
        default=None, description="The question every prompt asks; empty: the source's own (Oxford: "
        f"{OXFORD_QUESTION!r}; others: {DEFAULT_QUESTION!r}).",
    )
    min_train_photos: int = Field(
        default=1, ge=1, description="Fewest training photos a category may have; fewer fails this asset, naming "
        "the categories (a model cannot learn a category it never saw).",
    )
    min_test_photos: int = Field(
        default=1, ge=0, description="Fewest test photos a category should have; fewer is a warning naming them "
        "(the category cannot be evaluated).",
    )


SOURCES = (OXFORD_SOURCE, "folder_photos", "hf_dataset_photos")


def _source_data(storage: PipelineStorage, source: str) -> tuple[pd.DataFrame, CategoryMap]:
    """The source's manifest (labels index its own names) and its categories."""
    if source not in SOURCES:
        raise Failure(f"category_map: unknown source {source!r}; expected one of {list(SOURCES)}")
    if source == OXFORD_SOURCE:
        return read_manifest(storage.manifest_path), oxford_map()
    folder = storage.source_dir(source)
    if not (folder / "categories.json").is_file():
        raise Failure(f"category_map: source {source} has no photos yet ({folder} is empty); set its location in "
                      f"its config and materialise {source} first")
    return read_manifest(folder / "manifest.parquet"), read_category_map(folder / "categories.json")


@asset(
    deps=SOURCES,
    group_name="data",
    code_version="2",  # 2: the categories come from the chosen source
    kinds={"python", "json"},
    description="The categories and their ids, taken from the chosen source (config: source), with the question the "
    "prompts ask; ids are append-only. Writes category_map.json and the source's manifest relabelled to these ids.",
)
@locked_output
def category_map(context: AssetExecutionContext, config: CategoryMapConfig, storage: PipelineStorage) -> MaterializeResult:
    manifest, found = _source_data(storage, config.source)
    display = read_display_names(config.display_names_file) if config.display_names_file else {}
    current = replace(found, question=config.question or found.question, display_names=display)
    previous = read_category_map(storage.category_map_path) if storage.category_map_path.is_file() else None
    categories = merge_category_map(previous, current)
    manifest = manifest.assign(label=relabel(manifest["label"], found.names, categories))
    report = check_category_counts(zip(manifest["label"], manifest["split"]), categories,
                                   min_train=config.min_train_photos, min_test=config.min_test_photos)
    for warning in report.warnings:
        context.log.warning(warning)
    if report.errors:
        raise Failure("category_map: " + "; ".join(report.errors), metadata={"categories": table(
            pd.DataFrame(report.per_category), limit=200)})
    new = categories.new_names(previous)
    # The manifest first, the map last: a reader that finds the new map finds the manifest its ids belong to.
    write_manifest(manifest, storage.dataset_manifest_path)
    path = write_category_map(storage.category_map_path, categories)
    context.log.info(f"{len(categories)} categories from {config.source}; new: {new[:20]}")
    return MaterializeResult(
        metadata={
            "source": config.source,
            "num_categories": len(categories),
            "new_categories": MetadataValue.json(new[:200]),
            "question": categories.question,
            "warnings": MetadataValue.json(report.warnings),
            "path": MetadataValue.path(str(path)),
            "categories": table(pd.DataFrame(report.per_category), limit=200),
        },
        data_version=DataVersion(hashlib.sha256(
            (sha256_file(path) + sha256_file(storage.dataset_manifest_path)).encode()).hexdigest()[:16]),
    )


@asset_check(asset=category_map, description="Names unique once normalised, and every label of the dataset's manifest "
             "has a name.")
def category_map_complete(storage: PipelineStorage) -> AssetCheckResult:
    categories = read_category_map(storage.category_map_path)
    labels = set(read_manifest(storage.dataset_manifest_path)["label"].tolist())
    unnamed = sorted(label for label in labels if not 0 <= label < len(categories))
    return AssetCheckResult(
        passed=not unnamed,
        metadata={"num_names": len(categories), "labels_without_name": unnamed[:100], "source": categories.source},
    )
