"""The data assets through dagster.materialize, against a local folder and a loopback mirror."""

from __future__ import annotations

import json

import pytest
from dagster import materialize

from plant_pipeline.defs.assets.flowers import category_map, category_map_complete, oxford_flowers
from plant_pipeline.defs.resources import ModelResource, PipelineStorage
from plant_pipeline.ml.data.demo_release import make_demo_release
from plant_pipeline.ml.data.manifest import read_manifest
from plant_pipeline_tests.http_server import LoopbackServer


@pytest.fixture(scope="module")
def small_release(tmp_path_factory):
    return make_demo_release(tmp_path_factory.mktemp("release"), train_per_class=1, validation_per_class=1,
                             test_per_class=1, image_size=32)


def _materialize(tmp_path, config: dict, assets=(oxford_flowers, category_map, category_map_complete)):
    return materialize(
        list(assets),
        resources={"storage": PipelineStorage(data_dir=str(tmp_path)), "model": ModelResource(model_name="unused")},
        run_config={"ops": {"oxford_flowers": {"config": config}}},
        raise_on_error=False,
    )


def _metadata(result, asset_name: str) -> dict:
    [event] = [e for e in result.get_asset_materialization_events() if e.asset_key.path == [asset_name]]
    return {k: v.value for k, v in event.materialization.metadata.items()}


def test_local_folder_source_builds_manifest_and_category_map(tmp_path, small_release):
    result = _materialize(tmp_path, {"local_dir": str(small_release.out_dir), "md5": small_release.md5})
    assert result.success
    meta = _metadata(result, "oxford_flowers")
    assert (meta["images_train"], meta["images_validation"], meta["images_test"]) == (102, 102, 102)
    assert meta["num_classes"] == 102
    manifest = read_manifest(meta["manifest_path"])
    assert (tmp_path / manifest.loc[0, "path"]).is_file(), "manifest paths are relative to the data dir"
    names = json.loads((tmp_path / "category_map.json").read_text())
    assert names["id_to_name"]["0"] == "pink primrose" and names["name_to_id"]["blackberry lily"] == 101
    [check] = result.get_asset_check_evaluations()
    assert check.passed


def test_loopback_mirror_with_its_own_md5sums(tmp_path, small_release):
    with LoopbackServer(small_release.out_dir) as server:
        result = _materialize(tmp_path, {"base_url": server.url, "md5": {}})
        served = {r.path for r in server.requests}
    assert result.success
    assert {"/102flowers.tgz", "/imagelabels.mat", "/setid.mat", "/md5sums"} <= served
    assert _metadata(result, "oxford_flowers")["bytes_downloaded"] > 0


def test_checksum_mismatch_fails_and_nothing_downstream_materialises(tmp_path, small_release):
    wrong = dict(small_release.md5, **{"imagelabels.mat": "0" * 32})
    result = _materialize(tmp_path, {"local_dir": str(small_release.out_dir), "md5": wrong})
    assert not result.success
    assert result.get_asset_materialization_events() == []
    [failure] = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    message = str(failure.event_specific_data.error)
    assert "imagelabels.mat" in message and "0" * 32 in message and small_release.md5["imagelabels.mat"] in message
    assert not list((tmp_path / "oxford_flowers" / "downloads").rglob("imagelabels.mat"))


def test_category_map_check_fails_for_unnamed_labels(tmp_path, small_release):
    assert _materialize(tmp_path, {"local_dir": str(small_release.out_dir), "md5": small_release.md5}).success
    path = tmp_path / "category_map.json"
    mapping = json.loads(path.read_text())
    del mapping["id_to_name"]["101"]  # ids stay 0..N-1 without gaps; the last one loses its name
    path.write_text(json.dumps(mapping))
    check = category_map_complete(storage=PipelineStorage(data_dir=str(tmp_path)))
    assert not check.passed and check.metadata["labels_without_name"].value == [101]
