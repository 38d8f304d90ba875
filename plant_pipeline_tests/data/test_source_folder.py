"""The image-folder source: layouts, category names, duplicates and conflicts, split stability, bad input."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image

from plant_pipeline.ml.data.categories import CategoryError
from plant_pipeline.ml.data.sources import SourceError, content_image_id, read_image_folder


def png(seed: int, size: int = 8) -> bytes:
    """A tiny PNG whose bytes differ for each seed."""
    image = Image.new("RGB", (size, size), (seed % 256, (seed // 256) % 256, 7))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def put(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def tree(root: Path, layout: dict[str, list[int]]) -> Path:
    for folder, seeds in layout.items():
        for seed in seeds:
            put(root / folder / f"p{seed}.png", png(seed))
    return root


def triples(data) -> set[tuple[str, str, str]]:
    m = data.manifest
    return {(sha, data.categories.names[label], split) for sha, label, split in zip(m["sha256"], m["label"], m["split"])}


def test_flat_layout_with_nested_hidden_and_non_ascii(tmp_path):
    root = tree(tmp_path / "photos", {"löwenzahn": [1, 2], "蒲公英": [3], "Rose/close ups/2024": [4, 5]})
    put(tmp_path / "photos" / "Rose" / ".DS_Store", b"junk")
    put(tmp_path / "photos" / ".ipynb_checkpoints" / "x" / "p9.png", png(9))
    data = read_image_folder(root, source="mine")
    assert data.categories.names == ("löwenzahn", "Rose", "蒲公英")  # sorted by normalised name
    assert data.categories.allow_new
    m = data.manifest
    assert len(m) == 5 and set(m["source"]) == {"mine"}
    rose = m[m["label"] == 1]
    assert len(rose) == 2 and all(Path(p).is_absolute() and "close ups" in p for p in rose["path"])
    assert list(m["image_id"]) == sorted(content_image_id(s) for s in m["sha256"])
    assert data.warnings == [] and len(data.content_version) == 16


def test_split_layout_uses_split_folders_and_val_alias(tmp_path):
    root = tree(tmp_path, {"train/a": [1, 2], "train/b": [3, 4], "val/a": [5], "test/b": [6]})
    data = read_image_folder(root)
    splits = {int(Path(p).stem[1:]): s for p, s in zip(data.manifest["path"], data.manifest["split"])}
    assert splits == {1: "train", 2: "train", 3: "train", 4: "train", 5: "validation", 6: "test"}


def test_content_version_ignores_paths_and_adding_photos_keeps_splits(tmp_path):
    first = read_image_folder(tree(tmp_path / "one", {"a": list(range(20)), "b": list(range(100, 120))}))
    renamed = tmp_path / "two"
    for seed in range(20):
        put(renamed / "a" / "deep" / f"other{seed}.png", png(seed))
    for seed in range(100, 120):
        put(renamed / "b" / f"x{seed}.png", png(seed))
    again = read_image_folder(renamed)
    assert again.content_version == first.content_version and triples(again) == triples(first)
    grown = read_image_folder(tree(tmp_path / "one", {"a": list(range(20, 40))}))
    before = dict(zip(first.manifest["sha256"], first.manifest["split"]))
    after = dict(zip(grown.manifest["sha256"], grown.manifest["split"]))
    assert len(after) == 60 and all(after[sha] == split for sha, split in before.items())
    assert grown.content_version != first.content_version


def test_duplicates_conflicts_and_two_split_folders(tmp_path):
    root = tree(tmp_path, {"train/a": [1, 2, 3], "train/b": [4, 5], "test/a": [1]})
    put(root / "train" / "a" / "copy.png", png(2))  # same bytes twice in one category: one row
    put(root / "train" / "b" / "stolen.png", png(3))  # same bytes in a and b: neither taken
    data = read_image_folder(root)
    shas = list(data.manifest["sha256"])
    assert len(shas) == len(set(shas)) == 4  # 1, 2, 4, 5
    text = "\n".join(data.warnings)
    assert "copy.png" in text and "stolen.png" in text and "p3.png" in text and "two splits" in text


@pytest.mark.parametrize("layout, message", [
    ({}, "no category folders"),
    ({"only": [1]}, "at least 2"),
    ({"train/a": [1], "tset/a": [2]}, "tset"),
    ({"train/a": [1], "roses": [2]}, "roses"),
])
def test_bad_layouts(tmp_path, layout, message):
    root = tree(tmp_path / "root", layout)
    root.mkdir(exist_ok=True)
    with pytest.raises(SourceError, match=message):
        read_image_folder(root)


def test_missing_root_and_file_root(tmp_path):
    with pytest.raises(SourceError, match="does not exist"):
        read_image_folder(tmp_path / "nowhere")
    with pytest.raises(SourceError, match="not a folder"):
        read_image_folder(put(tmp_path / "f.png", png(1)))


def test_clashing_names_unreadable_category_and_empty_folder(tmp_path):
    with pytest.raises(CategoryError, match="Sweet_Pea"):
        read_image_folder(tree(tmp_path / "clash", {"Sweet_Pea": [1], "sweet pea": [2], "rose": [3]}))
    broken = tree(tmp_path / "broken", {"a": [1], "b": [2]})
    put(broken / "c" / "bad.jpg", b"not a photo")
    with pytest.raises(SourceError, match=r"'c'.*bad\.jpg"):
        read_image_folder(broken)
    (broken / "c" / "bad.jpg").unlink()
    put(broken / "a" / "notes.txt", b"hello")
    data = read_image_folder(broken)
    assert data.categories.names == ("a", "b")
    assert any("empty category" in w and "'c'" in w for w in data.warnings)
    assert any("notes.txt" in w for w in data.warnings)


def test_size_cap_skips_big_files_without_failing(tmp_path):
    root = tree(tmp_path, {"a": [1], "b": [2]})
    put(root / "a" / "big.png", png(3, size=256))
    data = read_image_folder(root, max_photo_mb=0.0005)
    assert len(data.manifest) == 2 and any("big.png" in w and "limit" in w for w in data.warnings)
