"""Real photos three ways: the Oxford route's manifest, the same photos as a split/category folder tree, and as a
``datasets`` DatasetDict saved to disk give the same (sha256, category name, split) set."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from datasets import ClassLabel, Dataset, DatasetDict, Features
from datasets import Image as ImageFeature

from plant_pipeline.ml.data import build_manifest, safe_extract_tgz
from plant_pipeline.ml.data.categories import CATEGORY_NAMES
from plant_pipeline.ml.data.sources import read_datasets_source, read_image_folder
from plant_pipeline.ml.files import sha256_file

LABELS = (0, 3, 49, 76, 101)  # five Oxford categories, all their photos (30 each in the mini mirror)


@pytest.fixture(scope="module")
def oxford_subset(shared_datasets, tmp_path_factory):
    mini = shared_datasets / "oxford-flowers-102-mini"
    root = tmp_path_factory.mktemp("oxford")
    safe_extract_tgz(mini / "102flowers.tgz", root)
    manifest = build_manifest(root, mini / "imagelabels.mat", mini / "setid.mat")
    return root, manifest[manifest["label"].isin(LABELS)].reset_index(drop=True)


def triples(data) -> set[tuple[str, str, str]]:
    m = data.manifest
    return {(sha, data.categories.names[label], split) for sha, label, split in zip(m["sha256"], m["label"], m["split"])}


def test_folder_tree_and_saved_dataset_match_the_oxford_route(oxford_subset, tmp_path):
    root, subset = oxford_subset
    expected = {(sha256_file(root / path), CATEGORY_NAMES[label], split)
                for path, label, split in zip(subset["path"], subset["label"], subset["split"])}
    assert len(expected) == len(subset) == 150 and {s for _, _, s in expected} == {"train", "validation", "test"}

    for path, label, split in zip(subset["path"], subset["label"], subset["split"]):
        target = tmp_path / "tree" / split / CATEGORY_NAMES[label] / Path(path).name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(root / path, target)
    folder = read_image_folder(tmp_path / "tree")
    assert folder.warnings == [] and triples(folder) == expected

    names = [CATEGORY_NAMES[label] for label in LABELS]
    features = Features({"image": ImageFeature(), "label": ClassLabel(names=names)})
    DatasetDict({
        split: Dataset.from_dict({"image": [{"bytes": (root / p).read_bytes(), "path": None} for p in part["path"]],
                                  "label": [LABELS.index(label) for label in part["label"]]}, features=features)
        for split, part in subset.groupby("split")
    }).save_to_disk(str(tmp_path / "saved"))
    hf = read_datasets_source(str(tmp_path / "saved"), tmp_path / "data" / "hf", data_root=tmp_path / "data")
    assert hf.warnings == [] and triples(hf) == expected
    assert hf.content_version == folder.content_version
