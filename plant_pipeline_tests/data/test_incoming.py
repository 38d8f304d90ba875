"""Photos from users: the intake core, the sensor (build_sensor_context), and a photo's way into the shards."""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from dagster import (
    AssetKey,
    AssetMaterialization,
    SkipReason,
    build_sensor_context,
    instance_for_test,
    materialize,
)
from PIL import Image

from plant_pipeline.defs.assets.flowers import category_map, oxford_flowers
from plant_pipeline.defs.assets.shards import (
    flower_shards,
    shards_integrity,
    shards_no_leakage,
)
from plant_pipeline.defs.assets.user_photos import user_photos
from plant_pipeline.defs.resources import ModelResource, PipelineStorage
from plant_pipeline.defs.sensors import incoming_photos_sensor, new_photos_run_key
from plant_pipeline.ml.data import incoming
from plant_pipeline.ml.data.categories import CATEGORY_NAMES
from plant_pipeline.ml.data.demo_release import make_demo_release
from plant_pipeline.ml.data.incoming import ledger
from plant_pipeline.ml.data.manifest import DatasetFormatError, combine_manifests, read_manifest
from plant_pipeline.ml.shards.format import META, read_index


def _settle(*paths: Path) -> None:
    """Date the files a minute back: written and done with, as the intake waits for files still changing."""
    then = time.time_ns() - 60 * 10**9
    for path in paths:
        os.utime(path, ns=(then, then))


def _photo(path: Path, seed: int, size=(40, 30), format="JPEG") -> bytes:
    """A small random photo at ``path``, written a minute ago; its bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format=format)
    _settle(path)
    return path.read_bytes()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _snapshot(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): _sha(p.read_bytes()) for p in folder.rglob("*") if p.is_file()}


@pytest.fixture
def drop(tmp_path):
    """A data root with a mixed drop: new photos, one photo twice, an unknown category, broken files."""
    inbox = tmp_path / incoming.INCOMING_DIR
    rose = _photo(inbox / "Rose" / "IMG_0001.jpg", 1)
    (inbox / "73" / "same-rose-again.jpg").parent.mkdir(parents=True)
    (inbox / "73" / "same-rose-again.jpg").write_bytes(rose)  # same bytes, another name and folder
    pea = _photo(inbox / "sweet_pea" / "pea.png", 2, format="PNG")
    _photo(inbox / "tulipz" / "tulip.jpg", 3)
    (inbox / "sunflower").mkdir()
    (inbox / "sunflower" / "notes.jpg").write_text("not a photo")
    (inbox / "sunflower" / "half.jpg").write_bytes(pea[: len(pea) // 2])  # a copy cut short
    (inbox / "sunflower" / ".DS_Store").write_bytes(b"\0")
    (inbox / "stray.jpg").write_bytes(rose)  # outside a category folder
    _settle(*(p for p in inbox.rglob("*") if p.is_file()))
    return tmp_path, {"rose": rose, "pea": pea}


# --- categories ------------------------------------------------------------------------------------


@pytest.mark.parametrize("folder, label", [
    ("rose", 73), ("Rose", 73), ("  ROSE ", 73), ("sweet_pea", 3), ("Sweet Pea", 3),
    ("hard_leaved_pocket_orchid", 1), ("Hard-Leaved Pocket Orchid", 1), ("colt's foot", 11),
    ("globe flower", 15), ("0", 0), ("073", 73), ("101", 101),
])
def test_category_label_reads_names_and_0_based_ids(folder, label):
    assert incoming.category_label(folder) == label


@pytest.mark.parametrize("folder, words", [
    ("tulipz", "unknown category 'tulipz'"), ("102", "outside 0..101"), ("-1", "unknown category"),
    ("", "unknown category"), ("rose garden", "unknown category"),
])
def test_unknown_categories_are_refused_with_the_reason(folder, words):
    with pytest.raises(incoming.UnknownCategoryError, match=words):
        incoming.category_label(folder)


def test_tolerant_names_do_not_merge_two_categories():
    # Every name, however its case, spaces, underscores and hyphens are written, still means its own category.
    for label, name in enumerate(CATEGORY_NAMES):
        assert incoming.category_label(name.upper().replace(" ", "_")) == label, name


# --- the core --------------------------------------------------------------------------------------


def test_ingest_copies_each_content_once_and_leaves_every_file_in_place(drop):
    root, data = drop
    before = _snapshot(root / "incoming")
    result = incoming.ingest(root)

    assert _snapshot(root / "incoming") == before, "nothing under incoming/ is moved, changed or deleted"
    added = {p["sha256"]: p for p in result.added}
    assert set(added) == {_sha(data["rose"]), _sha(data["pea"])}
    rose, pea = added[_sha(data["rose"])], added[_sha(data["pea"])]
    assert (rose["label"], rose["name"], pea["label"]) == (73, "rose", 3)
    assert rose["original"] == "incoming/73/same-rose-again.jpg", "sorted order: folder '73' before 'Rose'"
    assert rose["path"] == f"user_photos/{_sha(data['rose'])}.jpg" and pea["path"].endswith(".png")
    assert (root / rose["path"]).read_bytes() == data["rose"] and (root / pea["path"]).read_bytes() == data["pea"]
    assert {p["split"] for p in result.added} == {"train"} and {p["source"] for p in result.added} == {"user"}
    assert sorted(p["image_id"] for p in result.added) == [1_000_001, 1_000_002]

    assert [d.original for d in result.scan.duplicates] == ["incoming/Rose/IMG_0001.jpg"]
    reasons = {s.original: s.reason for s in result.rejected}
    assert set(reasons) == {"incoming/tulipz/tulip.jpg", "incoming/sunflower/notes.jpg",
                            "incoming/sunflower/half.jpg", "incoming/stray.jpg"}
    assert "unknown category 'tulipz'" in reasons["incoming/tulipz/tulip.jpg"]
    assert "not an image" in reasons["incoming/sunflower/notes.jpg"]
    assert "cannot decode" in reasons["incoming/sunflower/half.jpg"]
    assert "not in a category folder" in reasons["incoming/stray.jpg"]

    manifest = read_manifest(result.manifest_path)
    assert sorted(manifest["path"]) == sorted(p["path"] for p in result.added)
    assert set(manifest["split"]) == {"train"} and set(manifest["source"]) == {"user"}


def test_a_second_intake_takes_nothing_twice(drop):
    root, data = drop
    first = incoming.ingest(root)
    manifest_hash = _sha(first.manifest_path.read_bytes())
    (root / "incoming" / "sunflower" / "copy-of-a-copy.jpg").write_bytes(data["rose"])
    _settle(root / "incoming" / "sunflower" / "copy-of-a-copy.jpg")

    again = incoming.ingest(root)
    assert again.added == [] and len(again.photos) == 2
    assert again.scan.known == 2, "the two originals are recognised by path, size and mtime"
    duplicates = {d.original: d.reason for d in again.scan.duplicates}
    assert "taken in on" in duplicates["incoming/sunflower/copy-of-a-copy.jpg"]
    assert _sha(again.manifest_path.read_bytes()) == manifest_hash, "an intake with nothing new changes nothing"

    new = _photo(root / "incoming" / "daffodil" / "d.jpg", 9)
    third = incoming.ingest(root)
    assert [(p["sha256"], p["image_id"], p["label"]) for p in third.added] == [(_sha(new), 1_000_003, 41)]
    assert len(list((root / "user_photos").glob("*.jpg"))) == 2 and len(list((root / "user_photos").glob("*.png"))) == 1


def test_an_interrupted_intake_leaves_the_ledger_and_resumes(drop, monkeypatch):
    root, _ = drop

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed while writing the ledger")

    monkeypatch.setattr(ledger, "atomic_write_json", crash)
    with pytest.raises(KeyboardInterrupt):
        incoming.ingest(root)
    assert incoming.read_ledger(root) == [], "the ledger is written last"
    assert not list((root / "user_photos").glob("*.partial"))
    monkeypatch.undo()

    result = incoming.ingest(root)
    assert len(result.added) == 2 and len(incoming.read_ledger(root)) == 2
    assert len(read_manifest(result.manifest_path)) == 2


def test_split_can_be_chosen_and_is_checked(drop):
    root, _ = drop
    with pytest.raises(incoming.IncomingError, match="split must be one of"):
        incoming.ingest(root, split="holdout")
    assert {p["split"] for p in incoming.ingest(root, split="validation").added} == {"validation"}


def test_user_rows_join_the_release_manifest_without_id_collisions(drop):
    root, _ = drop
    user = read_manifest(incoming.ingest(root).manifest_path)
    release = user.assign(image_id=[1, 2], source="oxford_flowers", path=["a.jpg", "b.jpg"])
    combined = combine_manifests(release, user)
    assert len(combined) == 4 and combined["source"].value_counts().to_dict() == {"oxford_flowers": 2, "user": 2}
    assert len(combine_manifests(release, incoming.read_user_manifest(root / "elsewhere"))) == 2
    with pytest.raises(DatasetFormatError, match="duplicate image_id"):
        combine_manifests(release, release)


# --- the sensor ------------------------------------------------------------------------------------


def _listed(root: Path, *originals: str) -> list[tuple[str, int, int]]:
    """(original, size, mtime_ns) of files under the data root: what a run key is made of."""
    return [(name, (root / name).stat().st_size, (root / name).stat().st_mtime_ns) for name in originals]


def _tick(instance, root: Path, cursor: str | None = None):
    with build_sensor_context(instance=instance, cursor=cursor,
                              resources={"storage": PipelineStorage(data_dir=str(root))}) as context:
        return incoming_photos_sensor(context)


def test_sensor_requests_one_run_per_set_of_new_photos(drop):
    root, data = drop
    with instance_for_test() as instance:
        first = _tick(instance, root)
        [request] = first.run_requests
        # Every file the run must read (the sensor reads none): the photos, their copy, and the broken ones.
        expected = new_photos_run_key(_listed(
            root, "incoming/73/same-rose-again.jpg", "incoming/Rose/IMG_0001.jpg", "incoming/sunflower/half.jpg",
            "incoming/sunflower/notes.jpg", "incoming/sweet_pea/pea.png"))
        assert request.run_key == expected and request.tags["plant_pipeline/new_photos"] == "5"
        assert request.asset_selection == [AssetKey("user_photos")], "no shards yet: take the photos in only"
        [again] = _tick(instance, root, first.cursor).run_requests
        assert again.run_key == expected, "the same photos, ticked again, give the same key"

        instance.report_runless_asset_event(AssetMaterialization(asset_key="flower_shards"))
        _photo(root / "incoming" / "Rose" / "new.jpg", 5)
        [more] = _tick(instance, root, first.cursor).run_requests
        assert more.run_key != expected
        assert more.asset_selection == [AssetKey("user_photos"), AssetKey("flower_shards")]

        incoming.ingest(root)
        done = _tick(instance, root, first.cursor)
    assert done.run_requests == [] or done.run_requests is None
    assert isinstance(done.skip_reason, SkipReason) and "no new photos" in done.skip_reason.skip_message


def test_sensor_skip_names_unknown_categories_and_corrupt_files(tmp_path):
    inbox = tmp_path / "incoming"
    _photo(inbox / "tulipz" / "tulip.jpg", 1)
    (inbox / "rose").mkdir()
    (inbox / "rose" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    _settle(inbox / "rose" / "broken.jpg")
    before = _snapshot(inbox)
    with instance_for_test() as instance:
        assert _tick(instance, tmp_path).run_requests, "the sensor does not decode: the run finds out"
        incoming.ingest(tmp_path)
        result = _tick(instance, tmp_path)
    assert not result.run_requests
    message = result.skip_reason.skip_message
    assert "2 files left in place" in message
    assert "incoming/tulipz/tulip.jpg: unknown category 'tulipz'" in message
    assert "incoming/rose/broken.jpg: cannot decode image" in message
    assert json.loads(result.cursor)["rejected"] == 2
    assert _snapshot(inbox) == before


def test_sensor_with_an_empty_or_missing_inbox_skips(tmp_path):
    with instance_for_test() as instance:
        result = _tick(instance, tmp_path)
    assert not result.run_requests and "no new photos" in result.skip_reason.skip_message


# --- through Dagster -------------------------------------------------------------------------------


def _metadata(result, asset_name: str) -> dict:
    [event] = [e for e in result.get_asset_materialization_events() if e.asset_key == AssetKey(asset_name)]
    return {k: v.value for k, v in event.materialization.metadata.items()}


def _data_version(result, asset_name: str) -> str:
    [event] = [e for e in result.get_asset_materialization_events() if e.asset_key == AssetKey(asset_name)]
    return event.materialization.tags["dagster/data_version"]


def _train_metas(shards_dir: Path) -> dict[str, dict]:
    metas = {}
    for shard in read_index(shards_dir)["splits"]["train"]["shards"]:
        with tarfile.open(shards_dir / shard["file"]) as archive:
            for info in archive:
                if info.name.endswith("." + META):
                    metas[info.name.split(".")[0]] = json.loads(archive.extractfile(info).read())
    return metas


def test_a_user_photo_flows_into_the_manifest_and_the_train_shards(tmp_path, tiny_model_dir):
    release = make_demo_release(tmp_path / "release", train_per_class=1, validation_per_class=1, test_per_class=1,
                                image_size=16)
    root = tmp_path / "data"
    photo = _photo(root / "incoming" / "Rose" / "from-my-garden.jpg", 7)
    (root / "incoming" / "roses").mkdir()
    (root / "incoming" / "roses" / "r.jpg").write_bytes(photo[:100])
    _settle(root / "incoming" / "roses" / "r.jpg")
    storage = PipelineStorage(data_dir=str(root))
    resources = {"storage": storage, "model": ModelResource(model_name=str(tiny_model_dir), local_files_only=True)}
    run_config = {"ops": {"oxford_flowers": {"config": {"local_dir": str(release.out_dir), "md5": {}}},
                          "flower_shards": {"config": {"num_workers": 1, "min_shards": 1}}}}
    assets = [oxford_flowers, category_map, user_photos, flower_shards, shards_integrity, shards_no_leakage]
    result = materialize(assets, resources=resources, run_config=run_config)

    photos = _metadata(result, "user_photos")
    assert (photos["new_photos"], photos["rejected"], photos["num_photos"]) == (1, 1, 1)
    assert "incoming/roses/r.jpg" in str(photos["left_in_place"].records)
    shards = _metadata(result, "flower_shards")
    assert shards["images_by_source"] == {"oxford_flowers": 306, "user": 1}
    assert (shards["samples_train"], shards["samples_test"], shards["quarantined"]) == (103, 102, 0)
    meta = _train_metas(Path(shards["shards_dir"]))["user_image_1000001"]
    assert (meta["source"], meta["split"], meta["label"], meta["name"]) == ("user", "train", 73, "rose")
    assert meta["sha256"] == _sha(photo) and (root / meta["path"]).read_bytes() == photo
    assert all(check.passed for check in result.get_asset_check_evaluations())
    assert (root / "incoming" / "roses" / "r.jpg").is_file()

    # A test photo of the release dropped in (the leak of issue 20): refused, so it never joins the train split.
    test_photo = read_manifest(storage.manifest_path).query("split == 'test'").iloc[0]
    leaked = root / "incoming" / "Rose" / "found-on-my-disk.jpg"
    leaked.write_bytes((root / test_photo["path"]).read_bytes())
    _settle(leaked)
    again = materialize([user_photos], resources={"storage": storage})
    photos = _metadata(again, "user_photos")
    assert (photos["new_photos"], photos["already_in_data"]) == (0, 1)
    assert f"already in the data as image {test_photo['image_id']} (test split" in str(photos["left_in_place"].records)
    assert _data_version(again, "user_photos") == _data_version(result, "user_photos")
