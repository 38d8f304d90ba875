"""The ``datasets`` source: save_to_disk Dataset and DatasetDict, imagefolder, the hub offline, bad columns/labels."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from datasets import ClassLabel, Dataset, DatasetDict, Features, Value
from datasets import Image as ImageFeature
from PIL import Image

from plant_pipeline.ml.data.sources import SourceError, read_datasets_source

NAMES = ["daisy", "löwenzahn", "rose"]


def png(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (seed % 256, 3, 9)).save(buffer, format="PNG")
    return buffer.getvalue()


def dataset(seeds: list[int], labels: list[int], label_feature=None) -> Dataset:
    features = Features({"image": ImageFeature(), "label": label_feature or ClassLabel(names=NAMES)})
    return Dataset.from_dict({"image": [{"bytes": png(s), "path": None} for s in seeds], "label": labels},
                             features=features)


def read(location, tmp_path, **kwargs):
    return read_datasets_source(str(location), tmp_path / "root" / "export", data_root=tmp_path / "root", **kwargs)


def test_saved_dataset_gets_content_splits_and_exported_files(tmp_path):
    dataset(list(range(12)), [i % 3 for i in range(12)]).save_to_disk(str(tmp_path / "saved"))
    data = read(tmp_path / "saved", tmp_path, source="hf")
    m = data.manifest
    assert data.categories.names == tuple(NAMES) and len(m) == 12 and set(m["source"]) == {"hf"}
    for path, sha in zip(m["path"], m["sha256"]):
        assert path == f"export/{sha[:2]}/{sha}.png"
    files = {p: (tmp_path / "root" / p).stat().st_mtime_ns for p in m["path"]}
    again = read(tmp_path / "saved", tmp_path, source="hf")  # files already there are not rewritten
    assert again.content_version == data.content_version
    assert {p: (tmp_path / "root" / p).stat().st_mtime_ns for p in m["path"]} == files


def test_exported_bytes_are_the_originals(tmp_path):
    dataset([5, 6], [0, 2]).save_to_disk(str(tmp_path / "saved"))
    data = read(tmp_path / "saved", tmp_path)
    assert {(tmp_path / "root" / p).read_bytes() for p in data.manifest["path"]} == {png(5), png(6)}


def test_dataset_dict_splits_are_kept(tmp_path):
    DatasetDict({"train": dataset([1, 2, 3], [0, 1, 2]), "valid": dataset([4], [1]), "test": dataset([5], [2])}
                ).save_to_disk(str(tmp_path / "dd"))
    data = read(tmp_path / "dd", tmp_path)
    assert sorted(data.manifest["split"]) == ["test", "train", "train", "train", "validation"]


def test_imagefolder(tmp_path):
    for name, seeds in {"daisy": [1, 2], "rose": [3]}.items():
        (tmp_path / "if" / name).mkdir(parents=True)
        for s in seeds:
            (tmp_path / "if" / name / f"{s}.png").write_bytes(png(s))
    data = read(tmp_path / "if", tmp_path, cache_dir=str(tmp_path / "cache"))
    assert data.categories.names == ("daisy", "rose")
    assert sorted(data.manifest["label"]) == [0, 0, 1]


def test_hub_id_offline_says_so(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(SourceError, match="(?s)HF_HUB_OFFLINE.*save_to_disk"):
        read("someone/garden-plants", tmp_path)


def test_missing_columns_named(tmp_path):
    dataset([1, 2], [0, 1]).save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(SourceError, match=r"(?s)\['photo'\].*columns found: \['image', 'label'\]"):
        read(tmp_path / "saved", tmp_path, image_column="photo")


def test_label_must_be_class_label(tmp_path):
    dataset([1, 2], [0, 1], label_feature=Value("int64")).save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(SourceError, match="Value, expected a ClassLabel"):
        read(tmp_path / "saved", tmp_path)


def test_label_out_of_range_names_row(tmp_path):
    ds = Dataset.from_dict({"image": [{"bytes": png(1), "path": None}] * 2, "label": [1, -1]},
                           features=Features({"image": ImageFeature(), "label": ClassLabel(names=NAMES)}))
    ds.save_to_disk(str(tmp_path / "neg"))
    with pytest.raises(SourceError, match="row 1 has label -1"):
        read(tmp_path / "neg", tmp_path)
    assert not any(Path(tmp_path / "root").rglob("*.partial"))


def test_unreadable_image_is_a_warning(tmp_path):
    ds = Dataset.from_dict({"image": [{"bytes": png(1), "path": None}, {"bytes": png(2), "path": None},
                                      {"bytes": b"broken", "path": None}], "label": [0, 1, 2]},
                           features=Features({"image": ImageFeature(), "label": ClassLabel(names=NAMES)}))
    ds.save_to_disk(str(tmp_path / "saved"))
    data = read(tmp_path / "saved", tmp_path)
    assert len(data.manifest) == 2 and any("row 2" in w for w in data.warnings)
