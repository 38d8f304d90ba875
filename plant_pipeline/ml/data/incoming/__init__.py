"""Photos users drop into ``<data>/incoming/<category>/`` (subfolders too; a folder that names no category
creates one when the category map allows new categories): validated, and taken in once each by
content hash.

A taken-in photo is copied (never moved) to ``<data>/user_photos/<sha256>.<ext>`` and recorded in the ledger
``user_photos/ledger.json``, from which ``user_photos/manifest.parquet`` (the Oxford manifest's columns,
source "user") is rewritten. Files with an unknown category, symlinks, files over the size limit, files that
do not decode, the same content under two categories and photos already in the data (the release's, by content
hash) are reported and left where they are; files still being written wait; nothing under ``incoming/`` is ever
modified. Listing is cheap (a stat per file) and reads no photo: the sensor does only that; the run hashes and
decodes, and the ledger remembers each file's outcome by path, size and mtime so that an unchanged file is never
read twice.

listing.py lists incoming/, reading.py reads one file safely, scanning.py sorts the files by what becomes of
them, in_data.py knows the data's photos by hash, store.py takes the new ones in, ledger.py reads and writes the
record of what was taken in.
"""

from plant_pipeline.ml.data.incoming.in_data import DATA_MANIFESTS, DataPhoto, load_data_photos
from plant_pipeline.ml.data.incoming.ledger import (
    IncomingError,
    ledger_path,
    manifest_path,
    read_ledger,
    read_user_manifest,
    relabelled_manifest,
    user_manifest,
)
from plant_pipeline.ml.data.incoming.listing import (
    INCOMING_DIR,
    NEW_LABEL,
    Skipped,
    UnknownCategoryError,
    category_label,
    new_category_folders,
)
from plant_pipeline.ml.data.incoming.reading import check_image
from plant_pipeline.ml.data.incoming.scanning import DEFAULT_MAX_BYTES, DEFAULT_SETTLE_S, Scan, scan_incoming
from plant_pipeline.ml.data.incoming.store import DEFAULT_MIN_NEW_PHOTOS, IngestResult, ingest, intake

__all__ = [
    "DATA_MANIFESTS",
    "DataPhoto",
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MIN_NEW_PHOTOS",
    "DEFAULT_SETTLE_S",
    "INCOMING_DIR",
    "IncomingError",
    "IngestResult",
    "NEW_LABEL",
    "Scan",
    "Skipped",
    "UnknownCategoryError",
    "category_label",
    "check_image",
    "ingest",
    "intake",
    "ledger_path",
    "load_data_photos",
    "manifest_path",
    "new_category_folders",
    "read_ledger",
    "read_user_manifest",
    "relabelled_manifest",
    "scan_incoming",
    "user_manifest",
]
