"""Stage 1: the data. Downloading (download.py) and safely extracting (archive.py) the Oxford release, its
manifest of image, label and split (oxford.py, manifest.py), the categories, the synthetic demo release
(demo_release.py, demo_drawing.py), a person's own photos as sources (sources/: an image folder, a `datasets`
dataset), content-hash splits (splits.py), and photos users drop into incoming/ (incoming/).

Exported here: what the Dagster layer and the benchmarks call.
"""

from plant_pipeline.ml.data.archive import ExtractLimits, safe_extract_tgz
from plant_pipeline.ml.data.categories import (
    CATEGORY_NAMES,
    DEFAULT_QUESTION,
    NUM_CLASSES,
    OXFORD_QUESTION,
    OXFORD_SOURCE,
    CategoryError,
    CategoryMap,
    check_category_counts,
    merge_category_map,
    normalise_name,
    oxford_map,
    read_category_map,
    read_display_names,
    relabel,
    write_category_map,
)
from plant_pipeline.ml.data.download import (
    OFFICIAL_BASE_URL,
    OFFICIAL_MD5,
    fetch_md5sums,
    fetch_release,
    parse_md5sums,
)
from plant_pipeline.ml.data.incoming import (
    DEFAULT_MAX_BYTES,
    DEFAULT_SETTLE_S,
    INCOMING_DIR,
    IngestResult,
    Skipped,
    intake,
    read_user_manifest,
    scan_incoming,
    user_manifest,
)
from plant_pipeline.ml.data.manifest import (
    DATASET_MANIFEST,
    OXFORD_MANIFEST,
    combine_manifests,
    read_manifest,
    summarize_manifest,
    write_manifest,
)
from plant_pipeline.ml.data.oxford import build_manifest, image_relpath, read_labels, read_splits
from plant_pipeline.ml.data.sources import (
    SourceData,
    SourceError,
    content_image_id,
    read_datasets_source,
    read_image_folder,
)

__all__ = [
    "DATASET_MANIFEST",
    "OXFORD_MANIFEST",
    "CATEGORY_NAMES",
    "DEFAULT_QUESTION",
    "OXFORD_QUESTION",
    "OXFORD_SOURCE",
    "CategoryError",
    "CategoryMap",
    "check_category_counts",
    "merge_category_map",
    "normalise_name",
    "oxford_map",
    "read_category_map",
    "read_display_names",
    "relabel",
    "write_category_map",
    "DEFAULT_MAX_BYTES",
    "DEFAULT_SETTLE_S",
    "INCOMING_DIR",
    "NUM_CLASSES",
    "OFFICIAL_BASE_URL",
    "OFFICIAL_MD5",
    "ExtractLimits",
    "IngestResult",
    "Skipped",
    "SourceData",
    "SourceError",
    "content_image_id",
    "read_datasets_source",
    "read_image_folder",
    "build_manifest",
    "combine_manifests",
    "fetch_md5sums",
    "fetch_release",
    "image_relpath",
    "intake",
    "parse_md5sums",
    "read_labels",
    "read_manifest",
    "read_splits",
    "read_user_manifest",
    "safe_extract_tgz",
    "scan_incoming",
    "summarize_manifest",
    "user_manifest",
    "write_manifest",
]
