"""Incremental shards: new manifest rows alone are preprocessed into new shard files beside the untouched old ones."""

from __future__ import annotations

import os

import pytest

from plant_pipeline.ml.data.categories import CategoryMap
from plant_pipeline.ml.shards import build as build_module
from plant_pipeline.ml.shards.build import ShardConfig, build_shards
from plant_pipeline.ml.shards.checks import check_integrity, check_no_leakage
from plant_pipeline.ml.shards.format import read_index
from plant_pipeline_tests.shards.flower_folder import CATEGORIES, EXPECTED_QUARANTINE, read_all, tree_digest

SPLITS = ("train", "validation", "test")


def _build(flowers, model_dir, out, manifest, categories=CATEGORIES, **kwargs):
    root, _ = flowers
    return build_shards(manifest, root, str(model_dir), out, categories=categories, model_name="tiny",
                        config=ShardConfig(num_workers=1, batch_size=3, min_shards=2), **kwargs)


def _held_out(manifest):
    """The manifest without one readable photo per split (the rows to add later), and those rows."""
    readable = manifest[~manifest["path"].isin(list(EXPECTED_QUARANTINE))]
    held = readable.groupby("split").head(1)
    return manifest.drop(held.index), held


def _inodes(out):
    return {str(p.relative_to(out)): os.stat(p).st_ino for p in out.rglob("*.tar")}


@pytest.fixture()
def first(flowers, tiny_model_dir, tmp_path):
    """Shards of the manifest less three photos, and the full manifest."""
    manifest = flowers[1]
    smaller, held = _held_out(manifest)
    out = tmp_path / "out"
    result = _build(flowers, tiny_model_dir, out, smaller)
    assert result.mode == "full" and len(held) == 3
    return out, manifest, held


def test_new_rows_give_new_shards_beside_untouched_old_ones(first, flowers, tiny_model_dir):
    out, manifest, held = first
    before, inodes, old_index = tree_digest(out), _inodes(out), read_index(out)
    result = _build(flowers, tiny_model_dir, out, manifest)
    assert result.mode == "incremental", result.reason
    assert result.new_samples == {split: 1 for split in SPLITS}
    old_files = {s["file"] for e in old_index["splits"].values() for s in e["shards"]}
    assert result.reused_shards == len(old_files)
    after = tree_digest(out)
    assert all(after[file] == before[file] for file in old_files)  # same bytes
    assert all(_inodes(out)[file] == inodes[file] for file in old_files)  # the same files, not rewritten
    index = read_index(out)
    for split in SPLITS:
        files = [s["file"] for s in index["splits"][split]["shards"]]
        assert files[:-1] == [s["file"] for s in old_index["splits"][split]["shards"]] and files[-1] not in old_files
        ids = {s.meta["image_id"] for s in read_all(out, split)}
        old_ids = set(manifest[(manifest["split"] == split)]["image_id"]) - set(held["image_id"])
        assert set(held[held["split"] == split]["image_id"]) <= ids and ids - set(held["image_id"]) <= old_ids
    assert check_integrity(out, manifest).passed and check_no_leakage(out).passed


def test_the_same_manifest_again_rebuilds_nothing(first, flowers, tiny_model_dir):
    out, manifest, held = first
    _build(flowers, tiny_model_dir, out, manifest)
    before = tree_digest(out)
    again = _build(flowers, tiny_model_dir, out, manifest)
    assert again.mode == "unchanged" and again.new_samples == {} and tree_digest(out) == before


@pytest.mark.parametrize("change", ["remove", "question", "rename", "forced"])
def test_anything_but_new_rows_rebuilds_everything(first, flowers, tiny_model_dir, change):
    out, manifest, held = first
    smaller = manifest.drop(held.index)
    categories, kwargs = CATEGORIES, {}
    if change == "remove":
        smaller = smaller.iloc[1:]
    elif change == "question":
        categories = CategoryMap(CATEGORIES.names, question="Which plant grows here?")
    elif change == "rename":
        categories = CategoryMap(("fern", *CATEGORIES.names[1:]), question=CATEGORIES.question)
    else:
        kwargs = {"incremental": False}
    result = _build(flowers, tiny_model_dir, out, smaller, categories=categories, **kwargs)
    assert result.mode == "full" and result.reused_shards == 0 and result.reason
    assert check_integrity(out, smaller).passed


def test_an_interrupted_update_leaves_the_old_index_valid_and_the_next_build_clears_its_files(
        first, flowers, tiny_model_dir, monkeypatch):
    out, manifest, held = first
    smaller = manifest.drop(held.index)
    before = tree_digest(out)

    def fail(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(build_module, "write_index", fail)  # the new shard files are in place, the index is not
        with pytest.raises(KeyboardInterrupt):
            _build(flowers, tiny_model_dir, out, manifest)
    assert tree_digest(out)["index.json"] == before["index.json"]
    assert check_integrity(out, smaller).passed  # the old index and its shards still hold
    result = _build(flowers, tiny_model_dir, out, manifest)
    assert result.mode == "incremental"
    listed = {s["file"] for e in read_index(out)["splits"].values() for s in e["shards"]}
    assert {str(p.relative_to(out)) for p in out.rglob("*.tar")} == listed  # no leftover of the interrupted one
    assert check_integrity(out, manifest).passed


def test_the_same_photos_under_other_paths_and_ids_give_the_same_samples(flowers, tiny_model_dir, tmp_path):
    root, manifest = flowers
    moved = manifest.copy()
    for path in manifest["path"].unique():
        if (root / path).exists():
            target = root / "moved" / path
            target.parent.mkdir(parents=True, exist_ok=True)
            if not target.exists():
                target.write_bytes((root / path).read_bytes())
    moved["path"] = "moved/" + moved["path"]
    moved["image_id"] = moved["image_id"] + 1000
    _build(flowers, tiny_model_dir, tmp_path / "a", manifest)
    _build(flowers, tiny_model_dir, tmp_path / "b", moved)
    for split in SPLITS:
        a = {s.meta["sha256"]: s for s in read_all(tmp_path / "a", split)}
        b = {s.meta["sha256"]: s for s in read_all(tmp_path / "b", split)}
        assert a and a.keys() == b.keys()
        for sha, sample in a.items():
            assert sample.pixels.tobytes() == b[sha].pixels.tobytes()
            assert sample.input_ids.tolist() == b[sha].input_ids.tolist()
