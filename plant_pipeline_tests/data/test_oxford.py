"""Tests for plant_pipeline.ml.data.oxford: .mat parsing, its errors, and the manifest."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.io

from plant_pipeline.ml.data.manifest import (
    SPLITS,
    DatasetFormatError,
    read_manifest,
    summarize_manifest,
    validate_manifest,
    write_manifest,
)
from plant_pipeline.ml.data.oxford import build_manifest, read_labels, read_splits


def _mat(path: Path, **variables) -> Path:
    scipy.io.savemat(path, {k: np.asarray(v) for k, v in variables.items()})
    return path


# A tiny release: 9 images, labels 1, 2, 3 repeated, 3 per split (rows like the real (1, N) uint arrays).
TINY_LABELS = np.array([[1, 2, 3, 1, 2, 3, 1, 2, 3]], dtype=np.uint8)
TINY_SPLITS = {
    "trnid": np.array([[1, 2, 3]], dtype=np.uint16),
    "valid": np.array([[4, 5, 6]], dtype=np.uint16),
    "tstid": np.array([[9, 8, 7]], dtype=np.uint16),
}


@pytest.fixture
def tiny_release(tmp_path: Path) -> Path:
    root = tmp_path / "oxford_flowers"
    (root / "jpg").mkdir(parents=True)
    for image_id in range(1, 10):
        (root / "jpg" / f"image_{image_id:05d}.jpg").write_bytes(b"\xff\xd8fake")
    _mat(root / "imagelabels.mat", labels=TINY_LABELS)
    _mat(root / "setid.mat", **TINY_SPLITS)
    return root


# -- the real label and split files ---------------------------------------------------------------
def test_official_files_give_8189_labels_and_the_official_splits(shared_datasets: Path) -> None:
    official = shared_datasets / "oxford-flowers-102-official"
    labels = read_labels(official / "imagelabels.mat")
    assert labels.dtype == np.int64 and labels.shape == (8189,)
    assert (labels.min(), labels.max()) == (0, 101)
    splits = read_splits(official / "setid.mat", len(labels))
    assert {k: len(v) for k, v in splits.items()} == {"train": 1020, "validation": 1020, "test": 6149}
    # The official train split holds exactly 10 images of every class.
    assert np.bincount(labels[splits["train"] - 1], minlength=102).tolist() == [10] * 102


def test_mini_files_give_3060_labels_ten_per_class_and_split(shared_datasets: Path) -> None:
    mini = shared_datasets / "oxford-flowers-102-mini"
    labels = read_labels(mini / "imagelabels.mat")
    splits = read_splits(mini / "setid.mat", len(labels))
    assert len(labels) == 3060
    for split in SPLITS:
        assert np.bincount(labels[splits[split] - 1], minlength=102).tolist() == [10] * 102


# -- malformed .mat files -------------------------------------------------------------------------
def test_labels_variable_missing_lists_the_variables_found(tmp_path: Path) -> None:
    path = _mat(tmp_path / "imagelabels.mat", lables=TINY_LABELS, other=[1])
    with pytest.raises(DatasetFormatError, match=r"no variable 'labels'.*\['lables', 'other'\]"):
        read_labels(path)


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([[1, 0, 5]], r"1 labels outside 1\.\.102, e\.g\. value 0 for image_id 2"),
        ([[103, 2, 104, 7]], r"2 labels outside 1\.\.102, e\.g\. value 103 for image_id 1 \(bad values: 103, 104\)"),
        ([[1.5, 2.0]], r"non-integer values, e\.g\. 1\.5"),
        ([[1, 2], [3, 4]], r"non-empty vector, got shape \(2, 2\)"),
    ],
    ids=["zero", "above-102", "fraction", "matrix"],
)
def test_bad_label_values_are_reported(tmp_path: Path, values, expected: str) -> None:
    path = _mat(tmp_path / "imagelabels.mat", labels=np.array(values))
    with pytest.raises(DatasetFormatError, match=expected):
        read_labels(path)


def test_a_file_that_is_not_a_mat_file_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "imagelabels.mat"
    path.write_text("<html>404</html>")
    with pytest.raises(DatasetFormatError, match="not a readable MATLAB"):
        read_labels(path)
    with pytest.raises(DatasetFormatError, match="does not exist"):
        read_labels(tmp_path / "absent.mat")


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"tstid": None}, r"missing split variables \['tstid'\] \(found \['trnid', 'valid'\]\)"),
        ({"valid": [[4, 5, 10]]}, r"valid \(validation\) has 1 image ids outside 1\.\.9 .*e\.g\. 10"),
        ({"trnid": [[1, 2, 3, 3]]}, r"trnid \(train\) lists 1 image ids more than once, e\.g\. 3"),
        ({"tstid": [[9, 8, 7, 2]]}, r"splits train \(trnid\) and test \(tstid\) share 1 image ids, e\.g\. 2"),
        ({"tstid": [[9]]}, r"2 of 9 labelled images are in no split, e\.g\. image ids 7, 8"),
    ],
    ids=["missing-var", "out-of-range", "duplicate", "overlap", "not-covering"],
)
def test_bad_splits_say_which_split_and_which_ids(tmp_path: Path, change: dict, expected: str) -> None:
    variables = {**TINY_SPLITS, **change}
    variables = {k: v for k, v in variables.items() if v is not None}
    path = _mat(tmp_path / "setid.mat", **variables)
    with pytest.raises(DatasetFormatError, match=expected):
        read_splits(path, num_images=9)


# -- the manifest ----------------------------------------------------------------------------------
def test_build_manifest_has_one_typed_row_per_image(tiny_release: Path) -> None:
    df = build_manifest(tiny_release, tiny_release / "imagelabels.mat", tiny_release / "setid.mat")
    assert list(df.columns) == ["image_id", "path", "label", "split", "source"]
    assert df["image_id"].tolist() == list(range(1, 10))
    assert df["image_id"].dtype == np.int64 and df["label"].dtype == np.int64
    assert df["path"].iloc[0] == "jpg/image_00001.jpg"
    assert df["label"].tolist() == [0, 1, 2, 0, 1, 2, 0, 1, 2]
    assert df["split"].tolist() == ["train"] * 3 + ["validation"] * 3 + ["test"] * 3
    assert set(df["source"]) == {"oxford_flowers"}
    assert all((tiny_release / p).is_file() for p in df["path"])


def test_build_manifest_names_the_missing_images(tiny_release: Path) -> None:
    for image_id in (2, 5):
        (tiny_release / "jpg" / f"image_{image_id:05d}.jpg").unlink()
    with pytest.raises(DatasetFormatError, match=r"2 of 9 images are missing .*jpg/image_00002\.jpg, jpg/image_00005\.jpg"):
        build_manifest(tiny_release, tiny_release / "imagelabels.mat", tiny_release / "setid.mat")


def test_build_manifest_without_the_image_folder_names_it_and_what_the_root_holds(tiny_release: Path) -> None:
    (tiny_release / "jpg").rename(tiny_release / "images")
    with pytest.raises(DatasetFormatError) as info:
        build_manifest(tiny_release, tiny_release / "imagelabels.mat", tiny_release / "setid.mat")
    message = str(info.value)
    assert f"{tiny_release / 'jpg'} does not exist" in message
    assert "holds: imagelabels.mat, images/, setid.mat" in message
    assert "first" not in message  # not "extract first": the archive may well have been extracted


def test_manifest_round_trips_through_an_atomic_parquet_write(tiny_release: Path, tmp_path: Path) -> None:
    df = build_manifest(tiny_release, tiny_release / "imagelabels.mat", tiny_release / "setid.mat")
    path = write_manifest(df, tmp_path / "out" / "manifest.parquet")
    assert sorted(p.name for p in path.parent.iterdir()) == ["manifest.parquet"]
    back = read_manifest(path)
    pd.testing.assert_frame_equal(back, df, check_dtype=False)
    assert back["image_id"].dtype == np.int64 and back["label"].dtype == np.int64


def test_invalid_manifests_are_refused_on_write_and_read(tiny_release: Path, tmp_path: Path) -> None:
    df = build_manifest(tiny_release, tiny_release / "imagelabels.mat", tiny_release / "setid.mat")
    bad_split = df.assign(split=["dev"] + df["split"].tolist()[1:])
    with pytest.raises(DatasetFormatError, match=r"unknown split values \['dev'\]"):
        write_manifest(bad_split, tmp_path / "m.parquet")
    assert not (tmp_path / "m.parquet").exists()
    df.assign(label=df["label"].astype("float64")).to_parquet(tmp_path / "float.parquet")
    with pytest.raises(DatasetFormatError, match="'label' should be int64, got float64"):
        read_manifest(tmp_path / "float.parquet")
    with pytest.raises(DatasetFormatError, match="labels outside >= 0"):
        write_manifest(df.assign(label=df["label"] - 100), tmp_path / "m.parquet")
    # Any number of categories: the upper bound is the category map's, where the caller gives it.
    with pytest.raises(DatasetFormatError, match="labels outside 0..101"):
        validate_manifest(df.assign(label=df["label"] + 100), num_classes=102)


def test_summarize_manifest_counts_splits_and_classes(tiny_release: Path) -> None:
    df = build_manifest(tiny_release, tiny_release / "imagelabels.mat", tiny_release / "setid.mat")
    df = df[df["image_id"] != 9]  # leave class 2 with one image fewer
    assert summarize_manifest(df) == {
        "images_train": 3, "images_validation": 3, "images_test": 2, "num_classes": 3,
        "images_per_class_min": 2, "images_per_class_max": 3, "num_images": 8,
    }
